"""The kustomize manifests under deploy/k8s: they render, validate, follow the security and
resource policy, hang together (selectors, named ports, probes), and the server starts and
serves with exactly the Deployment's container command, environment and volumes."""

from __future__ import annotations

import json
import re
import shutil
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from tests.support.k8s import (
    K8S,
    OVERLAYS,
    Doc,
    all_containers,
    container_command,
    container_port,
    grpc_probe,
    help_settings,
    image_tag,
    infer,
    infer_with,
    load_yaml,
    one,
    open_channel,
    pod_spec,
    render,
    render_with_components,
    run_server,
    validate_kubernetes,
    volume_paths,
    wait_serving,
    write_model,
)

MODEL = "fashion-cnn"
TOKEN = "k8s-test-token"
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[Doc]]:
    return request.param, render(K8S / "overlays" / request.param)


@pytest.fixture(scope="module")
def cpu() -> list[Doc]:
    return render(K8S / "overlays" / "cpu")


@pytest.fixture(scope="module")
def with_components(tmp_path_factory: pytest.TempPathFactory) -> list[Doc]:
    return render_with_components(tmp_path_factory.mktemp("overlay"), "cpu",
                                  ["tls", "queue-depth-autoscaling", "pvc-repository"])


@pytest.fixture(scope="module")
def with_pvc(tmp_path_factory: pytest.TempPathFactory) -> list[Doc]:
    return render_with_components(tmp_path_factory.mktemp("overlay"), "cpu", ["pvc-repository"])


def server_container(docs: list[Doc]) -> Doc:
    containers = pod_spec(one(docs, "Deployment", "cnnserve"))["containers"]
    return next(c for c in containers if c["name"] == "server")


def pod_labels(docs: list[Doc]) -> dict[str, str]:
    labels: dict[str, str] = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    return labels


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# ---- rendering and schemas ------------------------------------------------------------

def test_each_overlay_renders_the_whole_application(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["Deployment", "HorizontalPodAutoscaler", "NetworkPolicy",
                     "PodDisruptionBudget", "Service", "Service", "ServiceMonitor"]


def test_every_kubernetes_object_validates_strictly_against_1_30_and_newest(
        overlay: tuple[str, list[Doc]], with_components: list[Doc]) -> None:
    from kubernetes_validate.utils import SchemaNotFoundError

    _, docs = overlay
    for doc in [*docs, *with_components]:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: kubernetes-validate has no schema; checked structurally below
        try:
            versions = validate_kubernetes(doc)
        except SchemaNotFoundError:
            pytest.fail(f"no Kubernetes schema for {doc['apiVersion']} {doc['kind']}")
        assert versions[0] == "1.30"


def test_servicemonitor_scrapes_the_metrics_port_of_the_server_service(
        overlay: tuple[str, list[Doc]]) -> None:
    # No schema for the Prometheus Operator's CRDs in kubernetes-validate: check its shape.
    _, docs = overlay
    monitor = one(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    services = [s for s in docs if s["kind"] == "Service"
                and selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
    assert [s["metadata"]["name"] for s in services] == ["cnnserve"], \
        "the monitor must select exactly one Service, or replicas are scraped twice"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}
    ports = {p["name"]: p for p in services[0]["spec"]["ports"]}
    assert endpoint["port"] in ports and endpoint["path"] == "/metrics"
    target = ports[endpoint["port"]]["targetPort"]
    assert container_port(server_container(docs), target) == 8002


# ---- policy ---------------------------------------------------------------------------

def test_every_container_is_non_root_read_only_unprivileged_and_limited(
        overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    deployment = one(docs, "Deployment")
    pod = pod_spec(deployment)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    containers = all_containers(deployment)
    assert [c["name"] for c in containers] == ["fetch-models", "server"]
    for c in containers:
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True, c["name"]
        assert sc.get("runAsUser", pod["securityContext"]["runAsUser"]) != 0, c["name"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
        assert not sc.get("privileged", False), c["name"]
        assert {"cpu", "memory"} <= set(c["resources"]["limits"]), c["name"]
        assert {"cpu", "memory"} <= set(c["resources"]["requests"]), c["name"]


def test_no_image_floats_on_latest(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    for c in all_containers(one(docs, "Deployment")):
        assert image_tag(c["image"]) not in ("", "latest"), c["image"]


def test_probes_are_native_grpc_health_checks_on_the_grpc_port(
        overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    server = server_container(docs)
    for name in PROBES:
        probe = server[name]
        assert probe["grpc"] == {"port": container_port(server, "grpc"), "service": ""}, name
    # The probe port is a number (gRPC probes take no port names): the server's own port.
    env = {v["name"]: v.get("value") for v in server["env"]}
    assert int(env["CNNSERVE_GRPC_PORT"]) == container_port(server, "grpc")
    assert int(env["CNNSERVE_METRICS_PORT"]) == container_port(server, "metrics")


def test_server_settings_are_real_flags_and_variables(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    flags, variables = help_settings()
    server = server_container(docs)
    assert server["command"] == ["cnnserve", "serve"]
    for arg in server.get("args", []):
        if arg.startswith("--"):
            assert arg.split("=")[0] in flags, arg
    for var in server["env"]:
        assert var["name"] in variables, var["name"]


def test_threads_follow_the_cpu_limit_through_the_downward_api(
        overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    server = server_container(docs)
    env = {v["name"]: v for v in server["env"]}
    assert "CNNSERVE_INTRA_OP_THREADS" not in env and "CNNSERVE_EXECUTION_WORKERS" not in env
    ref = env["CNNSERVE_CPUS"]["valueFrom"]["resourceFieldRef"]
    assert ref == {"containerName": "server", "resource": "limits.cpu", "divisor": "1"}


def test_token_comes_from_an_optional_secret(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    env = {v["name"]: v for v in server_container(docs)["env"]}
    assert env["CNNSERVE_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "cnnserve-token", "key": "token", "optional": True}
    assert "--token" not in str(server_container(docs).get("args", []))


def test_the_pod_drains_before_the_kubelet_kills_it(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    pod = pod_spec(one(docs, "Deployment"))
    server = server_container(docs)
    env = {v["name"]: v.get("value") for v in server["env"]}
    pre_stop = server["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pre_stop + float(env["CNNSERVE_GRACE_PERIOD"])


def test_rollouts_add_a_ready_pod_before_removing_one(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1,
                                                               "maxUnavailable": 0}
    assert "replicas" not in deployment["spec"], "the HorizontalPodAutoscaler owns replicas"


# ---- the objects hang together --------------------------------------------------------

def test_selectors_and_named_ports_match_the_pods(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    labels = pod_labels(docs)
    deployment = one(docs, "Deployment")
    assert selects(deployment["spec"]["selector"]["matchLabels"], labels)
    server = server_container(docs)
    for service in (d for d in docs if d["kind"] == "Service"):
        assert selects(service["spec"]["selector"], labels), service["metadata"]["name"]
        for port in service["spec"]["ports"]:
            assert container_port(server, port["targetPort"]) == port["port"]
    assert selects(one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], labels)
    policy = one(docs, "NetworkPolicy")
    assert selects(policy["spec"]["podSelector"]["matchLabels"], labels)
    for rule in policy["spec"]["ingress"]:
        for port in rule["ports"]:
            container_port(server, port["port"])
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert hpa["spec"]["minReplicas"] >= 2, "one replica must survive a disruption"


def test_gpu_overlay_runs_the_gpu_image_on_one_gpu_with_cuda_required() -> None:
    docs = render(K8S / "overlays" / "gpu")
    server = server_container(docs)
    assert server["image"].startswith("cnnserve/server-gpu:")
    assert server["args"] == ["--device", "cuda"]
    assert server["resources"]["limits"]["nvidia.com/gpu"] == "1"
    tolerations = pod_spec(one(docs, "Deployment"))["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
    dockerfile = (K8S.parent / "Dockerfile.server").read_text(encoding="utf-8")
    assert "AS server-gpu" in dockerfile


def test_queue_depth_component_scales_on_a_metric_the_server_exports(
        with_components: list[Doc]) -> None:
    (metric,) = one(with_components, "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    rules = load_yaml(K8S / "components" / "queue-depth-autoscaling"
                      / "prometheus-adapter-rules.yaml")
    assert rules["rules"]["custom"][0]["name"]["as"] == name
    # The contract test below reads the same name from a real server's /metrics.
    assert name == "cnnserve_queue_depth"


def test_tls_component_mounts_the_secret_and_probes_with_the_tls_aware_probe(
        with_components: list[Doc]) -> None:
    server = server_container(with_components)
    env = {v["name"]: v.get("value") for v in server["env"]}
    mounts = {m["name"]: m["mountPath"] for m in server["volumeMounts"]}
    assert env["CNNSERVE_TLS_CERT"] == f"{mounts['tls']}/tls.crt"
    assert env["CNNSERVE_TLS_KEY"] == f"{mounts['tls']}/tls.key"
    # The same probe command as the image's HEALTHCHECK, which test_dockerfile_commands runs.
    dockerfile = (K8S.parent / "Dockerfile.server").read_text(encoding="utf-8")
    healthchecks = {tuple(json.loads(cmd)) for cmd in re.findall(r"CMD (\[.*\])", dockerfile)}
    assert len(healthchecks) == 1, healthchecks
    for name in PROBES:
        assert (*server[name]["exec"]["command"],) in healthchecks, name
    volumes = {v["name"]: v for v in pod_spec(one(with_components, "Deployment"))["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "cnnserve-tls"


def test_pvc_component_mounts_the_claim_read_only_and_polls_it(with_pvc: list[Doc]) -> None:
    pod = pod_spec(one(with_pvc, "Deployment"))
    assert not pod.get("initContainers")
    volumes = {v["name"]: v for v in pod["volumes"]}
    claim = one(with_pvc, "PersistentVolumeClaim")
    assert volumes["model-repository"] == {"name": "model-repository", "persistentVolumeClaim": {
        "claimName": claim["metadata"]["name"], "readOnly": True}}
    assert "ReadWriteMany" in claim["spec"]["accessModes"]  # every replica, on any node
    server = server_container(with_pvc)
    env = {v["name"]: v.get("value") for v in server["env"]}
    assert env["CNNSERVE_CONTROL_MODE"] == "poll"


# ---- the contract: run the pod's containers as the kubelet would ----------------------

def _make_read_only(folder: Path) -> None:
    for path in [folder, *folder.rglob("*")]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def _make_writable(folder: Path) -> None:
    for path in [folder, *folder.rglob("*")]:
        path.chmod(path.stat().st_mode | stat.S_IWUSR)


def test_the_deployment_serves_as_rendered(cpu: list[Doc], tmp_path: Path) -> None:
    """Init container, then server, with the manifest's command, args, env and mounts; the
    kubelet's probes on the declared port; one inference with the Secret's token."""
    if shutil.which("cp") is None:
        pytest.skip("the init container's `cp` is not installed here")
    deployment = one(cpu, "Deployment")
    init, server = all_containers(deployment)
    volumes = tmp_path / "volumes"

    # The model image: a repository at /models (deploy/Dockerfile.models). Paths in the init
    # container outside its mounts are the image's own files.
    image_root = tmp_path / "image"
    write_model(image_root / "models", MODEL)
    paths: dict[str, Any] = {"/models": image_root / "models", **volume_paths(init, volumes)}
    launch = container_command(init, paths, {})
    assert subprocess.run(launch.argv, capture_output=True, timeout=30).returncode == 0

    # The server mounts that volume read-only.
    paths = volume_paths(server, volumes)
    repository = paths["/models"]
    assert (repository / MODEL / "1" / "model.onnx").exists()
    _make_read_only(repository)
    try:
        launch = container_command(server, paths, {("cnnserve-token", "token"): TOKEN})
        assert launch.env["CNNSERVE_CPUS"] == "2"  # the overlay's 2-core limit
        assert launch.declared_ports == {"grpc": container_port(server, "grpc"),
                                         "metrics": container_port(server, "metrics")}
        with run_server(launch, tmp_path) as running:
            wait_serving(running.address, server["startupProbe"]["grpc"]["service"])
            for name in PROBES:
                probe = server[name]["grpc"]
                assert probe["port"] == launch.declared_ports["grpc"]
                assert grpc_probe(running.address, probe["service"]) == "SERVING", name
            assert grpc_probe(running.address, MODEL) == "SERVING"
            x = np.arange(8, dtype=np.float32).reshape(2, 4)
            np.testing.assert_array_equal(infer(running.address, MODEL, x, TOKEN), 2 * x)
            with pytest.raises(grpc.RpcError) as refused:
                infer(running.address, MODEL, x)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            metrics = running.metrics_text()
            assert "cnnserve_queue_depth{" in metrics
    finally:
        _make_writable(repository)


def test_a_new_version_on_the_pvc_takes_over_with_no_failed_request(
        with_pvc: list[Doc], tmp_path: Path) -> None:
    """The in-place rollout of deploy/README.md: version 2 appears on the volume (renamed into
    place, as export does); each replica loads and warms it while version 1 serves, then
    switches. Requests sent all along never fail and the probes never leave SERVING."""
    server = server_container(with_pvc)
    paths = volume_paths(server, tmp_path / "volumes")
    repository = paths["/models"]
    write_model(repository, MODEL, 1, factor=2.0)
    launch = container_command(server, paths, {})
    x = np.ones((1, 4), np.float32)
    with run_server(launch, tmp_path) as running:
        wait_serving(running.address, server["startupProbe"]["grpc"]["service"])
        failures: list[BaseException] = []
        answers: list[tuple[str, float]] = []
        probes: list[str] = []
        stop = threading.Event()

        def traffic() -> None:
            client = open_channel(running.address)
            try:
                while not stop.is_set():
                    try:
                        y, version = infer_with(client, MODEL, x)
                        answers.append((version, float(y[0, 0])))
                    except Exception as exc:
                        failures.append(exc)
                    probes.append(grpc_probe(running.address,
                                             server["readinessProbe"]["grpc"]["service"]))
            finally:
                client.close()

        worker = threading.Thread(target=traffic)
        worker.start()
        try:
            write_model(tmp_path / "export", MODEL, 2, factor=3.0)
            (tmp_path / "export" / MODEL / "2").rename(repository / MODEL / "2")
            deadline = time.monotonic() + 30
            while not (answers and answers[-1][0] == "2") and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(0.3)  # a little traffic on version 2 as well
        finally:
            stop.set()
            worker.join(timeout=30)
    assert not failures, failures[:3]
    assert answers and answers[-1] == ("2", 3.0), "version 2 never took over"
    assert answers[0] == ("1", 2.0)
    versions = [v for v, _ in answers]
    assert versions == sorted(versions), "requests went back to version 1 after the switch"
    assert all(y == {"1": 2.0, "2": 3.0}[v] for v, y in answers), "a version answered wrong"
    assert set(probes) == {"SERVING"}


def test_the_gpu_overlay_is_never_ready_without_cuda(tmp_path: Path) -> None:
    """--device cuda: a replica on a node whose CUDA provider cannot start stays out of the
    Service (readiness NOT_SERVING, the reason in the log) instead of serving slowly on CPU.
    With a working CUDA provider the same container serves."""
    import onnxruntime

    docs = render(K8S / "overlays" / "gpu")
    server = server_container(docs)
    paths = volume_paths(server, tmp_path / "volumes")
    write_model(paths["/models"], MODEL)
    launch = container_command(server, paths, {})
    cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    with run_server(launch, tmp_path) as running:
        service = server["readinessProbe"]["grpc"]["service"]
        if cuda:
            wait_serving(running.address, service)
            x = np.ones((1, 4), np.float32)
            np.testing.assert_array_equal(infer(running.address, MODEL, x), 2 * x)
        else:
            # The engine has started when the port file appears: the answer is final.
            assert grpc_probe(running.address, service) == "NOT_SERVING"
            assert "CUDA" in running.log.read_text()
