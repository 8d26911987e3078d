"""The last phase of a graceful shutdown: calls that arrive while the server stops.

grpc cancels (CANCELLED, which clients do not retry) every call that reaches it after
``server.stop()`` has begun, until the client has read the connection's GOAWAY. So once the
drain begins, :class:`ShutdownGate` holds each new call (unread) instead of answering it at
once; when the server is about to stop it releases them, ``GOAWAY_S`` after the stop began,
with UNAVAILABLE. By then the client has read the GOAWAY, so its retry opens a new connection
(to a replica, or the restarted server) instead of landing in grpc's window; and a client
whose call is held sends nothing else meanwhile. A call is held at most ``HOLD_S`` seconds,
and never past its own deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]

SHUTTING_DOWN = "the server is shutting down; retry (another replica or the restarted server)"
HOLD_S = 5.0  # the longest a call is held before it is answered
GOAWAY_S = 0.1  # from the start of stop() to the answers: the GOAWAY goes first
SETTLE_S = 0.05  # after the drain, for calls sent in reply to its last answers to arrive


class ShutdownGate:
    """Closed when the drain begins; :meth:`release` just before grpc's stop."""

    def __init__(self) -> None:
        self.closed = False
        self._stopping: asyncio.Event | None = None

    def close(self) -> None:
        """Hold every new call from now on (the caller passes only non-health methods)."""
        self.closed = True
        self._stopping = asyncio.Event()

    async def release(self) -> None:
        """Let calls sent in reply to the drain's last answers arrive, then answer every
        held call UNAVAILABLE ``GOAWAY_S`` from now: call right before ``server.stop()``."""
        await asyncio.sleep(SETTLE_S)
        if self._stopping is not None:
            self._stopping.set()

    def refusal(self, handler: Handler) -> Handler:
        """A handler of ``handler``'s method that holds the call, then answers UNAVAILABLE.

        Request-streaming whatever the method's kind (the wire format is the same), so the
        request is never read, like the token refusal's.
        """
        async def refuse(_requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            await self._hold(context.time_remaining())
            await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)

        serde: dict[str, Any] = {"request_deserializer": _unread,
                                 "response_serializer": handler.response_serializer}
        if handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(refuse, **serde)
        return grpc.stream_unary_rpc_method_handler(refuse, **serde)

    async def _hold(self, remaining: float | None) -> None:
        stopping = self._stopping
        if stopping is None:
            return
        limit = HOLD_S if remaining is None else max(min(HOLD_S, remaining - 0.5), 0.0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), limit)
            await asyncio.sleep(GOAWAY_S)


def _unread(_data: bytes) -> None:
    """The deserializer of held calls: the body is never parsed."""
