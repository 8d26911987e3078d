"""OpenTelemetry tracing: one trace per request from the SDK to ONNX Runtime, the caller's
trace id joined by the server, and nothing at all while tracing is off."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cnnserve.client import InferenceClient
from cnnserve.proto import grpc_service_pb2 as pb
from cnnserve.proto import grpc_service_pb2_grpc as pb_grpc
from cnnserve.server.grpc import tracing as grpc_tracing
from cnnserve.server.telemetry import tracing
from tests.support.client import ServerThread
from tests.support.deploy import wait_until
from tests.support.deploy_server import running_server
from tests.support.models import write_test_model

EXPORTER = InMemorySpanExporter()
PROVIDER = TracerProvider()
PROVIDER.add_span_processor(SimpleSpanProcessor(EXPORTER))
X = np.arange(32, dtype=np.float32).reshape(2, 1, 4, 4) / 32


@pytest.fixture
def traced_server(model_repo: Path) -> Iterator[ServerThread]:
    """The real server created while tracing is on, and the SDK's global tracer provider."""
    write_test_model(model_repo, "linear", 1)
    if trace.get_tracer_provider() is not PROVIDER:
        trace.set_tracer_provider(PROVIDER)  # process-wide, once: as an application does
    tracing.enable(PROVIDER)
    try:
        with ServerThread(model_repo) as server:
            yield server
    finally:
        tracing.disable()


@pytest.fixture(autouse=True)
def clear_spans() -> None:
    EXPORTER.clear()


def by_name(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def parent_of(span: ReadableSpan, spans: tuple[ReadableSpan, ...]) -> ReadableSpan:
    assert span.parent is not None, f"{span.name} has no parent"
    (parent,) = [s for s in spans if s.context.span_id == span.parent.span_id]
    return parent


def test_one_trace_per_request_from_the_sdk_to_onnxruntime(traced_server: ServerThread) -> None:
    tracer = trace.get_tracer("test")
    with InferenceClient(traced_server.url, timeout=10) as client:
        client.model_info("linear")  # metadata first, so the traces below hold inference only
        roots = []
        for _ in range(2):
            with tracer.start_as_current_span("caller") as root:
                client.infer("linear", {"input": X})
                roots.append(root.get_span_context().trace_id)
    spans = EXPORTER.get_finished_spans()
    assert roots[0] != roots[1]
    for trace_id in roots:
        mine = tuple(s for s in spans if s.context.trace_id == trace_id)
        names = sorted(s.name for s in mine)
        assert names == ["ModelInfer", "ModelInfer", "batch", "caller", "encode",
                         "onnxruntime.run", "queue"], names
        (client_span,) = [s for s in by_name(mine, "ModelInfer")
                          if s.kind == trace.SpanKind.CLIENT]
        (server_span,) = [s for s in by_name(mine, "ModelInfer")
                          if s.kind == trace.SpanKind.SERVER]
        assert parent_of(client_span, mine).name == "caller"
        assert parent_of(server_span, mine) is client_span
        assert server_span.attributes is not None
        assert server_span.attributes["cnnserve.model"] == "linear"
        assert server_span.attributes["cnnserve.model_version"] == "1"
        for name in ("queue", "batch", "encode"):
            assert parent_of(by_name(mine, name)[0], mine) is server_span, name
        (batch,) = by_name(mine, "batch")
        (ort,) = by_name(mine, "onnxruntime.run")
        assert parent_of(ort, mine) is batch
        assert batch.attributes is not None and batch.attributes["batch.size"] == 2
        assert batch.attributes["batch.requests"] == 1
        # The spans nest in time too (monotonic timestamps converted to wall-clock time).
        for span in (batch, by_name(mine, "queue")[0], by_name(mine, "encode")[0]):
            assert span.start_time is not None and span.end_time is not None
            assert server_span.start_time is not None and server_span.end_time is not None
            assert server_span.start_time <= span.start_time <= span.end_time
            assert span.end_time <= server_span.end_time + 1_000_000  # clock conversion: 1 ms
        assert ort.start_time is not None and batch.start_time is not None
        assert batch.start_time <= ort.start_time


def test_a_trace_id_sent_by_a_client_appears_in_the_servers_spans(
        traced_server: ServerThread) -> None:
    """A plain gRPC caller (no SDK, no OpenTelemetry) sends a W3C traceparent."""
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    request = pb.ModelInferRequest(model_name="linear", inputs=[
        pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[2, 1, 4, 4])])
    request.raw_input_contents.append(X.tobytes())
    with grpc.insecure_channel(traced_server.url) as channel:
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request, timeout=10, metadata=(("traceparent", f"00-{trace_id}-{parent_id}-01"),))
    spans = EXPORTER.get_finished_spans()
    (server_span,) = by_name(spans, "ModelInfer")
    assert format(server_span.context.trace_id, "032x") == trace_id
    assert server_span.parent is not None and server_span.parent.is_remote
    assert format(server_span.parent.span_id, "016x") == parent_id
    assert {s.name for s in spans if format(s.context.trace_id, "032x") == trace_id} == {
        "ModelInfer", "queue", "batch", "onnxruntime.run", "encode"}


def test_a_failed_request_is_an_error_span(traced_server: ServerThread) -> None:
    with InferenceClient(traced_server.url, timeout=10, retries=0) as client, \
            pytest.raises(Exception, match="no-such-model"):
        client.infer("no-such-model", {"input": X})
    # grpc.aio sends an aborted call's status as abort() is called, before the span ends.
    (server_span,) = wait_until(lambda: [
        s for s in by_name(EXPORTER.get_finished_spans(), "ModelMetadata")
        if s.kind == trace.SpanKind.SERVER], 10, "the server's span")
    assert server_span.status.status_code == trace.StatusCode.ERROR


async def test_tracing_off_adds_no_interceptor_and_records_nothing(
        wire_server: Any, model_repo: Path) -> None:
    assert not tracing.TRACING_ENABLED and grpc_tracing.interceptors() == []
    write_test_model(model_repo, "linear", 1)
    server = await wire_server(model_repo)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    request = pb.ModelInferRequest(model_name="linear", inputs=[
        pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[2, 1, 4, 4])])
    request.raw_input_contents.append(X.tobytes())
    await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
        request, timeout=10, metadata=(("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-01"),))
    await channel.close()
    assert [s for s in EXPORTER.get_finished_spans() if s.kind == trace.SpanKind.SERVER] == []


def test_configure_needs_an_otlp_endpoint() -> None:
    assert tracing.configure({}) is False and not tracing.TRACING_ENABLED


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """A stand-in OpenTelemetry Collector: records the spans exported to it over OTLP/gRPC."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, bytes]] = []  # (name, trace id)
        self.services: set[str] = set()

    def Export(self, request: Any, context: Any) -> Any:
        for resource_spans in request.resource_spans:
            for attribute in resource_spans.resource.attributes:
                if attribute.key == "service.name":
                    self.services.add(attribute.value.string_value)
            for scope in resource_spans.scope_spans:
                self.spans.extend((s.name, s.trace_id) for s in scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


def test_cnnserve_serve_exports_over_otlp_when_the_endpoint_is_set(
        model_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_test_model(model_repo, "linear", 1)
    collector = _Collector()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "cnnserve-under-test")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")  # ms: export promptly
    trace_id = "5bf92f3577b34da6a3ce929d0e0e4737"
    try:
        with running_server(model_repo, tmp_path) as cnnserve, \
                grpc.insecure_channel(cnnserve.address) as channel:
            request = pb.ModelInferRequest(model_name="linear", inputs=[
                pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32",
                                                      shape=[2, 1, 4, 4])])
            request.raw_input_contents.append(X.tobytes())
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                request, timeout=10,
                metadata=(("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01"),))
            wait_until(lambda: len([s for s in collector.spans
                                    if s[1].hex() == trace_id]) >= 5, 30, "exported spans")
    finally:
        server.stop(0)
    assert {name for name, tid in collector.spans if tid.hex() == trace_id} == {
        "ModelInfer", "queue", "batch", "onnxruntime.run", "encode"}
    assert collector.services == {"cnnserve-under-test"}


def test_a_batch_job_run_inside_a_span_carries_its_trace_to_the_server(
        traced_server: ServerThread, tmp_path: Path) -> None:
    from cnnserve.client.batch.job import BatchOptions, run_batch_job

    images = tmp_path / "images.npy"
    np.save(images, (np.arange(5 * 16, dtype=np.uint8) % 255).reshape(5, 1, 4, 4))
    with trace.get_tracer("test").start_as_current_span("nightly job") as root:
        summary = run_batch_job(BatchOptions(url=traced_server.url, model="linear",
                                             input=str(images),
                                             output=str(tmp_path / "out.jsonl")))
    assert not summary.failed
    trace_id = root.get_span_context().trace_id
    server_infers = [s for s in EXPORTER.get_finished_spans()
                     if s.name == "ModelInfer" and s.kind == trace.SpanKind.SERVER]
    assert server_infers and all(s.context.trace_id == trace_id for s in server_infers)
