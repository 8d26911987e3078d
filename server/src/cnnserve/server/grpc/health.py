"""The standard grpc.health.v1 Health service, fed from the engine's readiness.

Service names: ``""`` (the whole server: the engine is ready), the protocol service
``inference.GRPCInferenceService`` (same), and each model name (SERVING when the model's
default version is ready). Check always answers from fresh engine state; Watch streams see
changes at the next refresh (every ``refresh_s`` seconds, and right after load/unload). Once
shutdown begins every service reports NOT_SERVING for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from cnnserve.server.errors import ServingError

if TYPE_CHECKING:
    import grpc

    from cnnserve.server.engine.core import Engine

logger = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
INFERENCE_SERVICE = "inference.GRPCInferenceService"
_RESERVED = frozenset({"", INFERENCE_SERVICE})


class _Servicer(HealthServicer):  # type: ignore[misc]
    def __init__(self, health: ModelHealth) -> None:
        super().__init__()
        self._health = health

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await self._health.refresh()
        return await super().Check(request, context)


class ModelHealth:
    """Keeps the Health servicer's statuses in step with ``engine``."""

    def __init__(self, engine: Engine, refresh_s: float = 1.0) -> None:
        self._engine = engine
        self._refresh_s = refresh_s
        self._models: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self.servicer = _Servicer(self)

    async def refresh(self) -> None:
        """Set every status from the engine now (no-op after :meth:`shutdown`)."""
        overall = SERVING if self._engine.ready else NOT_SERVING
        await self.servicer.set("", overall)
        await self.servicer.set(INFERENCE_SERVICE, overall)
        # A model that left the repository keeps a NOT_SERVING entry rather than vanishing,
        # so a watcher sees it go down.
        # Model names are folder names ("" is never one); a folder named like the protocol
        # service must not take over its entry either.
        self._models |= {entry.name for entry in self._engine.index()} - _RESERVED
        for name in sorted(self._models):
            await self.servicer.set(name, SERVING if self._model_ready(name) else NOT_SERVING)

    def _model_ready(self, name: str) -> bool:
        try:
            return self._engine.is_ready(name)
        except ServingError:
            return False

    def start(self) -> None:
        """Refresh periodically in the background until :meth:`shutdown`."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # a health refresh must never kill the loop; log and retry
                logger.exception("health refresh failed")
            await asyncio.sleep(self._refresh_s)

    async def shutdown(self) -> None:
        """Report NOT_SERVING for every service from now on and stop refreshing."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.servicer.enter_graceful_shutdown()
