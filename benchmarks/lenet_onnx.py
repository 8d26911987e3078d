"""A LeNet-5-sized ONNX model built with the onnx package alone (no torch), for benchmarks.

Random weights: throughput and latency do not depend on what the weights are.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from cnnserve.common.files import write_atomically
from cnnserve.common.repository import ModelPolicy, Normalization, TensorSpec, VersionConfig


def lenet5_graph(seed: int = 0) -> onnx.ModelProto:
    """conv 6@5x5 -> relu -> pool 2 -> conv 16@5x5 -> relu -> pool 2 -> 120 -> 84 -> 10."""
    rng = np.random.default_rng(seed)

    def init(name: str, *shape: int) -> onnx.TensorProto:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
        data = rng.normal(0, 1 / np.sqrt(fan_in), size=shape).astype(np.float32)
        return numpy_helper.from_array(data, name)

    inits = [init("w1", 6, 1, 5, 5), init("b1", 6), init("w2", 16, 6, 5, 5), init("b2", 16),
             init("w3", 120, 256), init("b3", 120), init("w4", 84, 120), init("b4", 84),
             init("w5", 10, 84), init("b5", 10)]
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], kernel_shape=[5, 5]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], kernel_shape=[5, 5]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("MaxPool", ["r2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p2"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["g3"], transB=1),
        helper.make_node("Relu", ["g3"], ["r3"]),
        helper.make_node("Gemm", ["r3", "w4", "b4"], ["g4"], transB=1),
        helper.make_node("Relu", ["g4"], ["r4"]),
        helper.make_node("Gemm", ["r4", "w5", "b5"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "lenet5",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def write_lenet_repository(repository: Path, names: tuple[str, ...] = ("lenet",),
                           max_batch_size: int = 256, queue_delay_us: int = 0) -> None:
    """Write each name as version 1 of a LeNet model into ``repository``."""
    for i, name in enumerate(names):
        version = repository / name / "1"
        version.mkdir(parents=True, exist_ok=True)
        onnx.save(lenet5_graph(seed=i), str(version / "model.onnx"))
        config = VersionConfig(
            name=name,
            inputs=(TensorSpec("input", "FP32", (-1, 1, 28, 28)),),
            outputs=(TensorSpec("logits", "FP32", (-1, 10)),),
            max_batch_size=max_batch_size,
            labels=tuple(str(d) for d in range(10)),
            normalization=Normalization(mean=(0.13,), std=(0.31,)),
            architecture="lenet5 (random weights, benchmark)",
        )
        write_atomically(version / "config.json", config.to_json())
        policy = ModelPolicy()
        policy = ModelPolicy(dynamic_batching=type(policy.dynamic_batching)(
            max_queue_delay_microseconds=queue_delay_us, max_queue_size=4096))
        write_atomically(repository / name / "model.json", policy.to_json())
