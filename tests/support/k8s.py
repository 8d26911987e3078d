"""Kubernetes and KServe manifests, checked without a cluster, and run as a kubelet would.

- Rendering: ``kubectl kustomize`` of an overlay (or of an overlay plus components, through a
  throw-away kustomization), parsed into plain dicts.
- Schemas: Kubernetes' own objects against the schemas ``kubernetes-validate`` bundles (strict:
  unknown fields are errors); KServe's objects against the ``openAPIV3Schema`` of KServe's CRDs
  in ``../shared/schemas/kserve/`` (read at test time, never copied into the project).
- Running a container: :func:`container_command` turns a container spec into the argv and
  environment the kubelet would start, with volume paths mapped to local folders, Secret and
  Downward API values filled in, and the port values rewritten to 0 (ports are reported
  through ``CNNSERVE_PORT_FILE``) so servers only bind free ports on 127.0.0.1.
- Probing: :func:`grpc_probe` is the kubelet's native gRPC probe: one ``grpc.health.v1``
  Check with the probe's ``service``, plaintext, no metadata.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
KSERVE = DEPLOY / "kserve"
OVERLAYS = ("cpu", "gpu")
#: KServe's CRDs live beside the project, shared by every worktree (see its README.md).
KSERVE_SCHEMAS = ROOT.parent / "shared" / "schemas" / "kserve"
VENV_BIN = Path(sys.executable).parent
KUBECTL_HINT = ("kubectl is not installed: install it (https://kubernetes.io/docs/tasks/tools/, "
                "or `gcloud components install kubectl`) to render the kustomize overlays")
#: Kubernetes versions every object must validate against: the oldest supported, the newest.
OLDEST_KUBERNETES = "1.30.0"

Doc = dict[str, Any]


# ---- rendering ------------------------------------------------------------------------

def kubectl() -> str:
    """Path of kubectl; skips the test when it is missing."""
    path = shutil.which("kubectl")
    if path is None:
        pytest.skip(KUBECTL_HINT)
    return path


def render(kustomization_dir: Path) -> list[Doc]:
    """``kubectl kustomize DIR`` as a list of objects. Fails the test with kubectl's error."""
    result = subprocess.run([kubectl(), "kustomize", str(kustomization_dir)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, f"kubectl kustomize {kustomization_dir}:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def render_with_components(workdir: Path, overlay: str, components: list[str]) -> list[Doc]:
    """Render ``overlays/<overlay>`` with ``components/<name>`` added, as a user's overlay
    would add them (kustomize wants relative paths)."""
    workdir.mkdir(parents=True, exist_ok=True)
    rel = Path(os.path.relpath(K8S, workdir))
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [str(rel / "overlays" / overlay)],
        "components": [str(rel / "components" / name) for name in components],
    }
    (workdir / "kustomization.yaml").write_text(yaml.safe_dump(kustomization), encoding="utf-8")
    return render(workdir)


#: libyaml's loader when PyYAML has it: KServe's InferenceService CRD is 2 MB of YAML.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_yaml(path: Path) -> Doc:
    doc = yaml.load(path.read_text(encoding="utf-8"), Loader=_LOADER)
    assert isinstance(doc, dict), f"{path} holds no object"
    return doc


def one(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    """The single object of ``kind`` (and ``name``)."""
    found = [d for d in docs if d["kind"] == kind
             and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


# ---- schemas --------------------------------------------------------------------------

def kubernetes_versions() -> tuple[str, ...]:
    """The oldest supported and the newest Kubernetes version kubernetes-validate knows."""
    from kubernetes_validate import utils
    return (OLDEST_KUBERNETES, utils.latest_version())


def validate_kubernetes(doc: Doc) -> list[str]:
    """Validate strictly against every version of :func:`kubernetes_versions`; returns the
    versions checked. Raises SchemaNotFoundError for kinds it has no schema for (CRDs)."""
    from kubernetes_validate import utils
    checked = []
    for version in kubernetes_versions():
        try:
            checked.append(utils.validate(doc, version, strict=True))
        except utils.ValidationError as exc:
            where = "/".join(str(p) for p in exc.path)
            raise AssertionError(f"{doc['kind']}/{doc['metadata']['name']} is invalid for "
                                 f"Kubernetes {exc.version} at {where}: {exc.message}") from None
    return checked


def kserve_schema(kind: str, api_version: str) -> Doc:
    """The ``openAPIV3Schema`` of KServe's CRD for ``kind`` at ``api_version``'s version.

    Skips the test when the shared schemas are absent.
    """
    plural = {"ServingRuntime": "servingruntimes",
              "ClusterServingRuntime": "clusterservingruntimes",
              "InferenceService": "inferenceservices"}[kind]
    path = KSERVE_SCHEMAS / f"serving.kserve.io_{plural}.yaml"
    if not path.exists():
        pytest.skip(f"KServe's CRD schemas are not at {KSERVE_SCHEMAS} (see "
                    "../shared/schemas/README.md); cannot validate KServe manifests")
    crd = load_yaml(path)
    assert crd["spec"]["names"]["kind"] == kind
    group, version = api_version.split("/")
    assert group == crd["spec"]["group"], f"{kind} belongs to {crd['spec']['group']}"
    for served in crd["spec"]["versions"]:
        if served["name"] == version and served.get("served", False):
            schema: Doc = served["schema"]["openAPIV3Schema"]
            return schema
    raise AssertionError(f"KServe does not serve {kind} at {api_version}")


def unknown_fields(node: Any, schema: Doc, path: str = "") -> Iterator[str]:
    """Fields of ``node`` that ``schema`` does not declare (the API server would prune them,
    or reject them with --validate=strict); CRD schemas do not forbid them themselves."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return
    if isinstance(node, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, value in node.items():
            if props is not None and key in props:
                yield from unknown_fields(value, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                yield from unknown_fields(value, extra, f"{path}.{key}")
            elif props is not None:
                yield f"{path}.{key}"
    elif isinstance(node, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(node):
            yield from unknown_fields(item, schema["items"], f"{path}[{i}]")


# ---- workloads ------------------------------------------------------------------------

def pod_spec(doc: Doc) -> Doc:
    """The pod-level spec: a Deployment's template spec, or a serving runtime's spec."""
    if doc["kind"] == "Deployment":
        spec: Doc = doc["spec"]["template"]["spec"]
        return spec
    return dict(doc["spec"])


def all_containers(doc: Doc) -> list[Doc]:
    spec = pod_spec(doc)
    return [*spec.get("initContainers", []), *spec["containers"]]


def container_port(container: Doc, name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    assert name in ports, f"container {container['name']} declares no port named {name!r}"
    return int(ports[name])


def image_tag(image: str) -> str:
    """The tag of an image reference ("" when it has none, i.e. means `latest`)."""
    if "@" in image:
        return image.split("@", 1)[1]
    last = image.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else ""


def cpu_cores(quantity: str | int | float) -> float:
    """A Kubernetes CPU quantity ("2", "1500m", 0.5) in cores."""
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def resource_field(container: Doc, ref: Doc) -> str:
    """The value the kubelet gives a Downward API ``resourceFieldRef`` (CPU: rounded up to
    whole multiples of the divisor, at least 1)."""
    section, resource = ref["resource"].split(".", 1)
    value = container["resources"][section][resource]
    assert resource == "cpu", f"only CPU resourceFieldRefs are emulated, not {resource}"
    return str(max(1, math.ceil(cpu_cores(value) / cpu_cores(ref.get("divisor", "1")))))


def help_settings() -> tuple[set[str], set[str]]:
    """(flags, CNNSERVE_* variables) that ``cnnserve serve --help`` documents."""
    result = subprocess.run([str(VENV_BIN / "cnnserve"), "serve", "--help"], capture_output=True,
                            text=True, timeout=60, check=True,
                            env={**os.environ, "COLUMNS": "400"})
    return (set(re.findall(r"--[a-z][a-z-]+", result.stdout)),
            set(re.findall(r"CNNSERVE_[A-Z_]+", result.stdout)))


# ---- the tiny model -------------------------------------------------------------------

def write_model(repository: Path, name: str, version: int = 1, factor: float = 2.0) -> Path:
    """``<repository>/<name>/<version>/`` with model.onnx (y = factor * x, x FP32 [-1, 4])
    and the config.json ``cnnserve export`` writes beside it; returns the version folder."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "factor"], ["y"])], "scale",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(np.array(factor, np.float32), "factor")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    folder = repository / name / str(version)
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    config = {"name": name, "platform": "onnxruntime_onnx", "max_batch_size": 8,
              "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
              "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}]}
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder


# ---- a container, as the kubelet starts it --------------------------------------------

#: The server's port settings, as flags and variables, and the container port each must be.
PORT_FLAGS = {"--grpc-port": "grpc", "--metrics-port": "metrics"}
PORT_ENV = {"CNNSERVE_GRPC_PORT": "grpc", "CNNSERVE_METRICS_PORT": "metrics"}


@dataclass
class Launch:
    """What the kubelet would run: argv, environment, and the ports the manifest asked for
    (by role: "grpc", "metrics") before they were rewritten to 0."""

    argv: list[str]
    env: dict[str, str]
    declared_ports: dict[str, int] = field(default_factory=dict)


def map_path(value: str, paths: Mapping[str, Path]) -> str:
    """``value`` with a leading container path (a mount, or /mnt/models) replaced by its
    local folder."""
    for inside, local in sorted(paths.items(), key=lambda kv: -len(kv[0])):
        if value == inside or value.startswith(inside.rstrip("/") + "/"):
            return str(local) + value[len(inside.rstrip("/")):]
    return value


def _map_arg(arg: str, paths: Mapping[str, Path]) -> str:
    flag, eq, value = arg.partition("=")
    return f"{flag}={map_path(value, paths)}" if eq else map_path(arg, paths)


def _rewrite_port_args(args: list[str], declared: dict[str, int]) -> list[str]:
    out = list(args)
    for i, arg in enumerate(out):
        flag, eq, value = arg.partition("=")
        if flag not in PORT_FLAGS:
            continue
        if eq:
            declared[PORT_FLAGS[flag]] = int(value)
            out[i] = f"{flag}=0"
        else:
            declared[PORT_FLAGS[flag]] = int(out[i + 1])
            out[i + 1] = "0"
    return out


def container_command(container: Doc, paths: Mapping[str, Path],
                      secrets: Mapping[tuple[str, str], str],
                      template: Mapping[str, str] | None = None) -> Launch:
    """The argv and environment of ``container``, ready to run here.

    ``paths`` maps container paths to local folders; ``secrets`` gives (Secret, key) values
    (an optional key that is absent is left out, as the kubelet does); ``template`` fills
    KServe's ``{{.Name}}``-style placeholders. The command's program is looked up in the
    project's virtual environment, then on PATH. Port flags and variables are set to 0.
    """
    def fill(text: str) -> str:
        for key, value in (template or {}).items():
            text = text.replace("{{." + key + "}}", value)
        assert "{{" not in text, f"unfilled template placeholder in {text!r}"
        return text

    command = [fill(c) for c in container.get("command", [])]
    assert command, f"container {container['name']} must name its command (the contract tests " \
                    "run exactly that, not an image ENTRYPOINT they cannot see)"
    args = [fill(a) for a in container.get("args", [])]
    program = VENV_BIN / command[0]
    argv = [str(program) if program.exists() else (shutil.which(command[0]) or command[0]),
            *(_map_arg(c, paths) for c in command[1:])]
    declared: dict[str, int] = {}
    argv += [_map_arg(a, paths) for a in _rewrite_port_args(args, declared)]
    env: dict[str, str] = {}
    for var in container.get("env", []):
        name = var["name"]
        if "value" in var:
            value = fill(str(var["value"]))
        elif "secretKeyRef" in var["valueFrom"]:
            ref = var["valueFrom"]["secretKeyRef"]
            if (ref["name"], ref["key"]) not in secrets:
                assert ref.get("optional"), f"{name}: Secret {ref['name']} is required"
                continue
            value = secrets[(ref["name"], ref["key"])]
        elif "resourceFieldRef" in var["valueFrom"]:
            ref = var["valueFrom"]["resourceFieldRef"]
            assert ref.get("containerName", container["name"]) == container["name"], \
                f"{name} reads the resources of another container"
            value = resource_field(container, ref)
        else:
            raise AssertionError(f"{name}: unsupported valueFrom {var['valueFrom']}")
        if name in PORT_ENV:
            declared[PORT_ENV[name]] = int(value)
            value = "0"
        env[name] = map_path(value, paths)
    return Launch(argv, env, declared)


def volume_paths(container: Doc, volumes_dir: Path) -> dict[str, Path]:
    """Each of the container's mount paths -> ``volumes_dir/<volume name>`` (created)."""
    paths = {}
    for mount in container.get("volumeMounts", []):
        local = volumes_dir / mount["name"]
        local.mkdir(parents=True, exist_ok=True)
        paths[mount["mountPath"]] = local
    return paths


# ---- the running server ---------------------------------------------------------------

@dataclass
class Server:
    process: subprocess.Popen[bytes]
    grpc_port: int
    metrics_port: int
    log: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def metrics_text(self) -> str:
        import urllib.request
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            return str(reply.read().decode("utf-8"))


@contextlib.contextmanager
def run_server(launch: Launch, workdir: Path, timeout_s: float = 60.0) -> Iterator[Server]:
    """Start ``launch`` on 127.0.0.1 (only the host and port file are added, through the
    environment), wait for its ports, SIGTERM it afterwards and expect exit status 0."""
    assert "CNNSERVE_HOST" not in launch.env and not any(
        a.startswith("--host") for a in launch.argv), "the manifest must not pin the bind host"
    port_file = workdir / "ports.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CNNSERVE_")}
    env.update(launch.env, CNNSERVE_HOST="127.0.0.1", CNNSERVE_PORT_FILE=str(port_file))
    log = workdir / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(launch.argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=workdir)
    try:
        deadline = time.monotonic() + timeout_s
        while not port_file.exists():
            if proc.poll() is not None:
                raise AssertionError(f"server exited with {proc.returncode}:\n{log.read_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"server wrote no port file in {timeout_s} s:\n"
                                     f"{log.read_text()}")
            time.sleep(0.05)
        ports = json.loads(port_file.read_text(encoding="utf-8"))
        yield Server(proc, int(ports["grpc_port"]), int(ports["metrics_port"]), log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"server ignored SIGTERM:\n{log.read_text()}") from None
    assert code == 0, f"server exited with {code} after SIGTERM:\n{log.read_text()}"


def grpc_probe(address: str, service: str, timeout_s: float = 5.0) -> str:
    """A kubelet gRPC probe: Health/Check(service), plaintext, no metadata. Returns the
    serving status name, or the gRPC status code name when the call fails."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as exc:
            return str(exc.code().name)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def wait_serving(address: str, service: str, timeout_s: float = 30.0) -> None:
    """Probe until SERVING, as the kubelet repeats a startup probe."""
    deadline = time.monotonic() + timeout_s
    status = ""
    while time.monotonic() < deadline:
        status = grpc_probe(address, service)
        if status == "SERVING":
            return
        time.sleep(0.1)
    raise AssertionError(f"probe of service {service!r} still {status} after {timeout_s} s")


def open_channel(address: str) -> Any:
    """A plaintext gRPC channel to ``address`` (close it when done)."""
    import grpc

    return grpc.insecure_channel(address)


def infer_with(channel: Any, model: str, x: np.ndarray[Any, Any],
               token: str = "") -> tuple[Any, str]:
    """One KServe v2 gRPC ModelInfer of the tiny model over ``channel`` (raw protocol
    messages, as any client sends them); returns (output "y", the version that answered).
    Raises grpc.RpcError for a refused call."""
    from cnnserve.proto import grpc_service_pb2 as pb
    from cnnserve.proto import grpc_service_pb2_grpc as pb_grpc

    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(np.ascontiguousarray(x, np.float32).tobytes())
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30,
                                                                 metadata=metadata)
    index = [o.name for o in reply.outputs].index("y")
    y = np.frombuffer(reply.raw_output_contents[index], np.float32).reshape(
        tuple(reply.outputs[index].shape))
    return y, reply.model_version


def infer(address: str, model: str, x: np.ndarray[Any, Any], token: str = "") -> Any:
    """One ModelInfer of the tiny model on a new connection; returns output "y"."""
    channel = open_channel(address)
    try:
        return infer_with(channel, model, x, token)[0]
    finally:
        channel.close()
