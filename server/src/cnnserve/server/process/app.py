"""Assembling and running the servers: gRPC, REST, metrics; security, limits, shutdown.

:func:`create_server` builds a started ``grpc.aio`` server around an engine (tests bind port
0 and read the port back, with no free-port race); :func:`serve` is the whole process:
engine, metrics endpoint, gRPC server, REST server (cnnserve.server.http, sharing the gRPC
servicer), and on SIGTERM/SIGINT a drain within the grace period
(health NOT_SERVING first, new requests refused UNAVAILABLE, queued and in-flight ones
finished) before it returns, so the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cnnserve.common.errors import CnnserveError
from cnnserve.common.files import write_atomically
from cnnserve.proto import grpc_service_pb2 as pb
from cnnserve.proto import grpc_service_pb2_grpc as pb_grpc
from cnnserve.server.grpc import tracing as grpc_tracing
from cnnserve.server.grpc.health import ModelHealth
from cnnserve.server.grpc.interceptors import ErrorMapping, TokenAuth
from cnnserve.server.grpc.servicer import InferenceServicer
from cnnserve.server.grpc.shutdown import ShutdownGate
from cnnserve.server.process.memory import MemoryTrimmer
from cnnserve.server.process.settings import Settings, flag_of
from cnnserve.server.telemetry.metrics import Metrics, start_metrics_http_server

if TYPE_CHECKING:
    from cnnserve.server.engine.core import Engine, EngineOptions

logger = logging.getLogger(__name__)

#: Time the server keeps to send responses the engine finished just as the grace ran out.
FLUSH_S = 1.0


class GrpcServer:
    """A started gRPC server with its health service; :meth:`shutdown` drains it."""

    def __init__(self, server: grpc.aio.Server, engine: Engine, model_health: ModelHealth,
                 servicer: InferenceServicer, gate: ShutdownGate | None = None):
        self.server = server
        self.health = model_health
        self.servicer = servicer  # shared with the REST front end
        self._engine = engine
        self._gate = gate or ShutdownGate()

    async def shutdown(self, grace_s: float) -> None:
        """Drain and stop: health NOT_SERVING, refuse new inference, finish queued and
        in-flight requests within ``grace_s`` seconds, then stop the server."""
        started = time.monotonic()
        await self.health.shutdown()
        # From now on every new call but health is held, unread, and answered UNAVAILABLE
        # (which clients retry) once the GOAWAY of stop() is out (grpc/shutdown.py); the
        # calls already running finish.
        self._gate.close()
        self._engine.begin_drain()
        await self._engine.stop(grace_s)
        remaining = grace_s - (time.monotonic() - started)
        await self._gate.release()
        await self.server.stop(max(remaining, FLUSH_S))


async def create_server(engine: Engine, metrics: Metrics, settings: Settings,
                        address: str | None = None) -> tuple[GrpcServer, int]:
    """Build, bind and start the gRPC server; return it and the bound port.

    ``address`` defaults to ``settings.host:settings.grpc_port``; port 0 binds a free port.
    TLS when ``settings.tls_cert`` is set, mutual TLS when ``settings.tls_ca`` is too.
    Raises CnnserveError if a TLS file cannot be read or the address cannot be bound.
    """
    # Tracing first, so its span covers authentication and error mapping too.
    gate = ShutdownGate()
    interceptors: list[grpc.aio.ServerInterceptor[Any, Any]] = grpc_tracing.interceptors()
    if settings.token is not None:
        interceptors.append(TokenAuth(settings.token))
    interceptors.append(ErrorMapping(gate))
    limit = settings.max_message_bytes
    server = grpc.aio.server(interceptors=interceptors, options=[
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
        # Off unless asked for: a second server on the port would silently share its traffic.
        ("grpc.so_reuseport", 1 if settings.reuse_port else 0),
    ])
    model_health = ModelHealth(engine)

    async def models_changed() -> None:
        await model_health.refresh()

    servicer = InferenceServicer(engine, metrics, on_models_changed=models_changed)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(model_health.servicer, server)
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
    reflection.enable_server_reflection((service, health.SERVICE_NAME,
                                         reflection.SERVICE_NAME), server)
    address = address or _join(settings.host, settings.grpc_port)
    try:
        if settings.tls_cert is not None:
            port = server.add_secure_port(address, _credentials(settings))
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise CnnserveError(f"cannot bind gRPC to {address}: {exc}") from exc
    await server.start()
    await model_health.refresh()
    model_health.start()
    return GrpcServer(server, engine, model_health, servicer, gate), port


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def _credentials(settings: Settings) -> grpc.ServerCredentials:
    assert settings.tls_cert is not None and settings.tls_key is not None
    pair = (_read(settings.tls_key, "tls_key"), _read(settings.tls_cert, "tls_cert"))
    if settings.tls_ca is None:
        return grpc.ssl_server_credentials([pair])
    return grpc.ssl_server_credentials([pair], root_certificates=_read(settings.tls_ca, "tls_ca"),
                                       require_client_auth=True)


def _read(path: Path, name: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CnnserveError(f"{flag_of(name)} {path}: cannot read: {exc.strerror}") from exc


def engine_options(settings: Settings) -> EngineOptions:
    """The engine's options from the process settings."""
    from cnnserve.server.engine.core import EngineOptions

    return EngineOptions(
        repository=settings.repository, models=settings.models,
        control_mode=settings.control_mode,
        poll_interval_s=settings.poll_interval_s,
        device=settings.device,
        intra_op_threads=settings.intra_op_threads, inter_op_threads=settings.inter_op_threads,
        cores=settings.cpus,
        graph_optimization=settings.graph_optimization,
        warmup=settings.warmup, execution_workers=settings.execution_workers,
        max_queue_delay_us=settings.max_queue_delay_us, max_queue_size=settings.max_queue_size,
        strict_readiness=settings.strict_readiness)


async def serve(settings: Settings) -> None:
    """Run the server until SIGTERM or SIGINT, then drain within the grace period.

    Raises CnnserveError when it cannot start (missing repository, port in use, bad TLS
    files); returns normally after a graceful shutdown, also when the signal arrives while
    the models are still loading.
    """
    from cnnserve.server.engine.core import Engine

    stop = _stop_event()
    trimmer = asyncio.get_running_loop().create_task(MemoryTrimmer().run())
    metrics = Metrics(triton_names=settings.metrics_names == "triton")
    engine = Engine(engine_options(settings), metrics)
    try:
        metrics_http, metrics_port = start_metrics_http_server(
            metrics, settings.host, settings.metrics_port, tls_cert=settings.metrics_tls_cert,
            tls_key=settings.metrics_tls_key, token=settings.metrics_token)
    except OSError as exc:
        where = _join(settings.host, settings.metrics_port)
        raise CnnserveError(f"cannot serve metrics on {where}: {exc.strerror}") from exc
    try:
        # The server answers liveness (and NOT_SERVING) while the models load and warm up.
        grpc_server, port = await create_server(engine, metrics, settings)
        rest = None
        try:
            if settings.http_port >= 0:
                from cnnserve.server.http.server import create_http_server

                rest = await create_http_server(grpc_server.servicer, settings, settings.host,
                                                settings.http_port)
            if await _start_unless_stopped(engine, stop):
                # Everything built so far (modules, sessions, configs) lives as long as the
                # process: freezing it keeps the collector from rescanning it, which under
                # load cost ~6 us per request and 25 ms pauses that showed in p99 latency.
                gc.freeze()
                await grpc_server.health.refresh()
                _announce(settings, port, metrics_port, rest.port if rest else None)
                await stop.wait()
            logger.info("shutting down: draining for up to %.1f s", settings.grace_period_s)
        finally:
            await grpc_server.shutdown(settings.grace_period_s)
            if rest is not None:
                await rest.stop()
    finally:
        metrics_http.shutdown()
        _remove_port_file(settings)
        trimmer.cancel()
    logger.info("stopped")


def _remove_port_file(settings: Settings) -> None:
    """Remove the port file on exit: a stale one would send clients to a dead port."""
    if settings.port_file is not None:
        with contextlib.suppress(FileNotFoundError):
            settings.port_file.unlink()


def _stop_event() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT (installed on the running loop)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def _start_unless_stopped(engine: Engine, stop: asyncio.Event) -> bool:
    """Start the engine; False if a signal came first (the start is then cancelled)."""
    starting = asyncio.ensure_future(engine.start())
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait((starting, stopped), return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if starting.done():
        starting.result()  # raises CnnserveError for a missing repository
        return True
    starting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await starting
    return False


def _announce(settings: Settings, port: int, metrics_port: int, http_port: int | None) -> None:
    security = ("mutual TLS" if settings.tls_ca else "TLS" if settings.tls_cert
                else "plaintext") + (", token auth" if settings.token else "")
    if settings.token and not settings.tls_cert:
        logger.warning("a bearer token over plaintext gRPC can be read on the network; "
                       "add --tls-cert/--tls-key")
    if settings.port_file is not None:
        write_atomically(settings.port_file,
                         json.dumps({"grpc_port": port, "http_port": http_port,
                                     "metrics_port": metrics_port}) + "\n")
    rest = ("off" if http_port is None else
            f"{'https' if settings.tls_cert else 'http'}://{_join(settings.host, http_port)}/v2")
    scheme = "https" if settings.metrics_tls_cert else "http"
    logger.info("serving gRPC on %s (%s), REST on %s, metrics on %s://%s/metrics%s",
                _join(settings.host, port), security, rest, scheme,
                _join(settings.host, metrics_port),
                " (bearer token)" if settings.metrics_token else "",
                extra={"grpc_port": port, "http_port": http_port, "metrics_port": metrics_port})
