"""ONNX Runtime called in-process: the throughput a server adds its overhead to.

    python benchmarks/ort_inprocess.py MODEL.onnx --batch 8 --threads 1 --seconds 3

Calls ``session.run`` back to back on one random batch for ``--seconds`` (after a short
warm-up) with ``--threads`` intra-op threads, and prints one JSON object: samples/s, p50 and
p99 latency of a run (ms), the process's CPU µs per run, and the runs measured. The server
benchmark runs it as a subprocess so that each setting gets a fresh process and the
benchmark's own threads stay out of the way.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort


def measure(model: Path, batch: int, threads: int, seconds: float) -> dict[str, float]:
    """Samples/s, p50/p99 ms and CPU µs of ``session.run``, and the runs, over ``seconds``."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    spec = session.get_inputs()[0]
    shape = [batch, *(int(d) for d in spec.shape[1:])]
    rng = np.random.default_rng(0)
    data = (rng.integers(0, 256, shape, dtype=np.uint8) if spec.type == "tensor(uint8)"
            else rng.random(shape, dtype=np.float32))
    feed = {spec.name: data}
    for _ in range(3):
        session.run(None, feed)
    latencies: list[float] = []
    cpu0, t0 = time.process_time(), time.perf_counter()
    stop = t0 + seconds
    while (started := time.perf_counter()) < stop:
        session.run(None, feed)
        latencies.append(time.perf_counter() - started)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    p50, p99 = np.percentile(latencies, [50, 99]) * 1000
    return {"samples_per_s": len(latencies) * batch / elapsed,
            "p50_ms": float(p50), "p99_ms": float(p99),
            "cpu_us_per_request": 1e6 * cpu / len(latencies), "runs": len(latencies)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--batch", type=int, default=1, help="rows per session.run")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads")
    parser.add_argument("--seconds", type=float, default=3.0, help="measuring time")
    args = parser.parse_args()
    print(json.dumps(measure(args.model, args.batch, args.threads, args.seconds)))


if __name__ == "__main__":
    main()
