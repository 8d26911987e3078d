"""Helpers for the over-the-wire tests: request builders and call wrappers."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np

from cnnserve.proto import grpc_service_pb2 as pb
from cnnserve.proto import grpc_service_pb2_grpc as pb_grpc


def infer_request(model: str, x: np.ndarray[Any, Any], input_name: str = "input", *,
                  outputs: Sequence[str] = (), request_id: str = "", version: str = "",
                  class_count: int = 0, timeout_us: int | None = None) -> pb.ModelInferRequest:
    """A ModelInferRequest carrying ``x`` as raw FP32 contents, like tritonclient sends."""
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    request.inputs.add(name=input_name, datatype="FP32", shape=x.shape)
    request.raw_input_contents.append(np.ascontiguousarray(x, np.float32).tobytes())
    for name in outputs:
        output = request.outputs.add(name=name)
        if class_count:
            output.parameters["classification"].int64_param = class_count
    if timeout_us is not None:
        request.parameters["timeout"].int64_param = timeout_us
    return request


def output_array(response: pb.ModelInferResponse, name: str) -> np.ndarray[Any, Any]:
    """The named output of a response, decoded from raw_output_contents."""
    for index, tensor in enumerate(response.outputs):
        if tensor.name == name:
            raw = response.raw_output_contents[index]
            if tensor.datatype == "BYTES":
                return np.array(_split_bytes(raw), dtype=object).reshape(tuple(tensor.shape))
            assert tensor.datatype == "FP32", tensor.datatype
            return np.frombuffer(raw, np.float32).reshape(tuple(tensor.shape))
    raise AssertionError(f"no output {name!r} in {[t.name for t in response.outputs]}")


def _split_bytes(raw: bytes) -> list[bytes]:
    items, offset = [], 0
    while offset < len(raw):
        length = int.from_bytes(raw[offset:offset + 4], "little")
        items.append(raw[offset + 4:offset + 4 + length])
        offset += 4 + length
    return items


async def call_error(call: Any) -> grpc.aio.AioRpcError:
    """Await a call that must fail; return its error."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc
    raise AssertionError("the call succeeded, but it should have failed")


def stub(channel: grpc.aio.Channel) -> pb_grpc.GRPCInferenceServiceStub:
    """The protocol stub on ``channel``."""
    return pb_grpc.GRPCInferenceServiceStub(channel)


def random_images(rows: int, seed: int) -> np.ndarray[Any, Any]:
    """Inputs for the ``linear`` test model: [rows, 1, 4, 4] float32, distinct per seed."""
    return np.random.default_rng(seed).normal(size=(rows, 1, 4, 4)).astype(np.float32)


async def eventually(predicate: Any, timeout_s: float = 10.0, what: str = "condition") -> None:
    """Wait until ``predicate()`` is true, checking every millisecond.

    For states the server exposes no event for (a request reached the engine, a batch is
    running); raises AssertionError after ``timeout_s`` seconds.
    """
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout_s
    while not predicate():
        if loop.time() > give_up:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)


def inflight(metrics: Any, model: str, version: str) -> float:
    """The cnnserve_inflight_requests gauge of one model version."""
    value = metrics.registry.get_sample_value("cnnserve_inflight_requests",
                                              {"model": model, "version": version})
    return float(value or 0.0)


class WireServer:
    """A started in-process server: the real Engine behind create_server on 127.0.0.1:0."""

    def __init__(self, engine: Any, metrics: Any, grpc_server: Any, port: int) -> None:
        self.engine = engine
        self.metrics = metrics
        self.grpc_server = grpc_server
        self.port = port
        self.address = f"127.0.0.1:{port}"

    def channel(self, **options: Any) -> Any:
        """A plaintext grpc.aio channel to the server (close it, or use ``async with``)."""
        import grpc

        return grpc.aio.insecure_channel(self.address, options=list(options.items()))
