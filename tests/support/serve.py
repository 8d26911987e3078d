"""A real ``cnnserve serve`` subprocess on 127.0.0.1 that tests can kill and start again.

It first binds port 0 and reports its ports through ``--port-file``; :meth:`ServeProcess.start`
after :meth:`ServeProcess.kill` binds the same gRPC port again, as a restarted server would.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


class ServeProcess:
    """``cnnserve serve --repository REPO`` on 127.0.0.1; its output goes to ``log``."""

    def __init__(self, repo: Path, workdir: Path, *extra: str) -> None:
        self.repo, self.workdir, self.extra = repo, workdir, extra
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "server.log"

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> ServeProcess:
        """Start the server and wait until its models are ready; returns self."""
        port_file = self.workdir / "ports.json"
        port_file.unlink(missing_ok=True)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cnnserve.cli", "serve", "--repository", str(self.repo),
                 "--host", "127.0.0.1", "--grpc-port", str(self.port), "--metrics-port", "0",
                 "--http-port", "0",
                 "--port-file", str(port_file), "--log-level", "WARNING", *self.extra],
                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:  # no event crosses the process boundary
            if self.proc.poll() is not None:
                raise AssertionError(f"cnnserve serve exited {self.proc.returncode}:\n"
                                     f"{self.log.read_text()}")
            with contextlib.suppress(OSError, json.JSONDecodeError):
                self.port = int(json.loads(port_file.read_text())["grpc_port"])
                return self  # the port file appears once the models are loaded and serving
            time.sleep(0.05)
        raise AssertionError(f"cnnserve serve did not start in {timeout_s:g} s")

    def kill(self) -> None:
        """SIGKILL the server (a crash: nothing drains) and wait for it to exit."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.kill()
