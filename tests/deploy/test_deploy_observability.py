"""Observability: Prometheus and Grafana files against a real ``cnnserve serve``.

``promtool check config`` accepts deploy/prometheus/prometheus.yml; the Grafana provisioning
matches the compose mounts; ``promtool check metrics`` accepts the server's real /metrics;
every series the dashboard queries exists there; and a real Prometheus on 127.0.0.1 scrapes
the server and answers every dashboard query with the expected labels after traffic.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from tests.support.deploy import (
    COMPOSE,
    DEPLOY,
    PROMETHEUS_YML,
    free_port,
    load_yaml,
    stop_process,
    wait_until,
)
from tests.support.deploy_server import (
    RunningServer,
    drive_requests,
    probe,
    running_server,
    sent_input,
    serve_unavailable_reason,
)
from tests.support.models import linear_expected, write_test_model

DASHBOARD = DEPLOY / "grafana" / "dashboards" / "cnnserve.json"
PROVISIONING = DEPLOY / "grafana" / "provisioning"
#: What Grafana substitutes before a query reaches Prometheus ("All" for the variables).
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m",
                     "$model": ".*", "$version": ".*", "$instance": ".*"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(load_yaml(COMPOSE))


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (Debian package prometheus; scripts/bootstrap.sh)")
    return path


def test_promtool_accepts_the_prometheus_config() -> None:
    result = subprocess.run([promtool(), "check", "config", str(PROMETHEUS_YML)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisioning_points_at_compose_paths_and_services(
        compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    mounts = dict(m.split(":")[:2] for m in grafana["volumes"])
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    (source,) = load_yaml(PROVISIONING / "datasources" / "prometheus.yml")["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert any(p.endswith(":9090") for p in compose["services"]["prometheus"]["ports"])
    (provider,) = load_yaml(PROVISIONING / "dashboards" / "cnnserve.yml")["providers"]
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"
    for panel in dashboard_panels():
        assert panel["datasource"]["uid"] == source["uid"], panel["title"]


def dashboard_panels() -> list[dict[str, Any]]:
    return [p for p in json.loads(DASHBOARD.read_text(encoding="utf-8"))["panels"]
            if p["type"] != "row"]


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL with Grafana's variables replaced) for every panel target."""
    queries = []
    for panel in dashboard_panels():
        for target in panel["targets"]:
            expr = target["expr"]
            for name, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
                expr = expr.replace(name, value)
            assert "$" not in expr, f"{panel['title']}: unknown variable in {expr}"
            queries.append((panel["title"], expr))
    return queries


def test_dashboard_json_is_valid_and_covers_what_operators_watch() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["uid"] == "cnnserve" and dashboard["schemaVersion"] >= 36
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]), panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
    text = " ".join(q for _, q in dashboard_queries())
    for series in ("cnnserve_requests_total", "cnnserve_request_failures_total",
                   "cnnserve_request_duration_seconds_bucket",
                   "cnnserve_queue_duration_seconds_bucket", "cnnserve_batch_size_bucket",
                   "cnnserve_queue_depth", "cnnserve_model_state"):
        assert series in text, f"the dashboard has no panel on {series}"
    assert "histogram_quantile(0.5," in text and "histogram_quantile(0.99," in text
    assert "by (model, reason)" in text
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"model", "version", "instance"} <= variables


# -- against a real server --------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    reason = serve_unavailable_reason()
    if reason:
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("deploy-server")
    write_test_model(work / "models", "tiny", 1)
    with running_server(work / "models", work) as running:
        yield running


def test_probe_checks_the_real_server_and_each_model(server: RunningServer) -> None:
    ok = probe(server.address, "--model", "tiny")
    assert ok.returncode == 0 and ok.stdout.startswith("SERVING"), ok.stderr
    missing = probe(server.address, "--model", "no-such-model")
    assert missing.returncode == 1 and missing.stderr.startswith("NOT_FOUND"), missing.stderr


def metric_families(text: str) -> dict[str, Any]:
    from prometheus_client.parser import text_string_to_metric_families
    return {f.name: f for f in text_string_to_metric_families(text)}


def exposed_series_names(text: str) -> set[str]:
    """Every series name /metrics can hold, whether or not a sample exists yet."""
    names = set()
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                "gauge": ("",), "summary": ("", "_sum", "_count")}
    for family in metric_families(text).values():
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
    return names


def test_dashboard_metrics_exist_in_the_real_metrics_output(server: RunningServer) -> None:
    drive_requests(server.address, "tiny", 3)
    text = server.metrics_text()
    exposed = exposed_series_names(text)
    for title, query in dashboard_queries():
        for name in re.findall(r"\bcnnserve_[a-z0-9_]+", query):
            assert name in exposed, f"panel '{title}' queries {name}, which /metrics lacks"
    labelled = {s.name: set(s.labels) for f in metric_families(text).values() for s in f.samples}
    assert {"model", "version"} <= labelled["cnnserve_requests_total"]
    assert {"model", "version", "reason"} <= labelled["cnnserve_request_failures_total"]
    assert {"model", "version", "state"} <= labelled["cnnserve_model_state"]


def test_promtool_check_metrics_passes_on_our_metrics(server: RunningServer) -> None:
    drive_requests(server.address, "tiny", 1)
    result = subprocess.run([promtool(), "check", "metrics"], input=server.metrics_text(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


class Prometheus:
    """A real Prometheus on 127.0.0.1 scraping one target every second."""

    def __init__(self, target: str, workdir: Path) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.skip("prometheus is not installed (Debian package prometheus)")
        config = workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "scrape_timeout": "900ms",
                       "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "cnnserve", "static_configs": [{"targets": [target]}]}],
        }))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "prometheus.log"
        with self.log.open("w") as out:
            self.process = subprocess.Popen(
                [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=out, stderr=subprocess.STDOUT)

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as reply:
            return json.loads(reply.read())

    def query(self, promql: str) -> list[dict[str, Any]]:
        answer = self.get("/api/v1/query", query=promql)
        assert answer["status"] == "success", answer
        return list(answer["data"]["result"])

    def ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"prometheus exited {self.process.returncode}:\n"
                                 f"{self.log.read_text()}")
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as reply:
                return bool(reply.status == 200)
        except OSError:
            return False


def test_real_prometheus_scrapes_the_server_and_answers_every_dashboard_query(
        server: RunningServer, tmp_path: Path) -> None:
    prometheus = Prometheus(f"127.0.0.1:{server.metrics_port}", tmp_path)
    try:
        wait_until(prometheus.ready, 30, "Prometheus to be ready")
        before = wait_until(lambda: prometheus.query('up{job="cnnserve"} == 1'), 30,
                            "the first successful scrape")
        assert before[0]["metric"]["instance"] == f"127.0.0.1:{server.metrics_port}"
        sent = drive_requests(server.address, "tiny", 20)
        np.testing.assert_allclose(sent["outputs"][0], linear_expected(sent_input()),
                                   rtol=1e-5, atol=1e-5)
        assert sent["failures"] == ["StatusCode.INVALID_ARGUMENT", "StatusCode.NOT_FOUND"]
        total = server_total(server)

        def scraped() -> list[dict[str, Any]]:
            rows = prometheus.query(f'cnnserve_requests_total{{model="tiny"}} >= {total}')
            return rows if rows and len(prometheus.query(
                'count_over_time(cnnserve_requests_total{model="tiny"}[1m]) >= 2')) else []
        (row,) = wait_until(scraped, 30, f"Prometheus to see {total} requests")
        assert row["metric"]["model"] == "tiny" and row["metric"]["version"] == "1"
        assert row["metric"]["job"] == "cnnserve"
        failures = prometheus.query("cnnserve_request_failures_total")
        assert {"invalid_argument", "not_found"} <= {r["metric"]["reason"] for r in failures}
        ready = prometheus.query('cnnserve_model_state{model="tiny", state="READY"} == 1')
        assert [r["metric"]["version"] for r in ready] == ["1"]
        empty = [title for title, q in dashboard_queries() if not prometheus.query(q)]
        # Queue depth, failures by load and the like may be zero-valued but must evaluate;
        # these panels must show data after traffic.
        for title in ("Requests/s", "Request rate", "Errors by reason",
                      "Request latency p50 / p99", "Batch size distribution", "Model state"):
            assert title not in empty, f"panel '{title}' shows no data after traffic"
        rate = dict(dashboard_queries())["Request rate"]
        tiny = [r for r in prometheus.query(rate) if r["metric"]["model"] == "tiny"]
        assert float(tiny[0]["value"][1]) > 0, "the request-rate panel shows no traffic"
    finally:
        stop_process(prometheus.process)


def server_total(server: RunningServer) -> float:
    """cnnserve_requests_total of the tiny model as the server reports it now."""
    family = metric_families(server.metrics_text())["cnnserve_requests"]
    return sum(s.value for s in family.samples
               if s.name == "cnnserve_requests_total" and s.labels.get("model") == "tiny")
