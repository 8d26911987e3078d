"""Image-folder datasets written by tests: coloured shapes, mixed formats and sizes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

#: class folder -> (fill colour, shape)
CLASSES: dict[str, tuple[tuple[int, int, int], str]] = {
    "circle": ((230, 40, 40), "ellipse"),
    "square": ((40, 220, 60), "rectangle"),
    "triangle": ((50, 80, 240), "polygon"),
}
FORMATS = ("png", "jpg", "webp", "bmp")


def shape_image(label: str, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """One RGB image of class ``label`` at ``size`` (W, H) on a noisy dark background."""
    w, h = size
    noise = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
    image = Image.fromarray(noise, "RGB")
    colour, kind = CLASSES[label]
    draw = ImageDraw.Draw(image)
    side = int(min(w, h) * rng.uniform(0.55, 0.8))
    x0 = int(rng.integers(0, w - side + 1))
    y0 = int(rng.integers(0, h - side + 1))
    if kind == "polygon":
        draw.polygon([(x0, y0 + side), (x0 + side // 2, y0), (x0 + side, y0 + side)], fill=colour)
    else:
        getattr(draw, kind)([x0, y0, x0 + side, y0 + side], fill=colour)
    return image


def write_shapes_folder(root: Path, per_class: int = 30, seed: int = 0) -> dict[str, Path]:
    """Write ``root/<class>/NNN.<fmt>`` for each class: mixed formats and sizes, plus one
    truncated JPEG, one grayscale image and one palette PNG. Returns the special files."""
    rng = np.random.default_rng(seed)
    for label in CLASSES:
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            size = (int(rng.integers(16, 40)), int(rng.integers(16, 40)))
            image = shape_image(label, size, rng)
            fmt = FORMATS[i % len(FORMATS)]
            image.save(root / label / f"{i:03d}.{fmt}")
    special = {"corrupt": root / "circle" / "broken.jpg", "gray": root / "square" / "gray.png",
               "palette": root / "triangle" / "palette.png"}
    shape_image("circle", (24, 24), rng).save(special["corrupt"])
    special["corrupt"].write_bytes(special["corrupt"].read_bytes()[:60])  # truncated
    shape_image("square", (30, 22), rng).convert("L").save(special["gray"])
    shape_image("triangle", (20, 20), rng).convert("P").save(special["palette"])
    return special
