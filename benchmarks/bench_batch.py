"""Batch-job benchmark: ``cnnserve batch`` through a local server, and on Ray, vs ``evaluate``.

    .venv/bin/python benchmarks/bench_batch.py [--input fashion-mnist:test]
        [--repository REPO --model NAME] [--batch-size 256] [--concurrency 4] [--no-ray]

Starts ``cnnserve serve`` in its own process (a LeNet-5-sized model with random weights
unless ``--repository``/``--model`` name an exported one), then in this process, one after
the other on the same images: ONNX Runtime in-process exactly as ``cnnserve evaluate`` runs
it (:func:`cnnserve.training.train.evaluate.evaluate_onnx`), and the batch job
(:func:`cnnserve.client.batch.job.run_batch_job`). Prints both rates, their ratio (target: the batch
job at least 60% of in-process on a 2-core machine where client and server share the cores)
and whether the predictions agree item by item (they must: same preprocessing, same graph).

With Ray Data installed (the ``batch-ray`` extra), it then runs the job with ``--engine ray`` in
in-process mode (one ONNX Runtime session per actor, one actor per CPU) on a local Ray: Ray's
start-up is reported on its own line, the job's rate over its whole run and over the blocks
after the first one (once the actors are up); target: in-process Ray >= 0.8x evaluate.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lenet_onnx import write_lenet_repository

from cnnserve.client.batch.job import BatchOptions, run_batch_job


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(address: str, process: subprocess.Popen[bytes], log: Path,
               timeout: float = 120) -> None:
    """Wait until the server answers ServerReady (through the SDK: servers.py uses
    tritonclient's stubs, whose protobuf symbols clash with cnnserve's in one process)."""
    from cnnserve.client import InferenceClient

    deadline = time.monotonic() + timeout
    with InferenceClient(address, retries=0, timeout=1) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited: {log.read_text()[-2000:]}")
            try:
                if client.ready():
                    return
            except Exception:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"{address} not ready after {timeout} s")


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", default="fashion-mnist:test", help="dataset name:split")
    p.add_argument("--repository", type=Path, default=None, help="an exported repository")
    p.add_argument("--model", default="lenet", help="model in --repository (default lenet)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--no-ray", action="store_true", help="skip the --engine ray job")
    return p.parse_args()


def _ray_job(args: argparse.Namespace, repo: Path, tmp: Path, n: int) -> tuple[float, Any]:
    """Ray start-up seconds and the Summary of the in-process Ray job."""
    import ray

    from cnnserve.client.batch.raydata.job import run_ray_job

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only
    started = time.perf_counter()
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    startup_s = time.perf_counter() - started
    try:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        summary = run_ray_job(BatchOptions(
            model=args.model, input=args.input, output=tmp / "ray-out", engine="ray",
            repository=repo, batch_size=args.batch_size, top_k=1, progress=False,
            block_size=max(args.batch_size, -(-n // (4 * cpus)))))
    finally:
        ray.shutdown()
    return startup_s, summary


def main() -> None:
    args = _args()
    tmp = Path(tempfile.mkdtemp(prefix="cnnserve-bench-batch-"))
    repo = args.repository
    if repo is None:
        repo = tmp / "repo"
        write_lenet_repository(repo, ("lenet",))
    version = max((p for p in (repo / args.model).iterdir() if p.name.isdigit()),
                  key=lambda p: int(p.name))
    port = free_port()
    log = tmp / "server.log"
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("cnnserve")), "serve", "--repository", str(repo),
         "--model", args.model, "--host", "127.0.0.1", "--grpc-port", str(port),
         "--metrics-port", str(free_port()), "--http-port", "-1", "--log-level", "WARNING"],
        stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        wait_ready(f"127.0.0.1:{port}", server, log)
        from cnnserve.common.data.datasets import load_split
        from cnnserve.training.train.evaluate import evaluate_onnx

        name, _, split = args.input.rpartition(":")
        data = load_split(name, split)
        started = time.perf_counter()
        reference = evaluate_onnx(version, data.images)
        in_process_s = time.perf_counter() - started

        out = tmp / "out.jsonl"
        summary = run_batch_job(BatchOptions(
            url=f"127.0.0.1:{port}", model=args.model, input=args.input, output=str(out),
            batch_size=args.batch_size, concurrency=args.concurrency, top_k=1,
            progress=False))
        served = np.array([json.loads(line)["index"] for line in out.read_text().splitlines()])
    finally:
        server.terminate()
        server.wait(timeout=30)
    n = len(data.images)
    in_process_rate = n / in_process_s
    agree = int((served == reference).sum())
    print(f"\nbatch job vs cnnserve evaluate on {args.input} ({n} images, model {args.model}, "
          f"{os.cpu_count()} CPUs, batch {args.batch_size}, concurrency {args.concurrency})\n")
    print(f"{'path':<36} {'items/s':>10} {'seconds':>8}")
    print(f"{'onnxruntime in-process (evaluate)':<36} {in_process_rate:>10.0f} "
          f"{in_process_s:>8.2f}")
    print(f"{'cnnserve batch through the server':<36} {summary.items_per_s:>10.0f} "
          f"{summary.elapsed_s:>8.2f}")
    print(f"\nratio: {summary.items_per_s / in_process_rate:.0%} of in-process (target >= 60%)")
    print(f"request latency: p50 {summary.percentile_ms(50):.1f} ms, "
          f"p95 {summary.percentile_ms(95):.1f} ms, p99 {summary.percentile_ms(99):.1f} ms")
    print(f"predictions identical item by item: {agree}/{n}"
          + ("" if agree == n else "  <-- MISMATCH"))
    if not args.no_ray:
        _report_ray(args, repo, tmp, reference, in_process_rate, summary.items_per_s)
    if summary.labelled:
        print(f"accuracy through the server: {summary.correct / summary.labelled:.4f}, "
              f"in-process: {float((reference == data.labels).mean()):.4f}")


def _report_ray(args: argparse.Namespace, repo: Path, tmp: Path, reference: np.ndarray,
                in_process_rate: float, server_rate: float) -> None:
    try:
        startup_s, ray_summary = _ray_job(args, repo, tmp, len(reference))
    except ImportError:
        print("\n--engine ray: skipped (install the batch-ray extra)")
        return
    records = [json.loads(line) for part in sorted((tmp / "ray-out").glob("part-*.jsonl"))
               for line in part.read_text().splitlines()]
    agree = int((np.array([r["index"] for r in records]) == reference).sum())
    first = ray_summary.processed // max(1, len(list((tmp / "ray-out").glob("part-*"))))
    steady = ((ray_summary.processed - first) / (ray_summary.elapsed_s - ray_summary.warmup_s)
              if ray_summary.elapsed_s > ray_summary.warmup_s else 0.0)
    print(f"\n--engine ray, in-process ({os.cpu_count()} CPUs, one actor per CPU)")
    print(f"{'Ray start-up (ray.init)':<36} {'':>10} {startup_s:>8.2f}")
    print(f"{'whole job (actors start, then run)':<36} {ray_summary.items_per_s:>10.0f} "
          f"{ray_summary.elapsed_s:>8.2f}")
    print(f"{'after the first block':<36} {steady:>10.0f} "
          f"{ray_summary.elapsed_s - ray_summary.warmup_s:>8.2f}")
    print(f"ratio to in-process evaluate: {ray_summary.items_per_s / in_process_rate:.2f}x whole "
          f"job, {steady / in_process_rate:.2f}x after the first block (target >= 0.8x); "
          f"server-based job {server_rate / in_process_rate:.2f}x")
    print(f"predictions identical item by item: {agree}/{len(reference)}"
          + ("" if agree == len(reference) else "  <-- MISMATCH"))


if __name__ == "__main__":
    main()
