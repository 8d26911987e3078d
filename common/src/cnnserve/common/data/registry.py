"""The dataset names ``--dataset`` accepts: one :class:`DatasetEntry` per dataset.

Adding a dataset is adding one entry to :data:`DATASETS`: its name, how it is written on a
command line, one line of help and a loader. The help texts of ``cnnserve train``,
``evaluate``, ``export`` and the batch job are generated from the entries, and so is the
"unknown dataset" message. Standard library only at import time (the CLIs describe their
flags without numpy); the loaders import :mod:`cnnserve.common.data.sources` when called.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from cnnserve.common.errors import CnnserveError

if TYPE_CHECKING:
    from cnnserve.common.data.sources import RawDataset

#: Splits every dataset has: train and val are carved from the official training split.
SPLITS = ("train", "val", "test")

BadImagePolicy = Literal["skip", "fail"]


@dataclass(frozen=True)
class LoadOptions:
    """How a dataset is loaded: may it download; what an unreadable image file does."""

    download: bool = False
    on_bad_image: BadImagePolicy = "skip"


#: A loader gets the text after ``NAME:`` ("" when absent) and the load options.
Loader = Callable[[str, LoadOptions], "RawDataset"]
#: Turns the text after ``NAME:`` into the canonical one, given --image-size and --channels.
Canonical = Callable[[str, "tuple[int, int] | None", "int | None"], str]


class DatasetError(CnnserveError):
    """A dataset that is unknown, missing, corrupt or fails its checksum."""


@dataclass(frozen=True)
class DatasetEntry:
    """One dataset name.

    ``usage`` is how it is written (``synthetic[:CxHxW]``, ``idx:DIR``); ``argument`` says
    whether the text after ``NAME:`` is ``"none"``, ``"optional"`` or ``"required"``.
    """

    name: str
    loader: Loader
    help: str
    usage: str = ""
    argument: str = "none"
    #: For datasets whose image shape is chosen (folders): the canonical argument.
    canonical: Canonical | None = None

    @property
    def shown(self) -> str:
        """The usage text, or the bare name."""
        return self.usage or self.name


def _fashion_mnist(_: str, options: LoadOptions) -> RawDataset:
    from cnnserve.common.data import sources
    return sources.load_fashion_mnist(download=options.download)


def _mnist(_: str, options: LoadOptions) -> RawDataset:
    from cnnserve.common.data import sources
    return sources.load_mnist(download=options.download)


def _digits(_: str, options: LoadOptions) -> RawDataset:
    from cnnserve.common.data import sources
    return sources.load_digits()


def _synthetic(shape: str, options: LoadOptions) -> RawDataset:
    from cnnserve.common.data import sources
    return sources.load_synthetic(shape)


def _idx(folder: str, options: LoadOptions) -> RawDataset:
    from cnnserve.common.data import sources
    return sources.load_idx_folder(Path(folder).expanduser())


def _cifar10(folder: str, options: LoadOptions) -> RawDataset:
    from cnnserve.common.data import cifar
    return cifar.load_cifar10(folder, download=options.download)


def _folder(argument: str, options: LoadOptions) -> RawDataset:
    from cnnserve.common.data import folders
    return folders.load_folder(argument, options)


def _folder_canonical(argument: str, image_size: tuple[int, int] | None,
                      channels: int | None) -> str:
    from cnnserve.common.data import folders
    return folders.canonical_argument(argument, image_size, channels)


DATASETS: tuple[DatasetEntry, ...] = (
    DatasetEntry("fashion-mnist", _fashion_mnist,
                 "Zalando's 70k 28x28 grayscale clothes, 10 classes"),
    DatasetEntry("mnist", _mnist, "the 70k 28x28 grayscale handwritten digits"),
    DatasetEntry("digits", _digits, "scikit-learn's 1797 8x8 digits, for quick runs"),
    DatasetEntry("cifar10", _cifar10,
                 "CIFAR-10's official binary release, 60k 32x32 RGB images, 10 classes, from "
                 "DIR (default ~/.cache/cnnserve/cifar10) or fetched by --download, "
                 "md5-checked", usage="cifar10[:DIR]", argument="optional"),
    DatasetEntry("folder", _folder,
                 "your own images, one sub-folder per class (optional DIR/train and DIR/test); "
                 "see --image-size and --channels", usage="folder:DIR", argument="required",
                 canonical=_folder_canonical),
    DatasetEntry("synthetic", _synthetic,
                 "generated class patterns of any shape (default 1x28x28), for tests",
                 usage="synthetic[:CxHxW]", argument="optional"),
    DatasetEntry("idx", _idx, "a folder of train-/t10k- images and labels IDX files",
                 usage="idx:DIR", argument="required"),
)


def entries() -> tuple[DatasetEntry, ...]:
    """Every registered dataset, in the order help texts list them."""
    return DATASETS


def plain_names() -> tuple[str, ...]:
    """Names usable without an argument (``fashion-mnist``, ``synthetic``, ...)."""
    return tuple(e.name for e in DATASETS if e.argument != "required")


def dataset_help() -> str:
    """One help text listing every dataset, for ``--dataset`` flags."""
    return "dataset: " + "; ".join(f"{e.shown} ({e.help})" for e in DATASETS)


def short_list() -> str:
    """``fashion-mnist, mnist, ..., synthetic[:CxHxW] or idx:DIR``."""
    shown = [e.shown for e in DATASETS]
    return ", ".join(shown[:-1]) + " or " + shown[-1]


def find(name: str) -> tuple[DatasetEntry, str] | None:
    """The entry ``name`` (``NAME`` or ``NAME:ARG``) refers to and its argument, or None."""
    head, colon, argument = name.partition(":")
    for entry in DATASETS:
        if entry.name != head:
            continue
        if colon and entry.argument == "none":
            return None
        if not (colon and argument) and entry.argument == "required":
            return None
        return entry, argument
    return None


def resolve(name: str) -> tuple[DatasetEntry, str]:
    """Like :func:`find`, but an unknown name raises :class:`DatasetError` listing them all."""
    found = find(name)
    if found is None:
        raise DatasetError(f"unknown dataset '{name}'; choose one of {short_list()}")
    return found


def load_raw(name: str, options: LoadOptions | None = None) -> RawDataset:
    """The official train and test sets of dataset ``name``; raises :class:`DatasetError`."""
    entry, argument = resolve(name)
    return entry.loader(argument, options or LoadOptions())


def canonical_name(name: str, image_size: tuple[int, int] | None = None,
                   channels: int | None = None) -> str:
    """The name that loads the same images anywhere (recorded in checkpoints).

    For ``folder:DIR``: ``folder:CxHxW:/absolute/DIR``, the shape from ``image_size``
    (H, W) and ``channels``, else from the data. Other datasets have a fixed shape: giving
    either raises :class:`DatasetError`, as does an unknown name.
    """
    entry, argument = resolve(name)
    if entry.canonical is not None:
        return f"{entry.name}:{entry.canonical(argument, image_size, channels)}"
    if image_size is not None or channels is not None:
        raise DatasetError(f"--image-size and --channels choose the input of folder: "
                           f"datasets; '{name}' has a fixed image shape")
    return name


def parse_dataset_ref(ref: str, default_split: str = "test") -> tuple[str, str]:
    """Split ``NAME[:ARG][:SPLIT]`` (``fashion-mnist:test``, ``idx:DIR:train``) in two.

    Without a split, ``default_split``. Raises :class:`DatasetError` saying which part is
    wrong: ``fashion-mnist:tset`` names a known dataset with an unknown split, ``cifar:test``
    an unknown dataset.
    """
    head, _, tail = ref.rpartition(":")
    if head and tail in SPLITS and find(head) is not None:
        return head, tail
    if find(ref) is not None:
        return ref, default_split
    if head and find(head) is not None:
        raise DatasetError(f"unknown split '{tail}' in '{ref}'; choose one of "
                           f"{', '.join(SPLITS)} (e.g. {head}:test)")
    resolve(head or ref)
    raise DatasetError(f"cannot read dataset reference '{ref}'; write NAME[:SPLIT], e.g. "
                       f"fashion-mnist:test")
