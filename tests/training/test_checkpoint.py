"""Checkpoints: round trip, atomic writes, and clear errors for every kind of bad file."""

from __future__ import annotations

import dataclasses
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnserve.training.train.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    restore_network,
    save_checkpoint,
)
from cnnserve.training.train.network import build_network
from cnnserve.training.train.spec import format_spec, parse_spec

SPEC = "conv(4, 3, pad=1) -> bn -> relu -> maxpool(2) -> fc(16) -> relu -> fc(3)"


@pytest.fixture
def ckpt() -> Checkpoint:
    torch.manual_seed(0)
    layers = parse_spec(SPEC)
    model = build_network(layers, (2, 8, 6), 3)
    # Non-trivial BatchNorm statistics, so a round trip that dropped buffers would show.
    model.train()
    model(torch.randn(16, 2, 8, 6) * 3 + 1)
    return Checkpoint(spec=format_spec(layers), input_shape=(2, 8, 6),
                      class_names=("a", "b", "c"), mean=(0.25, 0.5), std=(0.2, 0.3),
                      dataset="synthetic:2x8x6",
                      metrics={"test_accuracy": np.float32(0.75), "epochs": 2, "curve": (1, 2)},
                      state_dict=model.state_dict(),
                      train_state={"epoch": 2, "optimizer": {"state": {}, "param_groups": []},
                                   "history": [{"epoch": 1, "lr": 0.001}]})


def test_round_trip_keeps_metadata_and_predictions(tmp_path: Path, ckpt: Checkpoint) -> None:
    path = tmp_path / "sub" / "checkpoint.pt"
    save_checkpoint(ckpt, path)
    back = load_checkpoint(path)
    assert back.spec == ckpt.spec and back.input_shape == (2, 8, 6)
    assert back.class_names == ("a", "b", "c") and back.mean == (0.25, 0.5)
    assert back.std == (0.2, 0.3) and back.dataset == "synthetic:2x8x6"
    assert back.metrics == {"test_accuracy": 0.75, "epochs": 2, "curve": [1, 2]}
    assert back.train_state is not None and back.train_state["epoch"] == 2
    x = torch.randn(5, 2, 8, 6)
    original = restore_network(ckpt)
    restored = restore_network(back)
    assert not restored.training
    torch.testing.assert_close(restored(x), original(x), rtol=0, atol=0)
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pt"]  # no temp files left


def test_save_is_atomic_when_writing_fails(tmp_path: Path, ckpt: Checkpoint,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(ckpt, path)
    before = path.read_bytes()

    def explode(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", explode)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(dataclasses.replace(ckpt, dataset="other"), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_unserialisable_metrics_are_refused(tmp_path: Path, ckpt: Checkpoint) -> None:
    with pytest.raises(CheckpointError, match="metrics"):
        save_checkpoint(dataclasses.replace(ckpt, metrics={"x": object()}), tmp_path / "c.pt")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_truncated_file(tmp_path: Path, ckpt: Checkpoint) -> None:
    path = tmp_path / "c.pt"
    save_checkpoint(ckpt, path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_corrupt_file(tmp_path: Path, ckpt: Checkpoint) -> None:
    path = tmp_path / "c.pt"
    save_checkpoint(ckpt, path)
    # Damage the pickle inside the archive but keep the zip structure valid.
    with zipfile.ZipFile(path) as zf:
        entries = {info.filename: zf.read(info.filename) for info in zf.infolist()}
    name = next(n for n in entries if n.endswith("data.pkl"))
    entries[name] = bytes(b ^ 0x5A for b in entries[name])
    with zipfile.ZipFile(path, "w") as zf:
        for entry, data in entries.items():
            zf.writestr(entry, data)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)


def test_not_a_pytorch_file(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    path.write_text('{"accuracy": 0.9}')
    with pytest.raises(CheckpointError, match="not a PyTorch zip archive"):
        load_checkpoint(path)


def test_foreign_pytorch_file(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"not a cnnserve checkpoint.*cnnserve train"):
        load_checkpoint(path)


class _Tripwire:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (Path.write_text, (str(self.marker), "pickled code ran"))


def test_pickled_objects_are_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"format": "cnnserve-checkpoint", "payload": _Tripwire(marker)}, path)
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        load_checkpoint(path)
    assert not marker.exists()


def test_newer_format_and_missing_fields(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    torch.save({"format": "cnnserve-checkpoint", "format_version": 99}, path)
    with pytest.raises(CheckpointError, match=r"format version 99.*upgrade"):
        load_checkpoint(path)
    torch.save({"format": "cnnserve-checkpoint", "format_version": 1, "spec": "fc(2)"}, path)
    with pytest.raises(CheckpointError, match=r"missing checkpoint fields.*input_shape"):
        load_checkpoint(path)


def test_weights_that_do_not_fit_the_spec(ckpt: Checkpoint) -> None:
    wrong = dataclasses.replace(ckpt, spec="conv(5, 3, pad=1) -> bn -> relu -> maxpool(2) "
                                           "-> fc(16) -> relu -> fc(3)")
    with pytest.raises(CheckpointError, match="weights do not match"):
        restore_network(wrong)
    with pytest.raises(CheckpointError, match="architecture is invalid"):
        restore_network(dataclasses.replace(ckpt, spec="conv(4, 3) ->"))
