"""The metrics endpoint speaks HTTPS and wants a bearer token when configured to, and a real
Prometheus scrapes it with a scrape config that ``promtool check config`` accepts."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import shutil
import ssl
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from cnnserve.common.errors import CnnserveError
from cnnserve.server.process.settings import Settings
from cnnserve.server.telemetry.metrics import Metrics, start_metrics_http_server
from tests.support.deploy import free_port, stop_process, wait_until
from tests.support.models import write_test_model

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
TOKEN = "scrape-secret"
_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _openssl(folder: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca.crt, and server.crt/server.key for 127.0.0.1 signed by it."""
    folder = tmp_path_factory.mktemp("metrics-pki")
    _openssl(folder, "req", "-x509", *_EC, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
             "-subj", "/CN=ca", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    _openssl(folder, "req", *_EC, "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=server")
    (folder / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                                       "extendedKeyUsage=serverAuth\n")
    _openssl(folder, "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.crt", "-days", "1", "-extfile", "server.ext")
    return folder


def _get(url: str, ca: Path | None, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    context = ssl.create_default_context(cafile=str(ca)) if ca is not None else None
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        assert exc.headers.get("WWW-Authenticate", "").startswith("Bearer")
        return exc.code, exc.read().decode()


async def test_metrics_over_https_need_the_bearer_token(certs: Path) -> None:
    metrics = Metrics()
    metrics.request_started("m", "1")
    server, port = start_metrics_http_server(
        metrics, "127.0.0.1", 0, tls_cert=certs / "server.crt", tls_key=certs / "server.key",
        token=TOKEN)
    url = f"https://127.0.0.1:{port}/metrics"
    try:
        status, body = await asyncio.to_thread(_get, url, certs / "ca.crt", TOKEN)
        assert status == 200 and 'cnnserve_requests_total{model="m",version="1"} 1.0' in body
        for token in (None, "wrong", TOKEN + "x", ""):
            status, body = await asyncio.to_thread(_get, url, certs / "ca.crt", token)
            assert status == 401 and "cnnserve_" not in body, token
        # Plain HTTP gets no metrics: the server speaks only TLS on this port.
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            await asyncio.to_thread(_get, url.replace("https:", "http:"), None, TOKEN)
        # An untrusting client refuses the handshake; the server keeps serving.
        with pytest.raises(urllib.error.URLError):
            await asyncio.to_thread(_get, url, None, TOKEN)
        status, _ = await asyncio.to_thread(_get, url, certs / "ca.crt", TOKEN)
        assert status == 200
    finally:
        server.shutdown()


async def test_metrics_token_without_tls_and_open_endpoint_by_default() -> None:
    metrics = Metrics()
    guarded, guarded_port = start_metrics_http_server(metrics, "127.0.0.1", 0, token=TOKEN)
    open_, open_port = start_metrics_http_server(metrics, "127.0.0.1", 0)
    try:
        status, _ = await asyncio.to_thread(_get, f"http://127.0.0.1:{guarded_port}/", None)
        assert status == 401
        status, _ = await asyncio.to_thread(_get, f"http://127.0.0.1:{guarded_port}/", None,
                                            TOKEN)
        assert status == 200
        status, _ = await asyncio.to_thread(_get, f"http://127.0.0.1:{open_port}/", None)
        assert status == 200
    finally:
        guarded.shutdown()
        open_.shutdown()


def test_metrics_tls_settings_go_together(certs: Path) -> None:
    with pytest.raises(CnnserveError, match="--metrics-tls-cert and --metrics-tls-key"):
        Settings(metrics_tls_cert=certs / "server.crt")
    with pytest.raises(CnnserveError, match="--metrics-token must not be empty"):
        Settings(metrics_token="")
    settings = Settings.build({}, {"CNNSERVE_METRICS_TOKEN": TOKEN,
                                   "CNNSERVE_METRICS_TLS_CERT": str(certs / "server.crt"),
                                   "CNNSERVE_METRICS_TLS_KEY": str(certs / "server.key")})
    assert settings.metrics_token == TOKEN and TOKEN not in repr(settings)


def _scrape_config(port: int, certs: Path, token_file: Path | None) -> dict[str, Any]:
    job: dict[str, Any] = {
        "job_name": "with-token" if token_file else "without-token", "scheme": "https",
        "tls_config": {"ca_file": str(certs / "ca.crt")},
        "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
    if token_file is not None:
        job["authorization"] = {"type": "Bearer", "credentials_file": str(token_file)}
    return job


def _query(url: str, promql: str) -> list[dict[str, Any]]:
    query = urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(f"{url}/api/v1/query?{query}", timeout=5) as reply:
        answer = json.loads(reply.read())
    assert answer["status"] == "success", answer
    return list(answer["data"]["result"])


@pytest.mark.slow
def test_real_prometheus_scrapes_https_metrics_with_a_token(certs: Path, model_repo: Path,
                                                            tmp_path: Path) -> None:
    prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
    if prometheus is None or promtool is None:
        pytest.skip("prometheus/promtool are not installed (Debian package prometheus)")
    write_test_model(model_repo, "linear", 1)
    port_file = tmp_path / "ports.json"
    server = subprocess.Popen(
        [sys.executable, "-m", "cnnserve.cli", "serve", "--repository", str(model_repo),
         "--host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0", "--http-port", "0",
         "--port-file", str(port_file), "--metrics-tls-cert", str(certs / "server.crt"),
         "--metrics-tls-key", str(certs / "server.key")],
        env={**os.environ, "CNNSERVE_METRICS_TOKEN": TOKEN},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    scraper = None
    try:
        wait_until(port_file.exists, 60, "the server to announce its ports")
        metrics_port = json.loads(port_file.read_text())["metrics_port"]
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN)
        config = tmp_path / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "scrape_timeout": "900ms"},
            "scrape_configs": [_scrape_config(metrics_port, certs, token_file),
                               _scrape_config(metrics_port, certs, None)]}))
        check = subprocess.run([promtool, "check", "config", str(config)],
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        web = free_port()
        scraper = subprocess.Popen(
            [prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{web}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{web}"

        def scraped() -> bool:
            try:
                return bool(_query(url, 'up{job="with-token"} == 1')
                            and _query(url, 'up{job="without-token"} == 0'))
            except OSError:
                return False
        wait_until(scraped, 30, "Prometheus to scrape both jobs")
        assert _query(url, 'cnnserve_model_state{job="with-token",model="linear",'
                           'state="READY"} == 1')
    finally:
        if scraper is not None:
            stop_process(scraper)
        stop_process(server)
