"""Reduced-precision exports: INT8 (static QDQ) and FP16, judged against the FP32 graph."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from cnnserve.common.data.datasets import load_split
from cnnserve.common.preprocess import normalize
from cnnserve.common.repository import CONFIG_FILE, VersionConfig, list_versions
from cnnserve.training.export import builder as build
from cnnserve.training.export import graph as onnx_graph
from cnnserve.training.export.exporter import ExportError, ExportOptions, export_checkpoint
from cnnserve.training.export.quantize import QuantizationError, convert_fp16, quantize_int8
from cnnserve.training.train.checkpoint import load_checkpoint, restore_network
from tests.support.export import make_checkpoint

FAST = ExportOptions(benchmark_seconds=0.05, calibration_images=256)


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


def _ops(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def _float_io(path: Path) -> None:
    """The reduced graph keeps the FP32 export's interface: since issue 16 that is a UINT8
    pixel input (the normalisation runs in float32 inside the graph) and float32 outputs."""
    model = onnx.load(str(path))
    (pixels,) = model.graph.input
    assert pixels.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    for value in model.graph.output:
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT, value.name


def _argmax_agreement(model_path: Path, ckpt_path: Path) -> float:
    ckpt = load_checkpoint(ckpt_path)
    pixels = load_split("synthetic", "test").images
    x = normalize(pixels, ckpt.mean, ckpt.std)
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"input": pixels})  # pixel input (issue 16)
    with torch.inference_mode():
        want = restore_network(ckpt)(torch.from_numpy(x)).numpy()
    return float((logits.argmax(1) == want.argmax(1)).mean())


def test_int8_export_keeps_accuracy_and_float_interface(ckpt_path: Path, tmp_path: Path) -> None:
    result = export_checkpoint(ckpt_path, tmp_path, "q", quantize="int8", options=FAST)
    assert result.precision == "int8"
    config = VersionConfig.load(result.version_dir / CONFIG_FILE)
    assert config.precision == "int8"
    # The input is UINT8 pixels since issue 16 (export's default); outputs stay FP32.
    assert [t.datatype for t in (*config.inputs, *config.outputs)] == ["UINT8", "FP32", "FP32"]
    assert {"QuantizeLinear", "DequantizeLinear"} <= _ops(result.model_path)
    _float_io(result.model_path)
    assert onnx_graph.read_metadata(result.model_path)["cnnserve.precision"] == "int8"

    acc = result.accuracy
    assert acc["fp32"] > 90.0 and acc["int8"] >= acc["fp32"] - 0.5
    assert _argmax_agreement(result.model_path, ckpt_path) >= 0.98
    assert set(result.throughput) == {"fp32", "int8"} and min(result.throughput.values()) > 0
    figures = config.metrics["export"]
    assert figures["test_accuracy_percent"] == acc and figures["verified"] is True
    assert figures["cpu_throughput_images_per_second"]["batch_size"] == 64
    assert "CPU throughput at batch 64" in result.summary()


def test_int8_accuracy_drop_fails_export(ckpt_path: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    def bad_quantizer(fp32: Path, out: Path, calibration: Any) -> None:
        graph = onnx.load(str(fp32))
        for init in graph.graph.initializer:  # scramble every weight: accuracy collapses
            if init.data_type == onnx.TensorProto.FLOAT and len(init.dims) > 1:
                w = onnx.numpy_helper.to_array(init)
                init.CopyFrom(onnx.numpy_helper.from_array(
                    np.random.default_rng(0).permutation(w.ravel()).reshape(w.shape), init.name))
        onnx.save(graph, str(out))

    monkeypatch.setattr(build, "quantize_int8", bad_quantizer)
    with pytest.raises(ExportError, match=r"(?s)int8 graph is not accurate.*a drop of"):
        export_checkpoint(ckpt_path, tmp_path, "q", quantize="int8", options=FAST)
    assert list_versions(tmp_path / "q") == [] and not (tmp_path / "q").exists()


def test_fp16_export_is_verified_on_cpu(ckpt_path: Path, tmp_path: Path) -> None:
    result = export_checkpoint(ckpt_path, tmp_path, "h", fp16=True, options=FAST)
    assert result.precision == "fp16" and result.config.precision == "fp16"
    model = onnx.load(str(result.model_path))
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
    _float_io(result.model_path)
    assert result.reduced_parity is not None
    assert 0 < result.reduced_parity.max_abs_diff <= 5e-2
    assert result.accuracy["fp16"] >= result.accuracy["fp32"] - 0.5
    assert result.config.metrics["export"]["verified"] is True
    assert _argmax_agreement(result.model_path, ckpt_path) >= 0.99


def test_fp16_that_cannot_run_here_needs_explicit_permission(
        ckpt_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = build.verify.open_session

    def has_fp16(path: str) -> bool:
        return any(i.data_type == onnx.TensorProto.FLOAT16
                   for i in onnx.load(path).graph.initializer)

    def fake_open(path: str, *args: Any) -> ort.InferenceSession:
        if has_fp16(path):
            raise RuntimeError("NOT_IMPLEMENTED: no kernel for Conv(float16)")
        return real_open(path, *args)

    monkeypatch.setattr(build.verify, "open_session", fake_open)
    with pytest.raises(ExportError, match=r"(?s)cannot verify the fp16.*--allow-unverified"):
        export_checkpoint(ckpt_path, tmp_path, "h", fp16=True, options=FAST)
    assert not (tmp_path / "h").exists()

    allowed = ExportOptions(benchmark_seconds=0, allow_unverified_fp16=True)
    result = export_checkpoint(ckpt_path, tmp_path, "h", fp16=True, options=allowed)
    figures = result.config.metrics["export"]
    assert figures["verified"] is False and "NOT_IMPLEMENTED" in figures["unverified_reason"]
    assert result.reduced_parity is None and "NOT verified" in result.summary()


def test_quantize_without_calibration_images_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(QuantizationError, match="at least one training image"):
        quantize_int8(tmp_path / "m.onnx", tmp_path / "q.onnx",
                      np.zeros((0, 1, 28, 28), np.float32))


def test_fp16_refuses_weights_beyond_float16_range(tmp_path: Path) -> None:
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    with torch.no_grad():
        net[1].weight.fill_(1e6)
    path = tmp_path / "big.onnx"
    onnx_graph.export_onnx(net, path, (1, 2, 2), 17)
    with pytest.raises(QuantizationError, match="beyond float16's range"):
        convert_fp16(path, tmp_path / "half.onnx")
