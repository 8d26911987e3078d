"""Deployment files: compose spec validity, cross-references, Prometheus and Grafana.

What can be proven without a Docker engine: the compose files validate against the Compose
Specification's JSON Schema; everything they reference exists in the project; promtool accepts
the Prometheus configuration and our /metrics output; a real Prometheus scrapes a real
``cnnserve serve`` and answers every query the Grafana dashboard makes.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_support import (
    COMPOSE_SCHEMA,
    DEPLOY,
    ROOT,
    RunningServer,
    drive_requests,
    expected_tiny_output,
    free_port,
    healthcheck_command,
    interpolate,
    merge_compose,
    read_stages,
    running_server,
    serve_unavailable_reason,
    stop_process,
    variables_in,
    wait_until,
    write_tiny_model,
)

from cnnserve.server import probe
from cnnserve.server.settings import env_of, fields

COMPOSE = ROOT / "docker-compose.yml"
GPU_OVERRIDE = ROOT / "docker-compose.gpu.yml"
ENV_EXAMPLE = ROOT / ".env.example"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "cnnserve.json"
PROVISIONING = DEPLOY / "grafana" / "provisioning"
SERVER_ENV = {env_of(f.name) for f in fields()}
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m",
                     "$model": ".*", "$version": ".*", "$instance": ".*"}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def env_defaults() -> dict[str, str]:
    """The variables .env.example sets (a person's .env starts as a copy of it)."""
    values = {}
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f".env.example: not KEY=VALUE: {line!r}"
            values[key.strip()] = value.strip()
    return values


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(load_yaml(COMPOSE))


@pytest.fixture(scope="module")
def schema_validator() -> Any:
    if not COMPOSE_SCHEMA.exists():
        pytest.skip(f"the Compose Specification schema is not at {COMPOSE_SCHEMA} "
                    "(shared/schemas is provided beside the checkout)")
    import jsonschema
    schema = json.loads(COMPOSE_SCHEMA.read_text(encoding="utf-8"))
    # The file names draft-07 as "https://json-schema.org/draft-07/schema" (no "#"), which
    # jsonschema's lookup does not recognise; say the draft explicitly.
    assert "draft-07" in schema["$schema"]
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def assert_valid(validator: Any, document: Any, what: str) -> None:
    errors = sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path))
    assert not errors, f"{what}:\n" + "\n".join(
        f"  {'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


# -- compose ----------------------------------------------------------------------------

def test_compose_file_is_valid_against_the_compose_spec(compose: dict[str, Any],
                                                        schema_validator: Any) -> None:
    assert_valid(schema_validator, compose, "docker-compose.yml as written")
    assert_valid(schema_validator, interpolate(compose, {}), "with every variable unset")
    assert_valid(schema_validator, interpolate(compose, env_defaults()),
                 "with .env.example's values")
    assert set(compose["services"]) == {"trainer", "server", "prometheus", "grafana", "batch"}


def test_gpu_override_is_valid_and_reserves_an_nvidia_gpu(compose: dict[str, Any],
                                                           schema_validator: Any) -> None:
    override = load_yaml(GPU_OVERRIDE)
    assert_valid(schema_validator, override, "docker-compose.gpu.yml")
    merged = interpolate(merge_compose(compose, override), env_defaults())
    assert_valid(schema_validator, merged, "docker-compose.yml + docker-compose.gpu.yml")
    server = merged["services"]["server"]
    (device,) = server["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert server["environment"]["CNNSERVE_DEVICE"] == "cuda"
    stages = read_stages(ROOT / server["build"]["dockerfile"])
    gpu_stage = stages[server["build"]["target"]]
    assert gpu_stage.base.startswith("nvidia/cuda:") and "runtime" in gpu_stage.base
    assert gpu_stage.env()["CNNSERVE_DEVICE"] == "cuda"


def test_compose_references_exist(compose: dict[str, Any]) -> None:
    services, volumes = compose["services"], set(compose["volumes"])
    used_volumes = set()
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown service {dependency}"
        for mount in service.get("volumes", []):
            source, target = mount.split(":")[:2]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name}: bind mount source {source} missing"
            else:
                assert source in volumes, f"{name}: volume {source} is not declared"
                used_volumes.add(source)
            assert target.startswith("/"), mount
        if "build" in service:
            build = service["build"]
            dockerfile = ROOT / build["context"] / build["dockerfile"]
            assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
            assert build["target"] in read_stages(dockerfile), f"{name}: no stage {build['target']}"
    assert used_volumes == volumes, f"declared but unused volumes: {volumes - used_volumes}"


def test_compose_services_are_wired_as_a_person_expects(compose: dict[str, Any]) -> None:
    s = compose["services"]
    assert s["trainer"]["restart"] == "no"
    assert s["server"]["depends_on"]["trainer"]["condition"] == "service_completed_successfully"
    assert "model-repository:/models:ro" in s["server"]["volumes"]
    assert "model-repository:/models" in s["trainer"]["volumes"]
    assert s["server"]["restart"] == s["prometheus"]["restart"] == "unless-stopped"
    assert s["batch"]["profiles"] == ["batch"]
    assert s["batch"]["depends_on"]["server"]["condition"] == "service_healthy"
    assert "--url" in s["batch"]["command"] and "server:8001" in s["batch"]["command"]


def test_every_variable_is_documented_in_env_example_with_the_same_default() -> None:
    documented = env_defaults()
    used: dict[str, str | None] = {}
    for path in (COMPOSE, GPU_OVERRIDE):
        for name, default in variables_in(path.read_text(encoding="utf-8")).items():
            used[name] = default
            assert name in documented, f"{path.name} uses ${{{name}}}; document it in .env.example"
            assert default is not None, f"{path.name}: ${{{name}}} needs a default (:-)"
            assert documented[name] == default, (
                f"{name}: .env.example says {documented[name]!r}, {path.name} defaults to "
                f"{default!r}")
    assert set(documented) <= set(used), f"unused in compose: {set(documented) - set(used)}"


def test_cnnserve_variables_are_ones_the_programs_read(compose: dict[str, Any]) -> None:
    server_env = set(compose["services"]["server"]["environment"])
    server_env |= set(read_stages(DEPLOY / "Dockerfile.server")["server"].env())
    cnnserve_vars = {v for v in server_env if v.startswith("CNNSERVE_")}
    assert cnnserve_vars <= SERVER_ENV, f"not server settings: {cnnserve_vars - SERVER_ENV}"
    assert set(probe.SERVER_ENV) <= SERVER_ENV
    if serve_unavailable_reason() is None:  # the real --help documents every one of them
        help_text = subprocess.run([sys.executable, "-m", "cnnserve", "serve", "--help"],
                                   capture_output=True, text=True, check=True).stdout
        missing = {v for v in cnnserve_vars | set(probe.SERVER_ENV) if v not in help_text}
        assert not missing, f"`cnnserve serve --help` does not document {missing}"
    script = (ROOT / "scripts" / "prepare-model.sh").read_text(encoding="utf-8")
    trainer_env = set(compose["services"]["trainer"]["environment"])
    trainer_env |= set(read_stages(DEPLOY / "Dockerfile.trainer")["trainer"].env())
    for var in trainer_env:
        if var.startswith("CNNSERVE_"):
            assert f"${{{var}" in script or f"${var}" in script, f"prepare-model.sh ignores {var}"


def test_ports_agree_across_compose_dockerfile_prometheus_and_probe(
        compose: dict[str, Any]) -> None:
    server = compose["services"]["server"]
    stage = read_stages(DEPLOY / "Dockerfile.server")["server"]
    exposed = {int(p) for inst in stage.all("EXPOSE") for p in inst.args.split()}
    env = {**stage.env(), **server["environment"]}
    grpc_port, metrics_port = int(env["CNNSERVE_GRPC_PORT"]), int(env["CNNSERVE_METRICS_PORT"])
    assert exposed == {grpc_port, metrics_port} == {8001, 8002}
    published = {int(p.rsplit(":", 1)[1]) for p in server["ports"]}
    assert published == exposed
    jobs = load_yaml(PROMETHEUS_YML)["scrape_configs"]
    job = next(j for j in jobs if j["job_name"] == "cnnserve")
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["server"] and sd["port"] == metrics_port
    assert probe.default_address(env) == f"localhost:{grpc_port}"


def test_healthchecks_run_our_probe_with_the_same_command(compose: dict[str, Any]) -> None:
    command = healthcheck_command(read_stages(DEPLOY / "Dockerfile.server")["server"])
    assert command == ["python", "-m", "cnnserve.server.probe"]
    assert compose["services"]["server"]["healthcheck"]["test"] == ["CMD", *command]
    assert healthcheck_command(read_stages(DEPLOY / "Dockerfile.server")["server-gpu"]) == command


# -- images ---------------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["server", "server-gpu"])
def test_server_image_is_non_root_exec_form_and_torch_free(target: str) -> None:
    stages = read_stages(DEPLOY / "Dockerfile.server")
    stage = stages[target]
    user = stage.last("USER")
    assert user is not None and user.args.split(":")[0] not in ("0", "root")
    entrypoint = stage.last("ENTRYPOINT")
    assert entrypoint is not None and entrypoint.exec_form == ["cnnserve", "serve"]
    assert stage.last("CMD") is None
    (copy,) = [i for i in stage.all("COPY") if "from" in i.flags]
    builder = stages[copy.flags["from"]]
    installs = " ".join(i.args for i in builder.all("RUN") if "pip" in i.args)
    assert "torch" not in installs and "[train]" not in installs
    assert ('".[serve]"' if target == "server" else '".[gpu]"') in installs
    assert "-c constraints.txt" in installs
    if target == "server":
        assert stage.base.startswith("python:3.11-slim")


def test_dockerfile_copies_exist_and_survive_dockerignore() -> None:
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for name in ("Dockerfile.server", "Dockerfile.trainer", "Dockerfile.client"):
        for stage in read_stages(DEPLOY / name).values():
            for copy in stage.all("COPY"):
                if "from" in copy.flags:
                    continue
                for source in copy.args.split()[:-1]:
                    assert (ROOT / source).exists(), f"{name}: COPY {source}: missing"
                    top = source.strip("./").split("/")[0]
                    assert top not in ignored, f"{name}: COPY {source} but .dockerignore drops it"
    for local_state in (".venv", ".git", "/models", "/runs"):
        assert local_state in ignored


# -- Prometheus and Grafana -----------------------------------------------------------------

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
    write_tiny_model(work / "models")
    with running_server(work / "models", work) as running:
        yield running


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


@pytest.mark.slow
def test_real_prometheus_scrapes_the_server_and_answers_every_dashboard_query(
        server: RunningServer, tmp_path: Path) -> None:
    prometheus = Prometheus(f"127.0.0.1:{server.metrics_port}", tmp_path)
    try:
        wait_until(prometheus.ready, 30, "Prometheus to be ready")
        before = wait_until(lambda: prometheus.query('up{job="cnnserve"} == 1'), 30,
                            "the first successful scrape")
        assert before[0]["metric"]["instance"] == f"127.0.0.1:{server.metrics_port}"
        sent = drive_requests(server.address, "tiny", 20)
        for got, want in zip(sent["outputs"][0], expected_tiny_output(), strict=True):
            assert got == pytest.approx(want, abs=1e-5)
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
    finally:
        stop_process(prometheus.process)


def server_total(server: RunningServer) -> float:
    """cnnserve_requests_total of the tiny model as the server reports it now."""
    family = metric_families(server.metrics_text())["cnnserve_requests"]
    return sum(s.value for s in family.samples
               if s.name == "cnnserve_requests_total" and s.labels.get("model") == "tiny")
