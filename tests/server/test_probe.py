"""The health probe against a real gRPC health service: statuses, TLS, mutual TLS, token."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cnnserve.server.process import probe
from cnnserve.server.process.settings import env_of, fields

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class _RecordMetadata(grpc.ServerInterceptor):  # type: ignore[misc]
    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        self.seen.append(dict(details.invocation_metadata))
        return continuation(details)


@dataclass
class HealthServer:
    port: int
    servicer: health.HealthServicer
    metadata: _RecordMetadata

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def start_health_server(credentials: grpc.ServerCredentials | None = None
                        ) -> tuple[grpc.Server, HealthServer]:
    recorder = _RecordMetadata()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), interceptors=[recorder])
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = (server.add_secure_port("127.0.0.1:0", credentials) if credentials
            else server.add_insecure_port("127.0.0.1:0"))
    servicer.set("", SERVING)
    servicer.set("fashion-cnn", SERVING)
    servicer.set("warming", NOT_SERVING)
    server.start()
    return server, HealthServer(port, servicer, recorder)


@pytest.fixture
def plain() -> Iterator[HealthServer]:
    server, handle = start_health_server()
    yield handle
    server.stop(None)


def run(argv: list[str], env: dict[str, str] | None = None,
        capsys: pytest.CaptureFixture[str] | None = None) -> tuple[int, str]:
    code = probe.main(argv, env or {})
    out = ""
    if capsys is not None:
        captured = capsys.readouterr()
        out = (captured.out + captured.err).strip()
        assert len(out.splitlines()) == 1, f"not one line: {out!r}"
    return code, out


def test_serving_server_and_model_exit_0(plain: HealthServer,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["--address", plain.address], capsys=capsys) == (
        0, f"SERVING: server at {plain.address}")
    code, line = run(["--address", plain.address, "--model", "fashion-cnn"], capsys=capsys)
    assert code == 0 and "model 'fashion-cnn'" in line


def test_not_serving_and_unknown_model_exit_1_with_the_reason(
        plain: HealthServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, line = run(["--address", plain.address, "--model", "warming"], capsys=capsys)
    assert code == 1 and line.startswith("NOT_SERVING:") and "'warming'" in line
    code, line = run(["--address", plain.address, "--model", "nope"], capsys=capsys)
    assert code == 1 and line.startswith("NOT_FOUND:") and "'nope'" in line
    plain.servicer.enter_graceful_shutdown()  # what a draining server does first
    code, line = run(["--address", plain.address], capsys=capsys)
    assert code == 1 and line.startswith("NOT_SERVING:")


def test_unreachable_server_exits_1_within_the_timeout(capsys: pytest.CaptureFixture[str]) -> None:
    from tests.support.deploy import free_port
    code, line = run(["--address", f"127.0.0.1:{free_port()}", "--timeout", "2"], capsys=capsys)
    assert code == 1 and line.startswith(("UNAVAILABLE:", "DEADLINE_EXCEEDED:"))


def test_defaults_come_from_the_servers_environment(plain: HealthServer,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    env = {"CNNSERVE_GRPC_PORT": str(plain.port), "CNNSERVE_PROBE_MODEL": "fashion-cnn"}
    code, line = run([], env, capsys)
    assert code == 0 and f"localhost:{plain.port}" in line and "fashion-cnn" in line
    code, line = run([], {**env, "CNNSERVE_HOST": "127.0.0.1"}, capsys)
    assert code == 0 and f"127.0.0.1:{plain.port}" in line
    assert probe.default_address({}) == "localhost:8001"
    wildcard = {"CNNSERVE_HOST": "::", "CNNSERVE_GRPC_PORT": "9"}
    assert probe.default_address(wildcard) == "localhost:9"
    assert probe.default_address({"CNNSERVE_HOST": "::1"}) == "[::1]:8001"


def test_bearer_token_is_sent(plain: HealthServer) -> None:
    assert probe.main(["--address", plain.address], {"CNNSERVE_TOKEN": "s3cret"}) == 0
    assert plain.metadata.seen[-1]["authorization"] == "Bearer s3cret"


def test_usage_errors_exit_1_not_dockers_reserved_2() -> None:
    with pytest.raises(SystemExit) as exc:
        probe.main(["--no-such-flag"], {})
    assert exc.value.code == 1


def test_server_variables_the_probe_reads_are_server_settings() -> None:
    assert set(probe.SERVER_ENV) <= {env_of(f.name) for f in fields()}


def test_probe_imports_neither_torch_nor_onnxruntime() -> None:
    code = ("import sys, cnnserve.server.process.probe as p; p.build_parser({})\n"
            "print(' '.join(sorted(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    loaded = set(result.stdout.split())
    assert not {"torch", "onnxruntime", "numpy"} & loaded


# -- TLS ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost (it is its own CA)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "server.pem", folder / "server.key"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def test_tls_with_the_servers_self_signed_certificate(
        certificate: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    cert, key = certificate
    creds = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    server, handle = start_health_server(creds)
    try:
        env = {"CNNSERVE_GRPC_PORT": str(handle.port), "CNNSERVE_TLS_CERT": str(cert),
               "CNNSERVE_TLS_KEY": str(key)}
        assert run([], env, capsys)[0] == 0  # localhost matches the certificate
        code, line = run(["--no-tls", "--timeout", "2"], env, capsys)
        assert code == 1
        code, line = run(["--address", handle.address, "--tls-server-name", "localhost"],
                         env, capsys)
        assert code == 0, line
    finally:
        server.stop(None)


def test_mutual_tls_presents_the_servers_identity(
        certificate: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    cert, key = certificate
    creds = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())],
                                        root_certificates=cert.read_bytes(),
                                        require_client_auth=True)
    server, handle = start_health_server(creds)
    try:
        env = {"CNNSERVE_GRPC_PORT": str(handle.port), "CNNSERVE_TLS_CERT": str(cert),
               "CNNSERVE_TLS_KEY": str(key), "CNNSERVE_TLS_CA": str(cert)}
        assert run([], env, capsys)[0] == 0
        without_client_cert = {**env, "CNNSERVE_TLS_CA": "", "CNNSERVE_PROBE_TLS_CA": str(cert)}
        code, _ = run(["--timeout", "2"], without_client_cert, capsys)
        assert code == 1
    finally:
        server.stop(None)


def test_unreadable_tls_file_is_a_one_line_failure(capsys: pytest.CaptureFixture[str]) -> None:
    code, line = run([], {"CNNSERVE_TLS_CERT": "/nonexistent/cert.pem"}, capsys)
    assert code == 1 and "cannot read TLS file /nonexistent/cert.pem" in line
