"""Deployment files: the compose files and Dockerfiles, checked without a Docker engine.

The compose files validate against the Compose Specification's JSON Schema, and everything
they reference exists in the project: services, volumes, bind-mounted files, Dockerfiles and
their targets, ports, and variables (documented in .env.example; ``CNNSERVE_*`` ones are
settings the programs read). Prometheus and Grafana: tests/test_deploy_observability.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from typing import Any

import pytest

from cnnserve.server.process import probe
from cnnserve.server.process.settings import env_of, fields
from tests.support.deploy import (
    COMPOSE,
    COMPOSE_SCHEMA,
    DEPLOY,
    ENV_EXAMPLE,
    PROMETHEUS_YML,
    ROOT,
    healthcheck_command,
    interpolate,
    load_yaml,
    merge_compose,
    read_stages,
    variables_in,
)
from tests.support.deploy_server import serve_unavailable_reason

GPU_OVERRIDE = ROOT / "docker-compose.gpu.yml"
SERVER_ENV = {env_of(f.name) for f in fields()}


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
    assert set(compose["services"]) == {"trainer", "server", "prometheus", "grafana", "batch",
                                       "otel-collector", "jaeger"}


def test_docker_compose_itself_accepts_the_files_where_it_is_installed() -> None:
    """``docker compose config`` needs no engine, only the compose plugin (absent here)."""
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"],
                                        capture_output=True).returncode != 0:
        pytest.skip("the docker compose plugin is not installed; the schema tests stand in")
    for files in (["-f", str(COMPOSE)], ["-f", str(COMPOSE), "-f", str(GPU_OVERRIDE)]):
        result = subprocess.run([docker, "compose", *files, "--env-file", str(ENV_EXAMPLE),
                                 "--profile", "batch", "config", "--quiet"],
                                capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert result.returncode == 0, result.stderr


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
        help_text = subprocess.run([sys.executable, "-m", "cnnserve.cli", "serve", "--help"],
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
    http_port = int(env["CNNSERVE_HTTP_PORT"])  # REST (issue 16)
    assert exposed == {http_port, grpc_port, metrics_port} == {8000, 8001, 8002}
    published = {int(p.rsplit(":", 1)[1]) for p in server["ports"]}
    assert published == exposed
    jobs = load_yaml(PROMETHEUS_YML)["scrape_configs"]
    job = next(j for j in jobs if j["job_name"] == "cnnserve")
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["server"] and sd["port"] == metrics_port
    assert probe.default_address(env) == f"localhost:{grpc_port}"


def test_healthchecks_run_our_probe_with_the_same_command(compose: dict[str, Any]) -> None:
    command = healthcheck_command(read_stages(DEPLOY / "Dockerfile.server")["server"])
    assert command == ["python", "-m", "cnnserve.server.process.probe"]
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
    assert ('".[serve,otel]"' if target == "server" else '".[gpu]"') in installs
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


def test_the_tracing_profile_wires_server_collector_and_jaeger(compose: dict[str, Any]) -> None:
    s = compose["services"]
    assert s["otel-collector"]["profiles"] == s["jaeger"]["profiles"] == ["tracing"]
    # Off unless asked: an empty endpoint means no exporter at all (telemetry/tracing.py).
    assert s["server"]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == \
        "${OTEL_EXPORTER_OTLP_ENDPOINT:-}"
    config = load_yaml(DEPLOY / "otel" / "collector.yaml")
    (pipeline,) = config["service"]["pipelines"].values()
    assert set(pipeline["receivers"]) <= set(config["receivers"])
    assert set(pipeline["processors"]) <= set(config["processors"])
    assert set(pipeline["exporters"]) <= set(config["exporters"])
    assert config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].endswith(":4317")
    (exporter,) = config["exporters"].values()
    assert exporter["endpoint"] == "jaeger:4317" and "jaeger" in s["otel-collector"]["depends_on"]
    mount = next(v for v in s["otel-collector"]["volumes"] if "collector.yaml" in v)
    assert mount.split(":")[1] in s["otel-collector"]["command"][0]
