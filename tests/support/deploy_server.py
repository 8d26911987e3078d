"""A real ``cnnserve serve`` subprocess for the deployment tests, and traffic to drive it.

The server runs exactly as a container runs it (the ``cnnserve serve`` command, configured by
flags), on 127.0.0.1 ports it picks itself and reports through ``--port-file``.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.deploy import VENV_BIN, stop_process, wait_until


def serve_unavailable_reason() -> str | None:
    """Why a real ``cnnserve serve`` cannot run here (None when it can)."""
    result = subprocess.run([sys.executable, "-m", "cnnserve.cli", "serve", "--help"],
                            capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        return ("`cnnserve serve --help` fails, so no real server can be started: "
                f"{(result.stderr or result.stdout).strip()[-300:]}")
    return None


@dataclass
class RunningServer:
    process: subprocess.Popen[str]
    grpc_port: int
    metrics_port: int
    log: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def metrics_text(self) -> str:
        """GET /metrics (Prometheus text format)."""
        import urllib.request
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            return str(reply.read().decode("utf-8"))


def probe(address: str, *args: str, env: Mapping[str, str] | None = None,
          python: str = sys.executable) -> subprocess.CompletedProcess[str]:
    """Run ``python -m cnnserve.server.process.probe --address ADDRESS ...``."""
    return subprocess.run([python, "-m", "cnnserve.server.process.probe", "--address", address,
                           *args],
                          capture_output=True, text=True, timeout=30,
                          env=dict(os.environ if env is None else env))


@contextlib.contextmanager
def running_server(repository: Path, workdir: Path, extra: Sequence[str] = (), *,
                   repository_args: Sequence[str] | None = None) -> Iterator[RunningServer]:
    """Start ``cnnserve serve`` on 127.0.0.1 port 0, wait until SERVING, SIGTERM it after.

    ``repository_args`` replaces ``--repository REPOSITORY`` (e.g. Triton's spelling).
    Raises AssertionError with the server's log when it exits early or is not serving
    within 60 s.
    """
    port_file = workdir / "ports.json"
    log = workdir / "server.log"
    where = ["--repository", str(repository)] if repository_args is None else repository_args
    cmd = [str(VENV_BIN / "cnnserve"), "serve", *where,
           "--host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0", "--http-port", "0",
           "--port-file", str(port_file), *extra]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True,
                                cwd=workdir)
    try:
        def ports() -> dict[str, int] | None:
            if proc.poll() is not None:
                raise AssertionError(f"cnnserve serve exited with {proc.returncode}:\n"
                                     f"{log.read_text()}")
            if not port_file.exists():
                return None
            with contextlib.suppress(json.JSONDecodeError):
                return dict(json.loads(port_file.read_text()))
            return None  # caught mid-write

        bound = wait_until(ports, 60, "the server's port file")
        server = RunningServer(proc, int(bound["grpc_port"]), int(bound["metrics_port"]), log)
        wait_until(lambda: probe(server.address).returncode == 0, 60, "the server to be SERVING")
        yield server
    finally:
        stop_process(proc)


# The ``linear`` test model of conftest.write_test_model: "input" [-1,1,4,4] -> "output" [-1,3].
_TRITON_SCRIPT = r"""
import json, sys
import numpy as np
import tritonclient.grpc as g
from tritonclient.utils import InferenceServerException
address, model, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
client = g.InferenceServerClient(address)
x = np.arange(32, dtype=np.float32).reshape(2, 1, 4, 4) / 32
outputs = []
for _ in range(count):
    inp = g.InferInput("input", [2, 1, 4, 4], "FP32")
    inp.set_data_from_numpy(x)
    outputs.append(client.infer(model, [inp], client_timeout=10).as_numpy("output").tolist())
failures = []
bad = g.InferInput("input", [2, 3], "FP32")
bad.set_data_from_numpy(np.zeros((2, 3), dtype=np.float32))
for name in (model, "no-such-model"):
    try:
        client.infer(name, [bad], client_timeout=10)
    except InferenceServerException as exc:
        failures.append(exc.status())
print(json.dumps({"outputs": outputs, "failures": failures}))
"""


def drive_requests(address: str, model: str, count: int) -> dict[str, Any]:
    """Send ``count`` good requests and two bad ones (wrong shape, unknown model).

    Uses tritonclient, as a user's tooling would, in a child process: its generated protos
    share the ``inference`` package with cnnserve's and must not meet them in one process.
    Returns {"outputs": [...], "failures": [status names]}; the input is
    :func:`sent_input`.
    """
    result = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT, address, model, str(count)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def sent_input() -> Any:
    """The input batch :func:`drive_requests` sends with each good request."""
    import numpy as np
    return np.arange(32, dtype=np.float32).reshape(2, 1, 4, 4) / 32
