"""Model names are folder names of the repository, versions are ASCII digits: every RPC, every
control mode and the health service refuse anything else with INVALID_ARGUMENT, before a
name can reach the filesystem, and without saying anything about the filesystem."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cnnserve.proto import grpc_service_pb2 as pb
from tests.support.models import write_test_model
from tests.support.wire import call_error, infer_request, random_images, stub

#: Names that each once loaded a model from outside the repository, an alias of a model, a
#: listing of /proc, or the entry of the server's overall health.
BAD_NAMES = [
    "",
    ".",
    "..",
    "linear/.",
    "linear/./.",
    "fashion/../linear",
    "./linear",
    "../outside/evil",
    "/proc",
    "/proc/self/root/tmp",
    "linear\x00",
    "linear\\x",
    " linear",
    "l" * 129,
    "x" * 10_000 + "/../linear",
]
BAD_VERSIONS = ["²", "①", "-1", "+1", " 1", "1 ", "1.0", "0x1", "١"]


@pytest.fixture
def outside_model(tmp_path: Path) -> Path:
    """A valid model folder outside the repository, at an absolute path."""
    root = tmp_path / "outside"
    root.mkdir()
    write_test_model(root, "evil", 1)
    return root / "evil"


def _check_refusal(error: grpc.aio.AioRpcError, repo: Path) -> None:
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    details = error.details() or ""
    assert len(details) < 300, details  # echoes at most a bounded prefix of the name
    told = details.rsplit(" is not allowed", 1)[-1]  # what the server says beyond the echo
    for leak in (str(repo), "/tmp", "proc/", "No such file", "known models", "Errno"):
        assert leak not in told, details


@pytest.mark.parametrize("mode", ["explicit", "none", "poll"])
async def test_path_like_names_are_refused_by_load_and_unload_in_every_mode(
        wire_server: Any, model_repo: Path, outside_model: Path, mode: str) -> None:
    write_test_model(model_repo, "linear", 1)
    options: dict[str, Any] = {"control_mode": mode}
    if mode == "explicit":
        options["models"] = ("linear",)
    server = await wire_server(model_repo, **options)
    names = [*BAD_NAMES, str(outside_model), str(model_repo / "linear"),
             f"/proc/self/root{outside_model}"]
    async with server.channel() as channel:
        rpc = stub(channel)
        for name in names:
            _check_refusal(await call_error(rpc.RepositoryModelLoad(
                pb.RepositoryModelLoadRequest(model_name=name))), model_repo)
            _check_refusal(await call_error(rpc.RepositoryModelUnload(
                pb.RepositoryModelUnloadRequest(model_name=name))), model_repo)
        index = await rpc.RepositoryIndex(pb.RepositoryIndexRequest())
    assert [(m.name, m.version, m.state) for m in index.models] == [("linear", "1", "READY")]
    assert server.engine.index() and {e.name for e in server.engine.index()} == {"linear"}


async def test_every_model_rpc_refuses_path_like_names(wire_server: Any, model_repo: Path,
                                                        outside_model: Path) -> None:
    write_test_model(model_repo, "linear", 1)
    server = await wire_server(model_repo)
    x = random_images(1, seed=0)
    async with server.channel() as channel:
        rpc = stub(channel)
        for name in [*BAD_NAMES, str(outside_model)]:
            calls = [
                rpc.ModelInfer(infer_request(name, x)),
                rpc.ModelInfer(infer_request(name, x, outputs=["output"], class_count=2)),
                rpc.ModelMetadata(pb.ModelMetadataRequest(name=name)),
                rpc.ModelConfig(pb.ModelConfigRequest(name=name)),
                rpc.ModelReady(pb.ModelReadyRequest(name=name)),
            ]
            if name:  # "" asks for the statistics of every model
                calls.append(rpc.ModelStatistics(pb.ModelStatisticsRequest(name=name)))
            for call in calls:
                _check_refusal(await call_error(call), model_repo)
        # The real model still answers, and a well-formed unknown name is NOT_FOUND.
        reply = await rpc.ModelInfer(infer_request("linear", x))
        assert reply.model_name == "linear"
        missing = await call_error(rpc.ModelMetadata(pb.ModelMetadataRequest(name="nope")))
        assert missing.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("version", BAD_VERSIONS)
async def test_versions_that_are_not_ascii_digits_are_invalid_argument(
        wire_server: Any, model_repo: Path, version: str) -> None:
    write_test_model(model_repo, "linear", 1)
    server = await wire_server(model_repo)
    async with server.channel() as channel:
        rpc = stub(channel)
        for call in [
            rpc.ModelInfer(infer_request("linear", random_images(1, 0), version=version)),
            rpc.ModelReady(pb.ModelReadyRequest(name="linear", version=version)),
            rpc.ModelMetadata(pb.ModelMetadataRequest(name="linear", version=version)),
            rpc.ModelConfig(pb.ModelConfigRequest(name="linear", version=version)),
            rpc.ModelStatistics(pb.ModelStatisticsRequest(name="linear", version=version)),
        ]:
            error = await call_error(call)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (version, error.details())
            assert "ASCII digits" in (error.details() or "")


async def test_loading_the_empty_name_cannot_take_over_overall_health(
        wire_server: Any, model_repo: Path) -> None:
    write_test_model(model_repo, "linear", 1)
    write_test_model(model_repo, "inference.GRPCInferenceService", 1)
    server = await wire_server(model_repo, control_mode="explicit", models=("linear",))
    async with server.channel() as channel:
        rpc = stub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        error = await call_error(rpc.RepositoryModelLoad(
            pb.RepositoryModelLoadRequest(model_name="")))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        # A folder named like the protocol service loads, but its health entry would shadow
        # the service's: it gets none.
        await rpc.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(
            model_name="inference.GRPCInferenceService"))
        for service in ("", "inference.GRPCInferenceService", "linear"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        assert (await rpc.ServerReady(pb.ServerReadyRequest())).ready
        x = random_images(2, seed=1)
        reply = await rpc.ModelInfer(infer_request("linear", x))
        assert np.frombuffer(reply.raw_output_contents[0], np.float32).shape == (6,)


@pytest.mark.parametrize("method", ["ModelInfer", "ModelMetadata", "ModelConfig", "ModelReady",
                                    "ModelStatistics", "RepositoryModelLoad",
                                    "RepositoryIndex", "ServerLive"])
async def test_undecodable_bodies_are_invalid_argument_without_tracebacks(
        wire_server: Any, model_repo: Path, method: str,
        caplog: pytest.LogCaptureFixture) -> None:
    write_test_model(model_repo, "linear", 1)
    server = await wire_server(model_repo)
    async with server.channel() as channel:
        call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}")
        for body in (b"\xff\xff\xff\xff", b"\x0a\x05ab", b"\x0f", b"\x08"):
            error = await call_error(call(body))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
            assert f"not a valid {method}Request message" in (error.details() or "")
        assert (await stub(channel).ServerLive(pb.ServerLiveRequest())).live
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert len([r for r in caplog.records if r.levelname != "DEBUG"]) <= 1


async def test_undecodable_bodies_on_open_streaming_methods_are_invalid_argument(
        wire_server: Any, model_repo: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_test_model(model_repo, "linear", 1)
    server = await wire_server(model_repo)
    async with server.channel() as channel:
        for _ in range(3):
            watch = channel.unary_stream("/grpc.health.v1.Health/Watch")(b"\xff\xff\xff",
                                                                         timeout=10)
            error = await call_error(_drain(watch))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()

            async def garbage() -> Any:
                yield b"\xff\xff\xff"
            reflect = channel.stream_stream(
                "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
            error = await call_error(_drain(reflect(garbage(), timeout=10)))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        # Well-formed calls still work.
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service="linear"), timeout=10)
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


async def _drain(call: Any) -> None:
    async for _ in call:
        pass
