"""What the server benchmark measured, reduced to medians, and its markdown report.

A *target* is a server (cnnserve or a reference server) or in-process ONNX Runtime; a
*point* is a batch size and a concurrency (``b16c4``); a *phase* is one model with the
servers started for it (``lenet``, ``heavy``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field

CNNSERVE = "cnnserve"
CNNSERVE_REST = "cnnserve REST"  # perf_analyzer -i http
CNNSERVE_STREAM = "cnnserve stream"  # perf_analyzer --streaming
CONSTANT = "constant"
NAIVE = "naive"
FLOOR = "batched floor"
ORT = "ORT in-process"


@dataclass(frozen=True)
class Sample:
    """One measurement of one target at one point."""

    samples_per_s: float  # batch rows (inferences) per second
    p50_ms: float
    p99_ms: float
    cpu_us: float  # the target process's CPU time per request, µs (user + system)
    stable: bool = True  # False: perf_analyzer's stability check never passed


@dataclass
class Results:
    """Every sample by (phase, point, target), and each server's memory by (phase, target)."""

    samples: dict[tuple[str, str, str], list[Sample]] = field(default_factory=dict)
    memory: dict[tuple[str, str], tuple[float, float]] = field(default_factory=dict)  # MiB

    def add(self, phase: str, point: str, target: str, sample: Sample) -> None:
        self.samples.setdefault((phase, point, target), []).append(sample)

    def median(self, phase: str, point: str, target: str) -> Sample | None:
        """Each field's median over the repeats; None if that target was not measured."""
        runs = self.samples.get((phase, point, target))
        if not runs:
            return None
        return Sample(statistics.median(r.samples_per_s for r in runs),
                      statistics.median(r.p50_ms for r in runs),
                      statistics.median(r.p99_ms for r in runs),
                      statistics.median(r.cpu_us for r in runs),
                      all(r.stable for r in runs))


@dataclass(frozen=True)
class Check:
    """One of the issue's targets: ``value`` against ``bound``."""

    text: str
    value: float
    bound: float
    higher_is_better: bool

    @property
    def verdict(self) -> str:
        if math.isnan(self.value):
            return "n/a"
        ok = self.value >= self.bound if self.higher_is_better else self.value <= self.bound
        return "PASS" if ok else "FAIL"


def _ratio(a: Sample | None, b: Sample | None, attr: str = "samples_per_s") -> float:
    if a is None or b is None:
        return math.nan
    return float(getattr(a, attr)) / float(getattr(b, attr))


def checks(results: Results, lenet_points: Iterable[str], heavy_points: Iterable[str]
           ) -> list[Check]:
    """The issue's targets, from the medians."""
    m = results.median
    found = [c for c in [
        *(Check(f"LeNet {p}: cnnserve ÷ naive throughput", _ratio(m("lenet", p, CNNSERVE),
                                                                    m("lenet", p, NAIVE)),
                1.0, True) for p in lenet_points),
        Check("LeNet b1c32: cnnserve ÷ constant throughput",
              _ratio(m("lenet", "b1c32", CNNSERVE), m("lenet", "b1c32", CONSTANT)), 0.85, True),
        Check("LeNet b1c1: cnnserve p99 ÷ constant p99",
              _ratio(m("lenet", "b1c1", CNNSERVE), m("lenet", "b1c1", CONSTANT), "p99_ms"),
              1.3, False),
        Check("LeNet b1c32: cnnserve REST ÷ gRPC unary throughput",
              _ratio(m("lenet", "b1c32", CNNSERVE_REST), m("lenet", "b1c32", CNNSERVE)),
              0.7, True),
        Check("LeNet b1c32: cnnserve streaming ÷ gRPC unary throughput",
              _ratio(m("lenet", "b1c32", CNNSERVE_STREAM), m("lenet", "b1c32", CNNSERVE)),
              1.0, True)]]
    heavy_points = list(heavy_points)
    ort = [s.samples_per_s for p in heavy_points if (s := m("heavy", p, ORT)) is not None]
    best = max(ort) if ort else math.nan
    for p in heavy_points:
        served = m("heavy", p, CNNSERVE)
        found.append(Check(f"heavy {p}: cnnserve ÷ in-process ORT best",
                           served.samples_per_s / best if served else math.nan, 0.90, True))
    rss = results.memory.get(("lenet", CNNSERVE), (math.nan, math.nan))[1]
    found.append(Check("cnnserve peak RSS, two LeNet-size models (MiB)", rss, 150.0, False))
    return found


def _cell(value: float, digits: int, stable: bool = True) -> str:
    if math.isnan(value):
        return ""
    return f"{value:,.{digits}f}" + ("" if stable else " ~")


def render(results: Results, phases: list[tuple[str, str, list[str]]], targets: list[str],
           lenet_points: list[str], heavy_points: list[str], header: str) -> str:
    """The markdown report: a table per phase, memory, and the targets with PASS/FAIL.

    ``phases``: (key, title, point labels) in order.
    """
    lines = [header, ""]
    for key, title, points in phases:
        lines += [f"### {title}", "",
                  "| point | target | samples/s | p50 ms | p99 ms | CPU µs/request |",
                  "|---|---|--:|--:|--:|--:|"]
        for point in points:
            for target in targets:
                s = results.median(key, point, target)
                if s is not None:
                    lines.append(f"| {point} | {target} | {_cell(s.samples_per_s, 0, s.stable)}"
                                 f" | {_cell(s.p50_ms, 2)} | {_cell(s.p99_ms, 2)}"
                                 f" | {_cell(s.cpu_us, 0)} |")
        lines.append("")
    lines += ["### Resident memory (after each phase)", "",
              "| phase | server | VmRSS MiB | VmHWM (peak) MiB |", "|---|---|--:|--:|"]
    for (phase, target), (rss, hwm) in results.memory.items():
        lines.append(f"| {phase} | {target} | {rss:.1f} | {hwm:.1f} |")
    lines += ["", "### Targets", "", "| target | value | bound | verdict |", "|---|--:|--:|---|"]
    for c in checks(results, lenet_points, heavy_points):
        sign = "≥" if c.higher_is_better else "≤"
        lines.append(f"| {c.text} | {_cell(c.value, 2)} | {sign} {c.bound:g} | {c.verdict} |")
    lines += ["", "Medians over the repeats. `~`: perf_analyzer's stability check did not pass "
              "in some repeat (measured again with it relaxed). CPU µs/request: the target "
              "process's user+system CPU over the run divided by the requests it answered "
              "(in-process ORT: per session.run). ORT in-process: best of 1 and 2 intra-op "
              "threads at the point's batch size, its latencies those of one session.run."]
    return "\n".join(lines)
