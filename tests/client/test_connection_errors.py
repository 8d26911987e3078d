"""Addresses that cannot be a gRPC server are refused up front, and failed connections say
which address was tried and what it probably is."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cnnserve.client import AsyncInferenceClient, InferenceClient, InferenceServerError
from cnnserve.client._retry import RetryPolicy
from cnnserve.common.errors import UsageError
from cnnserve.server.telemetry.metrics import Metrics, start_metrics_http_server


@pytest.mark.parametrize("url", ["http://127.0.0.1:8001", "https://example.invalid:8001",
                                 "ftp://127.0.0.1:8001", "127.0.0.1:8002/metrics", ""])
def test_an_address_that_is_no_grpc_address_is_refused_before_connecting(url: str) -> None:
    with pytest.raises(UsageError, match=r"a gRPC address is host:port, e\.g\. localhost:8001"):
        InferenceClient(url)


@pytest.fixture
def metrics_port() -> Iterator[int]:
    """cnnserve's real Prometheus endpoint on 127.0.0.1 (an HTTP/1 server)."""
    server, port = start_metrics_http_server(Metrics(), "127.0.0.1", 0)
    yield port
    server.shutdown()


def test_the_metrics_port_as_url_says_it_is_no_grpc_server(metrics_port: int) -> None:
    with InferenceClient(f"127.0.0.1:{metrics_port}", timeout=10) as client, \
            pytest.raises(InferenceServerError) as caught:
        client.live()
    message = caught.value.message
    assert f"127.0.0.1:{metrics_port} is not a gRPC server" in message
    assert "metrics port" in message and "localhost:8001" in message
    # Retrying an HTTP port cannot help, whatever the retry budget.
    assert not RetryPolicy(retries=5).should_retry(caught.value.code, 0, message)


async def test_the_asyncio_client_says_the_same(metrics_port: int) -> None:
    async with AsyncInferenceClient(f"127.0.0.1:{metrics_port}", timeout=10) as client:
        with pytest.raises(InferenceServerError, match="is not a gRPC server"):
            await client.live()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_connection_refused_names_the_address_tried() -> None:
    port = _closed_port()
    with InferenceClient(f"127.0.0.1:{port}", timeout=10, retries=0) as client, \
            pytest.raises(InferenceServerError) as caught:
        client.live()
    assert f"connection refused by 127.0.0.1:{port}" in caught.value.message
    assert "--grpc-port" in caught.value.message


def test_the_cli_exits_2_for_an_http_url_and_1_for_the_metrics_port(
        metrics_port: int, tmp_path: Path) -> None:
    def classify(url: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cnnserve.cli", "classify", "--url", url,
                               "--model", "m", str(tmp_path / "x.png")],
                              capture_output=True, text=True, timeout=120)

    http = classify(f"http://127.0.0.1:{metrics_port}")
    assert http.returncode == 2 and "is an HTTP URL, not a gRPC address" in http.stderr
    metrics = classify(f"127.0.0.1:{metrics_port}")
    assert metrics.returncode == 1 and "is not a gRPC server" in metrics.stderr
