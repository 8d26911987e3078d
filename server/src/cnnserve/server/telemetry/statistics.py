"""Per-version inference statistics in the shape of Triton's ModelStatistics.

A :class:`StatsRecorder` is owned by one loaded model version and is only touched from the
event loop (the batcher hands timings measured in its worker thread back to the loop), so it
needs no lock. :meth:`StatsRecorder.snapshot` freezes it into a :class:`VersionStats`.

Counting follows Triton: success/fail/queue/compute counts are per *request*, and each request
of a batch is credited the whole batch's compute durations; ``batch_stats`` counts *executions*
per executed batch size; ``inference_count`` counts rows; all durations are nanoseconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class BatchStats:
    """Executions of one batch size and their cumulative durations (ns)."""

    batch_size: int
    compute_input_count: int
    compute_input_ns: int
    compute_infer_count: int
    compute_infer_ns: int
    compute_output_count: int
    compute_output_ns: int


@dataclass(frozen=True)
class VersionStats:
    """Triton ModelStatistics of one model version, cumulative since it was loaded."""

    name: str
    version: str
    last_inference_ms: int  # unix epoch ms of the last inference, 0 if none
    inference_count: int  # rows inferred successfully
    execution_count: int  # ONNX Runtime runs
    success_count: int
    success_ns: int
    fail_count: int
    fail_ns: int
    queue_count: int
    queue_ns: int
    compute_input_count: int
    compute_input_ns: int
    compute_infer_count: int
    compute_infer_ns: int
    compute_output_count: int
    compute_output_ns: int
    batch_stats: tuple[BatchStats, ...]


@dataclass(frozen=True)
class BatchTimings:
    """Durations (ns) of one execution: concatenating inputs, running ORT, splitting outputs."""

    input_ns: int
    infer_ns: int
    output_ns: int


class _Counter:
    """A count with a cumulative duration in nanoseconds."""

    __slots__ = ("count", "ns")

    def __init__(self) -> None:
        self.count = 0
        self.ns = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


class StatsRecorder:
    """Mutable accumulator behind :class:`VersionStats`; call it from the event loop only."""

    def __init__(self, name: str, version: int) -> None:
        self._name = name
        self._version = str(version)
        self._last_inference_ms = 0
        self._inferences = 0
        self._executions = 0
        self._success = _Counter()
        self._fail = _Counter()
        self._queue = _Counter()
        self._input = _Counter()
        self._infer = _Counter()
        self._output = _Counter()
        # batch size -> [input, infer, output] counters, one count per execution
        self._batches: dict[int, tuple[_Counter, _Counter, _Counter]] = {}

    def record_queue(self, ns: int) -> None:
        """A request left the queue for compute after waiting ``ns`` nanoseconds."""
        self._queue.add(ns)

    def record_execution(self, rows: int, requests: int, timings: BatchTimings) -> None:
        """One successful ORT run of ``rows`` rows serving ``requests`` requests."""
        self._executions += 1
        self._inferences += rows
        self._last_inference_ms = time.time_ns() // 1_000_000
        # Triton credits every request of a batch with the batch's compute time.
        self._input.add(timings.input_ns * requests, requests)
        self._infer.add(timings.infer_ns * requests, requests)
        self._output.add(timings.output_ns * requests, requests)
        per_size = self._batches.get(rows)
        if per_size is None:
            per_size = self._batches[rows] = (_Counter(), _Counter(), _Counter())
        per_size[0].add(timings.input_ns)
        per_size[1].add(timings.infer_ns)
        per_size[2].add(timings.output_ns)

    def record_success(self, ns: int) -> None:
        """A request answered successfully after ``ns`` nanoseconds in the engine."""
        self._success.add(ns)

    def record_failure(self, ns: int) -> None:
        """A request failed (queue full, deadline, inference error) after ``ns`` nanoseconds."""
        self._fail.add(ns)

    def snapshot(self) -> VersionStats:
        """The statistics so far, as an immutable value."""
        batches = tuple(
            BatchStats(size, c[0].count, c[0].ns, c[1].count, c[1].ns, c[2].count, c[2].ns)
            for size, c in sorted(self._batches.items()))
        return VersionStats(
            name=self._name, version=self._version,
            last_inference_ms=self._last_inference_ms,
            inference_count=self._inferences, execution_count=self._executions,
            success_count=self._success.count, success_ns=self._success.ns,
            fail_count=self._fail.count, fail_ns=self._fail.ns,
            queue_count=self._queue.count, queue_ns=self._queue.ns,
            compute_input_count=self._input.count, compute_input_ns=self._input.ns,
            compute_infer_count=self._infer.count, compute_infer_ns=self._infer.ns,
            compute_output_count=self._output.count, compute_output_ns=self._output.ns,
            batch_stats=batches)
