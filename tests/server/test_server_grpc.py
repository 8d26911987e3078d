"""Every RPC over the wire: a real server on 127.0.0.1:0 over the real engine and tiny models."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cnnserve.common import __version__
from cnnserve.common.repository import DynamicBatching, ModelPolicy
from cnnserve.proto import grpc_service_pb2 as pb
from cnnserve.proto import model_config_pb2 as mc
from cnnserve.server.process.settings import Settings
from tests.support.models import ORT_TOLERANCE, double_expected, linear_expected, write_test_model
from tests.support.wire import call_error, infer_request, output_array, random_images, stub


@pytest.fixture
async def server(wire_server: Any, model_repo: Path) -> Any:
    write_test_model(model_repo, "linear", 1, policy=ModelPolicy(
        dynamic_batching=DynamicBatching(max_queue_delay_microseconds=2000,
                                         preferred_batch_size=(4,))))
    write_test_model(model_repo, "double", 3, kind="double", max_batch_size=8)
    return await wire_server(model_repo)


async def test_health_rpcs_report_live_and_ready(server: Any) -> None:
    async with server.channel() as channel:
        rpc = stub(channel)
        assert (await rpc.ServerLive(pb.ServerLiveRequest())).live
        assert (await rpc.ServerReady(pb.ServerReadyRequest())).ready
        assert (await rpc.ModelReady(pb.ModelReadyRequest(name="linear"))).ready
        assert (await rpc.ModelReady(pb.ModelReadyRequest(name="double", version="3"))).ready
        assert not (await rpc.ModelReady(pb.ModelReadyRequest(name="nope"))).ready
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService", "linear", "double"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        error = await call_error(health.Check(health_pb2.HealthCheckRequest(service="nope")))
        assert error.code() == grpc.StatusCode.NOT_FOUND


async def test_reflection_lists_the_services(server: Any) -> None:
    async with server.channel() as channel:
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        async for reply in reflection.ServerReflectionInfo(iter([request])):
            names = {s.name for s in reply.list_services_response.service}
            break
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names


async def test_server_and_model_metadata(server: Any) -> None:
    async with server.channel() as channel:
        rpc = stub(channel)
        meta = await rpc.ServerMetadata(pb.ServerMetadataRequest())
        assert (meta.name, meta.version) == ("cnnserve", __version__)
        assert {"classification", "statistics", "model_configuration",
                "model_repository"} <= set(meta.extensions)
        model = await rpc.ModelMetadata(pb.ModelMetadataRequest(name="linear"))
    assert (model.name, list(model.versions), model.platform) == ("linear", ["1"],
                                                                   "onnxruntime_onnx")
    assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [
        ("input", "FP32", [-1, 1, 4, 4])]
    assert [(t.name, t.datatype, list(t.shape)) for t in model.outputs] == [
        ("output", "FP32", [-1, 3])]


async def test_model_config_has_tritons_shape(server: Any) -> None:
    async with server.channel() as channel:
        reply = await stub(channel).ModelConfig(pb.ModelConfigRequest(name="linear"))
    config = reply.config
    assert (config.name, config.platform, config.backend) == ("linear", "onnxruntime_onnx",
                                                              "onnxruntime")
    assert config.max_batch_size == 64
    assert [(i.name, i.data_type, list(i.dims), i.format) for i in config.input] == [
        ("input", mc.TYPE_FP32, [1, 4, 4], mc.ModelInput.FORMAT_NCHW)]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
        ("output", mc.TYPE_FP32, [3])]
    assert config.WhichOneof("scheduling_choice") == "dynamic_batching"
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    assert list(config.dynamic_batching.preferred_batch_size) == [4]
    assert config.dynamic_batching.default_queue_policy.max_queue_size == 1024
    assert config.version_policy.latest.num_versions == 1
    assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert config.instance_group[0].count == 2  # the server's execution workers
    assert config.parameters["execution_providers"].string_value == "CPUExecutionProvider"


async def test_infer_returns_the_models_values_with_request_id(server: Any) -> None:
    x = random_images(3, seed=1)
    async with server.channel() as channel:
        reply = await stub(channel).ModelInfer(infer_request("linear", x, request_id="req-7"))
    assert (reply.model_name, reply.model_version, reply.id) == ("linear", "1", "req-7")
    assert [(o.name, o.datatype, list(o.shape)) for o in reply.outputs] == [
        ("output", "FP32", [3, 3])]
    assert not reply.outputs[0].HasField("contents")
    np.testing.assert_allclose(output_array(reply, "output"), linear_expected(x),
                               **ORT_TOLERANCE)


async def test_infer_accepts_typed_contents(server: Any) -> None:
    x = np.array([[1.0, -2.0], [0.5, 4.0]], np.float32)
    request = pb.ModelInferRequest(model_name="double")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[2, 2])
    tensor.contents.fp32_contents.extend(x.reshape(-1).tolist())
    async with server.channel() as channel:
        reply = await stub(channel).ModelInfer(request)
    expected = double_expected(x)
    assert [o.name for o in reply.outputs] == ["y", "z"]
    np.testing.assert_allclose(output_array(reply, "y"), expected["y"])
    np.testing.assert_allclose(output_array(reply, "z"), expected["z"])


async def test_requested_outputs_come_back_in_request_order(server: Any) -> None:
    x = np.array([[1.0, 2.0]], np.float32)
    async with server.channel() as channel:
        rpc = stub(channel)
        both = await rpc.ModelInfer(infer_request("double", x, "x", outputs=["z", "y"]))
        only = await rpc.ModelInfer(infer_request("double", x, "x", outputs=["z"]))
    assert [o.name for o in both.outputs] == ["z", "y"]
    np.testing.assert_allclose(output_array(both, "z"), x + 1)
    np.testing.assert_allclose(output_array(both, "y"), x * 2)
    assert [o.name for o in only.outputs] == ["z"] and len(only.raw_output_contents) == 1


async def test_classification_returns_top_k_value_index_label(server: Any) -> None:
    x = random_images(2, seed=5)
    async with server.channel() as channel:
        reply = await stub(channel).ModelInfer(
            infer_request("linear", x, outputs=["output"], class_count=2))
    assert (reply.outputs[0].datatype, list(reply.outputs[0].shape)) == ("BYTES", [2, 2])
    got = output_array(reply, "output")
    scores = linear_expected(x)
    labels = ("zero", "one", "two")
    for row in range(2):
        best = np.argsort(-scores[row], kind="stable")[:2]
        parts = [item.decode().split(":") for item in got[row]]
        assert [int(p[1]) for p in parts] == best.tolist()
        assert [p[2] for p in parts] == [labels[i] for i in best]
        np.testing.assert_allclose([float(p[0]) for p in parts], scores[row][best], atol=1e-5)


async def test_concurrent_requests_are_batched_and_each_gets_its_own_rows(
        wire_server: Any, model_repo: Path) -> None:
    # A long queue delay and a preferred batch of 8: eight concurrent callers form one batch.
    write_test_model(model_repo, "linear", 1, policy=ModelPolicy(dynamic_batching=DynamicBatching(
        max_queue_delay_microseconds=500_000, preferred_batch_size=(8,))))
    server = await wire_server(model_repo)
    inputs = [random_images(1 + i % 2, seed=100 + i) for i in range(8)]
    async with server.channel() as channel:
        rpc = stub(channel)
        replies = await asyncio.gather(*(
            rpc.ModelInfer(infer_request("linear", x, request_id=str(i)))
            for i, x in enumerate(inputs)))
        stats = await rpc.ModelStatistics(pb.ModelStatisticsRequest(name="linear"))
    for i, (x, reply) in enumerate(zip(inputs, replies, strict=True)):
        assert reply.id == str(i)
        np.testing.assert_allclose(output_array(reply, "output"), linear_expected(x),
                                   **ORT_TOLERANCE)
    (model,) = stats.model_stats
    rows = sum(len(x) for x in inputs)
    assert model.inference_count == rows
    assert model.execution_count < len(inputs)  # merged: fewer runs than requests
    assert max(b.batch_size for b in model.batch_stats) > 2
    assert sum(b.batch_size * b.compute_infer.count for b in model.batch_stats) == rows
    assert model.inference_stats.success.count == len(inputs)


async def test_statistics_and_repository_index(server: Any) -> None:
    async with server.channel() as channel:
        rpc = stub(channel)
        await rpc.ModelInfer(infer_request("linear", random_images(2, seed=3)))
        every = await rpc.ModelStatistics(pb.ModelStatisticsRequest())
        one = await rpc.ModelStatistics(pb.ModelStatisticsRequest(name="linear", version="1"))
        index = await rpc.RepositoryIndex(pb.RepositoryIndexRequest())
        missing = await call_error(rpc.ModelStatistics(pb.ModelStatisticsRequest(name="nope")))
    assert {(s.name, s.version) for s in every.model_stats} == {("linear", "1"), ("double", "3")}
    (linear,) = one.model_stats
    assert (linear.inference_count, linear.execution_count) == (2, 1)
    assert linear.last_inference > 0 and linear.inference_stats.success.ns > 0
    assert [(b.batch_size, b.compute_infer.count) for b in linear.batch_stats] == [(2, 1)]
    assert {(m.name, m.version, m.state, m.reason) for m in index.models} == {
        ("linear", "1", "READY", ""), ("double", "3", "READY", "")}
    assert missing.code() == grpc.StatusCode.NOT_FOUND


async def test_load_and_unload_are_refused_outside_explicit_mode(server: Any) -> None:
    async with server.channel() as channel:
        rpc = stub(channel)
        load = await call_error(rpc.RepositoryModelLoad(
            pb.RepositoryModelLoadRequest(model_name="linear")))
        unload = await call_error(rpc.RepositoryModelUnload(
            pb.RepositoryModelUnloadRequest(model_name="linear")))
    for error in (load, unload):
        assert error.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "explicit" in (error.details() or "")


async def test_unexpected_errors_are_answered_internal_without_details(
        server: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def broken(*_: Any) -> Any:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(server.engine, "statistics", broken)
    async with server.channel() as channel:
        error = await call_error(stub(channel).ModelStatistics(pb.ModelStatisticsRequest()))
    assert (error.code(), error.details()) == (grpc.StatusCode.INTERNAL, "internal server error")
    assert "secret internals" in caplog.text  # logged with its traceback, not sent


async def test_message_size_limit_is_configurable(wire_server: Any, model_repo: Path) -> None:
    write_test_model(model_repo, "linear", 1)
    roomy = await wire_server(model_repo)
    tight = await wire_server(model_repo, settings=Settings(max_message_bytes=1024 * 1024))
    # 5 MiB: over grpcio's 4 MiB default, so only a raised limit lets it reach validation.
    request = pb.ModelInferRequest(model_name="linear")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 1, 4, 4])
    request.raw_input_contents.append(b"\0" * (5 * 1024 * 1024))
    async with roomy.channel() as channel:
        accepted = await call_error(stub(channel).ModelInfer(request))
    async with tight.channel() as channel:
        refused = await call_error(stub(channel).ModelInfer(request))
    assert accepted.code() == grpc.StatusCode.INVALID_ARGUMENT  # it arrived; the size is wrong
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
