"""``folder:DIR``: a dataset made of image files, one sub-folder per class.

Layout (folder names are the labels, sorted; files at any depth below a class folder; any
image Pillow reads: PNG, JPEG, WebP, BMP, GIF..., grayscale/RGB/RGBA/palette, any size)::

    DIR/                     or   DIR/train/cat/...  DIR/test/cat/...
      cat/001.jpg                 DIR/train/dog/...  DIR/test/dog/...
      cat/002.png
      dog/a.webp

Without ``DIR/train`` and ``DIR/test``, a stratified split with a fixed seed (0) keeps
:data:`TEST_FRACTION` of each class as the test set, the same on every run and machine.

Every image is converted and resized by :func:`cnnserve.common.images.load_image` (the code
the client SDK and the batch job use) to one shape ``CxHxW``. That shape is part of the
canonical name, ``folder:CxHxW:/abs/DIR``, which the trainer records in the checkpoint, so
evaluation and export verification read the same pixels. Decoded pixels are cached on disk
under ``~/.cache/cnnserve/decoded/CxHxW/``, keyed by the file's sha256 and size, so a large
folder is read one file at a time and decoded once; only the uint8 array is kept in memory.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnserve.common.data.datasets import ImageSet
from cnnserve.common.data.registry import DatasetError, LoadOptions
from cnnserve.common.data.sources import RawDataset, cache_dir
from cnnserve.common.images import ImageReadError, load_image, probe

log = logging.getLogger(__name__)

#: Share of each class kept for the test split when DIR has no train/test folders.
TEST_FRACTION = 0.2
SPLIT_SEED = 0
_SHAPED = re.compile(r"^(\d+)x(\d+)x(\d+):(.+)$", re.DOTALL)


@dataclass(frozen=True)
class FolderLayout:
    """The files of a folder dataset: ``(path, label)`` per split, and how it was split."""

    root: Path
    class_names: tuple[str, ...]
    train: tuple[tuple[Path, int], ...]
    test: tuple[tuple[Path, int], ...]
    split: str


def parse_argument(argument: str) -> tuple[tuple[int, int, int] | None, Path]:
    """``CxHxW:DIR`` or ``DIR`` -> (shape or None, folder)."""
    m = _SHAPED.match(argument)
    if m is None:
        return None, Path(argument).expanduser()
    return (int(m[1]), int(m[2]), int(m[3])), Path(m[4]).expanduser()


def canonical_argument(argument: str, image_size: tuple[int, int] | None,
                       channels: int | None) -> str:
    """``CxHxW:/abs/DIR``: the shape from the flags, else from the argument, else the data.

    From the data: 3 channels if any image has colour, else 1; the median height and width
    of the training images (their size, when they all have one). Raises
    :class:`DatasetError` for a bad layout.
    """
    shape, folder = parse_argument(argument)
    layout = scan(folder)
    if shape is None or image_size is None or channels is None:
        found = _shape_of_data(layout) if shape is None else shape
        c = channels if channels is not None else found[0]
        h, w = image_size if image_size is not None else found[1:]
        shape = (c, h, w)
    if shape[0] not in (1, 3) or min(shape[1:]) < 1 or shape[1] * shape[2] > 4096 * 4096:
        raise DatasetError(f"folder images can be read as 1 or 3 channels of at least 1x1 "
                           f"pixels, not {'x'.join(map(str, shape))}")
    return f"{shape[0]}x{shape[1]}x{shape[2]}:{layout.root}"


def _shape_of_data(layout: FolderLayout) -> tuple[int, int, int]:
    channels, heights, widths = 1, [], []
    for path, _ in layout.train:
        try:
            c, h, w = probe(path)
        except ImageReadError:
            continue  # reported (or fatal) when the pixels are read
        channels = max(channels, c)
        heights.append(h)
        widths.append(w)
    if not heights:
        raise DatasetError(f"no readable image in {layout.root}")
    return channels, int(np.median(heights)), int(np.median(widths))


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _classes(folder: Path) -> dict[str, list[Path]]:
    classes = {d.name: _files(d) for d in sorted(folder.iterdir())
               if d.is_dir() and not d.name.startswith(".")}
    for name, files in classes.items():
        if not files:
            raise DatasetError(f"class folder {folder / name} is empty; every class needs at "
                               "least one image (remove the folder or add images)")
    if len(classes) < 2:
        found = f"only '{next(iter(classes))}'" if classes else "none"
        raise DatasetError(f"{folder} must hold one sub-folder of images per class, at least "
                           f"two; found {found}")
    return classes


def scan(folder: Path) -> FolderLayout:
    """List the class folders and files of ``folder`` and split them; no image is read.

    Raises :class:`DatasetError` for a missing folder, fewer than two classes, an empty class
    folder, or a test class that has no training folder.
    """
    root = folder.expanduser().resolve()
    if not root.is_dir():
        raise DatasetError(f"image folder not found: {root}")
    if (root / "train").is_dir() and (root / "test").is_dir():
        train, test = _classes(root / "train"), _classes(root / "test")
        names = tuple(train)
        if extra := sorted(set(test) - set(train)):
            raise DatasetError(f"{root / 'test'} has class folders with no training folder in "
                               f"{root / 'train'}: {', '.join(extra)}")
        return FolderLayout(root, names, _label(train, names), _label(test, names),
                            "the train/ and test/ folders")
    classes = _classes(root)
    names = tuple(classes)
    rng = np.random.default_rng(SPLIT_SEED)
    train_items: list[tuple[Path, int]] = []
    test_items: list[tuple[Path, int]] = []
    for label, files in enumerate(classes.values()):
        n_test = min(len(files) - 1, max(1, round(len(files) * TEST_FRACTION)))
        picked = set(rng.permutation(len(files))[:n_test].tolist())
        for i, path in enumerate(files):
            (test_items if i in picked else train_items).append((path, label))
    return FolderLayout(root, names, tuple(train_items), tuple(test_items),
                        f"stratified: {TEST_FRACTION:.0%} of each class for test, seed "
                        f"{SPLIT_SEED}")


def _label(classes: dict[str, list[Path]], names: tuple[str, ...]) -> tuple[tuple[Path, int], ...]:
    return tuple((path, names.index(name)) for name, files in classes.items() for path in files)


def load_folder(argument: str, options: LoadOptions) -> RawDataset:
    """The folder dataset ``CxHxW:DIR`` (or ``DIR``, shape from the data) as pixel arrays.

    Unreadable or truncated files are logged by path and left out, or, with
    ``options.on_bad_image == "fail"``, raise :class:`DatasetError` naming the file.
    """
    shape, folder = parse_argument(argument)
    layout = scan(folder)
    if shape is None:
        shape = _shape_of_data(layout)
    train = _decode(layout.train, shape, options.on_bad_image, "train")
    test = _decode(layout.test, shape, options.on_bad_image, "test")
    return RawDataset(class_names=layout.class_names, train=train, test=test,
                      info={"root": str(layout.root), "split": layout.split,
                            "train_files": len(layout.train), "test_files": len(layout.test)})


def _decode(items: tuple[tuple[Path, int], ...], shape: tuple[int, int, int],
            on_bad_image: str, split: str) -> ImageSet:
    images = np.empty((len(items), *shape), dtype=np.uint8)
    labels = np.array([label for _, label in items], dtype=np.int64)
    keep = np.ones(len(items), dtype=bool)
    cache = cache_dir() / "decoded" / "x".join(map(str, shape))
    for i, (path, _) in enumerate(items):
        try:
            images[i] = _cached(path, shape, cache)
        except ImageReadError as exc:
            if on_bad_image == "fail":
                raise DatasetError(f"{exc} (--on-bad-image skip leaves such files out)") from exc
            log.warning("skipping a bad image in the %s split: %s", split, exc)
            keep[i] = False
    if not keep.any():
        raise DatasetError(f"no readable image in the {split} split ({len(items)} files)")
    return ImageSet(images[keep], labels[keep])


def _cached(path: Path, shape: tuple[int, int, int], cache: Path) -> np.ndarray:
    """Decoded pixels of ``path``, from the cache when its content was decoded before."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageReadError(f"cannot read image {path}: {exc.strerror}") from exc
    key = f"{hashlib.sha256(data).hexdigest()}-{len(data)}"
    entry = cache / key[:2] / f"{key}.u8"
    size = shape[0] * shape[1] * shape[2]
    try:
        cached = np.fromfile(entry, dtype=np.uint8)
        if cached.size == size:
            return cached.reshape(shape)
    except OSError:
        pass
    pixels = load_image(path, shape)
    try:  # a cache that cannot be written only costs speed
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=entry.parent, prefix=".", suffix=".part")
        with os.fdopen(fd, "wb") as fh:
            fh.write(pixels.tobytes())
        Path(tmp).replace(entry)
    except OSError as exc:
        log.debug("cannot cache decoded pixels of %s: %s", path, exc)
    return pixels
