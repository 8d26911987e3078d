"""``cifar10``: the official binary format, its class names, checksum and damaged files."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from cnnserve.common.data import cifar
from cnnserve.common.data.datasets import DatasetError, load_dataset, load_split

NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
         "truck")


def _records(labels: list[int], seed: int) -> bytes:
    """Records of 1 label byte + R, G, B planes; pixel (row 1, col 2) is (10+l, 20+l, 30+l)."""
    rng = np.random.default_rng(seed)
    out = bytearray()
    for label in labels:
        planes = rng.integers(0, 256, (3, 32, 32), dtype=np.uint8)
        planes[:, 1, 2] = (10 + label, 20 + label, 30 + label)
        out += bytes([label]) + planes.tobytes()  # C order: R plane, G plane, B plane
    return bytes(out)


def write_cifar(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(cifar.TRAIN_FILES):
        (folder / name).write_bytes(_records([i, (i + 1) % 10, 9], seed=i))
    (folder / cifar.TEST_FILE).write_bytes(_records([3, 7], seed=99))
    (folder / cifar.META_FILE).write_text("\n".join(NAMES) + "\n\n")


def test_binary_batches_load_with_labels_class_names_and_pixel_order(tmp_path: Path) -> None:
    write_cifar(tmp_path / "c")
    ds = load_dataset(f"cifar10:{tmp_path / 'c'}", val_fraction=0.2)
    assert ds.class_names == NAMES and ds.input_shape == (3, 32, 32)
    test = load_split(f"cifar10:{tmp_path / 'c'}", "test")
    assert test.labels.tolist() == [3, 7]
    assert test.images[0, :, 1, 2].tolist() == [13, 23, 33]  # R, G, B of row 1, column 2
    assert test.images[1, :, 1, 2].tolist() == [17, 27, 37]
    assert len(ds.train) + len(ds.val) == 15


def test_files_inside_the_release_folder_are_found(tmp_path: Path) -> None:
    write_cifar(tmp_path / cifar.MEMBER_DIR)
    assert len(load_split(f"cifar10:{tmp_path}", "test")) == 2


def test_a_truncated_record_fails_clearly(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    path = tmp_path / cifar.TEST_FILE
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DatasetError, match=r"test_batch.bin holds 6141 bytes, not a whole "
                                           r"number of 3073-byte .*truncated"):
        load_split(f"cifar10:{tmp_path}", "test")


def test_an_archive_with_the_wrong_checksum_is_refused(tmp_path: Path) -> None:
    (tmp_path / cifar.ARCHIVE).write_bytes(b"not the release")
    with pytest.raises(DatasetError, match=f"checksum mismatch .* md5 .*{cifar.ARCHIVE_MD5}"):
        load_split(f"cifar10:{tmp_path}", "test")


def test_missing_files_say_how_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"CIFAR-10 not found.*--download"):
        load_split(f"cifar10:{tmp_path}", "test")


def test_extraction_takes_only_the_expected_regular_files(tmp_path: Path) -> None:
    write_cifar(tmp_path / "src")
    archive = tmp_path / "a.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted((tmp_path / "src").iterdir()):
            tar.add(path, arcname=f"{cifar.MEMBER_DIR}/{path.name}")
        extra = tarfile.TarInfo("../evil.txt")
        extra.size = 4
        tar.addfile(extra, io.BytesIO(b"evil"))
    cifar.extract(archive, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out" / cifar.MEMBER_DIR).iterdir()) == sorted(
        [*cifar.TRAIN_FILES, cifar.TEST_FILE, cifar.META_FILE])
    assert not (tmp_path / "evil.txt").exists()
