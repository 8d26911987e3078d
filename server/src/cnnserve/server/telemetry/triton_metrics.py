"""Triton's metric names (``nv_inference_*``) computed from cnnserve's own series when scraped.

``cnnserve serve --metrics-names triton`` registers :class:`TritonCollector` beside the
``cnnserve_*`` series, so dashboards and alerts written for Triton work unchanged. Nothing
is counted twice: every ``nv_*`` value is derived, at scrape time, from the series the request
path already keeps. Names and units are Triton's: cumulative counts without ``_total`` and
cumulative durations in microseconds, which Prometheus' own naming lint flags by design;
Triton's counters are exposed untyped (prometheus_client adds ``_total`` to any counter).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cnnserve.server.telemetry.loop_metrics import LoopCounter, LoopFamily, LoopHistogram

if TYPE_CHECKING:
    from cnnserve.server.telemetry.metrics import Metrics

_MV = ("model", "version")
US_PER_S = 1e6

#: Each Triton name, its help, and the cnnserve series it is derived from (README table).
TRITON_NAMES: dict[str, str] = {
    "nv_inference_request_success": "Number of successful inference requests, all batch sizes",
    "nv_inference_request_failure": "Number of failed inference requests, all batch sizes",
    "nv_inference_count": "Number of inferences performed (batch items)",
    "nv_inference_exec_count": "Number of model executions performed",
    "nv_inference_request_duration_us": "Cumulative inference request duration in microseconds",
    "nv_inference_queue_duration_us": "Cumulative inference queuing duration in microseconds",
    "nv_inference_compute_infer_duration_us": "Cumulative compute inference duration in "
                                              "microseconds",
    "nv_inference_pending_request_count": "Instantaneous number of pending requests awaiting "
                                          "execution per-model",
    "nv_model_load_duration_secs": "Model load time in seconds",
}


class TritonCollector(Collector):
    """Exposes :data:`TRITON_NAMES` from a :class:`Metrics` (read-only, scrape thread)."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._m
        requests = _values(m.requests)
        failures = m.failure_totals()
        inflight = m.inflight_counts()
        success = {k: max(v - failures.get(k, 0.0) - inflight.get(k, 0.0), 0.0)
                   for k, v in requests.items()}
        yield _counter("nv_inference_request_success", success)
        yield _counter("nv_inference_request_failure",
                       {k: failures.get(k, 0.0) for k in requests.keys() | failures.keys()})
        yield _counter("nv_inference_count", _values(m.inferences))
        yield _counter("nv_inference_exec_count", _values(m.executions))
        for name, family in (("nv_inference_request_duration_us", m.request_duration),
                             ("nv_inference_queue_duration_us", m.queue_duration),
                             ("nv_inference_compute_infer_duration_us", m.compute_duration)):
            yield _counter(name, {k: v * US_PER_S for k, v in _values(family).items()})
        yield _gauge("nv_inference_pending_request_count", m.queue_depths())
        yield _gauge("nv_model_load_duration_secs", m.load_durations())


def _values(family: LoopFamily) -> dict[tuple[str, ...], float]:
    """A counter family's values, or a histogram family's sums, by label values."""
    out: dict[tuple[str, ...], float] = {}
    for labels, child in family.children():
        out[labels] = child.value if isinstance(child, LoopCounter) else _sum(child)
    return out


def _sum(child: LoopHistogram) -> float:
    return child.sum


def _counter(name: str, values: dict[tuple[str, ...], float]) -> Metric:
    # Triton's counters have no _total suffix, and prometheus_client writes every counter's
    # TYPE line with one: these are exposed untyped under Triton's exact names (rate() and
    # increase() work on them as on Triton's).
    metric = Metric(name, TRITON_NAMES[name], "unknown")
    for labels, value in sorted(values.items()):
        metric.add_sample(name, dict(zip(_MV, labels, strict=True)), value)
    return metric


def _gauge(name: str, values: dict[tuple[str, ...], float]) -> Metric:
    gauge = GaugeMetricFamily(name, TRITON_NAMES[name], labels=_MV)
    for labels, value in sorted(values.items()):
        gauge.add_metric(labels, value)
    return gauge
