"""Bare ONNX files (no config.json, no config.pbtxt) are served from what their graph says.

Graphs are built the way other exporters write them (tests/support/third_party.py), plus the
real CNNs the onnx package ships; every answer is compared with ONNX Runtime run in this
process on the same inputs: exactly for integer and boolean outputs, within float tolerance
otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from cnnserve.client.aio import AsyncInferenceClient
from cnnserve.client.errors import InferenceServerError
from cnnserve.proto import grpc_service_pb2 as pb
from cnnserve.server.engine.autocomplete import DEFAULT_MAX_BATCH_SIZE
from tests.support.models import ORT_TOLERANCE
from tests.support.third_party import (
    big_linear,
    fixed_shape,
    light_model,
    multi_io,
    ort_run,
    small_types,
    symbolic_batch,
    write_version,
)
from tests.support.wire import call_error, stub


def _same(served: dict[str, Any], expected: dict[str, Any]) -> None:
    assert set(served) == set(expected)
    for name, want in expected.items():
        got = served[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        if np.issubdtype(want.dtype, np.floating):
            np.testing.assert_allclose(got, want, **ORT_TOLERANCE)
        else:
            np.testing.assert_array_equal(got, want)


async def test_several_inputs_and_outputs_with_int64_and_bool_are_derived_and_batch(
        wire_server: Any, model_repo: Path) -> None:
    graph = multi_io()
    write_version(model_repo, "multi", graph)
    server = await wire_server(model_repo)
    async with AsyncInferenceClient(server.address) as client:
        meta = await client.model_metadata("multi")
        assert [(t.name, t.datatype, t.shape) for t in meta.inputs] == [
            ("a", "FP32", (-1, 3)), ("ids", "INT64", (-1, 2))]
        assert [(t.name, t.datatype, t.shape) for t in meta.outputs] == [
            ("sum", "FP32", (-1, 3)), ("twice", "INT64", (-1, 2)), ("positive", "BOOL", (-1, 2))]
        config = await client.model_config("multi")
        assert config.max_batch_size == DEFAULT_MAX_BATCH_SIZE
        assert [list(t.dims) for t in config.input] == [[3], [2]]
        assert config.parameters["config_source"].string_value == "the graph"
        rng = np.random.default_rng(0)
        feeds = {"a": rng.normal(size=(5, 3)).astype(np.float32),
                 "ids": rng.integers(-2**40, 2**40, size=(5, 2), dtype=np.int64)}
        _same(await client.infer("multi", feeds), ort_run(graph, feeds))


async def test_a_fixed_shape_graph_is_served_unbatched_with_its_exact_shapes(
        wire_server: Any, model_repo: Path) -> None:
    graph = fixed_shape()
    write_version(model_repo, "fixed", graph)
    server = await wire_server(model_repo)
    async with AsyncInferenceClient(server.address) as client:
        meta = await client.model_metadata("fixed")
        assert [(t.name, t.shape) for t in (*meta.inputs, *meta.outputs)] == [
            ("x", (3, 4)), ("total", (4,)), ("scaled", (3, 4))]
        config = await client.model_config("fixed")
        assert config.max_batch_size == 0
        assert [list(t.dims) for t in config.output] == [[4], [3, 4]]
        x = np.arange(12, dtype=np.int32).reshape(3, 4) - 5
        _same(await client.infer("fixed", {"x": x}), ort_run(graph, {"x": x}))
    async with server.channel() as channel:
        request = pb.ModelInferRequest(model_name="fixed")
        request.inputs.add(name="x", datatype="INT32", shape=[1, 3, 4])
        request.raw_input_contents.append(np.zeros((1, 3, 4), np.int32).tobytes())
        error = await call_error(stub(channel).ModelInfer(request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "expects shape [3,4], got [1,3,4]" in (error.details() or "")


async def test_uint8_fp16_and_bool_tensors_round_trip(wire_server: Any,
                                                      model_repo: Path) -> None:
    graph = small_types()
    write_version(model_repo, "small", graph)
    server = await wire_server(model_repo)
    feeds = {"pixels": np.array([[[0, 255], [127, 128]], [[3, 200], [1, 2]]], np.uint8),
             "flag": np.array([[True], [False]])}
    async with AsyncInferenceClient(server.address) as client:
        meta = await client.model_metadata("small")
        assert [t.datatype for t in (*meta.inputs, *meta.outputs)] == [
            "UINT8", "BOOL", "FP16", "BOOL", "BOOL"]
        _same(await client.infer("small", feeds), ort_run(graph, feeds))


async def test_an_external_data_model_is_served(wire_server: Any, model_repo: Path) -> None:
    path = write_version(model_repo, "ext", big_linear(), external_data=True)
    assert (path.parent / "model.onnx.data").stat().st_size >= 64 * 64 * 4
    server = await wire_server(model_repo)
    x = np.random.default_rng(1).normal(size=(3, 64)).astype(np.float32)
    async with AsyncInferenceClient(server.address) as client:
        _same(await client.infer("ext", {"x": x}), ort_run(path, {"x": x}))


async def test_real_cnns_with_a_fixed_and_a_symbolic_batch_dimension(
        wire_server: Any, model_repo: Path) -> None:
    densenet = light_model("densenet121")
    squeezenet = symbolic_batch(light_model("squeezenet"))
    write_version(model_repo, "densenet", densenet)
    write_version(model_repo, "squeezenet", squeezenet)
    server = await wire_server(model_repo)
    rng = np.random.default_rng(2)
    async with AsyncInferenceClient(server.address) as client:
        assert (await client.model_config("densenet")).max_batch_size == 0
        assert (await client.model_config("squeezenet")).max_batch_size == \
            DEFAULT_MAX_BATCH_SIZE
        x1 = rng.random((1, 3, 224, 224), dtype=np.float32)
        _same(await client.infer("densenet", {"data_0": x1}), ort_run(densenet, {"data_0": x1}))
        x2 = rng.random((2, 3, 224, 224), dtype=np.float32)
        _same(await client.infer("squeezenet", {"data_0": x2}),
              ort_run(squeezenet, {"data_0": x2}))


async def test_classification_of_an_unbatched_model_answers_one_item(
        wire_server: Any, model_repo: Path) -> None:
    write_version(model_repo, "fixed", fixed_shape())
    server = await wire_server(model_repo)
    async with server.channel() as channel:
        request = pb.ModelInferRequest(model_name="fixed")
        request.inputs.add(name="x", datatype="INT32", shape=[3, 4])
        request.raw_input_contents.append(
            np.array([[1, 9, 0, 2]] * 3, np.int32).tobytes())
        request.outputs.add(name="total").parameters["classification"].int64_param = 2
        response = await stub(channel).ModelInfer(request)
    assert list(response.outputs[0].shape) == [2]
    assert response.raw_output_contents[0] == b"\x04\x00\x00\x0027:1\x03\x00\x00\x006:3"


async def test_a_graph_the_protocol_cannot_carry_is_refused_at_load(
        wire_server: Any, model_repo: Path) -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("SequenceConstruct", ["x"], ["seq"])], "seq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_sequence_value_info("seq", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    write_version(model_repo, "seq", model)
    server = await wire_server(model_repo)
    (entry,) = server.engine.index()
    assert entry.state == "UNAVAILABLE"
    assert "output 'seq' has type seq(tensor(float))" in entry.reason
    async with AsyncInferenceClient(server.address) as client:
        with pytest.raises(InferenceServerError) as caught:
            await client.model_metadata("seq")
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


async def test_a_symbolic_first_dimension_that_is_no_batch_fails_the_load(
        wire_server: Any, model_repo: Path) -> None:
    from onnx import TensorProto, helper

    # "T" looks like a batch dimension, but the graph keeps only the first row (a mask
    # computed from the data, so no shape inference sees it): 1 row in, 1 out; 2 in, 1 out.
    nodes = [helper.make_node("ReduceSum", ["x", "ax1"], ["r"], keepdims=0),
             helper.make_node("Mul", ["r", "zero"], ["z"]),
             helper.make_node("Add", ["z", "one"], ["ones"]),
             helper.make_node("CumSum", ["ones", "ax0"], ["count"]),
             helper.make_node("Equal", ["count", "one"], ["first"]),
             helper.make_node("Compress", ["x", "first"], ["head"], axis=0)]
    graph = helper.make_graph(
        nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", 3])],
        [helper.make_tensor_value_info("head", TensorProto.FLOAT, ["T", 3])],
        [helper.make_tensor("ax1", TensorProto.INT64, [1], [1]),
         helper.make_tensor("ax0", TensorProto.INT64, [], [0]),
         helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
         helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    write_version(model_repo, "head", model)
    server = await wire_server(model_repo)
    (entry,) = server.engine.index()
    assert entry.state == "UNAVAILABLE"
    assert "a batch of 2 rows gave outputs of shapes {'head': [1, 3]}" in entry.reason
