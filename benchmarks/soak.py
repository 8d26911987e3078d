"""Reliability soak: a bounded hostile mix against one `cnnserve serve` on 127.0.0.1.

    .venv/bin/python benchmarks/soak.py          # about 1-2 minutes, bounded by count and time

Tiny test models (tests/support/models.py) in a temporary repository; the server runs in
poll mode with a bearer token and a 64 MiB message limit. Phases, each bounded in count:
malformed bodies, path-like model names, huge declared shapes, large failing bodies, BYTES
bodies for FP32 models, unauthenticated large requests, overload at 8x capacity (a slow
model with a short queue), a hot reload (a new version appears under a client loop), and
SIGTERM plus restart of the server in the middle of a `cnnserve batch` job (the output must
hold every item exactly once). Prints one row per phase (requests per status, accepted-call
p99), the server's RSS before/peak/after from /proc, and the targets with PASS/FAIL.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import grpc_floor  # noqa: E402
from procstat import memory_mib  # noqa: E402

from cnnserve.common.repository import DynamicBatching, ModelPolicy  # noqa: E402
from cnnserve.proto import grpc_service_pb2 as pb  # noqa: E402
from cnnserve.proto import grpc_service_pb2_grpc as pb_grpc  # noqa: E402
from tests.support.models import write_test_model  # noqa: E402

MiB = 1024 * 1024
LIMIT = 64 * MiB  # --max-message-bytes: the largest allowed message
TOKEN = "soak-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
BATCH_ITEMS = 6000


Record = Any  # Callable[[Phase], None]: keeps a finished phase


@dataclass
class Phase:
    """Outcomes of one phase: status name -> count, accepted-call latencies (s)."""

    name: str
    outcomes: Counter[str] = field(default_factory=Counter)
    accepted: list[float] = field(default_factory=list)
    note: str = ""
    rss_after: float = float("nan")  # the server's RSS right after the phase, MiB

    def p99_ms(self) -> str:
        if not self.accepted:
            return "-"
        return f"{np.percentile(self.accepted, 99) * 1e3:.1f}"


class Server:
    """A `cnnserve serve` child; RSS sampled every 20 ms while it runs."""

    def __init__(self, repo: Path, workdir: Path, port: int = 0) -> None:
        self.port_file = workdir / f"ports-{time.monotonic_ns()}.json"
        self.log = (workdir / "server.log").open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cnnserve.cli", "serve", "--repository", str(repo),
             "--host", "127.0.0.1", "--grpc-port", str(port), "--metrics-port", "0",
             "--http-port", "0",
             "--port-file", str(self.port_file), "--control-mode", "poll",
             "--poll-interval", "0.5", "--max-message-bytes", str(LIMIT),
             "--grace-period", "5"],
            env={**os.environ, "CNNSERVE_TOKEN": TOKEN}, stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 60
        while not self.port_file.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start (exit {self.process.returncode})")
            time.sleep(0.05)
        self.port = int(json.loads(self.port_file.read_text())["grpc_port"])
        self.peak = 0.0
        self._sampling = True
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while self._sampling and self.process.poll() is None:
            try:
                self.peak = max(self.peak, memory_mib(self.process.pid))
            except FileNotFoundError:
                return
            time.sleep(0.02)

    def rss(self) -> float:
        return memory_mib(self.process.pid)

    def stop(self) -> int:
        self._sampling = False
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


async def timed(phase: Phase, call: Awaitable[Any]) -> None:
    """Await ``call``; count its status, and its latency when it succeeds."""
    started = time.monotonic()
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        phase.outcomes[exc.code().name] += 1
        return
    phase.accepted.append(time.monotonic() - started)
    phase.outcomes["OK"] += 1


def _infer(model: str, shape: tuple[int, ...], data: bytes, datatype: str = "FP32",
           name: str = "input") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    request.raw_input_contents.append(data)
    return request


def _linear(rows: int = 1) -> pb.ModelInferRequest:
    return _infer("linear", (rows, 1, 4, 4), np.ones((rows, 16), np.float32).tobytes())


def _named_call(rpc: pb_grpc.GRPCInferenceServiceStub, name: str, which: int) -> Any:
    """One of the RPCs that take a model name, with ``name``."""
    if which % 4 == 0:
        return rpc.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=name),
                                       metadata=AUTH, timeout=10)
    if which % 4 == 1:
        return rpc.ModelMetadata(pb.ModelMetadataRequest(name=name), metadata=AUTH, timeout=10)
    if which % 4 == 2:
        return rpc.ModelInfer(_infer(name, (1, 1, 4, 4), b"\0" * 64), metadata=AUTH,
                              timeout=10)
    return rpc.ModelReady(pb.ModelReadyRequest(name="linear", version="\u2460"),
                          metadata=AUTH, timeout=10)


async def hostile_phases(channel: grpc.aio.Channel, record: Record) -> None:
    rpc = pb_grpc.GRPCInferenceServiceStub(channel)
    rng = random.Random(7)
    raw_infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    raw_meta = channel.unary_unary("/inference.GRPCInferenceService/ModelMetadata")

    phase = Phase("malformed bodies (300)")
    for i in range(300):
        body = rng.randbytes(rng.randrange(1, 4096))
        await timed(phase, (raw_infer if i % 2 else raw_meta)(body, metadata=AUTH, timeout=10))
    record(phase)

    phase = Phase("path-like names (300)")
    names = ["../linear", "/proc/self/root", "linear/./.", "", "/etc", "a" * 500, "linear\0",
             "fashion/../linear", "\u00b2", ".."]
    for i in range(300):
        name = rng.choice(names) + ("" if i % 3 else f"/{i}")
        await timed(phase, _named_call(rpc, name, i))
    record(phase)

    phase = Phase("huge declared shapes (200)")
    for i in range(200):
        shape = (2**40, 1, 4, 4) if i % 2 else (1, 2**31, 2**31, 4)
        await timed(phase, rpc.ModelInfer(_infer("linear", shape, b"\0" * 64), metadata=AUTH,
                                          timeout=10))
    record(phase)

    big = 48 * MiB
    phase = Phase("large failing bodies (15 x 48 MiB)")
    for _ in range(15):
        await timed(phase, rpc.ModelInfer(_infer("linear", (big // 64, 1, 4, 1), b"\0" * big),
                                          metadata=AUTH, timeout=30))
    record(phase)

    phase = Phase("BYTES on FP32 model (10 x 48 MiB)")
    for _ in range(10):
        await timed(phase, rpc.ModelInfer(_infer("linear", (1, 1, 4, 4), b"\0" * big, "BYTES"),
                                          metadata=AUTH, timeout=30))
    record(phase)

    phase = Phase("unauthenticated large (20 x 48 MiB)")
    await asyncio.gather(*(timed(phase, rpc.ModelInfer(
        _infer("linear", (big // 64, 1, 4, 4), b"\0" * big), timeout=30)) for _ in range(20)))
    record(phase)


async def overload(channel: grpc.aio.Channel, record: Record, seconds: float) -> None:
    """16 callers on a model that runs 2 at a time: 8x its capacity."""
    rpc = pb_grpc.GRPCInferenceServiceStub(channel)
    phase = Phase("overload 8x capacity (slow model)")
    x = np.full((1, 4), 1.0, np.float32).tobytes()
    end = time.monotonic() + seconds

    async def caller() -> None:
        while time.monotonic() < end:
            await timed(phase, rpc.ModelInfer(_infer("slow", (1, 4), x, name="x"),
                                              metadata=AUTH, timeout=10))
    await asyncio.gather(*(caller() for _ in range(16)))
    record(phase)


async def hot_reload(channel: grpc.aio.Channel, repo: Path, record: Record) -> None:
    """A new version appears in the repository while a client loop runs (poll mode)."""
    rpc = pb_grpc.GRPCInferenceServiceStub(channel)
    phase = Phase("hot reload under load (poll)")
    done = asyncio.Event()

    async def caller() -> None:
        while not done.is_set():
            await timed(phase, rpc.ModelInfer(_linear(4), metadata=AUTH, timeout=10))
    callers = [asyncio.ensure_future(caller()) for _ in range(4)]
    await asyncio.to_thread(write_test_model, repo, "linear", 2)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        ready = await rpc.ModelReady(pb.ModelReadyRequest(name="linear", version="2"),
                                     metadata=AUTH)
        if ready.ready:
            break
        await asyncio.sleep(0.05)
    phase.note = "version 2 READY" if ready.ready else "version 2 never READY"
    await asyncio.sleep(0.5)
    done.set()
    await asyncio.gather(*callers)
    record(phase)


def batch_restart(repo: Path, workdir: Path, server: Server) -> tuple[Phase, Server, str]:
    """`cnnserve batch` over BATCH_ITEMS items; the server is SIGTERMed and restarted on the
    same port while it runs. Returns the phase, the new server and the item check."""
    phase = Phase(f"batch job, SIGTERM + restart ({BATCH_ITEMS} items)")
    inputs = workdir / "items.npy"
    np.save(inputs, np.random.default_rng(1).normal(size=(BATCH_ITEMS, 1, 4, 4))
            .astype(np.float32))
    output = workdir / "predictions.jsonl"
    job = subprocess.Popen(
        [sys.executable, "-m", "cnnserve.cli", "batch", "--url", f"127.0.0.1:{server.port}",
         "--model", "linear", "--input", str(inputs), "--output", str(output),
         "--batch-size", "8", "--concurrency", "4", "--no-progress"],
        env={**os.environ, "CNNSERVE_TOKEN": TOKEN}, stdout=subprocess.DEVNULL,
        stderr=(workdir / "batch.log").open("wb"))
    started = time.monotonic()
    while (not output.exists() or output.stat().st_size < 20_000) and job.poll() is None:
        time.sleep(0.01)
    code = server.stop()
    phase.note = f"old server exit {code}"
    restarted = Server(repo, workdir, server.port)
    rc = job.wait(180)
    phase.accepted.append(time.monotonic() - started)
    ids = [json.loads(line)["id"] for line in output.read_text().splitlines() if line.strip()]
    errors = sum("error" in json.loads(line) for line in output.read_text().splitlines()
                 if line.strip())
    counts = Counter(ids)
    missing = BATCH_ITEMS - len(counts)
    duplicated = sum(c - 1 for c in counts.values() if c > 1)
    phase.outcomes.update({"items written": len(ids), "error records": errors})
    phase.note += f", job exit {rc}"
    verdict = (f"missing {missing}, duplicated {duplicated}, error records {errors}, "
               f"job exit {rc}")
    ok = missing == 0 and duplicated == 0 and errors == 0 and rc == 0
    return phase, restarted, ("PASS " if ok else "FAIL ") + verdict


def _models(repo: Path) -> None:
    write_test_model(repo, "linear", 1)
    write_test_model(repo, "slow", 1, kind="slow", slow_iterations=3000,
                     policy=ModelPolicy(max_batch_size=1, dynamic_batching=DynamicBatching(
                         max_queue_delay_microseconds=0, max_queue_size=8)))


async def drive(server: Server, repo: Path, phases: list[Phase]) -> None:
    def record(phase: Phase) -> None:
        phase.rss_after = server.rss()
        phases.append(phase)

    options = [("grpc.max_send_message_length", LIMIT), ("grpc.max_receive_message_length",
                                                          LIMIT)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=options) as ch:
        await hostile_phases(ch, record)
        await overload(ch, record, seconds=6.0)
        await hot_reload(ch, repo, record)


def main() -> None:
    began = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="cnnserve-soak-"))
    repo = workdir / "models"
    _models(repo)
    server = Server(repo, workdir)
    phases: list[Phase] = []
    try:
        time.sleep(1.0)  # warm-up done and first poll scan over
        before = server.rss()
        asyncio.run(drive(server, repo, phases))
        time.sleep(1.0)
        after, peak = server.rss(), max(server.peak, server.rss())
        alive = server.process.poll() is None
        batch, server, batch_verdict = batch_restart(repo, workdir, server)
        phases.append(batch)
    finally:
        exit_code = server.stop()
    log = (workdir / "server.log").read_text(errors="replace")
    floor = _grpc_floor(workdir)
    _report(phases, before, peak, after, alive and exit_code == 0, log, batch_verdict,
            time.monotonic() - began, floor)
    shutil.rmtree(workdir, ignore_errors=True)


def _grpc_floor(workdir: Path) -> tuple[float, float, float]:
    """The same large bodies (15 x 48 MiB FP32, 10 x 48 MiB BYTES), one at a time, sent to a
    bare grpc.aio server that parses and refuses them: what grpcio alone costs."""
    big = 48 * MiB
    bodies = [_infer("linear", (big // 64, 1, 4, 1), b"\0" * big).SerializeToString()
              for _ in range(15)]
    bodies += [_infer("linear", (1, 1, 4, 4), b"\0" * big, "BYTES").SerializeToString()
               for _ in range(10)]
    return grpc_floor.measure(bodies, LIMIT, workdir)


def _report(phases: list[Phase], before: float, peak: float, after: float, survived: bool,
            log: str, batch_verdict: str, elapsed: float,
            floor: tuple[float, float, float]) -> None:
    print(f"\ncnnserve soak ({elapsed:.0f} s; 64 MiB message limit)\n")
    print("| phase | outcomes | accepted p99 ms | RSS after, MiB | note |\n|---|---|---|---|---|")
    for p in phases:
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(p.outcomes.items()))
        p99 = "-" if p.name.startswith("batch") else p.p99_ms()
        rss = "-" if p.rss_after != p.rss_after else f"{p.rss_after:.0f}"
        print(f"| {p.name} | {outcomes} | {p99} | {rss} | {p.note} |")
    codes = Counter[str]()
    for p in phases:
        codes.update(p.outcomes)
    bad = codes["INTERNAL"] + codes["UNKNOWN"]
    tracebacks = log.count("Traceback")
    limit_mib = LIMIT / MiB
    print(f"\nRSS of the first server (MiB): before {before:.0f}, peak {peak:.0f}, "
          f"after {after:.0f}; server log tracebacks: {tracebacks}")
    print(f"Reference in the same run, a bare grpc.aio server that parses and refuses the same "
          f"large bodies (MiB): before {floor[0]:.0f}, peak {floor[1]:.0f} "
          f"({floor[1] - floor[0]:+.0f}), after {floor[2]:.0f}\n")
    targets = [
        ("no crash (server alive through every phase, exit 0)", survived),
        (f"zero INTERNAL/UNKNOWN answers (got {bad})", bad == 0),
        (f"RSS after within 50 MiB of before ({after - before:+.0f})", after - before <= 50),
        (f"peak within 2x the largest message above baseline ({peak - before:+.0f} <= "
         f"{2 * limit_mib:.0f}; grpcio alone: {floor[1] - floor[0]:+.0f})",
         peak - before <= 2 * limit_mib),
        (f"batch items exactly once: {batch_verdict}", batch_verdict.startswith("PASS")),
    ]
    for text, ok in targets:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")


if __name__ == "__main__":
    main()
