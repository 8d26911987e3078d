"""Invalid requests, overload and deadlines over the wire: each gets its status and message,
and the metrics count what happened."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from cnnserve.common.repository import DynamicBatching, ModelPolicy
from cnnserve.proto import grpc_service_pb2 as pb
from tests.support.models import ORT_TOLERANCE, linear_expected, write_test_model
from tests.support.wire import (
    call_error,
    eventually,
    infer_request,
    inflight,
    output_array,
    random_images,
    stub,
)

Code = grpc.StatusCode


@pytest.fixture
async def server(wire_server: Any, model_repo: Path) -> Any:
    write_test_model(model_repo, "linear", 1, max_batch_size=4)
    return await wire_server(model_repo)


def _x(*shape: int) -> np.ndarray[Any, Any]:
    return np.zeros(shape, np.float32)


def _both_kinds_of_contents() -> pb.ModelInferRequest:
    request = infer_request("linear", _x(1, 1, 4, 4))
    request.inputs[0].contents.fp32_contents.extend([0.0] * 16)
    return request


def _wrong_datatype() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="linear")
    request.inputs.add(name="input", datatype="FP64", shape=[1, 1, 4, 4])
    request.raw_input_contents.append(bytes(8 * 16))
    return request


def _short_raw() -> pb.ModelInferRequest:
    request = infer_request("linear", _x(1, 1, 4, 4))
    request.raw_input_contents[0] = bytes(60)
    return request


def _extra_input() -> pb.ModelInferRequest:
    request = infer_request("linear", _x(1, 1, 4, 4))
    request.inputs.add(name="bias", datatype="FP32", shape=[1])
    request.raw_input_contents.append(bytes(4))
    return request


def _no_inputs() -> pb.ModelInferRequest:
    return pb.ModelInferRequest(model_name="linear")


INVALID: dict[str, tuple[Callable[[], pb.ModelInferRequest], Code, str]] = {
    "unknown model": (lambda: infer_request("nope", _x(1, 1, 4, 4)), Code.NOT_FOUND, "'nope'"),
    "unknown version": (lambda: infer_request("linear", _x(1, 1, 4, 4), version="9"),
                        Code.NOT_FOUND, "'linear'"),
    "wrong rank": (lambda: infer_request("linear", _x(1, 4, 4)), Code.INVALID_ARGUMENT,
                   "model 'linear' input 'input' expects shape [-1,1,4,4], got [1,4,4]"),
    "wrong dimension": (lambda: infer_request("linear", _x(1, 1, 4, 5)), Code.INVALID_ARGUMENT,
                        "model 'linear' input 'input' expects shape [-1,1,4,4], got [1,1,4,5]"),
    "wrong datatype": (_wrong_datatype, Code.INVALID_ARGUMENT,
                       "model 'linear' input 'input' expects datatype FP32, got FP64"),
    "byte size mismatch": (_short_raw, Code.INVALID_ARGUMENT,
                           "model 'linear' input 'input': raw_input_contents holds 60 bytes, "
                           "but shape [1,1,4,4] of FP32 needs 64"),
    "batch over max": (lambda: infer_request("linear", _x(5, 1, 4, 4)), Code.INVALID_ARGUMENT,
                       "model 'linear' input 'input': batch size 5 exceeds the model's "
                       "max_batch_size 4"),
    "missing input": (_no_inputs, Code.INVALID_ARGUMENT,
                      "model 'linear' input 'input' is missing (expects FP32 [-1,1,4,4])"),
    "extra input": (_extra_input, Code.INVALID_ARGUMENT,
                    "model 'linear' has no input 'bias'; its inputs are ['input']"),
    "unknown output": (lambda: infer_request("linear", _x(1, 1, 4, 4), outputs=["probs"]),
                       Code.INVALID_ARGUMENT,
                       "model 'linear' has no output 'probs'; its outputs are ['output']"),
    "raw and typed contents": (_both_kinds_of_contents, Code.INVALID_ARGUMENT,
                               "model 'linear': request uses raw_input_contents, so inputs "
                               "['input'] must not also carry typed contents"),
    "negative timeout": (lambda: infer_request("linear", _x(1, 1, 4, 4), timeout_us=-5),
                         Code.INVALID_ARGUMENT,
                         "parameter 'timeout' must be >= 0 microseconds, got -5"),
}


@pytest.mark.parametrize("case", sorted(INVALID))
async def test_invalid_request_gets_its_status_and_message(server: Any, case: str) -> None:
    build, code, message = INVALID[case]
    async with server.channel() as channel:
        error = await call_error(stub(channel).ModelInfer(build()))
    assert error.code() == code
    details = error.details() or ""
    assert details == message if code == Code.INVALID_ARGUMENT else message in details


async def test_metrics_count_requests_rows_and_failures(server: Any) -> None:
    async with server.channel() as channel:
        rpc = stub(channel)
        await rpc.ModelInfer(infer_request("linear", _x(3, 1, 4, 4)))
        await rpc.ModelInfer(infer_request("linear", _x(1, 1, 4, 4)))
        await call_error(rpc.ModelInfer(infer_request("linear", _x(1, 4, 4))))
        await call_error(rpc.ModelInfer(infer_request("nope", _x(1, 1, 4, 4))))

    def sample(name: str, **labels: str) -> float:
        value = server.metrics.registry.get_sample_value(name, labels)
        return float(value or 0.0)

    linear = {"model": "linear", "version": "1"}
    assert sample("cnnserve_requests_total", **linear) == 3
    assert sample("cnnserve_request_failures_total", **linear, reason="invalid_argument") == 1
    assert sample("cnnserve_request_duration_seconds_count", **linear) == 3
    assert sample("cnnserve_inferences_total", **linear) == 4
    assert inflight(server.metrics, "linear", "1") == 0
    unknown = {"model": "_unknown_", "version": ""}
    assert sample("cnnserve_requests_total", **unknown) == 1
    assert sample("cnnserve_request_failures_total", **unknown, reason="not_found") == 1


def _slow_policy(queue_size: int = 1024) -> ModelPolicy:
    # One row per run, one run at a time and no waiting: requests queue behind a running one.
    return ModelPolicy(max_batch_size=1, instance_count=1, dynamic_batching=DynamicBatching(
        max_queue_delay_microseconds=0, max_queue_size=queue_size))


async def test_a_full_queue_refuses_at_once_with_unavailable(wire_server: Any,
                                                             model_repo: Path) -> None:
    write_test_model(model_repo, "slow", 1, kind="slow", slow_iterations=20_000,
                     policy=_slow_policy(queue_size=1))
    server = await wire_server(model_repo)
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    async with server.channel() as channel:
        rpc = stub(channel)
        results = await asyncio.gather(*(rpc.ModelInfer(infer_request("slow", x, "x"))
                                         for _ in range(6)), return_exceptions=True)
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    served = [r for r in results if not isinstance(r, BaseException)]
    assert refused and served and len(refused) + len(served) == 6
    for error in refused:
        assert error.code() == Code.UNAVAILABLE
        assert "queue" in (error.details() or "")
    for reply in served:
        np.testing.assert_array_equal(output_array(reply, "y"), x)
    failures = server.metrics.registry.get_sample_value(
        "cnnserve_request_failures_total", {"model": "slow", "version": "1",
                                            "reason": "queue_full"})
    assert failures == len(refused)


async def test_deadlines_drop_requests_before_compute(wire_server: Any,
                                                      model_repo: Path) -> None:
    # ~0.1 s per run here: far longer than the 20 ms deadlines below.
    write_test_model(model_repo, "slow", 1, kind="slow", slow_iterations=100_000,
                     policy=_slow_policy())
    server = await wire_server(model_repo)
    x = np.ones((1, 4), np.float32)
    async with server.channel() as channel:
        rpc = stub(channel)
        # The timeout parameter (microseconds) has passed before the batcher sees it.
        expired = await call_error(rpc.ModelInfer(infer_request("slow", x, "x", timeout_us=1)))
        head = asyncio.ensure_future(rpc.ModelInfer(infer_request("slow", x, "x")))
        await eventually(lambda: inflight(server.metrics, "slow", "1") == 1, what="head request")
        # Queued behind the head: the parameter's deadline and the gRPC one pass in the queue.
        queued = await call_error(rpc.ModelInfer(infer_request("slow", x, "x",
                                                               timeout_us=20_000)))
        cut = await call_error(rpc.ModelInfer(infer_request("slow", x, "x"), timeout=0.02))
        await head
        stats = await rpc.ModelStatistics(pb.ModelStatisticsRequest(name="slow"))
    for error in (expired, queued, cut):
        assert error.code() == Code.DEADLINE_EXCEEDED
    assert stats.model_stats[0].execution_count == 1  # only the head request ran


async def test_concurrent_requests_get_their_own_rows_under_load(server: Any) -> None:
    inputs = [random_images(1 + i % 4, seed=i) for i in range(40)]
    async with server.channel() as channel:
        rpc = stub(channel)
        replies = await asyncio.gather(*(rpc.ModelInfer(infer_request("linear", x))
                                         for x in inputs))
    for x, reply in zip(inputs, replies, strict=True):
        np.testing.assert_allclose(output_array(reply, "output"), linear_expected(x),
                                   **ORT_TOLERANCE)
