"""What the batcher costs per request in each dispatch mode, against a bare ``session.run``.

    .venv/bin/python benchmarks/bench_dispatch.py [--model M.onnx] [--requests 3000]

One caller at a time (concurrency 1) through a real :class:`Batcher` on the model's ONNX
Runtime session (one intra-op thread): forced inline on the event loop, forced hand-off to a
worker thread, and ``session.run`` called directly; between requests the loop turns a few
times, as it does for gRPC. Prints wall and process CPU microseconds per request. Default
model: the server benchmark's LeNet-size one (.bench/models, made by bench_server.py).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cnnserve.common.repository import CONFIG_FILE, VersionConfig
from cnnserve.server.batching.batcher import Batcher, BatchPolicy
from cnnserve.server.batching.dispatch import DispatchPolicy
from cnnserve.server.runtime.ort import OrtRuntime, RuntimeOptions, example_input, open_runtime
from cnnserve.server.telemetry.metrics import Metrics
from cnnserve.server.telemetry.statistics import StatsRecorder

REPO = Path(__file__).resolve().parent.parent
MODES = {"inline": DispatchPolicy(), "handoff": DispatchPolicy(inline_max_us=0)}


async def _between_requests() -> None:
    for _ in range(6):
        await asyncio.sleep(0)


async def measure(runtime: OrtRuntime, config: VersionConfig, requests: int) -> None:
    feeds = {t.name: example_input(t, rows=1) for t in config.inputs}
    executor, metrics = ThreadPoolExecutor(2), Metrics()
    outputs = [t.name for t in config.outputs]
    for mode, policy in MODES.items():
        batcher = Batcher(runtime, BatchPolicy(config.max_batch_size), executor, outputs,
                          where=mode, stats=StatsRecorder(mode, 1),
                          metrics=metrics.for_version(mode, 1), max_running=2, dispatch=policy)
        batcher.start()
        for _ in range(50):  # measures the model's cost before the timed part
            await batcher.submit(feeds)
        await asyncio.sleep(0.01)
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(requests):
            await batcher.submit(feeds)
            await _between_requests()
        _report(mode, wall, cpu, requests, {d.value: n for d, n in batcher.dispatched.items()})
        await batcher.drain()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(requests):
        runtime.run(feeds)
        await _between_requests()
    _report("session.run", wall, cpu, requests, {})
    executor.shutdown()


def _report(mode: str, wall: float, cpu: float, requests: int, counts: dict[str, int]) -> None:
    print(f"{mode:<12} {(time.perf_counter() - wall) / requests * 1e6:7.1f} us wall "
          f"{(time.process_time() - cpu) / requests * 1e6:7.1f} us CPU per request  {counts}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path,
                        default=REPO / ".bench/models/repos/lenet/fashion_cnn/1/model.onnx")
    parser.add_argument("--requests", type=int, default=3000)
    args = parser.parse_args()
    config = VersionConfig.load(args.model.parent / CONFIG_FILE)
    runtime = open_runtime(args.model, config, RuntimeOptions(), str(args.model))
    asyncio.run(measure(runtime, config, args.requests))


if __name__ == "__main__":
    main()
