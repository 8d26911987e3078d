"""The KServe manifests under deploy/kserve: they validate against KServe's own CRD schemas,
declare what KServe needs to pick and call the runtime, and the server serves the storage
initializer's layout with exactly the runtime container's command, args, env and port."""

from __future__ import annotations

import shutil
from pathlib import Path

import jsonschema  # type: ignore[import-untyped]
import numpy as np
import pytest

from tests.support.k8s import (
    KSERVE,
    Doc,
    container_command,
    container_port,
    grpc_probe,
    help_settings,
    image_tag,
    infer,
    kserve_schema,
    load_yaml,
    run_server,
    unknown_fields,
    wait_serving,
    write_model,
)

MANIFESTS = ("servingruntime.yaml", "clusterservingruntime.yaml", "inferenceservice.yaml")
MOUNT = "/mnt/models"  # where KServe's storage initializer puts the storageUri's files
TOKEN = "kserve-test-token"


def runtime(name: str = "servingruntime.yaml") -> Doc:
    return load_yaml(KSERVE / name)


def kserve_container(doc: Doc) -> Doc:
    (container,) = doc["spec"]["containers"]
    assert isinstance(container, dict)
    return container


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_validates_against_kserve_crd_schema(name: str) -> None:
    doc = load_yaml(KSERVE / name)
    schema = kserve_schema(doc["kind"], doc["apiVersion"])
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=str)
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)
    # Structural CRD schemas allow unknown fields (the API server prunes them): find typos.
    assert list(unknown_fields(doc, schema)) == []


def test_both_runtimes_run_the_same_container() -> None:
    namespaced, cluster = runtime(), runtime("clusterservingruntime.yaml")
    assert (namespaced["kind"], cluster["kind"]) == ("ServingRuntime", "ClusterServingRuntime")
    assert namespaced["metadata"]["name"] == cluster["metadata"]["name"] == "cnnserve"
    assert namespaced["spec"]["containers"] == cluster["spec"]["containers"]
    assert namespaced["spec"]["protocolVersions"] == cluster["spec"]["protocolVersions"]


@pytest.mark.parametrize("name", ["servingruntime.yaml", "clusterservingruntime.yaml"])
def test_runtime_declares_formats_protocols_and_the_grpc_port(name: str) -> None:
    spec = runtime(name)["spec"]
    formats = {f["name"]: f for f in spec["supportedModelFormats"]}
    assert formats["cnnserve"]["autoSelect"] is True
    assert formats["onnx"]["version"] == "1"
    # Namespaced: ONNX is picked automatically; cluster-wide it must be named (Triton's).
    assert formats["onnx"]["autoSelect"] is (name == "servingruntime.yaml")
    assert spec["protocolVersions"] == ["v2", "grpc-v2"]
    container = kserve_container(runtime(name))
    assert container["name"] == "kserve-container"  # the name KServe merges the predictor into
    (port,) = container["ports"]  # Knative routes to exactly one port
    assert port["name"] == "h2c", "Knative and KServe proxy HTTP/2 only to a port named h2c"
    assert f"--grpc-port={port['containerPort']}" in container["args"]
    assert f"--metrics-port={spec['annotations']['prometheus.kserve.io/port']}" \
        in container["args"]
    assert f"--repository={MOUNT}" in container["args"]
    assert "--model={{.Name}}" in container["args"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": port["containerPort"], "service": ""}


def test_runtime_container_follows_the_security_and_resource_policy() -> None:
    container = kserve_container(runtime())
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert {"cpu", "memory"} <= set(container["resources"]["limits"])
    assert image_tag(container["image"]) not in ("", "latest")
    flags, variables = help_settings()
    assert container["command"] == ["cnnserve", "serve"]
    assert {a.split("=")[0] for a in container["args"]} <= flags
    assert {v["name"] for v in container["env"]} <= variables


def test_inference_service_uses_the_runtime_it_names() -> None:
    isvc = load_yaml(KSERVE / "inferenceservice.yaml")
    model = isvc["spec"]["predictor"]["model"]
    spec = runtime()["spec"]
    assert model["runtime"] == runtime()["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in spec["supportedModelFormats"]}
    assert model["protocolVersion"] in spec["protocolVersions"]
    assert model["storageUri"].split("://")[0] in ("s3", "gs", "pvc", "https", "oci", "hdfs")
    assert {"cpu", "memory"} <= set(model["resources"]["limits"])


def test_the_runtime_serves_the_storage_initializer_layout(tmp_path: Path) -> None:
    """storageUri -> /mnt/models as the storage initializer copies it; then the runtime's
    container exactly as KServe fills it in for the example InferenceService."""
    isvc = load_yaml(KSERVE / "inferenceservice.yaml")
    name = isvc["metadata"]["name"]
    model = isvc["spec"]["predictor"]["model"]
    # The bucket prefix the storageUri names: a cnnserve repository with one model folder
    # named like the InferenceService, as `cnnserve export --repository` writes it.
    bucket = tmp_path / "bucket" / "cnnserve"
    write_model(bucket, name)
    mount = tmp_path / "mnt-models"
    shutil.copytree(bucket, mount)  # the storage initializer copies the prefix's contents

    container = dict(kserve_container(runtime()))
    container["resources"] = model["resources"]  # KServe merges the predictor's resources
    launch = container_command(container, {MOUNT: mount}, {("cnnserve-token", "token"): TOKEN},
                               template={"Name": name, "Namespace": "default"})
    assert launch.declared_ports == {"grpc": container_port(container, "h2c"),
                                     "metrics": 8002}
    assert launch.env["CNNSERVE_CPUS"] == "2"
    with run_server(launch, tmp_path) as running:
        wait_serving(running.address, container["readinessProbe"]["grpc"]["service"])
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == launch.declared_ports["grpc"]
            assert grpc_probe(running.address, container[probe]["grpc"]["service"]) \
                == "SERVING", probe
        # OIP v2 clients call the model by the InferenceService's name.
        assert grpc_probe(running.address, name) == "SERVING"
        x = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
        np.testing.assert_array_equal(infer(running.address, name, x, TOKEN), 2 * x)
        assert "cnnserve_model_state{" in running.metrics_text()


@pytest.mark.parametrize("uri_names", ["the model folder", "the model file"])
def test_a_storage_uri_naming_one_model_is_served_by_the_inference_service_name(
        uri_names: str, tmp_path: Path) -> None:
    """KServe's storage initializer puts ONE model at the mount path when the storageUri
    names a model folder (/mnt/models/1/model.onnx) or the file itself (/mnt/models/
    model.onnx): the runtime's unchanged arguments serve it under the InferenceService's
    name, probes and inference included."""
    name = load_yaml(KSERVE / "inferenceservice.yaml")["metadata"]["name"]
    version = write_model(tmp_path / "bucket", name)
    mount = tmp_path / "mnt-models"
    if uri_names == "the model folder":
        shutil.copytree(version.parent, mount)  # /mnt/models/1/model.onnx + config.json
    else:
        mount.mkdir()
        shutil.copy(version / "model.onnx", mount / "model.onnx")  # a bare ONNX file
    container = kserve_container(runtime())
    launch = container_command(container, {MOUNT: mount}, {("cnnserve-token", "token"): TOKEN},
                               template={"Name": name, "Namespace": "default"})
    with run_server(launch, tmp_path) as running:
        wait_serving(running.address, container["readinessProbe"]["grpc"]["service"])
        assert grpc_probe(running.address, name) == "SERVING"
        x = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)
        np.testing.assert_array_equal(infer(running.address, name, x, TOKEN), 2 * x)
