"""Image files to a model's uint8 pixels: the one conversion the server and the SDK share.

:func:`convert_image` turns a decoded Pillow image into grayscale ("L", 1 channel) or RGB (3
channels): EXIF orientation applied, transparency composited over black (the background of
MNIST-style datasets), 16/32-bit images scaled to 8 bits. :func:`decode_image` decodes PNG or
JPEG bytes, refusing images over a pixel limit before decoding them (a small file can declare
an enormous image: a decompression bomb), converts them, and resizes them to the model's
height and width with Pillow's BILINEAR filter (stretching; an image already at that size is
not resampled, so its pixels arrive unchanged). Needs Pillow (imported with this module).
"""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cnnserve.common.errors import CnnserveError

#: The largest image (width x height) :func:`decode_image` decodes by default: 16.8 million
#: pixels, 4096 x 4096 (about 50 MB as RGB).
MAX_IMAGE_PIXELS = 4096 * 4096
#: The formats :func:`decode_image` accepts (Pillow names).
FORMATS = ("PNG", "JPEG")
#: The resampling filter of every resize.
RESAMPLE = Image.Resampling.BILINEAR

#: Errors Pillow raises for unreadable, truncated or malformed files.
DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError,
                 struct.error, Image.DecompressionBombError, Image.DecompressionBombWarning)


class ImageDecodeError(CnnserveError):
    """Bytes that are not a PNG/JPEG image, a too-large image, or an unsupported channel count."""


def _to_8bit(image: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer and float images to 8-bit grayscale ("L")."""
    values = np.asarray(image)
    if image.mode.startswith("I;16") or (image.mode == "I" and values.max(initial=0) > 255):
        scaled = np.clip(values.astype(np.float64) / 257.0, 0, 255)
    else:  # "I" that already fits 0..255, or "F" taken as 0..255
        scaled = np.clip(values.astype(np.float64), 0, 255)
    return Image.fromarray(np.rint(scaled).astype(np.uint8), mode="L")


def convert_image(image: Image.Image, channels: int) -> Image.Image:
    """Convert to "L" (``channels`` 1) or "RGB" (3); raises ImageDecodeError for others."""
    image = ImageOps.exif_transpose(image) or image
    if image.mode.startswith("I") or image.mode == "F":
        image = _to_8bit(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    target = {1: "L", 3: "RGB"}.get(channels)
    if target is None:
        raise ImageDecodeError(f"images can be converted to 1 (grayscale) or 3 (RGB) channels, "
                               f"the model wants {channels}")
    return image if image.mode == target else image.convert(target)


def decode_image(data: bytes, shape: tuple[int, int, int], *,
                 max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """PNG or JPEG ``data`` as uint8 pixels ``[C, H, W]`` of ``shape`` (C, H, W).

    Raises ImageDecodeError for bytes that are not a PNG or JPEG image (or are truncated),
    an image of more than ``max_pixels`` pixels (checked from its header, before decoding),
    and a ``shape`` with other than 1 or 3 channels.
    """
    channels, height, width = shape
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data), formats=FORMATS)
            w, h = opened.size
            if w * h > max_pixels:
                raise ImageDecodeError(f"the image is {w}x{h} = {w * h} pixels; at most "
                                       f"{max_pixels} are decoded")
            opened.load()  # decode now, so a truncated file fails here
            image = convert_image(opened, channels)
            if image.size != (width, height):
                image = image.resize((width, height), RESAMPLE)
            pixels = np.asarray(image, dtype=np.uint8)
    except DECODE_ERRORS as exc:
        raise ImageDecodeError(f"not a readable {' or '.join(FORMATS)} image: "
                               f"{exc or type(exc).__name__}") from None
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1).copy()
