"""Micro-benchmark: the servicer's ModelInfer path (decode, validate, batcher, ONNX Runtime,
encode) called in-process, without gRPC, to measure what the tracing hooks cost.

    .venv/bin/python benchmarks/bench_tracing_overhead.py [--requests 3000] [--repeat 7]
    PYTHONPATH=<other checkout's src folders> python benchmarks/bench_tracing_overhead.py

Prints CPU microseconds per request, all threads of the process (wall time on a shared
machine swings too much to see a microsecond), the median and best of ``--repeat`` runs of
``--requests`` sequential
requests, batch 1, the tests' tiny linear model, so the path's own
cost dominates). It runs against whichever cnnserve is importable,
so the same script measures a branch and main (tracing off is the default everywhere); with
``--tracing`` it also measures tracing on, spans going to an in-memory exporter.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support
from tests.support.models import write_test_model


class _Context:
    """The little of grpc.aio.ServicerContext that ModelInfer reads."""

    def time_remaining(self) -> float | None:
        return None


async def run(repo: Path, model: str, requests: int, repeat: int,
              traced: bool = False) -> list[float]:
    from cnnserve.proto import grpc_service_pb2 as pb
    from cnnserve.server.engine.core import Engine, EngineOptions
    from cnnserve.server.grpc.servicer import InferenceServicer
    from cnnserve.server.telemetry.metrics import Metrics

    metrics = Metrics()
    engine = Engine(EngineOptions(repository=repo), metrics)
    await engine.start()
    servicer = InferenceServicer(engine, metrics)
    request = pb.ModelInferRequest(model_name=model, inputs=[
        pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32",
                                              shape=[1, 1, 4, 4])])
    request.raw_input_contents.append(np.zeros((1, 1, 4, 4), np.float32).tobytes())
    context: Any = _Context()
    call = servicer.ModelInfer
    if traced:  # what the tracing interceptor runs per RPC: server span, then the servicer
        from cnnserve.server.telemetry import tracing

        async def call(request: Any, context: Any) -> Any:
            return await tracing._serve_traced("ModelInfer", {}, servicer.ModelInfer,
                                               request, context)
    for _ in range(300):  # warm-up
        await call(request, context)
    results = []
    for _ in range(repeat):
        started = time.process_time()
        for _ in range(requests):
            await call(request, context)
        results.append((time.process_time() - started) / requests * 1e6)
    await engine.stop(1.0)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--tracing", action="store_true",
                        help="also measure with tracing on (in-memory exporter)")
    args = parser.parse_args()
    import cnnserve.server

    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "models"
        write_test_model(repo, "linear", 1)
        model = "linear"
        where = Path(next(iter(cnnserve.server.__path__))).parents[2]
        off = asyncio.run(run(repo, model, args.requests, args.repeat))
        print(f"{where}: tracing off: median {statistics.median(off):.1f}, best {min(off):.1f} "
              f"us/request "
              f"(runs: {', '.join(f'{v:.1f}' for v in off)})")
        if args.tracing:
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import SimpleSpanProcessor
            from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
                InMemorySpanExporter,
            )

            from cnnserve.server.telemetry import tracing

            provider = TracerProvider()
            provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
            tracing.enable(provider)
            on = asyncio.run(run(repo, model, args.requests, args.repeat, traced=True))
            print(f"{where}: tracing on (server span + 4 spans, in-memory exporter): "
                  f"{statistics.median(on):.1f} us/request")


if __name__ == "__main__":
    main()
