"""Server processes for the benchmarks: start, wait until ready, count served requests, stop.

cnnserve runs through its command line (``cnnserve serve``), the reference servers through
benchmarks/baseline_servers.py; nothing here imports cnnserve, so the benchmarks keep working
while cnnserve's modules move. The gRPC stubs are tritonclient's (Triton's own protocol).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Server:
    """A server process on 127.0.0.1 with its output going to ``log``."""

    name: str
    address: str  # host:port of its gRPC endpoint
    process: subprocess.Popen[bytes]
    log: Path
    http_address: str | None = None  # host:port of its REST endpoint, if it has one

    @property
    def pid(self) -> int:
        return self.process.pid


def free_port() -> int:
    """A TCP port that was free a moment ago (reference servers take a fixed port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(command: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)


def start_cnnserve(cnnserve: Path, repository: Path, workdir: Path, name: str = "cnnserve",
                   timeout: float = 120) -> Server:
    """``cnnserve serve`` with default settings on free ports; returns once it is ready.

    Raises RuntimeError (with the end of its log) if it exits, TimeoutError if it is not
    ready within ``timeout`` seconds.
    """
    log, port_file = workdir / f"{name}.log", workdir / f"{name}.ports.json"
    port_file.unlink(missing_ok=True)
    process = _spawn([str(cnnserve), "serve", "--repository", str(repository),
                      "--host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0",
                      "--http-port", "0",
                      "--port-file", str(port_file), "--log-level", "WARNING"], log)
    deadline = time.monotonic() + timeout
    while not port_file.exists():
        _check_alive(process, log, name)
        if time.monotonic() > deadline:
            process.kill()
            raise TimeoutError(f"{name} wrote no port file in {timeout:.0f}s")
        time.sleep(0.2)
    ports = json.loads(port_file.read_text())
    address = f"127.0.0.1:{ports['grpc_port']}"
    wait_ready(address, process, log, timeout)
    return Server(name, address, process, log, f"127.0.0.1:{ports['http_port']}")


def start_reference(kind: str, model: Path, workdir: Path, name: str,
                    timeout: float = 60) -> Server:
    """A baseline_servers.py server (``constant``, ``naive`` or ``batched``) for ``model``."""
    port, log = free_port(), workdir / f"{name}.log"
    process = _spawn([sys.executable, str(HERE / "baseline_servers.py"), kind,
                      "--port", str(port), "--model", str(model)], log)
    address = f"127.0.0.1:{port}"
    wait_ready(address, process, log, timeout)
    return Server(name, address, process, log)


def _check_alive(process: subprocess.Popen[bytes], log: Path, name: str) -> None:
    if process.poll() is not None:
        raise RuntimeError(f"{name} exited with status {process.returncode}:\n"
                           f"{log.read_text(errors='replace')[-2000:]}")


def wait_ready(address: str, process: subprocess.Popen[bytes], log: Path,
               timeout: float = 60) -> None:
    """Wait until the server at ``address`` answers ServerReady; fail early, with the end of
    its log, if ``process`` exits. Raises TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while time.monotonic() < deadline:
            _check_alive(process, log, address)
            try:
                if stub.ServerReady(pb.ServerReadyRequest(), timeout=1).ready:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    process.kill()
    raise TimeoutError(f"server at {address} did not become ready in {timeout:.0f}s")


def served_requests(address: str, model: str) -> int:
    """Requests ``model`` (all versions) has answered successfully, from ModelStatistics."""
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelStatistics(pb.ModelStatisticsRequest(name=model), timeout=10)
    return sum(s.inference_stats.success.count for s in response.model_stats)


def stop(servers: list[Server], grace: float = 30) -> None:
    """SIGTERM every server, then wait for each (SIGKILL after ``grace`` seconds)."""
    for server in servers:
        server.process.terminate()
    for server in servers:
        try:
            server.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
