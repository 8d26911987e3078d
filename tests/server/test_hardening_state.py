"""Names a client makes up create no state: no locks, records, health entries or series."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cnnserve.proto import grpc_service_pb2 as pb
from tests.support.models import write_test_model
from tests.support.wire import infer_request, random_images, stub

NAMES = 2000


def _series(server: Any) -> int:
    return sum(len(family.samples) for family in server.metrics.registry.collect())


def _state(server: Any) -> dict[str, int]:
    repo = server.engine._repo  # the tables that once grew per name
    health = server.grpc_server.health
    return {"records": len(repo._models), "locks": len(repo._locks), "known": len(repo.known),
            "health models": len(health._models),
            "health entries": len(health.servicer._server_status),
            "request series": len(server.metrics._request_series), "series": _series(server)}


def _random_name(rng: random.Random) -> str:
    kind = rng.randrange(4)
    word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(12))
    if kind == 0:
        return word  # well-formed, not in the repository
    if kind == 1:
        return f"linear/../{word}"
    if kind == 2:
        return f"/{word}/{word}"
    return word + "\u00b2"


async def _call(rpc: Any, health: Any, name: str, which: int) -> None:
    x = random_images(1, 0)
    calls = [
        lambda: rpc.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=name)),
        lambda: rpc.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=name)),
        lambda: rpc.ModelInfer(infer_request(name, x)),
        lambda: rpc.ModelMetadata(pb.ModelMetadataRequest(name=name)),
        lambda: rpc.ModelReady(pb.ModelReadyRequest(name=name)),
        lambda: rpc.ModelStatistics(pb.ModelStatisticsRequest(name=name)),
        lambda: health.Check(health_pb2.HealthCheckRequest(service=name)),
    ]
    try:
        await calls[which % len(calls)]()
    except grpc.aio.AioRpcError as exc:
        assert exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), (
            name, exc.code(), exc.details())


async def test_two_thousand_made_up_names_leave_tables_and_series_unchanged(
        wire_server: Any, model_repo: Path) -> None:
    write_test_model(model_repo, "linear", 1)
    server = await wire_server(model_repo, control_mode="explicit", models=("linear",))
    rng = random.Random(10)
    async with server.channel() as channel:
        rpc, health = stub(channel), health_pb2_grpc.HealthStub(channel)
        # Every kind of call with a real name, an unknown one and a malformed one, so the
        # series that exist by design (the model's, and the one "_unknown_" label value with
        # its failure reasons) exist before counting.
        for which in range(7):
            if which != 1:  # unloading the real model would leave it unloaded
                await _call(rpc, health, "linear", which)
            await _call(rpc, health, "unknown", which)  # "_unknown_", reason not_found
            await _call(rpc, health, "../bad", which)  # "_unknown_", reason invalid_argument
        await server.grpc_server.health.refresh()
        before = _state(server)
        names = [_random_name(rng) for _ in range(NAMES)]
        for start in range(0, NAMES, 100):
            await asyncio.gather(*(_call(rpc, health, name, start + i)
                                   for i, name in enumerate(names[start:start + 100])))
        await server.grpc_server.health.refresh()
        assert _state(server) == before
        assert (await rpc.ModelReady(pb.ModelReadyRequest(name="linear"))).ready
