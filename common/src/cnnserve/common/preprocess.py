"""The one canonical image preprocessing of cnnserve, in numpy.

Training, ``cnnserve evaluate``, export verification and the client SDK all call
:func:`normalize`, so a model sees bit-for-bit the same float32 input wherever it runs.
Only numpy is imported (the client's batch job reuses this module without torch).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cnnserve.common.errors import CnnserveError


def normalize(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Map uint8 images ``[N, C, H, W]`` to float32 ``((x / 255) - mean[c]) / std[c]``.

    Every step is float32 in a fixed order (divide by 255, subtract, divide) so results are
    reproducible across callers. Raises :class:`CnnserveError` if the array is not 4-D uint8,
    or ``mean``/``std`` do not have one entry per channel, or a std is not positive.
    """
    if images.ndim != 4:
        raise CnnserveError(f"images must have shape [N, C, H, W], got {list(images.shape)}")
    if images.dtype != np.uint8:
        raise CnnserveError(f"images must be uint8 (pixel values 0..255), got {images.dtype}")
    channels = images.shape[1]
    if len(mean) != channels or len(std) != channels:
        raise CnnserveError(f"normalisation has {len(mean)} means and {len(std)} stds but the "
                            f"images have {channels} channels")
    mean32 = np.asarray(mean, dtype=np.float32).reshape(1, channels, 1, 1)
    std32 = np.asarray(std, dtype=np.float32).reshape(1, channels, 1, 1)
    if not np.all(std32 > 0):
        raise CnnserveError(f"normalisation std must be positive, got {list(std)}")
    x = images.astype(np.float32) / np.float32(255)
    out: np.ndarray = (x - mean32) / std32
    return out


def channel_stats(images_u8: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Return per-channel ``(mean, std)`` of ``images_u8 / 255`` for uint8 ``[N, C, H, W]``.

    Call it on the training split only, so validation and test data never leak into the
    statistics stored with the model. Computed in float64 from a histogram of pixel values; a
    channel with zero variance gets std 1.0 (dividing by zero would turn pixels into inf/nan).
    """
    if images_u8.ndim != 4 or images_u8.shape[0] == 0 or images_u8.dtype != np.uint8:
        raise CnnserveError(f"need a non-empty uint8 [N, C, H, W] array, got {images_u8.dtype} "
                            f"{list(images_u8.shape)}")
    # A histogram of the 256 pixel values gives exact sums without a float copy of the data.
    values = np.arange(256, dtype=np.float64) / 255.0
    means: list[float] = []
    stds: list[float] = []
    for c in range(images_u8.shape[1]):
        counts = np.bincount(images_u8[:, c].ravel(), minlength=256).astype(np.float64)
        total = counts.sum()
        mean = float((counts * values).sum() / total)
        var = float((counts * (values - mean) ** 2).sum() / total)
        std = var ** 0.5
        means.append(mean)
        stds.append(std if std > 0 else 1.0)
    return tuple(means), tuple(stds)
