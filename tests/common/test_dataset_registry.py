"""The dataset registry: one entry per dataset feeds loading, help texts and error messages."""

from __future__ import annotations

import pytest

from cnnserve.common.data import registry
from cnnserve.common.data.datasets import DATASET_NAMES, DatasetError, load_split
from cnnserve.common.data.registry import parse_dataset_ref


def test_every_entry_is_in_the_help_and_the_unknown_name_message() -> None:
    text = registry.dataset_help()
    with pytest.raises(DatasetError) as exc:
        registry.resolve("imagenet")
    for entry in registry.entries():
        assert entry.shown in text and entry.help in text
        assert entry.shown in str(exc.value)


def test_names_usable_without_argument() -> None:
    assert set(DATASET_NAMES) >= {"fashion-mnist", "mnist", "digits", "synthetic"}
    assert "idx" not in DATASET_NAMES  # idx needs a folder
    assert registry.find("idx") is None and registry.find("idx:/data") is not None
    assert registry.find("mnist:extra") is None  # mnist takes no argument


def test_a_registered_loader_is_what_load_split_uses() -> None:
    assert load_split("synthetic:1x4x4", "test").images.shape[1:] == (1, 4, 4)


@pytest.mark.parametrize(("ref", "expected"), [
    ("fashion-mnist:test", ("fashion-mnist", "test")),
    ("fashion-mnist", ("fashion-mnist", "test")),
    ("digits:val", ("digits", "val")),
    ("synthetic:3x8x8", ("synthetic:3x8x8", "test")),
    ("synthetic:3x8x8:train", ("synthetic:3x8x8", "train")),
    ("idx:/data/x:train", ("idx:/data/x", "train")),
])
def test_dataset_references_split_into_name_and_split(ref: str,
                                                      expected: tuple[str, str]) -> None:
    assert parse_dataset_ref(ref) == expected


def test_a_misspelt_split_is_named_as_the_split() -> None:
    with pytest.raises(DatasetError, match=r"unknown split 'tset' in 'fashion-mnist:tset'.*"
                                           r"train, val, test"):
        parse_dataset_ref("fashion-mnist:tset")
    with pytest.raises(DatasetError, match="unknown dataset 'cifar'"):
        parse_dataset_ref("cifar:test")
