"""The OTLP exporter set-up the server and the client tools share (the ``otel`` extra).

Standard library only at import time: OpenTelemetry is imported when the standard variables
ask for export, so nothing pays for it otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)


def otlp_provider(environ: Mapping[str, str], default_service: str) -> Any:
    """A TracerProvider exporting over OTLP/gRPC, or None.

    None when neither ``OTEL_EXPORTER_OTLP_ENDPOINT`` nor ``..._TRACES_ENDPOINT`` is set, or
    when the ``otel`` extra is missing (logged as a warning naming the install). Every other
    standard ``OTEL_*`` variable applies; ``OTEL_SERVICE_NAME`` defaults to
    ``default_service``.
    """
    if not (environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
            or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        return None
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        log.warning("OTEL_EXPORTER_OTLP_ENDPOINT is set but OpenTelemetry is not installed "
                    "(%s); install 'cnnserve[otel]' to export traces", exc.name)
        return None
    service = environ.get("OTEL_SERVICE_NAME", default_service)
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider
