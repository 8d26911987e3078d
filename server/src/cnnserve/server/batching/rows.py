"""Merging requests into one model run and splitting the results: pure numpy, no runtime.

The batcher hands :func:`run_merged` a :class:`Runner` (an ONNX Runtime session satisfies it
structurally); this module never imports onnxruntime, so the batching layer is testable with
fake runners and sits above the runtime without depending on it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

from cnnserve.common.datatypes import Array
from cnnserve.server.telemetry.statistics import BatchTimings


class Runner(Protocol):
    """What the batcher needs from a model: run one batch, all outputs, same row count."""

    def run(self, inputs: Mapping[str, Array]) -> dict[str, Array]:
        """Blocking; called from a worker thread. Raises whatever the backend raises."""
        ...


Merged = tuple[list[dict[str, Array]], BatchTimings, int]


def run_merged(runner: Runner, inputs: Sequence[Mapping[str, Array]], rows: Sequence[int],
               outputs: Sequence[Sequence[str]]) -> Merged:
    """Run several requests as one model run (blocking; called inline or in a worker thread).

    ``inputs[i]`` holds request i's tensors with ``rows[i]`` rows; ``outputs[i]`` names the
    outputs it wants (empty: all). Inputs are concatenated once (a lone request is passed as
    it is, without a copy); outputs come back as views into the batch's arrays. Returns
    (each request's outputs, the batch's timings, the CPU time the calling thread spent in
    the model run, ns: the run's cost without the time other processes took the core).
    Raises whatever the runner raises, or RuntimeError if an output's row count is not the
    batch's.
    """
    t0 = time.perf_counter_ns()
    if len(inputs) == 1:
        feeds = inputs[0]
    else:
        feeds = {name: np.concatenate([x[name] for x in inputs]) for name in inputs[0]}
    total = sum(rows)
    t1, cpu = time.perf_counter_ns(), time.thread_time_ns()
    results = runner.run(feeds)
    t2, cpu = time.perf_counter_ns(), time.thread_time_ns() - cpu
    for name, value in results.items():
        got = value.shape[0] if value.ndim else 0
        if got != total:
            raise RuntimeError(f"output '{name}' has {got} rows but the batch had {total}")
    split: list[dict[str, Array]] = []
    offset = 0
    for n, wanted in zip(rows, outputs, strict=True):
        split.append({k: results[k][offset:offset + n] if len(rows) > 1 else results[k]
                      for k in (wanted or results)})
        offset += n
    return split, BatchTimings(t1 - t0, t2 - t1, time.perf_counter_ns() - t2), cpu
