"""Server benchmark: cnnserve, reference servers and in-process ONNX Runtime, all driven by
Triton's native load generator, perf_analyzer, in one run.

    benchmarks/perf_analyzer_env.sh                      # once: perf_analyzer in .bench/pa-venv
    .venv/bin/python benchmarks/bench_server.py [--repeat 3]   # about 30 minutes
    .venv/bin/python benchmarks/bench_server.py --quick        # smoke run, 1-2 minutes

Models (trained and exported with the cnnserve CLI on first use, cached in .bench/models):
the LeNet-size ``fashion-cnn`` (1x28x28) and a compute-heavy five-conv CNN (3x96x96).
Targets: cnnserve (``cnnserve serve``, default settings, serving two LeNet-size models in
the LeNet phase), the reference servers of benchmarks/baseline_servers.py (``constant``: no
model, the ceiling of gRPC in Python; ``naive``: session.run per request on the event loop;
``batched floor``: the least a batching server does) and in-process ONNX Runtime at the same
batch size (best of 1 and 2 intra-op threads).

Each point is ``perf_analyzer -i grpc -b B --concurrency-range C`` in time-window mode
(3 s windows until three agree within 10 %, at most 8); at b1c32 cnnserve is also driven over
REST (``-i http``) and on gRPC streams (``--streaming``). Each point is repeated ``--repeat``
times with the targets interleaved so a noisy moment hits them alike; medians are reported,
with each server's CPU time per request (/proc) and resident memory, and the issue's targets.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import BenchModel, prepare_models
from bench_report import (
    CNNSERVE,
    CNNSERVE_REST,
    CNNSERVE_STREAM,
    CONSTANT,
    FLOOR,
    NAIVE,
    ORT,
    Results,
    Sample,
    render,
)
from perf_analyzer import (
    REPO,
    Measurement,
    UnstableError,
    Window,
    ensure_perf_analyzer,
    measure,
)
from procstat import cpu_seconds, memory_mib
from servers import Server, served_requests, start_cnnserve, start_reference, stop

HERE = Path(__file__).resolve().parent
LENET_POINTS = ((1, 1), (1, 8), (1, 32), (16, 4), (64, 2))  # (batch, concurrency)
HEAVY_POINTS = ((1, 8), (8, 2))
#: Points where cnnserve is also driven over REST and on gRPC streams (LeNet phase).
PROTOCOL_POINTS = ((1, 32),)
#: The protocol variants: target name -> (perf_analyzer -i, --streaming).
VARIANTS = {CNNSERVE_REST: ("http", False), CNNSERVE_STREAM: ("grpc", True)}
REFERENCE_NAMES = {"constant": CONSTANT, "naive": NAIVE, "batched": FLOOR}


def label(batch: int, concurrency: int) -> str:
    """A point's name: ``b16c4`` is batch 16 at concurrency 4."""
    return f"b{batch}c{concurrency}"


@dataclass(frozen=True)
class Phase:
    """One model, the servers started for it, and the points measured."""

    key: str
    title: str
    model: BenchModel
    points: tuple[tuple[int, int], ...]
    references: tuple[str, ...]  # baseline_servers.py kinds
    second_model: BenchModel | None = None  # also in cnnserve's repository; driven once


@dataclass(frozen=True)
class Settings:
    """How every point is measured, and the folder for logs and perf_analyzer reports."""

    perf_analyzer: Path
    window: Window
    repeat: int
    workdir: Path


def measure_server(server: Server, model: BenchModel, batch: int, concurrency: int,
                   settings: Settings, variant: str = CNNSERVE) -> Sample:
    """One perf_analyzer run against ``server``, with the server's CPU time per request.

    ``variant`` CNNSERVE_REST drives its REST endpoint, CNNSERVE_STREAM gRPC streams; by
    default unary gRPC calls.

    If perf_analyzer's stability check never passes (a busy host), measures again with the
    check relaxed (three windows, any spread) and marks the sample unstable.
    """
    protocol, streaming = VARIANTS.get(variant, ("grpc", False))
    address = server.http_address if protocol == "http" else server.address
    assert address is not None, f"{server.name} has no {protocol} endpoint"
    report = (settings.workdir / f"{server.name}-{model.name}-{label(batch, concurrency)}"
              f"-{protocol}{'-stream' if streaming else ''}.csv")
    cpu0, requests0 = cpu_seconds(server.pid), served_requests(server.address, model.name)

    def run(window: Window) -> Measurement:
        return measure(settings.perf_analyzer, address, model.name, batch=batch,
                       concurrency=concurrency, shape=model.shape_text, window=window,
                       report=report, protocol=protocol, streaming=streaming)

    stable = True
    try:
        m = run(settings.window)
    except UnstableError:
        stable = False
        m = run(replace(settings.window, stability_pct=1000, max_trials=3))
    cpu = cpu_seconds(server.pid) - cpu0
    requests = served_requests(server.address, model.name) - requests0
    return Sample(m.samples_per_s, m.p50_ms, m.p99_ms, 1e6 * cpu / max(requests, 1), stable)


def measure_in_process(model: BenchModel, batch: int, seconds: float) -> Sample:
    """In-process ONNX Runtime at ``batch``: the better of 1 and 2 intra-op threads."""
    samples = []
    for threads in (1, 2):
        done = subprocess.run(
            [sys.executable, str(HERE / "ort_inprocess.py"), str(model.onnx), "--batch",
             str(batch), "--threads", str(threads), "--seconds", str(seconds)],
            capture_output=True, text=True, check=True)
        result = json.loads(done.stdout)
        samples.append(Sample(result["samples_per_s"], result["p50_ms"], result["p99_ms"],
                              result["cpu_us_per_request"]))
    return max(samples, key=lambda s: s.samples_per_s)


def run_phase(phase: Phase, cnnserve: Path, settings: Settings, results: Results) -> None:
    """Start the phase's servers, measure every point ``repeat`` times, record memory."""
    servers = [start_cnnserve(cnnserve, phase.model.repository, settings.workdir,
                              f"cnnserve-{phase.key}")]
    try:
        for kind in phase.references:
            servers.append(start_reference(kind, phase.model.onnx, settings.workdir,
                                           f"{kind}-{phase.key}"))
        names = [CNNSERVE] + [REFERENCE_NAMES[kind] for kind in phase.references]
        for batch, concurrency in phase.points:
            point = label(batch, concurrency)
            for rep in range(settings.repeat):
                for name, server in zip(names, servers, strict=True):
                    sample = measure_server(server, phase.model, batch, concurrency, settings)
                    results.add(phase.key, point, name, sample)
                    _progress(phase.key, point, rep, name, sample)
                if phase.key == "lenet" and (batch, concurrency) in PROTOCOL_POINTS:
                    for variant in VARIANTS:
                        sample = measure_server(servers[0], phase.model, batch, concurrency,
                                                settings, variant)
                        results.add(phase.key, point, variant, sample)
                        _progress(phase.key, point, rep, variant, sample)
                sample = measure_in_process(phase.model, batch,
                                            settings.window.interval_ms / 1000)
                results.add(phase.key, point, ORT, sample)
                _progress(phase.key, point, rep, ORT, sample)
        if phase.second_model is not None:  # so both models have served before the peak
            measure_server(servers[0], phase.second_model, 16, 4, settings)
        for name, server in zip(names, servers, strict=True):
            results.memory[(phase.key, name)] = (memory_mib(server.pid, "VmRSS"),
                                                 memory_mib(server.pid, "VmHWM"))
    finally:
        stop(servers)


def _progress(phase: str, point: str, rep: int, target: str, s: Sample) -> None:
    print(f"[{phase} {point} #{rep + 1}] {target:<15} {s.samples_per_s:>9.0f}/s  "
          f"p50 {s.p50_ms:7.2f} ms  p99 {s.p99_ms:7.2f} ms  CPU {s.cpu_us:8.0f} µs/req"
          + ("" if s.stable else "  (unstable)"), file=sys.stderr, flush=True)


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of each point per target, interleaved (default 3)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: one repeat, 0.4 s windows (1-2 minutes)")
    parser.add_argument("--perf-analyzer", type=Path, default=None,
                        help="perf_analyzer binary or wrapper (default: .bench/pa-venv/bin/pa, "
                             "set up by benchmarks/perf_analyzer_env.sh if missing)")
    parser.add_argument("--cnnserve", type=Path,
                        default=Path(sys.executable).with_name("cnnserve"),
                        help="the cnnserve command (default: next to this Python)")
    parser.add_argument("--models", type=Path, default=REPO / ".bench" / "models",
                        help="cache of trained and exported models (default .bench/models)")
    return parser.parse_args()


def main() -> None:
    args = _args()
    window = Window(interval_ms=400, stability_pct=50, max_trials=3) if args.quick else Window()
    perf_analyzer = ensure_perf_analyzer(args.perf_analyzer)
    models = prepare_models(args.cnnserve, args.models)
    (REPO / ".bench").mkdir(exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench-server-", dir=REPO / ".bench"))
    settings = Settings(perf_analyzer, window, 1 if args.quick else args.repeat, workdir)
    phases = [
        Phase("lenet", "LeNet-size model (fashion-cnn, 1x28x28; cnnserve serves two copies)",
              models.lenet, LENET_POINTS, ("constant", "naive", "batched"), models.lenet_b),
        Phase("heavy", "Compute-heavy CNN (five 3x3 convs, 3x96x96)", models.heavy,
              HEAVY_POINTS, ("naive", "batched")),
    ]
    results = Results()
    for phase in phases:
        try:
            run_phase(phase, args.cnnserve, settings, results)
        except Exception:
            print(f"server logs and perf_analyzer reports are in {workdir}", file=sys.stderr)
            raise
    shutil.rmtree(workdir, ignore_errors=True)
    lenet_points = [label(*p) for p in LENET_POINTS]
    heavy_points = [label(*p) for p in HEAVY_POINTS]
    header = (f"## Server benchmark ({os.cpu_count()} CPUs; perf_analyzer, "
              f"{window.interval_ms} ms windows, ±{window.stability_pct} % stability, "
              f"{settings.repeat} repeat(s){', quick' if args.quick else ''})")
    print(render(results, [(p.key, p.title, [label(*pt) for pt in p.points]) for p in phases],
                 [CNNSERVE, CNNSERVE_REST, CNNSERVE_STREAM, CONSTANT, NAIVE, FLOOR, ORT],
                 lenet_points, heavy_points, header))


if __name__ == "__main__":
    main()
