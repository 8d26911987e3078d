"""``folder:DIR`` datasets: layout, split, shape, bad files, cache; one image loader for all."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnserve.common.data import folders
from cnnserve.common.data.datasets import DatasetError, load_dataset, load_split
from cnnserve.common.data.registry import canonical_name
from cnnserve.common.images import load_image
from tests.support.image_folders import CLASSES, shape_image, write_shapes_folder


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "cnnserve" / "decoded"


@pytest.fixture
def shapes(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    special = write_shapes_folder(tmp_path / "shapes", per_class=10)
    return tmp_path / "shapes", special


def test_folder_names_are_the_sorted_labels_and_the_split_is_stratified_and_stable(
        shapes: tuple[Path, dict[str, Path]]) -> None:
    root, _ = shapes
    layout = folders.scan(root)
    assert layout.class_names == tuple(sorted(CLASSES))
    for label in range(len(CLASSES)):
        assert sum(1 for _, y in layout.test if y == label) == 2  # 20 % of 11 files
    assert folders.scan(root) == layout
    assert not {p for p, _ in layout.test} & {p for p, _ in layout.train}
    assert "stratified" in layout.split


def test_train_and_test_folders_are_used_as_given(tmp_path: Path, cache: Path) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("test", 2)):
        for label in ("a", "b"):
            (tmp_path / "d" / split / label).mkdir(parents=True)
            for i in range(n):
                shape_image("circle" if label == "a" else "square", (12, 12), rng).save(
                    tmp_path / "d" / split / label / f"{i}.png")
    layout = folders.scan(tmp_path / "d")
    assert (len(layout.train), len(layout.test)) == (8, 4)
    assert layout.class_names == ("a", "b")
    (tmp_path / "d" / "test" / "c").mkdir()
    shape_image("circle", (12, 12), rng).save(tmp_path / "d" / "test" / "c" / "0.png")
    with pytest.raises(DatasetError, match=r"no training folder.*c"):
        folders.scan(tmp_path / "d")


def test_shape_comes_from_the_flags_else_from_the_data(
        shapes: tuple[Path, dict[str, Path]], cache: Path) -> None:
    root, _ = shapes
    name = canonical_name(f"folder:{root}", (12, 10), 3)
    assert name == f"folder:3x12x10:{root.resolve()}"
    ds = load_dataset(name)
    assert ds.input_shape == (3, 12, 10) and ds.class_names == tuple(sorted(CLASSES))
    assert ds.info["split"].startswith("stratified")
    assert canonical_name(f"folder:{root}").startswith("folder:3x")  # RGB present -> 3
    gray = load_dataset(canonical_name(f"folder:{root}", (8, 8), 1))
    assert gray.input_shape == (1, 8, 8)
    with pytest.raises(DatasetError, match="fixed image shape"):
        canonical_name("digits", (8, 8), None)


def test_a_corrupt_file_is_reported_by_path_and_skipped_or_fatal(
        shapes: tuple[Path, dict[str, Path]], cache: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    root, special = shapes
    name = canonical_name(f"folder:{root}", (8, 8), 3)
    with caplog.at_level(logging.WARNING):
        ds = load_dataset(name)
    assert str(special["corrupt"]) in caplog.text
    assert len(ds.train) + len(ds.val) + len(ds.test) == 3 * 11 - 1
    with pytest.raises(DatasetError, match=f"{special['corrupt']}.*--on-bad-image skip"):
        load_dataset(name, on_bad_image="fail")


def test_empty_class_single_class_and_missing_folder_say_so(tmp_path: Path) -> None:
    (tmp_path / "one" / "cats").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "one" / "cats" / "a.png")
    with pytest.raises(DatasetError, match="at least two; found only 'cats'"):
        folders.scan(tmp_path / "one")
    (tmp_path / "one" / "dogs").mkdir()
    with pytest.raises(DatasetError, match=r"class folder .*dogs is empty"):
        folders.scan(tmp_path / "one")
    with pytest.raises(DatasetError, match="image folder not found"):
        folders.scan(tmp_path / "nope")
    with pytest.raises(DatasetError, match="unknown dataset 'folder'"):
        load_split("folder", "test")  # the folder is required


def test_decoded_pixels_are_cached_by_content_and_equal_the_shared_loader(
        shapes: tuple[Path, dict[str, Path]], cache: Path) -> None:
    root, special = shapes
    name = canonical_name(f"folder:{root}", (9, 7), 3)
    first = load_split(name, "test")
    entries = list((cache / "3x9x7").rglob("*.u8"))
    assert len(entries) >= 3 * 11 - 1
    assert np.array_equal(load_split(name, "test").images, first.images)
    layout = folders.scan(root)
    path, label = layout.test[0]
    assert np.array_equal(first.images[0], load_image(path, (3, 9, 7)))
    assert first.labels[0] == label
    gray = load_image(special["gray"], (3, 9, 7))  # grayscale among RGB: converted to RGB
    assert gray.shape == (3, 9, 7) and np.array_equal(gray[0], gray[1])


def test_the_client_sdk_reads_images_with_the_same_code(tmp_path: Path) -> None:
    from cnnserve.client.images import load_image as client_load_image

    path = tmp_path / "x.webp"
    shape_image("triangle", (33, 21), np.random.default_rng(1)).save(path)
    np.testing.assert_array_equal(client_load_image(path, (3, 16, 16)),
                                  load_image(path, (3, 16, 16)))
