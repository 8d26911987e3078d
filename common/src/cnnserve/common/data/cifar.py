"""``cifar10[:DIR]``: CIFAR-10 from its official *binary* release (never the pickled one).

Files (``cifar-10-batches-bin/`` of ``cifar-10-binary.tar.gz``): ``data_batch_1.bin`` ..
``data_batch_5.bin`` (50,000 training images), ``test_batch.bin`` (10,000) and
``batches.meta.txt`` (the class names, one a line). Each record is 3073 bytes: 1 label byte
(0..9), then 3072 pixel bytes: 1024 red, 1024 green, 1024 blue, each a 32x32 image in
row-major order, which is exactly ``[3, 32, 32]`` uint8.

The folder is ``DIR`` (or ``~/.cache/cnnserve/cifar10``) holding those files directly, in
``cifar-10-batches-bin/``, or as ``cifar-10-binary.tar.gz``; ``--download`` fetches the
archive. The archive is checked against the md5 the CIFAR page publishes before anything is
extracted, and only the seven expected regular files are taken out of it.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np

from cnnserve.common.data.datasets import DatasetError, ImageSet
from cnnserve.common.data.sources import RawDataset, cache_dir, download, verify_sha256

ARCHIVE = "cifar-10-binary.tar.gz"
#: Published on https://www.cs.toronto.edu/~kriz/cifar.html for the binary version.
ARCHIVE_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
URLS = ("https://www.cs.toronto.edu/~kriz/",)
MEMBER_DIR = "cifar-10-batches-bin"
TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_FILE = "test_batch.bin"
META_FILE = "batches.meta.txt"
RECORD = 1 + 3 * 32 * 32


def default_dir() -> Path:
    """Where ``cifar10`` without a folder looks (and ``--download`` writes)."""
    return cache_dir() / "cifar10"


def load_cifar10(folder: str = "", *, download: bool = False) -> RawDataset:
    """The 50k/10k official split with the class names of ``batches.meta.txt``.

    Raises :class:`DatasetError` for missing files (saying how to get them), an archive with
    the wrong md5, or a file that is not a whole number of 3073-byte records.
    """
    root = Path(folder).expanduser() if folder else default_dir()
    files = _locate(root, download=download)
    names = tuple(line.strip() for line in files.joinpath(META_FILE).read_text().splitlines()
                  if line.strip())
    if len(names) != 10:
        raise DatasetError(f"{files / META_FILE} lists {len(names)} class names, expected 10")
    train = [read_batch(files / name) for name in TRAIN_FILES]
    return RawDataset(class_names=names,
                      train=ImageSet(np.concatenate([t.images for t in train]),
                                     np.concatenate([t.labels for t in train])),
                      test=read_batch(files / TEST_FILE),
                      info={"root": str(files), "split": "official 50k/10k"})


def _has_files(folder: Path) -> bool:
    return all((folder / f).is_file() for f in (*TRAIN_FILES, TEST_FILE, META_FILE))


def _locate(root: Path, *, download: bool) -> Path:
    for candidate in (root, root / MEMBER_DIR):
        if _has_files(candidate):
            return candidate
    archive = root / ARCHIVE
    if not archive.is_file():
        if not download:
            raise DatasetError(
                f"CIFAR-10 not found in {root}: expected {', '.join(TRAIN_FILES)}, {TEST_FILE} "
                f"and {META_FILE} (directly or in {MEMBER_DIR}/), or {ARCHIVE}. Add --download "
                f"to fetch the official binary release into {root}, or unpack "
                f"{URLS[0]}{ARCHIVE} there")
        download_archive(root)
    verify_sha256(archive, ARCHIVE_MD5, f"Delete {archive} and add --download.", "md5")
    extract(archive, root)
    return root / MEMBER_DIR


def download_archive(root: Path) -> Path:
    """Fetch ``cifar-10-binary.tar.gz`` into ``root`` (md5-checked before it is renamed)."""
    return download(URLS, ARCHIVE, ARCHIVE_MD5, root, algorithm="md5")


def extract(archive: Path, root: Path) -> None:
    """Extract only the seven expected regular files into ``root/cifar-10-batches-bin``."""
    wanted = {f"{MEMBER_DIR}/{name}" for name in (*TRAIN_FILES, TEST_FILE, META_FILE)}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = [m for m in tar.getmembers() if m.name in wanted and m.isfile()]
            if len(members) != len(wanted):
                raise DatasetError(f"{archive} lacks some of {', '.join(sorted(wanted))}")
            tar.extractall(root, members=members, filter="data")
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise DatasetError(f"cannot extract {archive}: {exc}") from exc


def read_batch(path: Path) -> ImageSet:
    """One binary batch file: labels and ``[N, 3, 32, 32]`` uint8 images (R, G, B planes)."""
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % RECORD:
        raise DatasetError(f"{path} holds {raw.size} bytes, not a whole number of {RECORD}-byte "
                           f"CIFAR-10 records (1 label byte + 3072 pixel bytes): the file is "
                           f"truncated or not CIFAR-10 binary data")
    records = raw.reshape(-1, RECORD)
    labels = records[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise DatasetError(f"{path}: label {int(labels.max())} is not a CIFAR-10 class (0..9)")
    return ImageSet(np.ascontiguousarray(records[:, 1:].reshape(-1, 3, 32, 32)), labels)
