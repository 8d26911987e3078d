"""`cnnserve serve` as a process: it announces its ports, serves metrics, and on SIGTERM
finishes the requests in flight, refuses new ones and exits 0."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from cnnserve.common.repository import DynamicBatching, ModelPolicy
from tests.support.models import write_test_model
from tests.support.wire import call_error, eventually, infer_request, output_array, stub


class _Server:
    """A running `cnnserve serve` child whose JSON log lines are collected as they come."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[dict[str, Any]] = []
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            text = raw.decode().strip()
            try:
                self.lines.append(json.loads(text))
            except json.JSONDecodeError:
                self.lines.append({"message": text})  # e.g. a traceback line

    async def wait_for_log(self, needle: str) -> dict[str, Any]:
        def found() -> bool:
            return any(needle in line.get("message", "") for line in self.lines)
        await eventually(lambda: found() or self.process.returncode is not None, 60,
                         f"log line {needle!r}")
        assert found(), f"server exited {self.process.returncode}: {self.lines}"
        return next(line for line in self.lines if needle in line.get("message", ""))

    async def close(self) -> int:
        if self.process.returncode is None:
            self.process.kill()
        code = await self.process.wait()
        await self._reader
        return code


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return str(reply.read().decode())


def _sample(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{"):
            series, value = line.rsplit(" ", 1)
            got = ",".join(sorted(series[len(name) + 1:-1].split(",")))
            if got == want:
                return float(value)
    return 0.0


async def test_sigterm_drains_in_flight_requests_and_exits_zero(model_repo: Path,
                                                                tmp_path: Path) -> None:
    write_test_model(model_repo, "slow", 1, kind="slow", slow_iterations=100_000,
                     policy=ModelPolicy(max_batch_size=1, dynamic_batching=DynamicBatching(
                         max_queue_delay_microseconds=0)))
    port_file = tmp_path / "ports.json"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cnnserve.cli", "serve", "--repository", str(model_repo),
        "--host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0", "--http-port", "0",
        "--port-file", str(port_file), "--log-format", "json", "--grace-period", "30",
        stderr=asyncio.subprocess.PIPE)
    server = _Server(process)
    try:
        announced = await server.wait_for_log("serving gRPC on")
        ports = json.loads(port_file.read_text())
        assert ports == {"grpc_port": announced["grpc_port"],
                         "http_port": announced["http_port"],
                         "metrics_port": announced["metrics_port"]}
        assert ports["http_port"] > 0
        x = np.full((1, 4), 2.0, np.float32)
        labels = {"model": "slow", "version": "1"}
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ports['grpc_port']}") as channel:
            rpc = stub(channel)
            running = [asyncio.ensure_future(rpc.ModelInfer(infer_request("slow", x, "x")))
                       for _ in range(3)]
            await eventually(lambda: _sample(_scrape(ports["metrics_port"]),
                                             "cnnserve_inflight_requests", **labels) == 3,
                             what="3 requests in flight")
            process.send_signal(signal.SIGTERM)
            await server.wait_for_log("shutting down")
            refused = await call_error(rpc.ModelInfer(infer_request("slow", x, "x")))
            replies = await asyncio.gather(*running)
        # Refused by the draining engine ("shutting down"), or by the stopped server if the
        # drain already finished: UNAVAILABLE either way, so clients retry elsewhere.
        assert refused.code() == grpc.StatusCode.UNAVAILABLE, refused.details()
        for reply in replies:
            np.testing.assert_array_equal(output_array(reply, "y"), x)
        assert await asyncio.wait_for(process.wait(), 60) == 0
        assert any(line.get("message") == "stopped" for line in server.lines)
    finally:
        await server.close()
