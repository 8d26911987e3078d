"""Lock-free loop series: exposed exactly as prometheus_client's own types would be."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cnnserve.server.telemetry.loop_metrics import LoopCollector


def test_histogram_buckets_are_inclusive_upper_bounds_and_cumulative() -> None:
    registry = CollectorRegistry()
    family = LoopCollector(registry).family("histogram", "t_seconds", "Test.", ("m",),
                                            (0.1, 1.0))
    child = family.histogram("a")
    for value in (0.05, 0.1, 0.5, 1.0, 3.0):
        child.observe(value)

    def sample(suffix: str, **labels: str) -> float | None:
        return registry.get_sample_value(f"t_seconds{suffix}", {"m": "a", **labels})

    assert [sample("_bucket", le=le) for le in ("0.1", "1.0", "+Inf")] == [2, 4, 5]
    assert sample("_count") == 5
    assert sample("_sum") == pytest.approx(4.65)


def test_counters_and_histograms_round_trip_through_the_text_format() -> None:
    registry = CollectorRegistry()
    collector = LoopCollector(registry)
    requests = collector.family("counter", "t_requests", "Requests.", ("model", "version"))
    latency = collector.family("histogram", "t_latency_seconds", "Latency.", ("model",),
                               (0.001, 0.01))
    requests.counter("m", "1").inc()
    requests.counter("m", "1").inc(2)
    requests.counter("n", "2")  # created: exposed as 0, like a labelled prometheus Counter
    latency.histogram("m").observe(0.005)
    families = {f.name: f for f in text_string_to_metric_families(
        generate_latest(registry).decode())}
    assert families["t_requests"].type == "counter"
    assert {(s.labels["model"], s.value) for s in families["t_requests"].samples
            if s.name == "t_requests_total"} == {("m", 3.0), ("n", 0.0)}
    assert families["t_latency_seconds"].type == "histogram"
    values = {(s.name, s.labels.get("le")): s.value for s in families["t_latency_seconds"].samples}
    assert values[("t_latency_seconds_bucket", "0.001")] == 0
    assert values[("t_latency_seconds_bucket", "0.01")] == 1
    assert values[("t_latency_seconds_count", None)] == 1


def test_label_values_must_match_the_label_names() -> None:
    family = LoopCollector(CollectorRegistry()).family("counter", "t", "T.", ("model",))
    with pytest.raises(ValueError, match=r"takes labels \('model',\)"):
        family.counter("m", "extra")
