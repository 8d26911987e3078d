"""ONNX Runtime sessions: providers, signature checks against config.json, warm-up."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from cnnserve.common.repository import MODEL_FILE, TensorSpec, VersionConfig
from cnnserve.server.errors import ModelLoadError
from cnnserve.server.runtime.ort import CUDA, RuntimeOptions, example_input, open_runtime
from tests.support.models import ORT_TOLERANCE, config_for, linear_expected, write_test_model

HAS_CUDA = CUDA in ort.get_available_providers()
WHERE = "model 'm' version 1"


def linear_model(repo: Path) -> tuple[Path, VersionConfig]:
    folder = write_test_model(repo, "m", 1, kind="linear")
    return folder / MODEL_FILE, config_for("linear", "m")


def test_cpu_session_runs_the_graph_and_reports_its_provider(model_repo: Path) -> None:
    path, config = linear_model(model_repo)
    runtime = open_runtime(path, config, RuntimeOptions(device="cpu", intra_op_threads=1,
                                                        graph_optimization="disable"), WHERE)
    assert runtime.providers == ("CPUExecutionProvider",)
    x = np.random.default_rng(0).random((5, 1, 4, 4), np.float32)
    out = runtime.run({"input": x})
    assert list(out) == ["output"]
    np.testing.assert_allclose(out["output"], linear_expected(x), **ORT_TOLERANCE)
    runtime.close()
    with pytest.raises(RuntimeError, match="closed"):
        runtime.run({"input": x})


def test_auto_uses_cuda_only_when_onnxruntime_has_it(model_repo: Path) -> None:
    path, config = linear_model(model_repo)
    runtime = open_runtime(path, config, RuntimeOptions(device="auto"), WHERE)
    assert (CUDA in runtime.providers) == HAS_CUDA
    assert runtime.providers[-1] == "CPUExecutionProvider"


def test_cuda_required_without_a_cuda_build_fails_the_load_clearly(
        model_repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, config = linear_model(model_repo)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(ModelLoadError, match=(
            r"model 'm' version 1: device 'cuda' was requested but this onnxruntime build has "
            r"no CUDAExecutionProvider \(available: CPUExecutionProvider\); install "
            r"onnxruntime-gpu")):
        open_runtime(path, config, RuntimeOptions(device="cuda"), WHERE)


@pytest.mark.skipif(HAS_CUDA, reason="needs an onnxruntime build without CUDA")
@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
def test_cuda_required_but_not_active_after_session_creation_fails_the_load(
        model_repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Pretend the build has CUDA: ORT then silently falls back to CPU, which must not pass.
    path, config = linear_model(model_repo)
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, "CPUExecutionProvider"])
    with pytest.raises(ModelLoadError, match=r"device 'cuda' was requested but the session "
                                             r"runs on \['CPUExecutionProvider'\]"):
        open_runtime(path, config, RuntimeOptions(device="cuda"), WHERE)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="onnxruntime has no CUDAExecutionProvider here")
def test_cuda_session_runs_on_the_gpu(model_repo: Path) -> None:
    path, config = linear_model(model_repo)
    runtime = open_runtime(path, config, RuntimeOptions(device="cuda"), WHERE)
    assert runtime.providers[0] == CUDA
    x = np.ones((3, 1, 4, 4), np.float32)
    np.testing.assert_allclose(runtime.run({"input": x})["output"], linear_expected(x),
                               **ORT_TOLERANCE)


@pytest.mark.parametrize(("change", "message"), [
    ({"inputs": (TensorSpec("input", "FP16", (-1, 1, 4, 4)),)},
     "input 'input' is FP32 in the graph, FP16 in config.json"),
    ({"inputs": (TensorSpec("input", "FP32", (-1, 16)),)},
     r"input 'input' has rank 4 \[-1, 1, 4, 4\] in the graph, rank 2 \[-1, 16\]"),
    ({"inputs": (TensorSpec("input", "FP32", (-1, 1, 5, 5)),)},
     r"input 'input' has shape \[-1, 1, 4, 4\] in the graph, \[-1, 1, 5, 5\] in config.json"),
    ({"outputs": (TensorSpec("logits", "FP32", (-1, 3)),)},
     r"outputs differ: config.json lists \['logits'\], the graph has \['output'\]"),
])
def test_a_signature_that_disagrees_with_config_json_fails_the_load(
        model_repo: Path, change: dict[str, object], message: str) -> None:
    path, config = linear_model(model_repo)
    bad = dataclasses.replace(config, **change)  # type: ignore[arg-type]
    with pytest.raises(ModelLoadError, match=f"model 'm' version 1: the graph disagrees with "
                                             f"config.json: .*{message}"):
        open_runtime(path, bad, RuntimeOptions(), WHERE)


def test_a_corrupt_or_missing_file_fails_the_load(model_repo: Path) -> None:
    folder = write_test_model(model_repo, "m", 1, corrupt=True)
    config = config_for("linear", "m")
    with pytest.raises(ModelLoadError, match="model 'm' version 1: onnxruntime cannot load"):
        open_runtime(folder / MODEL_FILE, config, RuntimeOptions(), WHERE)
    with pytest.raises(ModelLoadError, match="does not exist"):
        open_runtime(folder / "nothing.onnx", config, RuntimeOptions(), WHERE)


def test_warm_up_catches_a_graph_that_cannot_run(model_repo: Path) -> None:
    # Reshape [N,2] -> [-1,3] type-checks but cannot run on one row.
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])], "broken",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", 3])],
        [onnx.numpy_helper.from_array(np.array([-1, 3], np.int64), "shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = model_repo / "broken.onnx"
    path.write_bytes(model.SerializeToString())
    config = VersionConfig(name="b", inputs=(TensorSpec("x", "FP32", (-1, 2)),),
                           outputs=(TensorSpec("y", "FP32", (-1, 3)),))
    with pytest.raises(ModelLoadError, match="model 'm' version 1: warm-up inference failed"):
        open_runtime(path, config, RuntimeOptions(warmup=True), WHERE)
    assert open_runtime(path, config, RuntimeOptions(warmup=False), WHERE).providers


def test_example_input_fills_free_dimensions() -> None:
    assert example_input(TensorSpec("a", "FP16", (-1, 3, -1)), rows=2).shape == (2, 3, 1)
    assert example_input(TensorSpec("a", "INT64", (-1,)), rows=4).dtype == np.int64
    assert example_input(TensorSpec("s", "BYTES", (-1, 2)), rows=1).dtype == object
