"""With a token, a call without it is refused from its metadata alone: before its body has
arrived, and without parsing any of it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cnnserve.proto import grpc_service_pb2 as pb
from cnnserve.server.process.settings import Settings
from tests.support.models import write_test_model
from tests.support.wire import call_error, infer_request, random_images, stub

TOKEN = "s3cret"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
MiB = 1024 * 1024


async def _never() -> AsyncIterator[bytes]:
    await asyncio.Event().wait()  # the body never comes
    yield b""


async def test_unauthenticated_calls_are_refused_before_the_body_arrives(
        wire_server: Any, model_repo: Path) -> None:
    write_test_model(model_repo, "linear", 1)
    server = await wire_server(model_repo, settings=Settings(host="127.0.0.1", token=TOKEN))
    async with server.channel() as channel:
        for method in ("ModelInfer", "ModelMetadata", "RepositoryModelLoad"):
            # The request stream stays open with no message: only a refusal that does not
            # wait for the body can answer before the deadline.
            call = channel.stream_unary(f"/inference.GRPCInferenceService/{method}")
            error = await call_error(call(_never(), timeout=10))
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error.details()
        # A body that does not parse is refused for the token, not for the body.
        garbage = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        error = await call_error(garbage(b"\xff\xff\xff\xff"))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_large_unauthenticated_requests_are_refused_and_tokened_ones_served(
        wire_server: Any, model_repo: Path) -> None:
    write_test_model(model_repo, "linear", 1)
    server = await wire_server(model_repo, settings=Settings(host="127.0.0.1", token=TOKEN))
    big = infer_request("linear", np.zeros((2 * MiB, 1, 4, 1), np.float32))  # 32 MiB
    async with server.channel(**{"grpc.max_send_message_length": 64 * MiB}) as channel:
        rpc = stub(channel)
        refusals = await asyncio.gather(*(call_error(rpc.ModelInfer(big)) for _ in range(4)))
        assert {e.code() for e in refusals} == {grpc.StatusCode.UNAUTHENTICATED}
        x = random_images(2, seed=3)
        reply = await rpc.ModelInfer(infer_request("linear", x), metadata=AUTH)
        assert reply.model_name == "linear"
        # What stays open without the token: health, liveness, readiness.
        assert (await rpc.ServerLive(pb.ServerLiveRequest())).live
        assert (await rpc.ServerReady(pb.ServerReadyRequest())).ready
        health = health_pb2_grpc.HealthStub(channel)
        check = await health.Check(health_pb2.HealthCheckRequest(service="linear"))
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        for call in (rpc.ModelReady(pb.ModelReadyRequest(name="linear")),
                     rpc.ModelStatistics(pb.ModelStatisticsRequest())):
            assert (await call_error(call)).code() == grpc.StatusCode.UNAUTHENTICATED
