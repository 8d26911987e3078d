"""evaluate: checkpoint (PyTorch) and ONNX (ONNX Runtime) predictions agree item by item."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from cnnserve.common.data.datasets import load_split
from cnnserve.common.repository import Normalization, TensorSpec, VersionConfig
from cnnserve.training.train.checkpoint import Checkpoint, restore_network, save_checkpoint
from cnnserve.training.train.evaluate import (
    EvaluationError,
    confusion_matrix,
    evaluate,
    evaluate_checkpoint,
    evaluate_onnx,
    format_table,
    onnx_info,
    per_class_accuracy,
)
from cnnserve.training.train.trainer import TrainConfig, train

NET = "conv(8, 3, pad=1) -> bn -> relu -> maxpool(2) -> fc(10)"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Checkpoint, Path]:
    ckpt = train(TrainConfig(dataset="digits", arch=NET, epochs=2, batch_size=32,
                             lr=3e-3, augment=False)).checkpoint
    path = tmp_path_factory.mktemp("run") / "checkpoint.pt"
    save_checkpoint(ckpt, path)
    return ckpt, path


def _export(ckpt: Checkpoint, path: Path, metadata: dict[str, str]) -> Path:
    """A plain ONNX export (logits first, like cnnserve export) with ``metadata`` props."""
    model = restore_network(ckpt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(2, *ckpt.input_shape),), str(path),
                          input_names=["input"], output_names=["logits"], dynamo=False,
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    proto = onnx.load(str(path))
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))
    return path


def test_confusion_matrix_and_per_class_accuracy() -> None:
    cm = confusion_matrix(np.array([0, 0, 1, 1, 1]), np.array([0, 1, 1, 1, 0]), 3)
    assert cm.tolist() == [[1, 1, 0], [1, 2, 0], [0, 0, 0]]
    assert per_class_accuracy(cm) == (0.5, pytest.approx(2 / 3), None)


def test_evaluate_checkpoint_matches_training(trained: tuple[Checkpoint, Path]) -> None:
    ckpt, path = trained
    test = load_split("digits", "test")
    preds = evaluate_checkpoint(path, test.images, batch_size=7)
    assert preds.dtype == np.int64 and preds.shape == (360,)
    assert float((preds == test.labels).mean()) == pytest.approx(ckpt.metrics["test_accuracy"])
    result = evaluate(path)  # dataset defaults to the one it was trained on
    assert result.kind == "checkpoint" and result.dataset == "digits"
    assert result.accuracy == pytest.approx(ckpt.metrics["test_accuracy"])
    assert result.confusion.sum() == 360
    table = format_table(result)
    assert "accuracy" in table and all(f"\n{d} " in table for d in "0123456789")


def test_onnx_with_metadata_predicts_like_the_checkpoint(
        trained: tuple[Checkpoint, Path], tmp_path: Path) -> None:
    ckpt, _ = trained
    meta = {"cnnserve.normalization": json.dumps({"mean": ckpt.mean, "std": ckpt.std}),
            "cnnserve.labels": json.dumps(ckpt.class_names), "cnnserve.dataset": "digits"}
    model = _export(ckpt, tmp_path / "model.onnx", meta)
    test = load_split("digits", "test")
    np.testing.assert_array_equal(evaluate_onnx(model, test.images, batch_size=50),
                                  evaluate_checkpoint(ckpt, test.images))
    result = evaluate(model, split="test")
    assert result.kind == "onnx" and result.dataset == "digits"
    assert result.accuracy == pytest.approx(ckpt.metrics["test_accuracy"])


def test_onnx_config_json_is_preferred(trained: tuple[Checkpoint, Path], tmp_path: Path) -> None:
    ckpt, _ = trained
    version = tmp_path / "digits" / "1"
    version.mkdir(parents=True)
    _export(ckpt, version / "model.onnx", {})  # no metadata: only config.json can help
    config = VersionConfig(name="digits", inputs=(TensorSpec("input", "FP32", (-1, 1, 8, 8)),),
                           outputs=(TensorSpec("logits", "FP32", (-1, 10)),),
                           labels=ckpt.class_names, dataset="digits",
                           normalization=Normalization(ckpt.mean, ckpt.std))
    (version / "config.json").write_text(config.to_json())
    assert onnx_info(version / "model.onnx").mean == ckpt.mean
    result = evaluate(version)  # a version folder works too
    assert result.accuracy == pytest.approx(ckpt.metrics["test_accuracy"])


def test_onnx_without_normalisation_is_an_error(trained: tuple[Checkpoint, Path],
                                                tmp_path: Path) -> None:
    model = _export(trained[0], tmp_path / "model.onnx", {})
    with pytest.raises(EvaluationError, match="no normalisation found"):
        evaluate(model, "digits")


def test_shape_mismatch_is_reported(trained: tuple[Checkpoint, Path]) -> None:
    with pytest.raises(EvaluationError, match=r"expects images of shape 1x8x8.*3x16x16"):
        evaluate(trained[1], "synthetic:3x16x16")


def test_missing_onnx_file(tmp_path: Path) -> None:
    with pytest.raises(EvaluationError, match="not found"):
        evaluate_onnx(tmp_path / "model.onnx", np.zeros((1, 1, 8, 8), np.uint8), mean=(0.0,),
                      std=(1.0,))


def test_a_dataset_with_other_classes_is_refused(trained: tuple[Checkpoint, Path]) -> None:
    """A digits model on 8x8 synthetic patterns would score chance: refused, not reported."""
    from cnnserve.common.errors import UsageError

    with pytest.raises(UsageError, match=r"trained on digits.*synthetic:1x8x8 has classes "
                                         r"pattern-0"):
        evaluate(trained[1], "synthetic:1x8x8")
