"""TLS, mutual TLS and bearer-token auth accept and refuse the right clients.

Certificates are made in the test with the ``openssl`` command: a CA, a server certificate
for 127.0.0.1/localhost and a client certificate it signs, plus a second, untrusted CA with a
client certificate of its own.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cnnserve.proto import grpc_service_pb2 as pb
from cnnserve.server.process.settings import Settings
from tests.support.models import write_test_model
from tests.support.wire import call_error, infer_request, random_images, stub

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")

_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _openssl(folder: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)


def _make_ca(folder: Path, name: str) -> None:
    _openssl(folder, "req", "-x509", *_EC, "-keyout", f"{name}.key", "-out", f"{name}.crt",
             "-days", "1", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")


def _issue(folder: Path, ca: str, name: str, extensions: str) -> None:
    _openssl(folder, "req", *_EC, "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={name}")
    (folder / f"{name}.ext").write_text(extensions)
    _openssl(folder, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey",
             f"{ca}.key", "-CAcreateserial", "-out", f"{name}.crt", "-days", "1",
             "-extfile", f"{name}.ext")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pki")
    _make_ca(folder, "ca")
    _make_ca(folder, "rogue-ca")
    _issue(folder, "ca", "server", "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                                   "extendedKeyUsage=serverAuth\n")
    _issue(folder, "ca", "client", "extendedKeyUsage=clientAuth\n")
    _issue(folder, "rogue-ca", "rogue-client", "extendedKeyUsage=clientAuth\n")
    return folder


def _secure(server: Any, pki: Path, ca: str = "ca", client: str | None = None) -> Any:
    creds = grpc.ssl_channel_credentials(
        root_certificates=(pki / f"{ca}.crt").read_bytes(),
        private_key=(pki / f"{client}.key").read_bytes() if client else None,
        certificate_chain=(pki / f"{client}.crt").read_bytes() if client else None)
    return grpc.aio.secure_channel(server.address, creds)


async def _live(channel: Any) -> bool:
    async with channel:
        reply = await stub(channel).ServerLive(pb.ServerLiveRequest(), timeout=10)
    return bool(reply.live)


async def _refused(channel: Any) -> grpc.StatusCode:
    async with channel:
        error = await call_error(stub(channel).ServerLive(pb.ServerLiveRequest(), timeout=10))
    return error.code()


async def test_tls_serves_clients_that_trust_its_ca(wire_server: Any, model_repo: Path,
                                                    pki: Path) -> None:
    write_test_model(model_repo, "linear", 1)
    server = await wire_server(model_repo, settings=Settings(
        tls_cert=pki / "server.crt", tls_key=pki / "server.key"))
    assert await _live(_secure(server, pki))
    assert await _refused(_secure(server, pki, ca="rogue-ca")) == grpc.StatusCode.UNAVAILABLE
    assert await _refused(server.channel()) == grpc.StatusCode.UNAVAILABLE  # plaintext


async def test_mutual_tls_requires_a_client_certificate_from_the_ca(
        wire_server: Any, model_repo: Path, pki: Path) -> None:
    write_test_model(model_repo, "linear", 1)
    server = await wire_server(model_repo, settings=Settings(
        tls_cert=pki / "server.crt", tls_key=pki / "server.key", tls_ca=pki / "ca.crt"))
    assert await _live(_secure(server, pki, client="client"))
    assert await _refused(_secure(server, pki)) == grpc.StatusCode.UNAVAILABLE
    refused = await _refused(_secure(server, pki, client="rogue-client"))
    assert refused == grpc.StatusCode.UNAVAILABLE


async def test_token_auth_refuses_missing_or_wrong_tokens_but_not_health(
        wire_server: Any, model_repo: Path) -> None:
    write_test_model(model_repo, "linear", 1)
    server = await wire_server(model_repo, settings=Settings(token="s3cret"))
    request = infer_request("linear", random_images(1, seed=1))
    async with server.channel() as channel:
        rpc = stub(channel)
        missing = await call_error(rpc.ModelInfer(request))
        wrong = await call_error(rpc.ModelInfer(
            request, metadata=(("authorization", "Bearer guess"),)))
        other_rpc = await call_error(rpc.ModelMetadata(pb.ModelMetadataRequest(name="linear")))
        reply = await rpc.ModelInfer(request, metadata=(("authorization", "Bearer s3cret"),))
        # Probes and tooling need no token.
        live = await rpc.ServerLive(pb.ServerLiveRequest())
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        async for answer in reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])):
            assert answer.list_services_response.service
            break
    for error in (missing, wrong, other_rpc):
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "bearer token" in (error.details() or "")
    assert reply.model_name == "linear"
    assert live.live and health.status == health_pb2.HealthCheckResponse.SERVING
