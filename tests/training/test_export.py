"""``cnnserve export``: ONNX parity with PyTorch, metadata, repository layout and versioning."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from cnnserve.cli import main
from cnnserve.common.data.datasets import load_split
from cnnserve.common.preprocess import normalize
from cnnserve.common.repository import (
    CONFIG_FILE,
    MODEL_FILE,
    POLICY_FILE,
    ModelPolicy,
    VersionConfig,
    list_versions,
)
from cnnserve.training.export import builder as build
from cnnserve.training.export import graph as onnx_graph
from cnnserve.training.export import writer as repository_writer
from cnnserve.training.export.exporter import (
    ExportError,
    ExportOptions,
    ExportResult,
    export_checkpoint,
    next_version,
)
from cnnserve.training.export.writer import STAGING_PREFIX
from cnnserve.training.train.checkpoint import load_checkpoint, restore_network, save_checkpoint
from tests.support.export import TINY_SPEC, make_checkpoint


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.fixture(scope="module")
def exported(ckpt_path: Path, tmp_path_factory: pytest.TempPathFactory) -> ExportResult:
    repo = tmp_path_factory.mktemp("repo")
    return export_checkpoint(ckpt_path, repo, "tiny")


def _test_inputs(ckpt_path: Path) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    ckpt = load_checkpoint(ckpt_path)
    test = load_split("synthetic", "test")
    return normalize(test.images, ckpt.mean, ckpt.std), test.labels


def _entries(model_dir: Path) -> list[str]:
    return sorted(p.name for p in model_dir.iterdir())


# ---- layout and config -----------------------------------------------------------------

def test_export_writes_model_config_and_default_policy(exported: ExportResult) -> None:
    model_dir = exported.version_dir.parent
    assert exported.version == 1 and exported.version_dir == model_dir / "1"
    assert _entries(model_dir) == ["1", POLICY_FILE]  # no staging folder left behind
    assert _entries(exported.version_dir) == [CONFIG_FILE, MODEL_FILE]
    assert ModelPolicy.load(model_dir / POLICY_FILE) == ModelPolicy()

    config = VersionConfig.load(exported.version_dir / CONFIG_FILE)
    assert config == exported.config
    # UINT8: export builds the normalisation into the graph by default (issue 16); the
    # float-input export is covered in test_pixel_export.py.
    assert [(t.name, t.datatype, t.shape) for t in config.inputs] == [
        ("input", "UINT8", (-1, 1, 28, 28))]
    assert [(t.name, t.datatype, t.shape) for t in config.outputs] == [
        ("logits", "FP32", (-1, 10)), ("probabilities", "FP32", (-1, 10))]
    assert config.labels == tuple(f"pattern-{k}" for k in range(10))
    assert config.precision == "fp32" and config.max_batch_size == 256
    assert config.architecture == TINY_SPEC and config.dataset == "synthetic"
    ckpt = load_checkpoint(Path(config.source_checkpoint))
    assert config.normalization is not None
    assert config.normalization.mean == ckpt.mean and config.normalization.std == ckpt.std
    parity = config.metrics["export"]["parity_fp32"]
    assert [b["batch_size"] for b in parity["batches"]] == [1, 7, 64, 256]
    assert parity["max_abs_diff"] <= 1e-4 and parity["argmax_mismatches"] == 0
    assert config.metrics["export"]["test_accuracy_percent"]["fp32"] > 90.0
    assert config.metrics["training"] == {"test_accuracy": 0.0, "epochs": 3}


def test_graph_passes_checker_with_requested_opset_and_dynamic_batch(
        exported: ExportResult) -> None:
    model = onnx.load(str(exported.model_path))
    onnx.checker.check_model(model, full_check=True)
    assert onnx_graph.opset_of(model) == 17
    assert all(i.data_location != onnx.TensorProto.EXTERNAL for i in model.graph.initializer)
    for value in (*model.graph.input, *model.graph.output):
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch"


def test_metadata_props_carry_labels_normalization_and_provenance(
        exported: ExportResult, ckpt_path: Path) -> None:
    props = onnx_graph.read_metadata(exported.model_path)
    ckpt = load_checkpoint(ckpt_path)
    assert json.loads(props["cnnserve.labels"]) == list(ckpt.class_names)
    assert json.loads(props["cnnserve.normalization"]) == {"mean": list(ckpt.mean),
                                                           "std": list(ckpt.std)}
    assert props["cnnserve.architecture"] == TINY_SPEC
    assert props["cnnserve.source_checkpoint"] == str(ckpt_path.resolve())
    assert props["cnnserve.dataset"] == "synthetic"
    assert json.loads(props["cnnserve.input_shape"]) == [1, 28, 28]
    assert props["cnnserve.precision"] == "fp32"


@pytest.mark.parametrize("batch", [1, 3, 300])
def test_onnx_matches_pytorch_values_and_argmax(exported: ExportResult, ckpt_path: Path,
                                                batch: int) -> None:
    x, _ = _test_inputs(ckpt_path)
    pixels = load_split("synthetic", "test").images
    model = restore_network(load_checkpoint(ckpt_path))
    session = ort.InferenceSession(str(exported.model_path), providers=["CPUExecutionProvider"])
    for start in range(0, min(len(x), 3 * batch), batch):
        chunk = x[start:start + batch]
        # The exported graph takes the pixels and normalises them itself (issue 16).
        logits, probs = session.run(["logits", "probabilities"],
                                    {"input": pixels[start:start + batch]})
        with torch.inference_mode():
            want = model(torch.from_numpy(chunk)).numpy()
        assert logits.shape == (len(chunk), 10)
        np.testing.assert_allclose(logits, want, atol=1e-4, rtol=0)
        np.testing.assert_allclose(probs, torch.softmax(torch.from_numpy(want), 1).numpy(),
                                   atol=1e-5, rtol=0)
        assert (logits.argmax(1) == want.argmax(1)).all()


def test_result_reports_parity_at_batch_one_and_large(exported: ExportResult) -> None:
    rows = {r.batch_size: r for r in exported.parity.rows}
    assert set(rows) == {1, 7, 64, 256}
    assert all(r.images == 300 and r.argmax_mismatches == 0 for r in rows.values())
    assert exported.parity.max_abs_diff <= 1e-4
    summary = exported.summary()
    assert "max|dlogits|" in summary and str(exported.version_dir) in summary


@pytest.mark.slow  # trains a second network; the other tests cover the export path itself
def test_rgb_model_with_every_layer_kind_exports(tmp_path: Path) -> None:
    spec = ("conv(8, 3, pad=1) -> bn -> tanh -> avgpool(2) -> conv(8, 3, stride=2, pad=1)"
            " -> sigmoid -> dropout(0.2) -> maxpool(2, stride=1) -> fc(16) -> bn -> relu"
            " -> fc(10)")
    ckpt = make_checkpoint(tmp_path / "rgb.pt", dataset="synthetic:3x16x16", spec=spec,
                           epochs=1)
    result = export_checkpoint(ckpt, tmp_path / "repo", "rgb", max_batch_size=100)
    assert result.config.inputs[0].shape == (-1, 3, 16, 16)
    assert [r.batch_size for r in result.parity.rows] == [1, 7, 64, 100]
    assert result.parity.max_abs_diff <= 1e-4 and result.parity.argmax_mismatches == 0


# ---- versioning and atomicity ------------------------------------------------------------

def test_versions_next_free_explicit_refused_and_forced(ckpt_path: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    assert export_checkpoint(ckpt_path, repo, "m").version == 1
    policy = ModelPolicy(version_policy={"all": True})
    (repo / "m" / POLICY_FILE).write_text(policy.to_json())
    assert export_checkpoint(ckpt_path, repo, "m", version=5).version == 5
    assert ModelPolicy.load(repo / "m" / POLICY_FILE) == policy  # the operator's is kept
    assert next_version(repo / "m") == 6

    before = (repo / "m" / "5" / CONFIG_FILE).read_text()
    with pytest.raises(ExportError, match=r"already exists.*--force"):
        export_checkpoint(ckpt_path, repo, "m", version=5, max_batch_size=32)
    assert (repo / "m" / "5" / CONFIG_FILE).read_text() == before

    forced = export_checkpoint(ckpt_path, repo, "m", version=5, max_batch_size=32, force=True)
    assert VersionConfig.load(forced.version_dir / CONFIG_FILE).max_batch_size == 32
    assert _entries(repo / "m") == ["1", "5", POLICY_FILE]  # the replaced folder is gone


def test_staging_folders_are_not_versions(tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    (model_dir / f"{STAGING_PREFIX}abc").mkdir(parents=True)
    (model_dir / f"{STAGING_PREFIX}abc" / MODEL_FILE).write_bytes(b"half written")
    (model_dir / "2").mkdir()
    assert list_versions(model_dir) == [2]
    assert next_version(model_dir) == 3
    assert next_version(tmp_path / "absent") == 1


def _staged(model_dir: Path, text: str) -> Path:
    staging = repository_writer.stage(model_dir)
    (staging / MODEL_FILE).write_text(text)
    return staging


@pytest.mark.parametrize("exchange", [True, False])
def test_publish_replaces_only_with_force(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          exchange: bool) -> None:
    if not exchange:  # the portable path: move the old folder aside, then rename
        monkeypatch.setattr(repository_writer, "_exchange", lambda a, b: False)
    model_dir = tmp_path / "m"
    first = repository_writer.publish(_staged(model_dir, "v1"), model_dir, 1, force=False)
    assert (first / MODEL_FILE).read_text() == "v1"

    staging = _staged(model_dir, "v1 again")
    with pytest.raises(repository_writer.RepositoryWriteError, match="--force"):
        repository_writer.publish(staging, model_dir, 1, force=False)
    assert (first / MODEL_FILE).read_text() == "v1" and staging.is_dir()

    repository_writer.publish(staging, model_dir, 1, force=True)
    assert (first / MODEL_FILE).read_text() == "v1 again"
    assert _entries(model_dir) == ["1"]  # neither the staging nor the old folder is left


def test_failure_mid_export_leaves_repository_untouched(
        ckpt_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "repo"
    (repo / "m" / "1").mkdir(parents=True)
    (repo / "m" / "1" / MODEL_FILE).write_bytes(b"existing version")

    def crash(model: torch.nn.Module, path: Path, *args: Any) -> str:
        path.write_bytes(b"half of a model")  # a partial model.onnx in the staging folder
        raise OSError("disk full")

    monkeypatch.setattr(build, "export_onnx", crash)
    with pytest.raises(OSError, match="disk full"):
        export_checkpoint(ckpt_path, repo, "m")
    assert _entries(repo / "m") == ["1"]
    assert (repo / "m" / "1" / MODEL_FILE).read_bytes() == b"existing version"
    with pytest.raises(OSError, match="disk full"):
        export_checkpoint(ckpt_path, repo, "fresh")
    assert not (repo / "fresh").exists()  # the model folder this export made is gone too


def test_parity_failure_fails_export_and_writes_nothing(
        ckpt_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_export = build.export_onnx

    def tampered(model: torch.nn.Module, path: Path, *args: Any) -> str:
        exporter = real_export(model, path, *args)
        graph = onnx.load(str(path))
        bias = next(i for i in graph.graph.initializer if i.dims == [10])  # last fc bias
        bias.CopyFrom(onnx.numpy_helper.from_array(
            onnx.numpy_helper.to_array(bias) + np.float32(1e-3), bias.name))
        onnx.save(graph, str(path))
        return exporter

    monkeypatch.setattr(build, "export_onnx", tampered)
    with pytest.raises(ExportError, match=r"does not compute.*\n.*exceeds the tolerance"):
        export_checkpoint(ckpt_path, tmp_path / "repo", "m")
    assert not (tmp_path / "repo" / "m").exists()


def test_cli_verification_failure_exits_1_and_writes_nothing(
        ckpt_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # 1e-12 is below float32 rounding noise: the check must fail, and say why.
    code = main(["export", str(ckpt_path), "--repository", str(tmp_path), "--name", "m",
                 "--tolerance", "1e-12"])
    err = capsys.readouterr().err
    assert code == 1
    assert "failed verification, nothing was written" in err
    assert "exceeds the tolerance 1e-12" in err and "argmax diff" in err
    assert list(tmp_path.iterdir()) == []


# ---- datasets and arguments --------------------------------------------------------------

def test_missing_dataset_fails_with_its_error_unless_overridden(ckpt_path: Path,
                                                                 tmp_path: Path) -> None:
    moved = replace(load_checkpoint(ckpt_path), dataset=f"idx:{tmp_path / 'gone'}")
    save_checkpoint(moved, tmp_path / "moved.pt")
    with pytest.raises(ExportError, match=r"(?s)test images of 'idx:.*gone'.*--verify-dataset"):
        export_checkpoint(tmp_path / "moved.pt", tmp_path / "repo", "m")
    assert not (tmp_path / "repo" / "m").exists()
    done = export_checkpoint(tmp_path / "moved.pt", tmp_path / "repo", "m",
                             options=ExportOptions(verify_dataset="synthetic"))
    assert done.config.metrics["export"]["verify_dataset"] == "synthetic"
    assert done.config.dataset == moved.dataset


def test_verify_dataset_with_other_image_shape_is_refused(ckpt_path: Path,
                                                          tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"shape \[3, 16, 16\].*expects \[1, 28, 28\]"):
        export_checkpoint(ckpt_path, tmp_path, "m",
                          options=ExportOptions(verify_dataset="synthetic:3x16x16"))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"version": 0}, "positive integer"),
    ({"opset": 9}, "--opset must be between"),
    ({"max_batch_size": 0}, "--max-batch-size"),
    ({"quantize": "int4"}, "--quantize must be one of"),
    ({"quantize": "int8", "fp16": True}, "mutually exclusive"),
    ({"tolerance": -1.0}, "--tolerance"),
])
def test_bad_arguments_are_refused_before_any_work(kwargs: dict[str, Any], message: str,
                                                   tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=message):
        export_checkpoint(tmp_path / "never-read.pt", tmp_path / "repo", "m", **kwargs)
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "..", "x" * 200])
def test_unsafe_model_names_are_refused(name: str, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="model name"):
        export_checkpoint(tmp_path / "c.pt", tmp_path / "repo", name)


def test_torchscript_fallback_when_torch_export_fails(
        ckpt_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = onnx_graph._run_exporter

    def no_dynamo(*args: Any, dynamo: bool) -> None:
        if dynamo:
            raise RuntimeError("torch.export cannot trace this model")
        real(*args, dynamo=dynamo)

    monkeypatch.setattr(onnx_graph, "_run_exporter", no_dynamo)
    result = export_checkpoint(ckpt_path, tmp_path, "m", opset=18)
    assert result.exporter == "torchscript" and result.parity.max_abs_diff <= 1e-4
    model = onnx.load(str(result.model_path))
    assert onnx_graph.opset_of(model) == 18
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_both_exporters_failing_is_an_export_error(
        ckpt_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, dynamo: bool) -> None:
        raise RuntimeError(f"unsupported operator (dynamo={dynamo})")

    monkeypatch.setattr(onnx_graph, "_run_exporter", broken)
    with pytest.raises(ExportError, match=r"(?s)both exporters.*dynamo=True.*dynamo=False"):
        export_checkpoint(ckpt_path, tmp_path, "m")
    assert list(tmp_path.iterdir()) == []


# ---- command line ------------------------------------------------------------------------

def test_cli_exports_and_prints_figures(ckpt_path: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["export", str(ckpt_path), "--repository", str(tmp_path), "--name", "m",
                 "--version", "3", "--max-batch-size", "64"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "argmax diff" in out and "wrote fp32 model version 3" in out
    assert list_versions(tmp_path / "m") == [3]


def test_cli_missing_checkpoint_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["export", str(tmp_path / "nope.pt"), "--repository", str(tmp_path / "r"),
                 "--name", "m"])
    assert code == 1
    assert "checkpoint not found" in capsys.readouterr().err
    assert not (tmp_path / "r" / "m").exists()


def test_cli_corrupt_checkpoint_exits_1(ckpt_path: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(ckpt_path.read_bytes()[:500])
    code = main(["export", str(bad), "--repository", str(tmp_path / "r"), "--name", "m"])
    assert code == 1
    assert "corrupt" in capsys.readouterr().err
    assert not (tmp_path / "r" / "m").exists()


def test_cli_refuses_two_precisions(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["export", "c.pt", "--repository", str(tmp_path), "--name", "m",
              "--quantize", "int8", "--fp16"])
    assert exc.value.code == 2
