"""Server interceptors: the one place errors become gRPC statuses, and bearer-token auth.

:class:`ErrorMapping` turns a :class:`~cnnserve.server.errors.ServingError` raised anywhere
under a handler into its ``code`` with its message; any other exception is logged with its
traceback and answered ``INTERNAL "internal server error"``, so internals never leak to
clients. A body that does not parse is answered INVALID_ARGUMENT (one rate-limited log line,
no traceback). It aborts only after the handler's frame has let go of the request, so a failed
request is freed with its answer rather than at the next GC pass. :class:`TokenAuth` refuses
calls without ``authorization: Bearer <token>`` metadata with UNAUTHENTICATED from the
metadata alone, before the body is read or parsed, except health checks and reflection,
which stay open so probes and tooling work without the secret.
"""

from __future__ import annotations

import hmac
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import grpc
from grpc.aio import ServerInterceptor

from cnnserve.server.errors import ServingError
from cnnserve.server.grpc.shutdown import ShutdownGate

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
    # grpc-stubs type the continuation's result and intercept_service's as never None, but
    # grpc returns None for a method no service implements (answered UNIMPLEMENTED); hence
    # the `type: ignore[override]` on the honest signatures below.
    Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]]
    Interceptor = ServerInterceptor[Any, Any]
else:  # the grpc classes are not generic at run time
    Interceptor = ServerInterceptor

#: Methods callable without a token: health probes (grpc.health.v1 and the protocol's own
#: liveness/readiness) and server reflection.
OPEN_METHODS = frozenset({
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.health.v1.Health/List",
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
})

INTERNAL_MESSAGE = "internal server error"


class ErrorMapping(Interceptor):
    """Map ServingError to its status and hide unexpected errors behind INTERNAL; once
    ``gate`` is closed, hand every call but :data:`OPEN_METHODS` to it."""

    def __init__(self, gate: ShutdownGate | None = None) -> None:
        # Handlers never change while the server runs; wrapping each once keeps the per-call
        # cost to one dictionary lookup.
        self._wrapped: dict[str, Handler] = {}
        self._gate = gate or ShutdownGate()

    async def intercept_service(  # type: ignore[override]
            self, continuation: Continuation, details: grpc.HandlerCallDetails) -> Handler | None:
        method = details.method
        if self._gate.closed and method not in OPEN_METHODS:
            handler = await continuation(details)
            return None if handler is None else self._gate.refusal(handler)
        cached = self._wrapped.get(method)
        if cached is not None:
            return cached
        handler = await continuation(details)
        if handler is None:
            return None  # unknown method: not cached, so made-up names cannot grow the cache
        wrapped = self._wrapped[method] = _wrap(handler, method)
        return wrapped


def _wrap(handler: Handler, method: str) -> Handler:
    """``handler`` with its errors mapped and undecodable bodies answered INVALID_ARGUMENT."""
    serde: dict[str, Any] = {
        "request_deserializer": tolerant(handler.request_deserializer),
        "response_serializer": handler.response_serializer}
    if inspect.iscoroutinefunction(handler.unary_unary):
        return grpc.unary_unary_rpc_method_handler(_mapped(handler.unary_unary, method),
                                                   **serde)
    # Streaming methods (health Watch, reflection) keep grpc's own error handling; only a
    # body that does not parse is answered here, without grpc's traceback per body.
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _checked_unary_stream(handler.unary_stream, method), **serde)
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(
            _checked_stream_stream(handler.stream_stream, method), **serde)
    return handler  # stream-unary: none is served


def _checked_unary_stream(behavior: Any, method: str) -> Any:
    async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if request is UNDECODABLE:
            await _refuse_undecodable(context, method)
        result = behavior(request, context)
        if inspect.isasyncgen(result):
            async for response in result:
                yield response
        else:
            await result  # a coroutine that writes with context.write
    return call


def _checked_stream_stream(behavior: Any, method: str) -> Any:
    async def call(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        result = behavior(_decoded(requests, context, method), context)
        if inspect.isasyncgen(result):
            async for response in result:
                yield response
        else:
            await result
    return call


async def _decoded(requests: Any, context: grpc.aio.ServicerContext[Any, Any],
                   method: str) -> Any:
    async for request in requests:
        if request is UNDECODABLE:
            await _refuse_undecodable(context, method)
        yield request


async def _refuse_undecodable(context: grpc.aio.ServicerContext[Any, Any], method: str) -> None:
    _log_undecodable(method)
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                        f"the request body is not a valid {_message_of(method)} message "
                        "(protocol buffers)")


def _mapped(behavior: Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]],
            method: str) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]:
    async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if request is UNDECODABLE:
            await _refuse_undecodable(context, method)
        try:
            return await behavior(request, context)
        except ServingError as exc:
            code, message = grpc_status(exc), str(exc)
        except grpc.aio.AbortError:
            raise  # the handler chose its own status
        except Exception:
            logger.exception("unexpected error in %s", method)
            code, message = grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE
        # Abort outside the except block, with this frame no longer holding the request: the
        # AbortError's traceback holds this frame, and grpc keeps the error in a reference
        # cycle; chained to the domain error (whose traceback holds the servicer's frame) it
        # kept every failed request, however large, alive until the next GC pass.
        del request
        await context.abort(code, message)
    return call


class _Undecodable:
    """The request of a call whose body did not parse (see :func:`tolerant`)."""

    __slots__ = ()


#: Passed to the handler in place of a request whose body is not a valid message, so it
#: is answered INVALID_ARGUMENT instead of grpc's UNKNOWN plus a traceback in the log.
UNDECODABLE = _Undecodable()
_last_undecodable_log = [0.0]


def tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """``deserializer``, returning :data:`UNDECODABLE` instead of raising for a bad body."""
    if deserializer is None:
        return None
    parse = deserializer

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception:  # DecodeError, or anything else a hostile body provokes
            return UNDECODABLE
    return deserialize


def _log_undecodable(method: str) -> None:
    """One short line at most every 10 s: garbage must not flood the log."""
    now = time.monotonic()
    if now - _last_undecodable_log[0] >= 10.0:
        _last_undecodable_log[0] = now
        logger.warning("refused an undecodable request body for %s (logged at most every "
                       "10 s)", method)
    else:
        logger.debug("refused an undecodable request body for %s", method)


def _message_of(method: str) -> str:
    """``ModelInferRequest`` for ``/inference.GRPCInferenceService/ModelInfer``; the
    grpc.health and reflection request messages for their methods."""
    return _REQUEST_MESSAGES.get(method, method.rsplit("/", 1)[-1] + "Request")


_REQUEST_MESSAGES = {
    "/grpc.health.v1.Health/Check": "HealthCheckRequest",
    "/grpc.health.v1.Health/Watch": "HealthCheckRequest",
    "/grpc.health.v1.Health/List": "HealthListRequest",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": "ServerReflectionRequest",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": "ServerReflectionRequest",
}


class TokenAuth(Interceptor):
    """Require ``authorization: Bearer <token>`` on every call except :data:`OPEN_METHODS`."""

    def __init__(self, token: str, open_methods: frozenset[str] = OPEN_METHODS) -> None:
        if not token:
            raise ValueError("token must not be empty")
        self._expected = token.encode("utf-8")
        self._open = open_methods

    async def intercept_service(  # type: ignore[override]
            self, continuation: Continuation, details: grpc.HandlerCallDetails) -> Handler | None:
        if details.method in self._open or self._authorized(details.invocation_metadata):
            return await continuation(details)
        handler = await continuation(details)
        return None if handler is None else _refusal(handler)

    def _authorized(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
        for key, value in metadata or ():
            if key.lower() != "authorization":
                continue
            text = value.decode("latin-1") if isinstance(value, bytes) else value
            scheme, _, credential = text.strip().partition(" ")
            if scheme.lower() == "bearer" and hmac.compare_digest(
                    credential.strip().encode("utf-8"), self._expected):
                return True
        return False


def _refusal(handler: Handler) -> Handler:
    """A handler for ``handler``'s method that answers UNAUTHENTICATED without reading.

    It is a request-streaming handler whatever the method's kind (the wire format is the
    same): grpc runs it before any message arrives, while a unary handler runs only once the
    whole body has been received, and its deserializer parses nothing. An unauthenticated
    200 MiB request so costs no more than a small one.
    """
    async def refuse(_requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                            "missing or invalid bearer token: send metadata "
                            "'authorization: Bearer <token>'")

    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(
            refuse, request_deserializer=_unread, response_serializer=handler.response_serializer)
    return grpc.stream_unary_rpc_method_handler(
        refuse, request_deserializer=_unread, response_serializer=handler.response_serializer)


def _unread(_data: bytes) -> None:
    """The deserializer of refused calls: the body is never parsed."""


def grpc_status(error: ServingError) -> grpc.StatusCode:
    """The gRPC status code of a domain error (the engine's statuses carry gRPC's names)."""
    return grpc.StatusCode[error.code.value]
