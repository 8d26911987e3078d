"""Run Triton's perf_analyzer against a gRPC server and read back what it measured.

perf_analyzer comes from the venv that benchmarks/perf_analyzer_env.sh sets up (its wrapper
``pa`` puts the libcudart perf_analyzer links on LD_LIBRARY_PATH).
"""

from __future__ import annotations

import csv
import subprocess
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SETUP_SCRIPT = REPO / "benchmarks" / "perf_analyzer_env.sh"
DEFAULT_WRAPPER = REPO / ".bench" / "pa-venv" / "bin" / "pa"


class PerfAnalyzerError(RuntimeError):
    """perf_analyzer failed or wrote no report; the message ends with its last output lines."""


class UnstableError(PerfAnalyzerError):
    """No three windows in a row agreed within the stability percentage (a busy host)."""


@dataclass(frozen=True)
class Window:
    """perf_analyzer's time-window measurement settings.

    Each measurement is ``interval_ms`` long; perf_analyzer repeats it, up to ``max_trials``
    times, until three in a row agree within ``stability_pct`` percent.
    """

    interval_ms: int = 3000
    stability_pct: int = 10
    max_trials: int = 8


@dataclass(frozen=True)
class Measurement:
    """One perf_analyzer point: samples (batch rows) per second and client latency."""

    samples_per_s: float
    p50_ms: float
    p99_ms: float


def ensure_perf_analyzer(binary: Path | None = None) -> Path:
    """``binary``, or the wrapper of the default venv, created by the set-up script if absent.

    Raises PerfAnalyzerError if the set-up script fails.
    """
    if binary is not None:
        return binary
    if DEFAULT_WRAPPER.exists():
        return DEFAULT_WRAPPER
    done = subprocess.run(["bash", str(SETUP_SCRIPT)], stdout=subprocess.PIPE, text=True,
                          check=False)
    if done.returncode != 0:
        raise PerfAnalyzerError(f"{SETUP_SCRIPT} failed with status {done.returncode}")
    return Path(done.stdout.strip().splitlines()[-1])


def measure(binary: Path, address: str, model: str, *, batch: int, concurrency: int,
            shape: str, window: Window, report: Path, protocol: str = "grpc",
            streaming: bool = False) -> Measurement:
    """Drive ``model`` at ``address`` (host:port of ``protocol``: "grpc" or "http") with
    ``concurrency`` callers sending ``batch``-row requests of per-row ``shape`` (such as
    "1,28,28"): synchronous calls, or with ``streaming`` on gRPC streams.

    The CSV report goes to ``report``. Raises UnstableError if the measurements never
    settled, PerfAnalyzerError if perf_analyzer fails otherwise.
    """
    command = [str(binary), "-i", protocol, "-u", address, "-m", model, "-b", str(batch),
               "--concurrency-range", str(concurrency), "--shape", f"input:{shape}",
               "--measurement-mode", "time_windows", "-p", str(window.interval_ms),
               "-s", str(window.stability_pct), "-r", str(window.max_trials), "-f", str(report),
               *(["--streaming"] if streaming else [])]
    report.unlink(missing_ok=True)
    # The longest run: every trial, plus start-up and a warm-up window.
    timeout = (window.max_trials + 2) * window.interval_ms / 1000 + 60
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired as exc:
        raise PerfAnalyzerError(f"perf_analyzer against {address} ran past {timeout:.0f}s"
                                ) from exc
    if done.returncode != 0 or not report.exists():
        output = done.stdout + done.stderr
        tail = "\n".join(output.strip().splitlines()[-8:])
        error = UnstableError if "Failed to obtain stable measurement" in output else (
            PerfAnalyzerError)
        raise error(f"perf_analyzer against {address} (model {model}, batch "
                                f"{batch}, concurrency {concurrency}) exited with status "
                                f"{done.returncode}:\n{tail}")
    return read_report(report)


def read_report(path: Path) -> Measurement:
    """The first row of a perf_analyzer ``-f`` CSV report (latencies there are in µs).

    Raises PerfAnalyzerError if the file has no data row or lacks a needed column.
    """
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise PerfAnalyzerError(f"{path}: no measurement in perf_analyzer's report")
    row = rows[0]
    try:
        return Measurement(samples_per_s=float(row["Inferences/Second"]),
                           p50_ms=float(row["p50 latency"]) / 1000,
                           p99_ms=float(row["p99 latency"]) / 1000)
    except KeyError as exc:
        raise PerfAnalyzerError(f"{path}: perf_analyzer's report has no column {exc}") from exc
