"""No request outlives its answer, and nothing of a request the model cannot take is decoded.

Memory is checked deterministically rather than by RSS: with the cycle collector off, the
requests that fail are sent, and then a collection with DEBUG_SAVEALL shows whatever only a
reference cycle still held. A failed request must not be among it (it was: exception ->
traceback -> frame -> request kept each failed 64 MiB body until the next GC pass).
"""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from cnnserve.common.datatypes import encode_bytes
from cnnserve.common.repository import CONFIG_FILE, MODEL_FILE, TensorSpec, VersionConfig
from cnnserve.proto import grpc_service_pb2 as pb
from cnnserve.server.process.memory import MemoryTrimmer
from tests.support.models import write_test_model
from tests.support.wire import call_error, infer_request, output_array, random_images, stub

MiB = 1024 * 1024


@pytest.fixture
def gc_disabled() -> Iterator[None]:
    """The cycle collector off for the test: only reference counting frees anything."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _collect_cycles() -> list[Any]:
    """Everything that only reference cycles kept alive (collected now)."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        return list(gc.garbage)
    finally:
        gc.garbage.clear()
        gc.set_debug(0)


def _bytes_body(model: str, shape: tuple[int, ...], raw: bytes) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="input", datatype="BYTES", shape=shape)
    request.raw_input_contents.append(raw)
    return request


async def test_failed_large_requests_are_freed_without_a_gc_pass(
        wire_server: Any, model_repo: Path, gc_disabled: None) -> None:
    write_test_model(model_repo, "linear", 1)
    server = await wire_server(model_repo)
    big = np.zeros((MiB, 1, 4, 1), np.float32)  # 16 MiB of the wrong shape
    failing = [
        infer_request("linear", big),  # wrong shape
        infer_request("nope", big),  # unknown model
        infer_request("../linear", big),  # malformed name
        infer_request("linear", big, version="²"),  # malformed version
        _bytes_body("linear", (1, 1, 4, 4), b"\0" * (16 * MiB)),  # BYTES for FP32
        infer_request("linear", random_images(1, 0), outputs=["nope"]),  # no such output
    ]
    options = {"grpc.max_send_message_length": 64 * MiB}
    async with server.channel(**options) as channel:
        rpc = stub(channel)
        await rpc.ModelInfer(infer_request("linear", random_images(1, 0)))  # warm paths up
        _collect_cycles()
        for request in failing:
            error = await call_error(rpc.ModelInfer(request))
            assert error.code() in (grpc.StatusCode.INVALID_ARGUMENT,
                                    grpc.StatusCode.NOT_FOUND), error.details()
        del request, failing
        held = [o for o in _collect_cycles() if isinstance(o, pb.ModelInferRequest)]
    assert not held, f"{len(held)} failed requests were held by reference cycles"


async def test_bytes_body_for_a_float_input_is_refused_before_it_is_decoded(
        wire_server: Any, model_repo: Path) -> None:
    write_test_model(model_repo, "linear", 1)
    server = await wire_server(model_repo)
    # 4 MiB of 4-byte length prefixes of zero: a million BYTES elements had they been split.
    garbage = b"\0" * (4 * MiB)
    async with server.channel() as channel:
        rpc = stub(channel)
        error = await call_error(rpc.ModelInfer(_bytes_body("linear", (1, 1, 4, 4), garbage)))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "expects datatype FP32, got BYTES" in (error.details() or "")
        # A shape of 2**40 rows is refused for its batch size, not for its byte count.
        huge = infer_request("linear", random_images(1, 0))
        del huge.inputs[0].shape[:]
        huge.inputs[0].shape.extend([2**40, 1, 4, 4])
        error = await call_error(rpc.ModelInfer(huge))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "exceeds the model's max_batch_size" in (error.details() or "")
        # So is an input the model does not have, before its data is read.
        other = _bytes_body("linear", (1,), garbage)
        other.inputs[0].name = "other"
        error = await call_error(rpc.ModelInfer(other))
        assert "has no input 'other'" in (error.details() or "")


def _write_strings_model(repo: Path, name: str) -> None:
    """A BYTES model: input [-1,-1] strings, output the same strings (Identity)."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["output"])], name,
        [helper.make_tensor_value_info("input", TensorProto.STRING, ["b", "n"])],
        [helper.make_tensor_value_info("output", TensorProto.STRING, ["b", "n"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    folder = repo / name / "1"
    folder.mkdir(parents=True)
    (folder / MODEL_FILE).write_bytes(model.SerializeToString())
    onnx.checker.check_model(model)
    config = VersionConfig(name=name, inputs=(TensorSpec("input", "BYTES", (-1, -1)),),
                           outputs=(TensorSpec("output", "BYTES", (-1, -1)),),
                           max_batch_size=8, input_layout="", labels=())
    (folder / CONFIG_FILE).write_text(config.to_json())


async def test_bytes_inputs_are_decoded_off_the_loop_and_round_trip(
        wire_server: Any, model_repo: Path) -> None:
    _write_strings_model(model_repo, "strings")
    server = await wire_server(model_repo)
    items = [f"item {i}".encode() for i in range(2 * 1000)]
    async with server.channel() as channel:
        reply = await stub(channel).ModelInfer(
            _bytes_body("strings", (2, 1000), encode_bytes(items)))
        # Shape and count only: ONNX Runtime receives bytes elements as str(bytes) ("b'..'"),
        # a defect of the runtime layer outside this test's concern.
        assert output_array(reply, "output").shape == (2, 1000)
        # A body whose elements do not add up is still refused with the codec's reason.
        error = await call_error(stub(channel).ModelInfer(
            _bytes_body("strings", (1, 3), encode_bytes([b"a", b"b"]))))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "shape needs 3" in (error.details() or "")


async def test_memory_trimmer_trims_once_per_growth_of_the_threshold() -> None:
    trimmer = MemoryTrimmer(threshold_bytes=16 * MiB)
    if not trimmer.available:
        pytest.skip("needs glibc and /proc")
    # Free heap space left by earlier tests would absorb the allocation below: drop it.
    ctypes.CDLL(None).malloc_trim(0)
    trimmer = MemoryTrimmer(threshold_bytes=16 * MiB)
    await trimmer.check()
    assert trimmer.trims == 0
    grown = [bytes(64 * 1024) for _ in range(32 * 16)]  # 32 MiB in pieces malloc keeps
    await trimmer.check()
    assert trimmer.trims == 1
    await trimmer.check()  # still in use: the level after the trim is the new baseline
    assert trimmer.trims == 1
    del grown
