"""The wire half of tracing: a gRPC interceptor that opens each inference RPC's SERVER span.

Installed only while :data:`cnnserve.server.telemetry.tracing.TRACING_ENABLED` (no cost when
off); the spans below it are recorded by the protocol-neutral hooks in
:mod:`cnnserve.server.telemetry.tracing`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import grpc

from cnnserve.server.telemetry import tracing

if TYPE_CHECKING:  # grpc-stubs makes the interceptor generic; the runtime class is not
    Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    Interceptor = grpc.aio.ServerInterceptor

_SERVICE_PREFIX = "/inference.GRPCInferenceService/"


def interceptors() -> list[grpc.aio.ServerInterceptor[Any, Any]]:
    """The tracing interceptor when tracing is on, else none (no per-request cost)."""
    return [ServerTracing()] if tracing.TRACING_ENABLED else []


class ServerTracing(Interceptor):
    """Opens a SERVER span per GRPCInferenceService unary call, child of the caller's
    ``traceparent`` (metadata) when present."""

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
            details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        method = details.method or ""
        if handler is None or handler.unary_unary is None \
                or not method.startswith(_SERVICE_PREFIX):
            return handler
        behaviour = handler.unary_unary
        name = method[len(_SERVICE_PREFIX):]
        metadata = {k: v for k, v in (details.invocation_metadata or ())
                    if isinstance(v, str)}

        async def traced(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            return await _serve_traced(name, metadata, behaviour, request, context)

        return grpc.unary_unary_rpc_method_handler(
            traced, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


async def _serve_traced(name: str, metadata: Mapping[str, str],
                        behaviour: Callable[..., Awaitable[Any]], request: Any,
                        context: grpc.aio.ServicerContext[Any, Any]) -> Any:
    attributes = {"rpc.system": "grpc", "rpc.service": "inference.GRPCInferenceService",
                  "rpc.method": name}
    model = getattr(request, "model_name", "") or getattr(request, "name", "")
    if model:
        attributes["cnnserve.model"] = model
    with tracing.start_rpc_span(name, metadata, attributes) as span:
        rpc, token = tracing.bind_rpc()
        try:
            response = await behaviour(request, context)
        except BaseException as exc:
            tracing.mark_error(span, exc)
            raise
        finally:
            tracing.unbind_rpc(token)
        tracing.rpc_finished(rpc)
        version = getattr(response, "model_version", "")
        if version:
            span.set_attribute("cnnserve.model_version", version)
        return response
