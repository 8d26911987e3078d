"""Helpers for the REST tests: start REST beside a wire server; run curl and scripts."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


async def start_rest(server: Any, settings: Any) -> Any:
    """Start the REST front end on 127.0.0.1:0 over ``server``'s servicer; returns it."""
    from cnnserve.server.http.server import create_http_server

    return await create_http_server(server.grpc_server.servicer, settings, "127.0.0.1", 0)


async def run_python(script: str, *args: str, timeout_s: float = 120) -> dict[str, Any]:
    """Run ``script`` in a child Python; return the JSON it printed (it must exit 0)."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(child.communicate(), timeout_s)
    assert child.returncode == 0, stderr.decode()
    return dict(json.loads(stdout))


async def curl(url: str, *args: str, data: bytes | None = None) -> tuple[int, Any]:
    """``curl`` ``url`` (body ``data`` if given, sent on stdin); return status and JSON body.

    Status 0 means curl itself failed (no connection, TLS error); the body is then its message.
    """
    command = ["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", *args, url]
    if data is not None:
        command[1:1] = ["--data-binary", "@-", "-H", "Content-Type: application/json"]
    child = await asyncio.create_subprocess_exec(
        *command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(child.communicate(data), 60)
    if child.returncode != 0:
        return 0, stderr.decode()
    body, _, status = stdout.rpartition(b"\n")
    return int(status), json.loads(body) if body.strip() else None


def make_server_certificate(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 it signed, made with ``openssl``.

    Returns (server certificate, server key, CA certificate), all PEM files in ``folder``.
    """
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    openssl("req", "-x509", *_EC, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
            "-subj", "/CN=ca", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("req", *_EC, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=server")
    (folder / "server.ext").write_text("subjectAltName=IP:127.0.0.1\n"
                                       "extendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.crt", "-days", "1", "-extfile", "server.ext")
    return folder / "server.crt", folder / "server.key", folder / "ca.crt"
