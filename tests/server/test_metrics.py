"""Prometheus metrics: an injected registry whose values move, served over HTTP on port 0."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY, CollectorRegistry

from cnnserve.server.engine.core import Engine, EngineOptions
from cnnserve.server.telemetry.metrics import Metrics, start_metrics_http_server
from tests.support.models import write_test_model

M1 = {"model": "m", "version": "1"}


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_each_metrics_object_owns_its_registry() -> None:
    a, b = Metrics(), Metrics()
    a.request_started("m", "1")
    assert value(a, "cnnserve_requests_total", **M1) == 1
    assert value(b, "cnnserve_requests_total", **M1) is None
    assert REGISTRY.get_sample_value("cnnserve_requests_total", M1) is None
    shared = CollectorRegistry()
    assert Metrics(shared).registry is shared


def test_request_counters_failures_and_in_flight_gauge() -> None:
    metrics = Metrics()
    metrics.request_started("m", "1")
    metrics.request_started("m", "1")
    assert value(metrics, "cnnserve_inflight_requests", **M1) == 2
    metrics.request_finished("m", "1", 0.002, None)
    metrics.request_finished("m", "1", 0.5, "queue_full")
    assert value(metrics, "cnnserve_inflight_requests", **M1) == 0
    assert value(metrics, "cnnserve_requests_total", **M1) == 2
    assert value(metrics, "cnnserve_request_failures_total", reason="queue_full", **M1) == 1
    assert value(metrics, "cnnserve_request_duration_seconds_count", **M1) == 2
    assert value(metrics, "cnnserve_request_duration_seconds_sum", **M1) == pytest.approx(0.502)
    assert value(metrics, "cnnserve_request_duration_seconds_bucket", le="0.0025", **M1) == 1


async def test_serving_moves_engine_metrics(model_repo: Path) -> None:
    write_test_model(model_repo, "m", 1)
    write_test_model(model_repo, "m", 2, corrupt=True)
    metrics = Metrics()
    engine = Engine(EngineOptions(repository=model_repo, control_mode="explicit",
                                  models=("m",)), metrics)
    await engine.start()  # latest 1 = the corrupt 2 fails, falls back to 1
    try:
        model = engine.get("m")
        xs = [np.full((1, 1, 4, 4), i, np.float32) for i in range(8)]
        await asyncio.gather(*(model.infer({"input": x}) for x in xs))
        await model.infer({"input": np.zeros((3, 1, 4, 4), np.float32)})
    finally:
        await engine.stop(5)
    assert value(metrics, "cnnserve_inferences_total", **M1) == 11
    executions = value(metrics, "cnnserve_executions_total", **M1)
    assert executions is not None and 2 <= executions < 9
    assert value(metrics, "cnnserve_batch_size_count", **M1) == executions
    assert value(metrics, "cnnserve_batch_size_sum", **M1) == 11
    assert value(metrics, "cnnserve_compute_duration_seconds_count", **M1) == executions
    assert value(metrics, "cnnserve_queue_duration_seconds_count", **M1) == 9
    assert value(metrics, "cnnserve_queue_depth", **M1) == 0
    assert value(metrics, "cnnserve_model_state", state="READY", **M1) == 1
    assert value(metrics, "cnnserve_model_state", state="LOADING", **M1) == 0
    assert value(metrics, "cnnserve_model_state", model="m", version="2",
                 state="UNAVAILABLE") == 1
    assert value(metrics, "cnnserve_model_load_failures_total", model="m") == 1
    load_s = value(metrics, "cnnserve_model_load_duration_seconds", **M1)
    assert load_s is not None and load_s > 0
    # stop() released the session, so its provider is no longer active
    assert value(metrics, "cnnserve_model_execution_provider",
                 provider="CPUExecutionProvider", **M1) == 0


async def test_the_http_endpoint_serves_the_registry_and_shuts_down() -> None:
    metrics = Metrics()
    metrics.request_started("m", "1")
    metrics.model_loaded("m", 1, 0.25, ["CPUExecutionProvider"])
    server, port = start_metrics_http_server(metrics, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        assert port > 0
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())
        text = body.decode()
        assert 'cnnserve_requests_total{model="m",version="1"} 1.0' in text
        assert ('cnnserve_model_execution_provider{model="m",provider="CPUExecutionProvider",'
                'version="1"} 1.0') in text
        assert 'cnnserve_model_load_duration_seconds{model="m",version="1"} 0.25' in text
    finally:
        server.shutdown()
    with pytest.raises(urllib.error.URLError):
        await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=2).read())
    server.shutdown()  # idempotent


async def test_reloading_a_version_in_place_keeps_its_provider_active(model_repo: Path) -> None:
    write_test_model(model_repo, "m", 1)
    metrics = Metrics()
    engine = Engine(EngineOptions(repository=model_repo, control_mode="explicit",
                                  models=("m",)), metrics)
    await engine.start()
    try:
        old = engine.get("m")
        write_test_model(model_repo, "m", 1)  # a re-export replaces the files
        await engine.load("m")
        assert engine.get("m") is not old
        assert value(metrics, "cnnserve_model_execution_provider",
                     provider="CPUExecutionProvider", **M1) == 1
        await engine.unload("m")
        assert value(metrics, "cnnserve_model_execution_provider",
                     provider="CPUExecutionProvider", **M1) == 0
        assert value(metrics, "cnnserve_model_state", state="UNAVAILABLE", **M1) == 1
    finally:
        await engine.stop(5)
