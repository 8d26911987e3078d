"""Model control and draining over the wire: load/unload/reload under traffic, a corrupt
version beside a good one, and a graceful shutdown with requests in flight."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

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

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _traffic(rpc: Any, stop: asyncio.Event, versions: list[str]) -> None:
    """Send linear requests until ``stop``; every one must succeed with the right values."""
    seed = 0
    while not stop.is_set():
        seed += 1
        x = random_images(2, seed)
        reply = await rpc.ModelInfer(infer_request("linear", x))
        np.testing.assert_allclose(output_array(reply, "output"), linear_expected(x),
                                   **ORT_TOLERANCE)
        versions.append(reply.model_version)


async def test_reload_under_traffic_loses_no_request(wire_server: Any,
                                                     model_repo: Path) -> None:
    write_test_model(model_repo, "linear", 1)
    server = await wire_server(model_repo, control_mode="explicit", models=("linear",))
    versions: list[str] = []
    stop = asyncio.Event()
    async with server.channel() as channel:
        rpc = stub(channel)
        workers = [asyncio.ensure_future(_traffic(rpc, stop, versions)) for _ in range(4)]
        await eventually(lambda: len(versions) >= 8, what="traffic on version 1")
        write_test_model(model_repo, "linear", 2)
        await rpc.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="linear"))
        served_before = len(versions)
        await eventually(lambda: len(versions) >= served_before + 8, what="traffic after load")
        stop.set()
        await asyncio.gather(*workers)  # raises if any request failed
        meta = await rpc.ModelMetadata(pb.ModelMetadataRequest(name="linear"))
    assert list(meta.versions) == ["2"]
    assert versions[0] == "1" and versions[-1] == "2"


async def test_unload_lets_in_flight_requests_finish_then_refuses(wire_server: Any,
                                                                  model_repo: Path) -> None:
    write_test_model(model_repo, "slow", 1, kind="slow", slow_iterations=100_000,
                     policy=ModelPolicy(max_batch_size=1, dynamic_batching=DynamicBatching(
                         max_queue_delay_microseconds=0)))
    server = await wire_server(model_repo, control_mode="explicit", models=("slow",))
    x = np.full((1, 4), 3.0, np.float32)
    async with server.channel() as channel:
        rpc = stub(channel)
        running = [asyncio.ensure_future(rpc.ModelInfer(infer_request("slow", x, "x")))
                   for _ in range(3)]
        await eventually(lambda: inflight(server.metrics, "slow", "1") == 3, what="3 in flight")
        await rpc.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="slow"))
        for reply in await asyncio.gather(*running):
            np.testing.assert_array_equal(output_array(reply, "y"), x)
        after = await call_error(rpc.ModelInfer(infer_request("slow", x, "x")))
        ready = await rpc.ModelReady(pb.ModelReadyRequest(name="slow"))
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="slow"))
        await rpc.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="slow"))
        again = await rpc.ModelInfer(infer_request("slow", x, "x"))
    assert after.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND)
    assert "'slow'" in (after.details() or "")
    assert not ready.ready and health.status == NOT_SERVING
    np.testing.assert_array_equal(output_array(again, "y"), x)


async def test_a_corrupt_version_leaves_the_good_one_serving(wire_server: Any,
                                                             model_repo: Path) -> None:
    write_test_model(model_repo, "linear", 1)
    server = await wire_server(model_repo, control_mode="explicit", models=("linear",))
    write_test_model(model_repo, "linear", 2, corrupt=True)
    x = random_images(1, seed=9)
    async with server.channel() as channel:
        rpc = stub(channel)
        error = await call_error(rpc.RepositoryModelLoad(
            pb.RepositoryModelLoadRequest(model_name="linear")))
        reply = await rpc.ModelInfer(infer_request("linear", x))
        index = await rpc.RepositoryIndex(pb.RepositoryIndexRequest())
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="linear"))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "version 2" in (error.details() or "")
    assert reply.model_version == "1"
    np.testing.assert_allclose(output_array(reply, "output"), linear_expected(x),
                               **ORT_TOLERANCE)
    states = {m.version: (m.state, m.reason) for m in index.models if m.name == "linear"}
    assert states["1"] == ("READY", "")
    assert states["2"][0] == "UNAVAILABLE" and states["2"][1]
    assert health.status == SERVING


async def test_shutdown_drains_in_flight_and_refuses_new_requests(wire_server: Any,
                                                                  model_repo: Path) -> None:
    write_test_model(model_repo, "slow", 1, kind="slow", slow_iterations=100_000,
                     policy=ModelPolicy(max_batch_size=1, dynamic_batching=DynamicBatching(
                         max_queue_delay_microseconds=0)))
    server = await wire_server(model_repo)
    x = np.full((1, 4), 7.0, np.float32)
    async with server.channel() as channel:
        rpc = stub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        running = [asyncio.ensure_future(rpc.ModelInfer(infer_request("slow", x, "x")))
                   for _ in range(3)]
        await eventually(lambda: inflight(server.metrics, "slow", "1") == 3, what="3 in flight")
        draining = asyncio.ensure_future(server.grpc_server.shutdown(30.0))
        await eventually(lambda: not server.engine.ready, what="drain to begin")
        status = await health.Check(health_pb2.HealthCheckRequest())
        ready = await rpc.ServerReady(pb.ServerReadyRequest())
        refused = await call_error(rpc.ModelInfer(infer_request("slow", x, "x")))
        replies = await asyncio.gather(*running)
        await draining
    assert status.status == NOT_SERVING and not ready.ready
    assert refused.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in (refused.details() or "")
    for reply in replies:
        np.testing.assert_array_equal(output_array(reply, "y"), x)
