"""OpenTelemetry tracing of inference requests: optional, and free on the hot path when off.

With the ``otel`` extra installed and ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) set, :func:`configure` installs a tracer provider
that exports over OTLP/gRPC (every standard ``OTEL_*`` variable applies: service name,
headers, sampler...). Otherwise nothing is set up and :data:`TRACING_ENABLED` stays False:
the request path then pays one module-attribute check per hook, and the gRPC server has no
tracing interceptor at all (:mod:`cnnserve.server.grpc.tracing`, the wire half).

Per inference RPC (GRPCInferenceService methods), joined to the caller's W3C ``traceparent``
from the gRPC metadata when there is one::

    <rpc method>                 SERVER span (model, version, status)
      queue                      arrival in the batcher -> taken into a batch
      batch                      sent to a worker -> results back (batch.size rows,
                                 batch.requests requests merged)
        onnxruntime.run          the ONNX Runtime call of that batch
      encode                     results back -> response built

Batches merge requests of several traces, so each request records its own ``batch`` span
(the same timings, ``batch.id`` ties them together). ONNX Runtime's start is placed from the
durations the worker measures (it ends where the output split began), since the worker keeps
no wall clock. Spans of a request are recorded after the fact, from timestamps taken anyway,
so tracing adds no clock reads to the request path.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from cnnserve.server.telemetry.statistics import BatchTimings

log = logging.getLogger(__name__)

#: True once :func:`configure` or :func:`enable` installed a tracer; read on the hot path.
TRACING_ENABLED = False
INSTRUMENTATION = "cnnserve.server"

_tracer: Any = None
_provider: Any = None
#: The RPC being served by the current task (set by the interceptor, read by the batcher).
_current: contextvars.ContextVar[RpcTrace | None] = contextvars.ContextVar(
    "cnnserve_rpc_trace", default=None)


class RpcTrace:
    """The trace context of one RPC, and when its result came back (for the encode span)."""

    __slots__ = ("context", "result_ns")

    def __init__(self, context: Any) -> None:
        self.context = context
        self.result_ns = 0


@dataclass
class RequestTrace:
    """What a queued request carries when tracing is on: its RPC, and when it was sent."""

    rpc: RpcTrace
    arrival_ns: int
    dispatch_ns: int = 0


def configure(environ: Mapping[str, str]) -> bool:
    """Export spans over OTLP if ``environ`` names an endpoint; returns whether tracing is on.

    Called once by ``cnnserve serve``'s main. Without an endpoint it does nothing; with one
    but without the ``otel`` extra it logs a warning (the server still serves, untraced).
    """
    from cnnserve.common.otel import otlp_provider

    provider = otlp_provider(environ, "cnnserve")
    if provider is None:
        return False
    enable(provider)
    log.info("tracing: exporting spans over OTLP as service %r",
             environ.get("OTEL_SERVICE_NAME", "cnnserve"))
    return True


def enable(provider: Any) -> None:
    """Trace with ``provider`` (an opentelemetry-sdk TracerProvider; tests pass one with an
    in-memory exporter). Call before the gRPC server is created."""
    global TRACING_ENABLED, _tracer, _provider
    _provider = provider
    _tracer = provider.get_tracer(INSTRUMENTATION)
    TRACING_ENABLED = True


def disable() -> None:
    """Stop tracing new RPCs: servers created later have no interceptor. Requests already
    traced finish their spans (the tracer stays)."""
    global TRACING_ENABLED
    TRACING_ENABLED = False


def shutdown() -> None:
    """Stop tracing and flush the provider's exporters (at process exit)."""
    global _provider
    disable()
    provider, _provider = _provider, None
    if provider is not None:
        provider.shutdown()


def start_rpc_span(name: str, metadata: Mapping[str, str],
                   attributes: Mapping[str, Any]) -> Any:
    """A context manager: the SERVER span of one RPC, child of the ``traceparent`` in
    ``metadata`` when present. Only called while tracing is on."""
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    parent = TraceContextTextMapPropagator().extract(metadata)
    return _tracer.start_as_current_span(name, context=parent, kind=trace.SpanKind.SERVER,
                                         attributes=dict(attributes))


def bind_rpc() -> tuple[RpcTrace, contextvars.Token[RpcTrace | None]]:
    """Make the current span the RPC the batcher's hooks attach to; reset with the token."""
    from opentelemetry import context as otel_context

    rpc = RpcTrace(otel_context.get_current())
    return rpc, _current.set(rpc)


def unbind_rpc(token: contextvars.Token[RpcTrace | None]) -> None:
    """Undo :func:`bind_rpc`."""
    _current.reset(token)


def mark_error(span: Any, exc: BaseException) -> None:
    """Mark the RPC's span as failed with the exception's type name."""
    from opentelemetry import trace

    span.set_status(trace.Status(trace.StatusCode.ERROR, type(exc).__name__))


def rpc_finished(rpc: RpcTrace) -> None:
    """Record the ``encode`` span: from the batch's results to now."""
    if rpc.result_ns:
        _span("encode", rpc.context, rpc.result_ns, time.monotonic_ns())


# -- hooks of the batcher (each guarded by ``if tracing.TRACING_ENABLED`` at the call site) --

def request_trace(arrival_ns: int) -> RequestTrace | None:
    """The trace a request queued now belongs to (None outside a traced RPC)."""
    rpc = _current.get()
    return None if rpc is None else RequestTrace(rpc, arrival_ns)


def dispatched(trace: RequestTrace, now_ns: int) -> None:
    """The request was taken into a batch at ``now_ns``: record its ``queue`` span."""
    trace.dispatch_ns = now_ns
    _span("queue", trace.rpc.context, trace.arrival_ns, now_ns)


class Traced(Protocol):
    """A queued request as the hooks see it (the batcher's QueuedRequest)."""

    trace: RequestTrace | None


def batch_finished(requests: Iterable[Traced], batch_id: int, rows: int,
                   timings: BatchTimings) -> None:
    """A batch came back: record ``batch`` and ``onnxruntime.run`` for each traced request."""
    now_ns = time.monotonic_ns()
    traced: Sequence[RequestTrace] = [r.trace for r in requests if r.trace is not None]
    if not traced:
        return
    from opentelemetry import trace

    attributes = {"batch.size": rows, "batch.requests": len(list(traced)),
                  "batch.id": batch_id}
    ort_end = now_ns - timings.output_ns
    for request in traced:
        batch = _span("batch", request.rpc.context, request.dispatch_ns, now_ns, attributes,
                      end=False)
        inner = trace.set_span_in_context(batch, request.rpc.context)
        _span("onnxruntime.run", inner, max(ort_end - timings.infer_ns, request.dispatch_ns),
              ort_end, {"batch.size": rows})
        batch.end(end_time=_wall(now_ns))
        request.rpc.result_ns = now_ns


def _span(name: str, context: Any, start_ns: int, end_ns: int,
          attributes: Mapping[str, Any] | None = None, *, end: bool = True) -> Any:
    """A span from monotonic ``start_ns`` to ``end_ns`` (converted to wall-clock time)."""
    span = _tracer.start_span(name, context=context, start_time=_wall(start_ns),
                              attributes=dict(attributes or {}))
    if end:
        span.end(end_time=_wall(end_ns))
    return span


def _wall(monotonic_ns: int) -> int:
    return time.time_ns() - (time.monotonic_ns() - monotonic_ns)
