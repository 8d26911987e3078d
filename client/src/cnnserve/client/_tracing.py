"""Trace-context propagation of the SDK (and so of batch jobs): optional OpenTelemetry.

With the ``opentelemetry-api`` package installed (the ``otel`` extra), every RPC the clients
send runs in a CLIENT span named after the method, and its W3C ``traceparent`` goes to the
server in the gRPC metadata, so the server's spans join the caller's trace. The application
decides where spans go (it installs a TracerProvider, or none: the API's default records
nothing, and a ``traceparent`` is still sent while a caller's span is active). Without the
package this is a no-op. :func:`configure` sets up OTLP export for command-line tools.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

log = logging.getLogger(__name__)

_trace: Any
try:
    from opentelemetry import trace as _trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError:  # the otel extra is not installed: propagate nothing
    _trace = None

#: Whether the OpenTelemetry API is importable (the SDK traces its RPCs).
AVAILABLE = _trace is not None
INSTRUMENTATION = "cnnserve.client"
#: A proxy until the application installs a TracerProvider, then that provider's tracer; with
#: none installed its spans record nothing and carry only a caller's active context.
_tracer: Any = None if _trace is None else _trace.get_tracer(INSTRUMENTATION)
Metadata = tuple[tuple[str, str], ...]


@contextlib.contextmanager
def rpc_span(method: str, target: str) -> Iterator[Metadata]:
    """Run one RPC attempt in a CLIENT span; yields the metadata that carries its context
    (``traceparent``, and ``tracestate`` when set), or () when there is nothing to send."""
    if _trace is None:
        yield ()
        return
    with _tracer.start_as_current_span(
            method, kind=_trace.SpanKind.CLIENT,
            attributes={"rpc.system": "grpc", "rpc.service": "inference.GRPCInferenceService",
                        "rpc.method": method, "server.address": target}):
        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier)
        yield tuple(carrier.items())


def configure(environ: Mapping[str, str]) -> Any:
    """For command-line tools: export spans over OTLP when ``OTEL_EXPORTER_OTLP_ENDPOINT``
    (or ``..._TRACES_ENDPOINT``) is set and the ``otel`` extra is installed. Returns the
    provider (call ``shutdown()`` on it before exiting, to flush) or None."""
    from cnnserve.common.otel import otlp_provider

    provider = otlp_provider(environ, "cnnserve-client")
    if provider is None:
        return None
    if _trace is not None:
        _trace.set_tracer_provider(provider)
    return provider
