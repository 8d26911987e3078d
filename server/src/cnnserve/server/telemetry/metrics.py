"""Prometheus metrics of the server, kept in a registry the :class:`Metrics` object owns.

Nothing here touches prometheus_client's global registry: the process builds one
:class:`Metrics` in ``main()`` and passes it to the engine and the wire layer, and tests build
their own. Every series is labelled by ``model`` and ``version``; requests for a model that
does not exist are counted under ``model="_unknown_"`` so label values stay bounded.
"""

from __future__ import annotations

import hmac
import logging
import socket
import ssl
import threading
from collections.abc import Iterable, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    make_wsgi_app,
)
from prometheus_client.exposition import ThreadingWSGIServer

from cnnserve.common.repository import MODEL_STATES
from cnnserve.server.telemetry.loop_metrics import LoopCollector, LoopCounter, LoopHistogram

logger = logging.getLogger(__name__)

UNKNOWN_MODEL = "_unknown_"

#: Latency buckets in seconds, 50 us to 10 s: sub-millisecond resolution where a CPU
#: serving path lives, plus a tail for overloaded or slow models.
LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                   0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = tuple(float(2**i) for i in range(11))  # 1, 2, 4, ..., 1024 rows

_MV = ("model", "version")


@dataclass(frozen=True)
class VersionMetrics:
    """The series of one model version with their labels already bound (cheap on hot paths).

    ``queues`` holds the queue of each live batcher of the version (two for a moment while
    a version is reloaded in place): the queue-depth gauge sums their lengths when scraped,
    so queueing a request updates no metric at all.
    """

    queues: list[Sized]
    queue_duration: LoopHistogram
    compute_duration: LoopHistogram
    batch_size: LoopHistogram
    executions: LoopCounter
    inferences: LoopCounter

    def track_queue(self, queue: Sized) -> None:
        """Count ``queue``'s length in the version's queue-depth gauge."""
        self.queues.append(queue)

    def untrack_queue(self, queue: Sized) -> None:
        """Stop counting ``queue`` (idempotent). By identity: empty queues compare equal."""
        self.queues[:] = [q for q in self.queues if q is not queue]

    def execution(self, rows: int, compute_s: float) -> None:
        """One ORT run of ``rows`` rows that took ``compute_s`` seconds."""
        self.executions.inc()
        self.inferences.inc(rows)
        self.batch_size.observe(rows)
        self.compute_duration.observe(compute_s)


class _RequestSeries:
    """The request-path series of one (model, version), labels bound once."""

    __slots__ = ("duration", "failures", "inflight", "requests")

    def __init__(self, requests: LoopCounter, inflight_gauge: Any,
                 duration: LoopHistogram) -> None:
        self.requests = requests
        # A plain count the gauge reads when scraped: the request path (one event loop)
        # then pays no lock for it.
        self.inflight = 0
        inflight_gauge.set_function(lambda: float(self.inflight))
        self.duration = duration
        self.failures: dict[str, Any] = {}  # reason -> bound counter


class Metrics:
    """All cnnserve series, registered in ``registry`` (a new private one by default).

    Besides cnnserve's own series the registry holds the standard ``process_*`` and
    ``python_*`` ones (CPU, memory, file descriptors, garbage collections); with
    ``triton_names`` also Triton's ``nv_inference_*`` names (triton_metrics.py).
    """

    def __init__(self, registry: CollectorRegistry | None = None, *,
                 triton_names: bool = False) -> None:
        # A ``*_created`` series per counter and histogram doubles the exposition and no
        # dashboard reads it. prometheus_client's switch is process-wide (it only affects
        # this process's metrics, which are all cnnserve's).
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        # Series updated per request or per batch, only ever from the event loop: kept
        # without locks (loop_metrics.py).
        hot = LoopCollector(r)
        self.requests = hot.family("counter", "cnnserve_requests",
                                   "Inference requests received.", _MV)
        self.inferences = hot.family("counter", "cnnserve_inferences",
                                     "Batch items (rows) inferred.", _MV)
        self.executions = hot.family("counter", "cnnserve_executions", "ONNX Runtime runs.", _MV)
        self.request_duration = hot.family(
            "histogram", "cnnserve_request_duration_seconds",
            "Whole request time, receive to response.", _MV, LATENCY_BUCKETS)
        self.queue_duration = hot.family(
            "histogram", "cnnserve_queue_duration_seconds",
            "Time a request waited in the batcher queue.", _MV, LATENCY_BUCKETS)
        self.compute_duration = hot.family(
            "histogram", "cnnserve_compute_duration_seconds",
            "ONNX Runtime run time per execution.", _MV, LATENCY_BUCKETS)
        self.batch_size = hot.family("histogram", "cnnserve_batch_size",
                                     "Rows per ONNX Runtime run.", _MV, BATCH_BUCKETS)
        self.request_failures = Counter(
            "cnnserve_request_failures_total", "Failed inference requests by reason.",
            (*_MV, "reason"), registry=r)
        self.queue_depth = Gauge("cnnserve_queue_depth", "Requests waiting in the batcher.",
                                 _MV, registry=r)
        self.inflight = Gauge("cnnserve_inflight_requests",
                              "Requests received and not yet answered.", _MV, registry=r)
        self.load_duration = Gauge("cnnserve_model_load_duration_seconds",
                                   "Time the last load of the version took (incl. warm-up).",
                                   _MV, registry=r)
        self.load_failures = Counter("cnnserve_model_load_failures_total",
                                     "Model version loads that failed.", ("model",), registry=r)
        self.model_state = Gauge("cnnserve_model_state",
                                 "1 for the version's current state, 0 for the others.",
                                 (*_MV, "state"), registry=r)
        self.loaded_versions = Gauge("cnnserve_model_loaded_versions",
                                     "Versions of the model that are READY.", ("model",),
                                     registry=r)
        self._states: dict[tuple[str, str], str] = {}
        # Sessions per (model, version, provider): a version reloaded in place has two for a
        # moment, and closing the old one must not zero the provider of the new one.
        self._sessions: dict[tuple[str, str, str], int] = {}
        self.execution_provider = Gauge("cnnserve_model_execution_provider",
                                        "1 for each active ONNX Runtime execution provider.",
                                        (*_MV, "provider"), registry=r)
        self._request_series: dict[tuple[str, str], _RequestSeries] = {}
        self._queues: dict[tuple[str, str], list[Sized]] = {}
        if triton_names:
            from cnnserve.server.telemetry.triton_metrics import TritonCollector

            r.register(TritonCollector(self))

    # -- called by the wire layer, from the event loop only (the in-flight count is a plain
    # int the gauge reads when scraped) ---------------------------------------------------
    def request_started(self, model: str, version: str) -> None:
        """A request for ``model``/``version`` arrived (use UNKNOWN_MODEL for unknown ones)."""
        series = self._request_series.get((model, version)) or self._bind(model, version)
        series.requests.inc()
        series.inflight += 1

    def request_finished(self, model: str, version: str, seconds: float,
                         reason: str | None) -> None:
        """The request was answered after ``seconds``; ``reason`` None means success."""
        series = self._request_series.get((model, version)) or self._bind(model, version)
        series.inflight -= 1
        series.duration.observe(seconds)
        if reason is not None:
            failures = series.failures.get(reason)
            if failures is None:
                failures = series.failures[reason] = self.request_failures.labels(
                    model, version, reason)
            failures.inc()

    def _bind(self, model: str, version: str) -> _RequestSeries:
        # labels() costs ~5 us (argument checks, a lock, a dict keyed by label tuples); the
        # request path binds each (model, version) once. The keys are bounded like the label
        # values themselves: repository models plus UNKNOWN_MODEL.
        series = self._request_series[(model, version)] = _RequestSeries(
            self.requests.counter(model, version), self.inflight.labels(model, version),
            self.request_duration.histogram(model, version))
        return series

    # -- called by the engine -----------------------------------------------------------
    def for_version(self, model: str, version: int) -> VersionMetrics:
        """Bound series for the batcher of one version."""
        v = str(version)
        queues = self._queues.get((model, v))
        if queues is None:
            queues = self._queues[(model, v)] = []
            self.queue_depth.labels(model, v).set_function(
                lambda: float(sum(len(q) for q in list(queues))))
        return VersionMetrics(
            queues=queues,
            queue_duration=self.queue_duration.histogram(model, v),
            compute_duration=self.compute_duration.histogram(model, v),
            batch_size=self.batch_size.histogram(model, v),
            executions=self.executions.counter(model, v),
            inferences=self.inferences.counter(model, v))

    def set_model_state(self, model: str, version: int, state: str) -> None:
        """Mark ``state`` (one of MODEL_STATES) as the version's current state."""
        for s in MODEL_STATES:
            self.model_state.labels(model, str(version), s).set(1.0 if s == state else 0.0)
        self._states[(model, str(version))] = state
        self.loaded_versions.labels(model).set(float(sum(
            1 for (m, _), st in list(self._states.items()) if m == model and st == "READY")))

    def model_loaded(self, model: str, version: int, seconds: float,
                     providers: Iterable[str]) -> None:
        """A version finished loading in ``seconds`` and runs on ``providers``."""
        self.load_duration.labels(model, str(version)).set(seconds)
        self._count_sessions(model, version, providers, +1)

    def model_unloaded(self, model: str, version: int, providers: Iterable[str]) -> None:
        """A session of the version was released: its providers may no longer be active."""
        self._count_sessions(model, version, providers, -1)

    def _count_sessions(self, model: str, version: int, providers: Iterable[str],
                        delta: int) -> None:
        for provider in providers:
            key = (model, str(version), provider)
            count = self._sessions[key] = max(self._sessions.get(key, 0) + delta, 0)
            self.execution_provider.labels(*key).set(1.0 if count else 0.0)

    def load_failed(self, model: str) -> None:
        """A version (or the model's model.json) of ``model`` failed to load."""
        self.load_failures.labels(model).inc()

    # -- read when scraped (the Triton names are derived from these) ----------------------
    def failure_totals(self) -> dict[tuple[str, ...], float]:
        """Failed requests per (model, version), all reasons together."""
        totals: dict[tuple[str, ...], float] = {}
        for family in self.request_failures.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    key = (sample.labels["model"], sample.labels["version"])
                    totals[key] = totals.get(key, 0.0) + sample.value
        return totals

    def inflight_counts(self) -> dict[tuple[str, ...], float]:
        """Requests received and not yet answered, per (model, version)."""
        return {k: float(s.inflight) for k, s in list(self._request_series.items())}

    def queue_depths(self) -> dict[tuple[str, ...], float]:
        """Requests waiting in the batcher queues, per (model, version)."""
        return {k: float(sum(len(q) for q in list(queues)))
                for k, queues in list(self._queues.items())}

    def load_durations(self) -> dict[tuple[str, ...], float]:
        """Seconds the last load of each (model, version) took."""
        return {(s.labels["model"], s.labels["version"]): s.value
                for family in self.load_duration.collect() for s in family.samples}


class MetricsHttpServer:
    """The /metrics HTTP endpoint running in a daemon thread; :meth:`shutdown` stops it."""

    def __init__(self, server: Any, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self.port: int = int(server.server_address[1])

    def shutdown(self) -> None:
        """Stop serving, close the socket and join the thread (idempotent)."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=5.0)
        self._server.server_close()


def start_metrics_http_server(metrics: Metrics, host: str, port: int, *,
                              tls_cert: Path | None = None, tls_key: Path | None = None,
                              token: str | None = None) -> tuple[MetricsHttpServer, int]:
    """Serve ``metrics.registry`` in the Prometheus text format on ``host:port``.

    ``port`` 0 picks a free port (returned as the second item). With ``tls_cert`` and
    ``tls_key`` (PEM) it serves HTTPS only (TLS 1.2 or newer); with ``token`` every request
    needs ``Authorization: Bearer <token>`` (Prometheus' ``authorization`` scrape setting)
    and is otherwise answered 401. Raises OSError if the address cannot be bound or the TLS
    files cannot be read, ssl.SSLError if they do not hold a certificate and its key.
    """
    app = make_wsgi_app(metrics.registry)
    if token is not None:
        app = _bearer_only(app, token)
    server = make_server(host, port, app, _server_class(host), handler_class=_QuietHandler)
    if tls_cert is not None and tls_key is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(certfile=tls_cert, keyfile=tls_key)
        # The handshake then runs in the request's own thread, on its first read, not in
        # the accepting thread, where one stalled client would block every scrape.
        server.socket = context.wrap_socket(server.socket, server_side=True,
                                            do_handshake_on_connect=False)
    thread = threading.Thread(target=server.serve_forever, name="cnnserve-metrics",
                              daemon=True)
    thread.start()
    handle = MetricsHttpServer(server, thread)
    return handle, handle.port


def _server_class(host: str) -> type[ThreadingWSGIServer]:
    class Server(ThreadingWSGIServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        def handle_error(self, request: Any, client_address: Any) -> None:
            # A failed TLS handshake or a client that hung up: one short line, no traceback.
            logger.debug("metrics request from %s failed", client_address, exc_info=True)
    return Server


class _QuietHandler(WSGIRequestHandler):
    """No access log line per scrape (prometheus_client's server logs none either)."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _bearer_only(app: Any, token: str) -> Any:
    """``app`` behind ``Authorization: Bearer <token>``; 401 without it (constant-time)."""
    expected = token.encode("utf-8")

    def guarded(environ: dict[str, Any], start_response: Any) -> Any:
        scheme, _, credential = str(environ.get("HTTP_AUTHORIZATION", "")).strip().partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
                credential.strip().encode("utf-8", "replace"), expected):
            return app(environ, start_response)
        start_response("401 Unauthorized", [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("WWW-Authenticate", 'Bearer realm="cnnserve metrics"')])
        return [b"missing or invalid bearer token\n"]
    return guarded
