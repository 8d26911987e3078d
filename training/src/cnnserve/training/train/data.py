"""Turning uint8 image arrays into normalised tensors, batch augmentation and inference.

The normalisation is always :func:`cnnserve.common.preprocess.normalize`, the same numpy function
the export check and the client SDK use, so every consumer feeds the model identical floats.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from cnnserve.common.preprocess import normalize


def to_tensor(images_u8: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...],
              chunk: int = 8192) -> torch.Tensor:
    """Normalise uint8 images with :func:`cnnserve.common.preprocess.normalize` into one tensor.

    Done in chunks so the peak memory is one float32 copy of the data, not several.
    """
    out = np.empty(images_u8.shape, dtype=np.float32)
    for start in range(0, len(images_u8), chunk):
        out[start:start + chunk] = normalize(images_u8[start:start + chunk], mean, std)
    return torch.from_numpy(out)


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Logits ``[N, classes]`` of ``model`` in eval mode for normalised inputs ``x``."""
    model.eval()
    parts = [model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
    return torch.cat(parts) if parts else torch.empty(0)


def augment_batch(x: torch.Tensor, background: torch.Tensor, flip: bool,
                  generator: torch.Generator, shift: int = 2, *, jitter: float = 0.0,
                  stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Shift each image by up to ``shift`` px (a random crop of the image padded with
    ``background`` per channel) and, if ``flip``, mirror half of them left-right; with
    ``jitter`` > 0 and ``stats`` (per-channel mean, std of the normalisation), scale each
    image's brightness and contrast by factors in [1-jitter, 1+jitter]. ``x`` is normalised
    ``[B, C, H, W]``; every random draw comes from ``generator``, so a seed repeats a run."""
    b, c, h, w = x.shape
    padded = background.view(1, c, 1, 1).expand(b, c, h + 2 * shift, w + 2 * shift).clone()
    padded[:, :, shift:shift + h, shift:shift + w] = x
    dy = torch.randint(0, 2 * shift + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * shift + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    out = padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None],
                 rows, cols]
    if flip:
        mirror = torch.rand(b, generator=generator) < 0.5
        out[mirror] = out[mirror].flip(-1)
    if jitter > 0 and stats is not None:
        out = _jitter(out, jitter, stats, generator)
    return out


def _jitter(x: torch.Tensor, amount: float, stats: tuple[torch.Tensor, torch.Tensor],
            generator: torch.Generator) -> torch.Tensor:
    """Brightness and contrast jitter in pixel space (0..1), then normalised again."""
    b, c = x.shape[:2]
    mean, std = (s.view(1, c, 1, 1) for s in stats)
    pixels = x * std + mean
    factors = 1 + (torch.rand(2, b, 1, 1, 1, generator=generator) * 2 - 1) * amount
    grey = pixels.mean(dim=(1, 2, 3), keepdim=True)
    pixels = ((pixels - grey) * factors[1] + grey) * factors[0]
    out: torch.Tensor = (pixels.clamp(0, 1) - mean) / std
    return out
