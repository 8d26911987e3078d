"""Image helpers: files of any size and mode become the model's uint8 [C, H, W] pixels."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnserve.client.errors import ImageError, InvalidInputError
from cnnserve.client.images import load_image, load_images, to_pixels


def _gradient(width: int, height: int) -> np.ndarray:
    """uint8 [H, W] ramp, so resizing keeps a recognisable left-to-right brightness order."""
    return np.tile(np.linspace(0, 255, width).astype(np.uint8), (height, 1))


@pytest.mark.parametrize(("mode", "suffix"), [
    ("L", ".png"), ("RGB", ".png"), ("RGBA", ".png"), ("P", ".png"), ("I;16", ".png"),
    ("L", ".jpg"), ("RGB", ".jpg"), ("1", ".bmp"), ("CMYK", ".jpg"), ("LA", ".png"),
    ("RGB", ".gif"), ("RGB", ".webp"), ("F", ".tiff"),
])
@pytest.mark.parametrize("channels", [1, 3])
def test_any_mode_and_odd_size_becomes_the_model_input(tmp_path: Path, mode: str, suffix: str,
                                                       channels: int) -> None:
    base = Image.fromarray(_gradient(37, 23)).convert("RGB")
    if mode == "I;16":
        image = Image.fromarray(_gradient(37, 23).astype(np.uint16) * 257)
    elif mode == "F":
        image = Image.fromarray(_gradient(37, 23).astype(np.float32))
    else:
        image = base.convert(mode)
    path = tmp_path / f"img{suffix}"
    image.save(path)

    pixels = load_image(path, (channels, 28, 28))

    assert pixels.shape == (channels, 28, 28) and pixels.dtype == np.uint8
    if mode != "1":  # a bilevel image keeps only black and white
        # the ramp survives conversion and resizing: dark on the left, bright on the right
        assert pixels[:, :, :3].mean() < 60 and pixels[:, :, -3:].mean() > 190, pixels[0, 0]


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert load_image(tmp_path / "deep.png", (1, 1, 3)).tolist() == [[[0, 100, 255]]]


def test_transparent_pixels_become_black(tmp_path: Path) -> None:
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 255, 255, 255)  # opaque white
    rgba[1, 1] = (255, 255, 255, 0)    # fully transparent white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    assert load_image(tmp_path / "alpha.png", (1, 2, 2))[0].tolist() == [[255, 0], [0, 0]]


def test_an_image_of_the_right_size_keeps_its_exact_pixels(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    Image.fromarray(pixels.transpose(1, 2, 0)).save(tmp_path / "exact.png")
    np.testing.assert_array_equal(load_image(tmp_path / "exact.png", (3, 28, 28)), pixels)
    gray = pixels[0]
    Image.fromarray(gray).save(tmp_path / "gray.png")
    np.testing.assert_array_equal(load_image(tmp_path / "gray.png", (1, 28, 28))[0], gray)


def test_rgb_to_grayscale_uses_luminance(tmp_path: Path) -> None:
    Image.new("RGB", (4, 4), (255, 0, 0)).save(tmp_path / "red.png")
    # ITU-R 601-2 luma: L = R * 299/1000 + G * 587/1000 + B * 114/1000
    assert set(load_image(tmp_path / "red.png", (1, 4, 4)).ravel().tolist()) == {76}


@pytest.mark.parametrize("fit", ["stretch", "pad", "crop"])
def test_fit_modes_give_the_target_size(tmp_path: Path, fit: str) -> None:
    Image.new("L", (90, 30), 255).save(tmp_path / "wide.png")
    pixels = load_image(tmp_path / "wide.png", (1, 30, 30), fit=fit)  # type: ignore[arg-type]
    assert pixels.shape == (1, 30, 30)
    if fit == "pad":  # letterboxed: black bars above and below the white band
        assert pixels[0, 0].max() == 0 and pixels[0, 15].min() == 255
    else:
        assert pixels.min() == 255


def test_bytes_and_pil_images_are_accepted() -> None:
    image = Image.new("RGB", (10, 10), (0, 0, 255))
    buf = io.BytesIO()
    image.save(buf, format="JPEG")
    from_bytes = load_image(buf.getvalue(), (3, 5, 5))
    from_pil = load_image(image, (3, 5, 5))
    assert from_bytes.shape == from_pil.shape == (3, 5, 5)
    assert from_pil[2].min() == 255 and from_pil[0].max() == 0


def test_corrupt_truncated_and_missing_files_raise_image_error(tmp_path: Path) -> None:
    (tmp_path / "garbage.png").write_bytes(b"definitely not a PNG file")
    noise = np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8)
    for fmt, suffix in (("PNG", ".png"), ("JPEG", ".jpg")):
        buf = io.BytesIO()
        Image.fromarray(noise).save(buf, format=fmt)
        (tmp_path / f"truncated{suffix}").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
    for name in ("garbage.png", "truncated.png", "truncated.jpg", "missing.png"):
        with pytest.raises(ImageError, match=name):
            load_image(tmp_path / name, (1, 28, 28))


def test_load_images_and_to_pixels_shapes(tmp_path: Path) -> None:
    Image.new("L", (5, 7), 9).save(tmp_path / "a.png")
    batch = load_images([tmp_path / "a.png", tmp_path / "a.png"], (1, 28, 28))
    assert batch.shape == (2, 1, 28, 28)
    assert to_pixels(tmp_path / "a.png", (1, 28, 28)).shape == (1, 1, 28, 28)
    assert to_pixels(str(tmp_path / "a.png"), (3, 8, 8)).shape == (1, 3, 8, 8)
    gray = np.zeros((4, 28, 28), np.uint8)
    assert to_pixels(gray, (1, 28, 28)).shape == (4, 1, 28, 28)
    assert to_pixels(gray[0], (1, 28, 28)).shape == (1, 1, 28, 28)
    assert to_pixels(np.zeros((3, 28, 28), np.uint8), (3, 28, 28)).shape == (1, 3, 28, 28)
    with pytest.raises(InvalidInputError, match="uint8"):
        to_pixels(gray.astype(np.float32), (1, 28, 28))
    with pytest.raises(InvalidInputError, match="1x28x28"):
        to_pixels(np.zeros((2, 27, 28), np.uint8), (1, 28, 28))
    with pytest.raises(InvalidInputError, match="channels"):
        load_image(tmp_path / "a.png", (2, 28, 28))
