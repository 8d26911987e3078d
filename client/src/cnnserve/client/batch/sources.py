"""Inputs of the batch job: image folders and globs, numpy, Parquet and IDX files, datasets.

:func:`open_source` resolves the job's ``--input`` to a :class:`Source`: stable item ids in a
deterministic order (sorted relative paths, or array indices), the true class indices when
known, and a loader that turns a list of item positions into the model's input tensor.
An image that cannot be read fails only its own item; everything else about the input is
checked up front and raises :class:`CnnserveError` with what was expected.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnserve.client._codec import numpy_dtype
from cnnserve.client._infer import preprocess
from cnnserve.client._model import ModelInfo
from cnnserve.client.errors import ImageError
from cnnserve.common.errors import CnnserveError

#: Keys tried, in order, for the images and labels of an ``.npz`` file.
NPZ_IMAGE_KEYS = ("images", "x", "x_test", "X", "data", "inputs")
NPZ_LABEL_KEYS = ("labels", "y", "y_test", "Y", "targets")
#: Columns tried, in order, for the images of a Parquet file (encoded bytes or uint8 pixels).
PARQUET_IMAGE_COLUMNS = ("image", "images", "bytes", "pixels")
_IDX_NAME = re.compile(r"(idx\d?|ubyte)(\.gz)?$|\.idx\d?(\.gz)?$", re.IGNORECASE)


@dataclass
class Loaded:
    """The model input for the items that loaded, and the errors of those that did not."""

    inputs: np.ndarray
    #: Positions (into the requested list) of the rows of ``inputs``.
    ok: list[int]
    #: Position -> error message, for items that could not be loaded.
    errors: dict[int, str]


class Source:
    """Items to classify: ``ids`` in output order and optional true class ``labels``."""

    ids: list[str]
    labels: np.ndarray | None

    def load(self, items: Sequence[int], info: ModelInfo) -> Loaded:
        """Return the preprocessed model input for items ``items`` (indices into ``ids``)."""
        raise NotImplementedError


class ArraySource(Source):
    """An in-memory array: uint8 pixels (normalised here) or float model inputs (sent as is)."""

    def __init__(self, array: np.ndarray, labels: np.ndarray | None, info: ModelInfo,
                 what: str) -> None:
        self.array = _to_nchw(array, info, what)
        self.ids = [str(i) for i in range(len(self.array))]
        self.labels = _check_labels(labels, len(self.array), what)

    def load(self, items: Sequence[int], info: ModelInfo) -> Loaded:
        rows = self.array[np.asarray(items, dtype=np.int64)]
        inputs = preprocess(info, rows) if rows.dtype == np.uint8 else rows
        return Loaded(inputs, list(range(len(items))), {})


class FileSource(Source):
    """Image files, read with Pillow when their batch is loaded."""

    def __init__(self, paths: list[Path], root: Path, info: ModelInfo) -> None:
        self.paths = paths
        self.ids = [p.relative_to(root).as_posix() if p.is_relative_to(root) else p.as_posix()
                    for p in paths]
        self.labels = _folder_labels(self.ids, info)

    def load(self, items: Sequence[int], info: ModelInfo) -> Loaded:
        from cnnserve.client.images import load_image  # Pillow only for image inputs

        shape = info.image_shape
        pixels = np.empty((len(items), *shape), dtype=np.uint8)
        ok: list[int] = []
        errors: dict[int, str] = {}
        for pos, item in enumerate(items):
            try:
                pixels[len(ok)] = load_image(self.paths[item], shape)
            except ImageError as exc:
                errors[pos] = str(exc)
                continue
            ok.append(pos)
        return Loaded(preprocess(info, pixels[:len(ok)]) if ok else pixels[:0], ok, errors)


class ParquetSource(Source):
    """A Parquet file: an image column (encoded image bytes, or C*H*W uint8 pixel lists),
    and optional ``label`` (class index) and ``id`` columns; ids default to row numbers."""

    def __init__(self, path: Path, info: ModelInfo) -> None:
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise CnnserveError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow, "
                                "or the batch-ray extra)") from exc
        table = pq.read_table(path)
        names = table.column_names
        column = next((c for c in PARQUET_IMAGE_COLUMNS if c in names), None)
        if column is None:
            raise CnnserveError(f"{path}: no image column among {names}; name it one of "
                                f"{list(PARQUET_IMAGE_COLUMNS)}")
        self.images: list[object] = table.column(column).to_pylist()
        self.ids = ([str(v) for v in table.column("id").to_pylist()] if "id" in names
                    else [str(i) for i in range(len(self.images))])
        labels = table.column("label").to_numpy() if "label" in names else None
        self.labels = _check_labels(labels, len(self.images), str(path))

    def load(self, items: Sequence[int], info: ModelInfo) -> Loaded:
        from cnnserve.client.images import load_image

        shape = info.image_shape
        pixels = np.empty((len(items), *shape), dtype=np.uint8)
        ok: list[int] = []
        errors: dict[int, str] = {}
        for pos, item in enumerate(items):
            value = self.images[item]
            try:
                if isinstance(value, bytes):
                    pixels[len(ok)] = load_image(value, shape)
                else:
                    pixels[len(ok)] = np.asarray(value, dtype=np.uint8).reshape(shape)
            except (ImageError, ValueError, TypeError) as exc:
                errors[pos] = f"row {item}: {exc}"
                continue
            ok.append(pos)
        return Loaded(preprocess(info, pixels[:len(ok)]) if ok else pixels[:0], ok, errors)


def _to_nchw(array: np.ndarray, info: ModelInfo, what: str) -> np.ndarray:
    """Accept [N, C, H, W], [N, H, W, C] or (grayscale) [N, H, W]; return [N, C, H, W]."""
    c, h, w = info.image_shape
    shape = tuple(array.shape)
    if array.dtype != np.uint8 and array.dtype.kind != "f":
        raise CnnserveError(f"{what}: expected uint8 pixels or float model inputs, got "
                            f"{array.dtype}")
    if array.ndim == 4 and shape[1:] == (c, h, w):
        out = array
    elif array.ndim == 4 and shape[1:] == (h, w, c):
        out = array.transpose(0, 3, 1, 2)
    elif array.ndim == 3 and c == 1 and shape[1:] == (h, w):
        out = array[:, None]
    else:
        raise CnnserveError(f"{what}: array of shape {list(shape)} does not fit model "
                            f"'{info.name}' input {c}x{h}x{w}; expected [N, {c}, {h}, {w}], "
                            f"[N, {h}, {w}, {c}]" + (f" or [N, {h}, {w}]" if c == 1 else ""))
    if out.dtype.kind == "f":
        if info.image_input.datatype == "UINT8":
            raise CnnserveError(f"{what}: model '{info.name}' takes uint8 pixels (it normalises "
                                f"them itself), got {out.dtype} model inputs; pass the pixels")
        out = out.astype(numpy_dtype(info.image_input.datatype), copy=False)
    return np.ascontiguousarray(out)


def _check_labels(labels: np.ndarray | None, n: int, what: str) -> np.ndarray | None:
    if labels is None:
        return None
    labels = np.asarray(labels).reshape(-1)
    if labels.shape != (n,) or labels.dtype.kind not in "iu":
        raise CnnserveError(f"{what}: labels must be {n} integers, got {labels.dtype} "
                            f"{list(labels.shape)}")
    return labels.astype(np.int64)


def _folder_labels(ids: list[str], info: ModelInfo) -> np.ndarray | None:
    """True classes from ImageFolder layout (``<label>/<file>``) when every folder is a label."""
    if not info.labels or not ids:
        return None
    index = {label: i for i, label in enumerate(info.labels)}
    tops = [i.split("/")[0] if "/" in i else None for i in ids]
    if any(t not in index for t in tops):
        return None
    return np.array([index[t] for t in tops if t is not None], dtype=np.int64)


def _image_files(folder: Path) -> list[Path]:
    from PIL import Image

    suffixes = {s.lower() for s in Image.registered_extensions()}
    return sorted((p for p in folder.rglob("*")
                   if p.is_file() and p.suffix.lower() in suffixes
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts)),
                  key=lambda p: p.relative_to(folder).as_posix())


def _has_magic(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def _glob(pattern: str) -> tuple[Path, list[Path]]:
    """The fixed folder before the first wildcard, and the files matching ``pattern``."""
    parts = Path(pattern).expanduser().parts
    cut = next(i for i, p in enumerate(parts) if _has_magic(p))
    root = Path(*parts[:cut]) if cut else Path()
    files = [p for p in root.glob(str(Path(*parts[cut:]))) if p.is_file()]
    return root, sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _npz(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    with np.load(path, allow_pickle=False) as data:
        keys = list(data.keys())
        image_key = next((k for k in NPZ_IMAGE_KEYS if k in data), None)
        if image_key is None and len(keys) == 1:
            image_key = keys[0]
        if image_key is None:
            raise CnnserveError(f"{path}: cannot tell which array holds the images among "
                                f"{keys}; name it one of {list(NPZ_IMAGE_KEYS)}")
        label_key = next((k for k in NPZ_LABEL_KEYS if k in data), None)
        return data[image_key], None if label_key is None else data[label_key]


def _idx(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    from cnnserve.common.data.idx import read_idx

    images = read_idx(path)
    sibling = path.with_name(path.name.replace("images", "labels").replace("idx3", "idx1"))
    labels = read_idx(sibling) if sibling != path and sibling.is_file() else None
    return images, labels


def _dataset(spec: str, info: ModelInfo) -> Source:
    from cnnserve.common.data.datasets import SPLITS, load_split

    name, _, split = spec.rpartition(":")
    if split not in SPLITS:
        name, split = spec, "test"
    data = load_split(name, split)
    return ArraySource(data.images, data.labels, info, f"dataset {name}:{split}")


def open_source(spec: str, info: ModelInfo) -> Source:
    """Resolve ``--input``: a folder, glob, image, .npy/.npz, IDX file or ``dataset:split``.

    Raises :class:`CnnserveError` for an input that does not exist, matches no image, or
    holds arrays that do not fit the model's input ``info.image_shape``.
    """
    info.image_input  # noqa: B018 -- raises early for a model that does not take images
    path = Path(spec).expanduser()
    if path.is_dir():
        files = _image_files(path)
        if not files:
            raise CnnserveError(f"folder {path} holds no image files")
        return FileSource(files, path, info)
    if path.is_file():
        try:
            if path.suffix.lower() == ".npy":
                return ArraySource(np.load(path, allow_pickle=False), None, info, str(path))
            if path.suffix.lower() == ".npz":
                return ArraySource(*_npz(path), info, str(path))
            if path.suffix.lower() == ".parquet":
                return ParquetSource(path, info)
        except (OSError, ValueError) as exc:
            raise CnnserveError(f"cannot read {path}: {exc}") from exc
        if _IDX_NAME.search(path.name):
            return ArraySource(*_idx(path), info, str(path))
        return FileSource([path], path.parent, info)
    if _has_magic(spec):
        root, files = _glob(spec)
        if not files:
            raise CnnserveError(f"pattern {spec!r} matches no files")
        return FileSource(files, root, info)
    from cnnserve.common.data.datasets import DATASET_NAMES

    if ":" in spec or spec in DATASET_NAMES:
        return _dataset(spec, info)
    raise CnnserveError(f"input {spec!r} is not a folder, file, glob pattern or dataset name "
                        "such as fashion-mnist:test")
