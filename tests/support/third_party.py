"""ONNX graphs as other tools write them: no cnnserve metadata, Triton-style repositories.

Each builder returns an ``onnx.ModelProto`` made with ``onnx.helper`` (no torch);
:func:`write_version` puts one into ``<repo>/<model>/<version>/`` with nothing beside it
(or with external data), and :func:`write_pbtxt` writes a Triton ``config.pbtxt``.
:func:`ort_run` is the in-process ONNX Runtime reference the served values are compared
with. The ``light_*`` CNNs are the real ImageNet graphs the ``onnx`` package ships (weights
replaced by constants) with the batch dimension fixed at 1; :func:`symbolic_batch` makes it
a symbol, as onnx tools do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
CLASSIFIER_WEIGHTS = (np.arange(15, dtype=np.float32).reshape(3, 5) % 7 - 3.0) / 2.0


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="third-party-exporter")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def multi_io() -> onnx.ModelProto:
    """Inputs "a" FP32 [N,3] and "ids" INT64 [N,2]; outputs "sum" = a + 1 (FP32),
    "twice" = ids * 2 (INT64), "positive" = ids > 0 (BOOL)."""
    nodes = [helper.make_node("Add", ["a", "one"], ["sum"]),
             helper.make_node("Mul", ["ids", "two"], ["twice"]),
             helper.make_node("Greater", ["ids", "zero"], ["positive"])]
    graph = helper.make_graph(
        nodes, "multi_io",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 3]),
         helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 2])],
        [helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["batch", 3]),
         helper.make_tensor_value_info("twice", TensorProto.INT64, ["batch", 2]),
         helper.make_tensor_value_info("positive", TensorProto.BOOL, ["batch", 2])],
        [numpy_helper.from_array(np.array(1.0, np.float32), "one"),
         numpy_helper.from_array(np.array(2, np.int64), "two"),
         numpy_helper.from_array(np.array(0, np.int64), "zero")])
    return _model(graph)


def fixed_shape() -> onnx.ModelProto:
    """No batch dimension: "x" INT32 [3,4] -> "total" INT32 [4] (column sums) and
    "scaled" FP32 [3,4] = x * 0.5."""
    nodes = [helper.make_node("ReduceSum", ["x", "axis"], ["total"], keepdims=0),
             helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["xf", "half"], ["scaled"])]
    graph = helper.make_graph(
        nodes, "fixed_shape", [helper.make_tensor_value_info("x", TensorProto.INT32, [3, 4])],
        [helper.make_tensor_value_info("total", TensorProto.INT32, [4]),
         helper.make_tensor_value_info("scaled", TensorProto.FLOAT, [3, 4])],
        [numpy_helper.from_array(np.array([0], np.int64), "axis"),
         numpy_helper.from_array(np.array(0.5, np.float32), "half")])
    return _model(graph)


def small_types() -> onnx.ModelProto:
    """"pixels" UINT8 [N,2,2] -> "half" FP16 [N,2,2] = pixels / 2 and "bright" BOOL
    [N,2,2] = pixels > 127; "flag" BOOL [N,1] -> "flipped" BOOL [N,1] = not flag."""
    nodes = [helper.make_node("Cast", ["pixels"], ["p16"], to=TensorProto.FLOAT16),
             helper.make_node("Div", ["p16", "two"], ["half"]),
             helper.make_node("Greater", ["pixels", "mid"], ["bright"]),
             helper.make_node("Not", ["flag"], ["flipped"])]
    graph = helper.make_graph(
        nodes, "small_types",
        [helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["N", 2, 2]),
         helper.make_tensor_value_info("flag", TensorProto.BOOL, ["N", 1])],
        [helper.make_tensor_value_info("half", TensorProto.FLOAT16, ["N", 2, 2]),
         helper.make_tensor_value_info("bright", TensorProto.BOOL, ["N", 2, 2]),
         helper.make_tensor_value_info("flipped", TensorProto.BOOL, ["N", 1])],
        [numpy_helper.from_array(np.array(2.0, np.float16), "two"),
         numpy_helper.from_array(np.array(127, np.uint8), "mid")])
    return _model(graph)


def classifier(batch: int | str = "N", size: int = 4) -> onnx.ModelProto:
    """An image classifier: "image" FP32 [batch,3,size,size] -> channel means [batch,3]
    -> MatMul(CLASSIFIER_WEIGHTS) -> "scores" FP32 [batch,5]."""
    nodes = [helper.make_node("ReduceMean", ["image", "axes"], ["means"], keepdims=0),
             helper.make_node("MatMul", ["means", "w"], ["scores"])]
    graph = helper.make_graph(
        nodes, "classifier",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, 3, size, size])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [batch, 5])],
        [numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
         numpy_helper.from_array(CLASSIFIER_WEIGHTS, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model


def big_linear(features: int = 64) -> onnx.ModelProto:
    """"x" FP32 [N,features] -> "y" = x @ W with a 64x64 weight (stored as external data)."""
    w = np.random.default_rng(3).normal(size=(features, features)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "big_linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", features])],
        [numpy_helper.from_array(w, "w")])
    return _model(graph)


def light_model(name: str) -> onnx.ModelProto:
    """One of the real CNNs in onnx/backend/test/data/light (e.g. "squeezenet")."""
    folder = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
    return onnx.load(str(folder / f"light_{name}.onnx"))


def symbolic_batch(model: onnx.ModelProto, symbol: str = "N") -> onnx.ModelProto:
    """A copy whose graph inputs (not initializers) and outputs have first dimension ``symbol``."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    weights = {init.name for init in copy.graph.initializer}
    for value in [*copy.graph.input, *copy.graph.output]:
        if value.name not in weights:
            value.type.tensor_type.shape.dim[0].dim_param = symbol
    return copy


def write_version(repo: Path, name: str, model: onnx.ModelProto, version: int = 1, *,
                  external_data: bool = False, filename: str = "model.onnx") -> Path:
    """Write ``model`` alone into ``<repo>/<name>/<version>/<filename>``; return the file."""
    folder = repo / name / str(version)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / filename
    if external_data:
        onnx.save_model(model, str(path), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=f"{filename}.data",
                        size_threshold=0)
    else:
        onnx.save_model(model, str(path))
    return path


def write_pbtxt(repo: Path, name: str, text: str, **files: str) -> Path:
    """Write ``<repo>/<name>/config.pbtxt`` (and extra files, e.g. labels) into the model folder."""
    folder = repo / name
    folder.mkdir(parents=True, exist_ok=True)
    for filename, content in files.items():
        (folder / filename.replace("__", ".")).write_text(content, encoding="utf-8")
    path = folder / "config.pbtxt"
    path.write_text(text, encoding="utf-8")
    return path


def ort_run(model: onnx.ModelProto | Path, feeds: dict[str, Any]) -> dict[str, Any]:
    """Every output of ``model`` on ``feeds``, computed by ONNX Runtime in this process."""
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


CLASSIFIER_PBTXT = """
name: "cls"
platform: "onnxruntime_onnx"
max_batch_size: 4
input [ { name: "image" data_type: TYPE_FP32 format: FORMAT_NCHW dims: [ 3, 4, 4 ] } ]
output [ { name: "scores" data_type: TYPE_FP32 dims: [ 5 ] label_filename: "labels.txt" } ]
dynamic_batching {
  max_queue_delay_microseconds: 250
  preferred_batch_size: [ 2, 4 ]
  default_queue_policy { max_queue_size: 3 }
}
instance_group [ { count: 2 kind: KIND_CPU }, { count: 1 kind: KIND_CPU } ]
version_policy: { specific: { versions: [ 1, 3 ] } }
default_model_filename: "net.onnx"
parameters {
  key: "normalization"
  value: { string_value: "{\\"mean\\": [0.5, 0.5, 0.5], \\"std\\": [0.25, 0.25, 0.25]}" }
}
parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
"""
CLASSIFIER_LABELS = "cat\ndog\n\nfox\nowl\n"


def write_classifier_repo(repo: Path) -> None:
    """Model "cls": versions 1-3 of :func:`classifier` as net.onnx and CLASSIFIER_PBTXT,
    which uses every config.pbtxt field cnnserve honours."""
    for version in (1, 2, 3):
        write_version(repo, "cls", classifier(), version, filename="net.onnx")
    write_pbtxt(repo, "cls", CLASSIFIER_PBTXT, labels__txt=CLASSIFIER_LABELS)
