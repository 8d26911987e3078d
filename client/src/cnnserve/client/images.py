"""Turn image files (PNG, JPEG, any format Pillow reads) into a model's uint8 input pixels.

:func:`load_image` reads one image, converts it to the model's channel count (1: grayscale,
3: RGB) and resizes it to the model's height and width, giving uint8 ``[C, H, W]``.
Normalisation with the model's own statistics happens in the SDK
(:meth:`InferenceClient.classify <cnnserve.client.sync.InferenceClient.classify>`), so a user
classifies a photo in one line::

    client.classify("fashion", "shoe.jpg", top_k=3)

Conversions: EXIF orientation is applied; transparent pixels are composited over black (the
background of MNIST-style datasets); 16-bit and 32-bit images are scaled to 8 bits; an image
already at the target size and mode is not resampled, so its pixels arrive unchanged.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageOps

from cnnserve.client.errors import ImageError, InvalidInputError
from cnnserve.common.images import DECODE_ERRORS, ImageDecodeError, convert_image

ImageSource = str | Path | bytes | Image.Image
Fit = Literal["stretch", "pad", "crop"]

_DECODE_ERRORS = DECODE_ERRORS


def _open(source: ImageSource) -> tuple[Image.Image, str]:
    if isinstance(source, Image.Image):
        return source, "<PIL image>"
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
            image.load()  # decode now, so a truncated file fails here, not later
    except FileNotFoundError as exc:
        raise ImageError(f"image not found: {name}") from exc
    except _DECODE_ERRORS as exc:
        raise ImageError(f"cannot read image {name}: {exc or type(exc).__name__}") from exc
    return image, name


def _convert(image: Image.Image, channels: int) -> Image.Image:
    """Convert to "L" (channels 1) or "RGB" (channels 3), as the server does."""
    try:
        return convert_image(image, channels)
    except ImageDecodeError as exc:
        raise InvalidInputError(str(exc)) from None


def _resize(image: Image.Image, width: int, height: int, fit: Fit) -> Image.Image:
    if image.size == (width, height):
        return image
    resample = Image.Resampling.BILINEAR
    if fit == "stretch":
        return image.resize((width, height), resample)
    if fit == "crop":
        return ImageOps.fit(image, (width, height), resample)
    if fit == "pad":
        return ImageOps.pad(image, (width, height), resample, color=0)
    raise ValueError(f"fit must be 'stretch', 'pad' or 'crop', got {fit!r}")


def load_image(source: ImageSource, shape: tuple[int, int, int], *,
               fit: Fit = "stretch") -> np.ndarray:
    """Return ``source`` as uint8 pixels ``[C, H, W]`` for a model input of ``shape`` (C, H, W).

    ``source`` is a file path, the encoded bytes, or a PIL image. ``fit`` says how the aspect
    ratio is handled: ``stretch`` (resize to H x W), ``pad`` (letterbox on black) or ``crop``
    (centre crop). Raises :class:`ImageError` if the file is missing, truncated or not an
    image, and :class:`InvalidInputError` if ``shape`` has other than 1 or 3 channels.
    """
    channels, height, width = shape
    image, name = _open(source)
    try:
        image = _resize(_convert(image, channels), width, height, fit)
        pixels = np.asarray(image, dtype=np.uint8)
    except _DECODE_ERRORS as exc:  # a lazily decoded frame can still fail here
        raise ImageError(f"cannot convert image {name}: {exc}") from exc
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1).copy()


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
