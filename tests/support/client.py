"""Servers for the client tests: the real cnnserve server in a thread, and a flaky fake.

:class:`ServerThread` runs the real engine + gRPC server (``create_server``) on its own event
loop in a background thread, so blocking SDK calls, asyncio clients on the test's loop and
batch-job subprocesses can all talk to it. It can be stopped and started again on the same
port, which is how the tests simulate a server restart.

:class:`FlakyServicer` is a tiny ``grpc.aio`` servicer that answers ServerLive and ModelInfer
with a chosen status a number of times before it answers, counting attempts and recording
the deadline and metadata it saw.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc

from cnnserve.proto import grpc_service_pb2 as pb
from cnnserve.proto import grpc_service_pb2_grpc as pb_grpc

T = TypeVar("T")


class LoopThread:
    """An event loop running in a daemon thread; :meth:`run` executes a coroutine there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class ServerThread:
    """The real cnnserve server on 127.0.0.1, serving ``repo`` from a background loop."""

    def __init__(self, repo: Path, *, models: tuple[str, ...] = (), control_mode: str = "none",
                 **settings: Any) -> None:
        self.repo = repo
        self.models = models
        self.control_mode = control_mode
        self.settings = settings
        self.port = 0
        self._loop = LoopThread()
        self._server: Any = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _start(self) -> None:
        from cnnserve.server.engine.core import Engine, EngineOptions
        from cnnserve.server.process.app import create_server
        from cnnserve.server.process.settings import Settings
        from cnnserve.server.telemetry.metrics import Metrics

        metrics = Metrics()
        engine = Engine(EngineOptions(repository=self.repo, models=self.models,
                                      control_mode=self.control_mode,  # type: ignore[arg-type]
                                      execution_workers=2), metrics)
        await engine.start()
        settings = Settings(repository=self.repo, **self.settings)
        self._server, self.port = await create_server(
            engine, metrics, settings, address=f"127.0.0.1:{self.port}")

    def start(self) -> ServerThread:
        """Start serving (on the previous port when restarting); returns self."""
        self._loop.run(self._start())
        return self

    def stop(self, grace_s: float = 0.5) -> None:
        """Drain and stop the server; the port stays remembered for :meth:`start`."""
        if self._server is not None:
            self._loop.run(self._server.shutdown(grace_s))
            self._server = None

    def close(self) -> None:
        self.stop()
        self._loop.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class FlakyServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Fails the first ``failures`` calls of each method with ``code``, then answers.

    ``hang`` makes every call wait until ``release`` is set (for deadline tests).
    """

    failures: int = 0
    code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    hang: bool = False
    attempts: dict[str, int] = field(default_factory=dict)
    time_remaining: list[float] = field(default_factory=list)
    metadata: list[dict[str, str]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def _gate(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self.attempts[method] = self.attempts.get(method, 0) + 1
        self.time_remaining.append(context.time_remaining() or 0.0)
        self.metadata.append({k: str(v) for k, v in context.invocation_metadata() or ()})
        if self.hang:
            await self.release.wait()
        if self.attempts[method] <= self.failures:
            await context.abort(self.code, f"{method} refused on purpose "
                                           f"(attempt {self.attempts[method]})")

    async def ServerLive(self, request: pb.ServerLiveRequest,
                         context: grpc.aio.ServicerContext[Any, Any]) -> pb.ServerLiveResponse:
        await self._gate("ServerLive", context)
        return pb.ServerLiveResponse(live=True)


async def start_fake(servicer: FlakyServicer) -> tuple[grpc.aio.Server, str]:
    """Serve ``servicer`` on 127.0.0.1 (a free port); return the server and its address."""
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"
