"""Shared fixtures: an empty model repository, and a real gRPC server on 127.0.0.1:0.

Helpers that tests import live in :mod:`tests.support` (never ``from conftest import``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support.wire import WireServer


@pytest.fixture
def model_repo(tmp_path: Path) -> Path:
    """An empty model repository folder."""
    repo = tmp_path / "models"
    repo.mkdir()
    return repo


# ---- wire layer: a real gRPC server over the real engine on 127.0.0.1:0 ----------------

@pytest.fixture
async def wire_server() -> Any:
    """Factory ``await wire_server(repo, settings=None, **engine_options) -> WireServer``.

    Starts the engine (models loaded and warmed) and the gRPC server; every server started
    is shut down (grace 0) when the test ends.
    """
    from cnnserve.server.engine.core import Engine, EngineOptions
    from cnnserve.server.process.app import create_server
    from cnnserve.server.process.settings import Settings
    from cnnserve.server.telemetry.metrics import Metrics

    started: list[WireServer] = []

    async def start(repo: Path, settings: Settings | None = None,
                    **options: Any) -> WireServer:
        metrics = Metrics()
        engine = Engine(EngineOptions(repository=repo, **options), metrics)
        await engine.start()
        grpc_server, port = await create_server(
            engine, metrics, settings or Settings(host="127.0.0.1"), address="127.0.0.1:0")
        server = WireServer(engine, metrics, grpc_server, port)
        started.append(server)
        return server

    yield start
    for server in started:
        await server.grpc_server.shutdown(0.0)
