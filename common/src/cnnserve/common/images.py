"""Image files (PNG, JPEG, WebP, any format Pillow reads) to a model's uint8 input pixels.

The one implementation shared by training on image folders
(:mod:`cnnserve.common.data.folders`), the client SDK (:mod:`cnnserve.client.images`) and the
batch job, so a photo becomes the same pixels wherever it is read.

Conversions, in order: EXIF orientation is applied; 16-bit and 32-bit images are scaled to
8 bits; palette images are expanded; transparent pixels are composited over black (the
background of MNIST-style datasets); the image is converted to grayscale ("L", ITU-R 601
luma) or RGB; then it is resized with Pillow's **bilinear** filter (which averages over the
whole source footprint when shrinking, so downsizing does not alias). An image already at
the target size and mode is not resampled, so its pixels arrive unchanged.

Pillow is imported inside the functions: importing this module costs nothing.
"""

from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from cnnserve.common.errors import CnnserveError

if TYPE_CHECKING:
    from PIL import Image

Fit = Literal["stretch", "pad", "crop"]
FITS: tuple[str, ...] = ("stretch", "pad", "crop")

#: The largest image (width x height) :func:`decode_image` decodes by default: 16.8 million
#: pixels, 4096 x 4096 (about 50 MB as RGB); larger ones are refused from their header.
MAX_IMAGE_PIXELS = 4096 * 4096
#: The formats :func:`decode_image` (the server's encoded-image inputs) accepts.
FORMATS = ("PNG", "JPEG")


class ImageReadError(CnnserveError):
    """An image that is missing, truncated, not an image, or cannot be converted."""


class ImageShapeError(CnnserveError):
    """A target shape this module cannot produce (other than 1 or 3 channels)."""


def _decode_errors() -> tuple[type[BaseException], ...]:
    """Errors Pillow raises for unreadable, truncated or malformed files."""
    from PIL import Image, UnidentifiedImageError

    return (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error,
            Image.DecompressionBombError, Image.DecompressionBombWarning)


def open_image(source: str | Path | bytes | Image.Image) -> tuple[Image.Image, str]:
    """Open and fully decode ``source`` (path, encoded bytes or PIL image); return it and a name.

    Decoding happens here, so a truncated file fails here. Raises :class:`ImageReadError`
    naming the file.
    """
    from PIL import Image

    if isinstance(source, Image.Image):
        return source, "<PIL image>"
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
            image.load()
    except FileNotFoundError as exc:
        raise ImageReadError(f"image not found: {name}") from exc
    except _decode_errors() as exc:
        raise ImageReadError(f"cannot read image {name}: {exc or type(exc).__name__}") from exc
    return image, name


def _to_8bit(image: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer and float images to 8-bit grayscale ("L")."""
    from PIL import Image

    values = np.asarray(image)
    if image.mode.startswith("I;16") or (image.mode == "I" and values.max(initial=0) > 255):
        scaled = np.clip(values.astype(np.float64) / 257.0, 0, 255)
    else:  # "I" that already fits 0..255, or "F" taken as 0..255
        scaled = np.clip(values.astype(np.float64), 0, 255)
    return Image.fromarray(np.rint(scaled).astype(np.uint8), mode="L")


def convert(image: Image.Image, channels: int) -> Image.Image:
    """``image`` as "L" (``channels`` 1) or "RGB" (3); raises :class:`ImageShapeError` else."""
    from PIL import Image, ImageOps

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
        raise ImageShapeError(f"images can be converted to 1 (grayscale) or 3 (RGB) channels, "
                              f"not {channels}")
    return image if image.mode == target else image.convert(target)


def resize(image: Image.Image, width: int, height: int, fit: Fit = "stretch") -> Image.Image:
    """Resize to ``width`` x ``height`` (bilinear): ``stretch``, ``pad`` (letterbox on black)
    or ``crop`` (centre crop). Raises ValueError for another ``fit``."""
    from PIL import Image, ImageOps

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


def load_image(source: str | Path | bytes | Any, shape: tuple[int, int, int], *,
               fit: Fit = "stretch") -> np.ndarray:
    """Return ``source`` as uint8 pixels ``[C, H, W]`` for a model input of ``shape``.

    ``source`` is a file path, the encoded bytes, or a PIL image. Raises
    :class:`ImageReadError` if the file is missing, truncated or not an image, and
    :class:`ImageShapeError` if ``shape`` has other than 1 or 3 channels.
    """
    channels, height, width = shape
    image, name = open_image(source)
    try:
        image = resize(convert(image, channels), width, height, fit)
        pixels = np.asarray(image, dtype=np.uint8)
    except _decode_errors() as exc:  # a lazily decoded frame can still fail here
        raise ImageReadError(f"cannot convert image {name}: {exc}") from exc
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1).copy()


def decode_image(data: bytes, shape: tuple[int, int, int], *,
                 max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """PNG or JPEG ``data`` as uint8 pixels ``[C, H, W]`` of ``shape``, for untrusted input.

    Like :func:`load_image` (same conversion and filter) but only for :data:`FORMATS`, and an
    image of more than ``max_pixels`` pixels is refused from its header, before decoding (a
    decompression bomb costs nothing). Raises :class:`ImageReadError` for bytes that are not
    such an image, truncated or too large, and :class:`ImageShapeError` for a bad ``shape``.
    """
    from PIL import Image

    channels, height, width = shape
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data), formats=FORMATS)
            w, h = opened.size
            if w * h > max_pixels:
                raise ImageReadError(f"the image is {w}x{h} = {w * h} pixels; at most "
                                     f"{max_pixels} are decoded")
            opened.load()  # decode now, so a truncated file fails here
            pixels = np.asarray(resize(convert(opened, channels), width, height), np.uint8)
    except _decode_errors() as exc:
        raise ImageReadError(f"not a readable {' or '.join(FORMATS)} image: "
                             f"{exc or type(exc).__name__}") from None
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1).copy()


def probe(path: Path) -> tuple[int, int, int]:
    """``(channels, height, width)`` of the image file at ``path`` from its header only.

    Channels are 1 for grayscale modes and 3 for every other (colour, palette, alpha).
    Raises :class:`ImageReadError` when the header cannot be read.
    """
    from PIL import Image

    try:
        with Image.open(path) as image:
            gray = image.mode in ("1", "L", "LA", "La", "I", "F") or image.mode.startswith("I;")
            width, height = image.size
    except _decode_errors() as exc:
        raise ImageReadError(f"cannot read image {path}: {exc or type(exc).__name__}") from exc
    return (1 if gray else 3), height, width
