"""Tiny ONNX models written into a model repository, for tests of every part.

``write_test_model(repo, name, version, kind=...)`` builds one version with the ``onnx``
package directly (no torch) and writes model.onnx + config.json (VersionConfig.to_json) the
way ``cnnserve export`` lays them out. Kinds, float32 unless said otherwise, every output row
a function of its own input row only (so a wrongly split batch shows in the values):

- ``linear``: input "input" [-1,1,4,4] -> Flatten -> MatMul(LINEAR_WEIGHTS) -> "output" [-1,3];
  labels ("zero", "one", "two"). Expected: :func:`linear_expected`.
- ``double``: input "x" [-1,2] -> "y" = 2x and "z" = x + 1 (two outputs).
- ``pixels``: like ``linear`` but its input is UINT8 pixels, normalised in the graph as
  ``cnnserve export`` does, with PIXEL_MEAN/PIXEL_STD (also published in config.json).
  Expected: :func:`pixels_expected`.
- ``slow``: input "x" [-1,4] -> "y" = x, computed after a Loop of ``slow_iterations``
  4x4 MatMul+Tanh steps (about 5-20 us each), for tests that need requests to pile up.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from cnnserve.common.repository import (
    CONFIG_FILE,
    MODEL_FILE,
    POLICY_FILE,
    ModelPolicy,
    Normalization,
    TensorSpec,
    VersionConfig,
)

Kind = Literal["linear", "double", "slow", "pixels"]
OPSET = 17
LINEAR_WEIGHTS = (np.arange(48, dtype=np.float32).reshape(16, 3) - 24.0) / 8.0
PIXEL_MEAN, PIXEL_STD = (0.5,), (0.25,)


def linear_expected(x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """What the ``linear`` model returns for input ``x`` of shape [B,1,4,4]."""
    return np.asarray(x, np.float32).reshape(len(x), 16) @ LINEAR_WEIGHTS


def pixels_expected(pixels: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """What the ``pixels`` model returns for uint8 ``pixels`` of shape [B,1,4,4]."""
    x = pixels.astype(np.float32) / np.float32(255)
    return linear_expected((x - np.float32(PIXEL_MEAN[0])) / np.float32(PIXEL_STD[0]))


def double_expected(x: np.ndarray[Any, Any]) -> dict[str, np.ndarray[Any, Any]]:
    """What the ``double`` model returns for input ``x`` of shape [B,2]."""
    return {"y": x * 2.0, "z": x + 1.0}


def config_for(kind: Kind, name: str, max_batch_size: int = 64) -> VersionConfig:
    """The config.json that matches the graph of ``kind``."""
    if kind == "linear":
        return VersionConfig(name=name, inputs=(TensorSpec("input", "FP32", (-1, 1, 4, 4)),),
                             outputs=(TensorSpec("output", "FP32", (-1, 3)),),
                             max_batch_size=max_batch_size, labels=("zero", "one", "two"))
    if kind == "pixels":
        return VersionConfig(name=name, inputs=(TensorSpec("input", "UINT8", (-1, 1, 4, 4)),),
                             outputs=(TensorSpec("output", "FP32", (-1, 3)),),
                             max_batch_size=max_batch_size, labels=("zero", "one", "two"),
                             normalization=Normalization(PIXEL_MEAN, PIXEL_STD))
    if kind == "double":
        return VersionConfig(name=name, inputs=(TensorSpec("x", "FP32", (-1, 2)),),
                             outputs=(TensorSpec("y", "FP32", (-1, 2)),
                                      TensorSpec("z", "FP32", (-1, 2))),
                             max_batch_size=max_batch_size)
    return VersionConfig(name=name, inputs=(TensorSpec("x", "FP32", (-1, 4)),),
                         outputs=(TensorSpec("y", "FP32", (-1, 4)),),
                         max_batch_size=max_batch_size)


def _value(name: str, dims: list[Any]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


def build_onnx(kind: Kind, slow_iterations: int = 2000) -> bytes:
    """Serialized ONNX model of ``kind`` (see the module docstring)."""
    if kind == "linear":
        nodes = [helper.make_node("Flatten", ["input"], ["flat"], axis=1),
                 helper.make_node("MatMul", ["flat", "w"], ["output"])]
        graph = helper.make_graph(nodes, "linear", [_value("input", ["N", 1, 4, 4])],
                                  [_value("output", ["N", 3])],
                                  [numpy_helper.from_array(LINEAR_WEIGHTS, "w")])
    elif kind == "pixels":
        nodes = [helper.make_node("Cast", ["input"], ["f"], to=TensorProto.FLOAT),
                 helper.make_node("Div", ["f", "k255"], ["unit"]),
                 helper.make_node("Sub", ["unit", "mean"], ["centred"]),
                 helper.make_node("Div", ["centred", "std"], ["normalised"]),
                 helper.make_node("Flatten", ["normalised"], ["flat"], axis=1),
                 helper.make_node("MatMul", ["flat", "w"], ["output"])]
        pixels = helper.make_tensor_value_info("input", TensorProto.UINT8, ["N", 1, 4, 4])
        graph = helper.make_graph(nodes, "pixels", [pixels], [_value("output", ["N", 3])], [
            numpy_helper.from_array(LINEAR_WEIGHTS, "w"),
            numpy_helper.from_array(np.array(255, np.float32), "k255"),
            numpy_helper.from_array(np.array(PIXEL_MEAN[0], np.float32), "mean"),
            numpy_helper.from_array(np.array(PIXEL_STD[0], np.float32), "std")])
    elif kind == "double":
        nodes = [helper.make_node("Mul", ["x", "two"], ["y"]),
                 helper.make_node("Add", ["x", "one"], ["z"])]
        graph = helper.make_graph(nodes, "double", [_value("x", ["N", 2])],
                                  [_value("y", ["N", 2]), _value("z", ["N", 2])],
                                  [numpy_helper.from_array(np.array(2.0, np.float32), "two"),
                                   numpy_helper.from_array(np.array(1.0, np.float32), "one")])
    else:
        graph = _slow_graph(slow_iterations)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _slow_graph(iterations: int) -> onnx.GraphProto:
    w = np.full((4, 4), 0.25, np.float32)
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("MatMul", ["s_in", "w"], ["prod"]),
         helper.make_node("Tanh", ["prod"], ["s_out"])],
        "step",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []), _value("s_in", None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), _value("s_out", None)])
    nodes = [
        helper.make_node("Loop", ["trips", "cond", "x"], ["s"], body=body),
        # y = x + 0 * s: exactly x, but only once the loop has run
        helper.make_node("Mul", ["s", "zero"], ["nothing"]),
        helper.make_node("Add", ["x", "nothing"], ["y"]),
    ]
    inits = [numpy_helper.from_array(np.array(iterations, np.int64), "trips"),
             numpy_helper.from_array(np.array(True), "cond"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(w, "w")]
    return helper.make_graph(nodes, "slow", [_value("x", ["N", 4])], [_value("y", ["N", 4])],
                             inits)


def write_test_model(repo: Path, name: str, version: int, *, kind: Kind = "linear",
                     max_batch_size: int = 64, policy: ModelPolicy | None = None,
                     config: VersionConfig | None = None, corrupt: bool = False,
                     slow_iterations: int = 2000) -> Path:
    """Write ``<repo>/<name>/<version>/`` (model.onnx + config.json); returns that folder.

    ``policy`` also writes ``<repo>/<name>/model.json``; ``config`` replaces the matching
    config.json (e.g. to make the signature disagree); ``corrupt`` writes garbage instead of
    ONNX. A new version appears atomically (built in a "."-prefixed folder, then renamed),
    an existing one has its files replaced one by one, as a re-export would.
    """
    model_dir = repo / name
    model_dir.mkdir(parents=True, exist_ok=True)
    if policy is not None:
        (model_dir / POLICY_FILE).write_text(policy.to_json(), encoding="utf-8")
    onnx_bytes = b"this is not an ONNX model" if corrupt else build_onnx(kind, slow_iterations)
    config_text = (config or config_for(kind, name, max_batch_size)).to_json()
    target = model_dir / str(version)
    if target.exists():
        for file, data in ((MODEL_FILE, onnx_bytes), (CONFIG_FILE, config_text.encode())):
            fd, tmp = tempfile.mkstemp(dir=target, prefix=".tmp-")
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            Path(tmp).replace(target / file)
        return target
    staging = Path(tempfile.mkdtemp(dir=model_dir, prefix=f".tmp-{version}-"))
    try:
        (staging / MODEL_FILE).write_bytes(onnx_bytes)
        (staging / CONFIG_FILE).write_text(config_text, encoding="utf-8")
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


#: Tolerance for comparing ONNX Runtime's float32 outputs with numpy's: a relative bound alone
#: fails near zero, where a float32 GEMM's rounding of large partial sums (the linear model's
#: reach ~100) leaves absolute errors of ~1e-6 whatever the batch split (one fresh-clone run
#: saw 3.7e-7 on a value of 0.0255). Use as ``assert_allclose(a, b, **ORT_TOLERANCE)``.
ORT_TOLERANCE: dict[str, float] = {"rtol": 1e-5, "atol": 1e-4}
