"""Turn image files (PNG, JPEG, any format Pillow reads) into a model's uint8 input pixels.

:func:`load_image` reads one image, converts it to the model's channel count (1: grayscale,
3: RGB) and resizes it to the model's height and width, giving uint8 ``[C, H, W]``.
Normalisation with the model's own statistics happens in the SDK
(:meth:`InferenceClient.classify <cnnserve.client.sync.InferenceClient.classify>`), so a user
classifies a photo in one line::

    client.classify("fashion", "shoe.jpg", top_k=3)

The conversion is :mod:`cnnserve.common.images`, the one implementation training on image
folders uses too: EXIF orientation is applied; transparent pixels are composited over black
(the background of MNIST-style datasets); 16-bit and 32-bit images are scaled to 8 bits; the
resize is bilinear; an image already at the target size and mode is not resampled, so its
pixels arrive unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cnnserve.client.errors import ImageError, InvalidInputError
from cnnserve.common import images as common_images
from cnnserve.common.images import Fit

__all__ = ["Fit", "ImageSource", "load_image", "load_images", "to_pixels"]

ImageSource = str | Path | bytes | Image.Image


def load_image(source: ImageSource, shape: tuple[int, int, int], *,
               fit: Fit = "stretch") -> np.ndarray:
    """Return ``source`` as uint8 pixels ``[C, H, W]`` for a model input of ``shape`` (C, H, W).

    ``source`` is a file path, the encoded bytes, or a PIL image. ``fit`` says how the aspect
    ratio is handled: ``stretch`` (resize to H x W), ``pad`` (letterbox on black) or ``crop``
    (centre crop). Raises :class:`ImageError` if the file is missing, truncated or not an
    image, and :class:`InvalidInputError` if ``shape`` has other than 1 or 3 channels.
    """
    try:
        return common_images.load_image(source, shape, fit=fit)
    except common_images.ImageReadError as exc:
        raise ImageError(str(exc)) from exc
    except common_images.ImageShapeError as exc:
        raise InvalidInputError(f"{exc}: the model wants {shape[0]}") from exc


def load_images(sources: Sequence[ImageSource], shape: tuple[int, int, int], *,
                fit: Fit = "stretch") -> np.ndarray:
    """Load several images into uint8 ``[N, C, H, W]``; the first unreadable one raises."""
    out = np.empty((len(sources), *shape), dtype=np.uint8)
    for i, source in enumerate(sources):
        out[i] = load_image(source, shape, fit=fit)
    return out


def to_pixels(images: Any, shape: tuple[int, int, int]) -> np.ndarray:
    """Accept what ``classify`` accepts and return uint8 ``[N, C, H, W]`` of ``shape``.

    One source or a list of sources (path, bytes, PIL image) are loaded with
    :func:`load_image`. A numpy array must be uint8 pixels of the model's size: ``[N, C, H, W]``,
    ``[C, H, W]`` (one image), or ``[N, H, W]`` / ``[H, W]`` for a grayscale model.
    """
    if isinstance(images, str | Path | bytes | Image.Image):
        return load_images([images], shape)
    if not isinstance(images, np.ndarray):
        return load_images(list(images), shape)
    if images.dtype != np.uint8:
        raise InvalidInputError(f"classify takes uint8 pixels (0..255), got {images.dtype}; "
                                "for preprocessed tensors call infer()")
    c, h, w = shape
    if images.shape[-2:] != (h, w):
        raise InvalidInputError(f"pixels of shape {list(images.shape)} do not match the "
                                f"model's input {c}x{h}x{w}; resize them, or pass the images "
                                "as files or PIL images to have them resized")
    if images.ndim == 4 and images.shape[1] == c:
        return images
    if images.ndim == 3 and images.shape[0] == c:
        return images[None]
    if c == 1 and images.ndim in (2, 3):
        return images.reshape(-1, 1, h, w)
    raise InvalidInputError(f"pixels of shape {list(images.shape)} do not match the model's "
                            f"input {c}x{h}x{w}; expected [N, {c}, {h}, {w}] or [{c}, {h}, {w}]")
