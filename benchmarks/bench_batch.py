"""Batch-job benchmark: ``cnnserve batch`` through a local server vs ``cnnserve evaluate``.

    .venv/bin/python benchmarks/bench_batch.py [--input fashion-mnist:test]
        [--repository REPO --model NAME] [--batch-size 256] [--concurrency 4]

Starts ``cnnserve serve`` in its own process (a LeNet-5-sized model with random weights
unless ``--repository``/``--model`` name an exported one), then in this process, one after
the other on the same images: ONNX Runtime in-process exactly as ``cnnserve evaluate`` runs
it (:func:`cnnserve.training.train.evaluate.evaluate_onnx`), and the batch job
(:func:`cnnserve.client.batch.job.run_batch_job`). Prints both rates, their ratio (target: the batch
job at least 60% of in-process on a 2-core machine where client and server share the cores)
and whether the predictions agree item by item (they must: same preprocessing, same graph).
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

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lenet_onnx import write_lenet_repository
from servers import free_port, wait_ready

from cnnserve.client.batch.job import BatchOptions, run_batch_job


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", default="fashion-mnist:test", help="dataset name:split")
    p.add_argument("--repository", type=Path, default=None, help="an exported repository")
    p.add_argument("--model", default="lenet", help="model in --repository (default lenet)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=4)
    return p.parse_args()


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
    if summary.labelled:
        print(f"accuracy through the server: {summary.correct / summary.labelled:.4f}, "
              f"in-process: {float((reference == data.labels).mean()):.4f}")


if __name__ == "__main__":
    main()
