"""Where a batch runs: inline on the event loop, on a worker thread, or not yet.

:func:`decide` is the whole rule, a pure function of what the batcher knows when it could
send a batch: the batch's rows and requests, how many batches of the version are running,
whether other callers are known to be waiting or on their way, and the batch's estimated
run time (:class:`CostEstimate`, measured per model version). It returns a :class:`Dispatch`:

- ``INLINE``: run now on the event loop. Only when nothing of the version runs, no other
  caller waits or was seen recently (``contended``), and the estimated run time is at most
  ``inline_max_us``: then nothing could overlap with the run anyway, and a thread hop costs
  more than it saves (on the shared 2-core host, a lone LeNet-size request through the
  batcher cost 45 us of CPU over a bare ``session.run`` inline, 190-230 us handed off). A
  request that arrives meanwhile waits at most about ``inline_max_us``.
- ``HANDOFF``: send the batch to a worker thread (ONNX Runtime releases the GIL, so the
  loop keeps decoding and encoding other requests in parallel). Always when nothing runs
  and the batch is not cheap or not alone; beside running batches (a free worker being
  required), only when the batch is full or worth running in parallel: its estimated run
  time is at least ``split_min_us``, ~5-10x what one more run costs (the hand-off above
  plus merging and splitting), so the parallel core is bought for a small share of CPU.
- ``PASS_THROUGH``: a single request that is a batch by itself (at least the smallest
  preferred batch size, or at least ``split_min_us`` of work) goes alone to a free worker
  at once: no waiting to merge, no concatenation (no copy of its rows).
- ``WAIT``: leave it queued; a running batch finishes soon and the next batch merges what
  waited, which costs less CPU per request than more, smaller runs.

Costs are the CPU time of the thread that ran the model (``time.thread_time_ns``), so a
host busy with other work does not make a model look expensive. With one intra-op thread
(the default on small hosts) that is the run's whole cost; with more it is about its wall
time.

The earlier rule "a further batch starts only when full" made a compute-heavy model use
one core at concurrency 8 (batches never fill); the cost test above replaces it.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

#: Run inline when the estimated run takes at most this long, microseconds: also the most
#: a request arriving meanwhile waits for the loop. A LeNet-size row costs 30-70 us.
INLINE_MAX_US = 500.0
#: Beside a running batch, start another when its estimated run takes at least this long,
#: microseconds (~5-10x the CPU one more run costs in hand-off, merge and split).
SPLIT_MIN_US = 1000.0
#: Weight of the newest batch in the run-time fit (exponentially weighted).
EWMA_WEIGHT = 0.1


class Dispatch(enum.Enum):
    """What to do with the batch the queue offers now (see the module docstring)."""

    INLINE = "inline"
    HANDOFF = "handoff"
    PASS_THROUGH = "pass_through"
    WAIT = "wait"


@dataclass(frozen=True)
class DispatchPolicy:
    """The limits :func:`decide` applies for one model version."""

    max_running: int = 1  #: batches of the version that may run at once (instance count)
    max_batch_size: int = 1  #: rows of a full batch
    preferred: frozenset[int] = frozenset()  #: preferred batch sizes (also "full")
    inline_max_us: float = INLINE_MAX_US  #: 0 disables inline runs
    split_min_us: float = SPLIT_MIN_US


def decide(rows: int, requests: int, running: int, contended: bool, cost_us: float,
           policy: DispatchPolicy) -> Dispatch:
    """Where the batch of ``requests`` requests (``rows`` rows) runs, if it runs now.

    ``running``: batches of the version running now; ``contended``: other callers wait or
    were seen recently; ``cost_us``: estimated run time of the batch, microseconds
    (``math.inf`` while unknown, which never runs inline).
    """
    if running >= policy.max_running:
        return Dispatch.WAIT
    if running == 0:
        if not contended and cost_us <= policy.inline_max_us:
            return Dispatch.INLINE
        return Dispatch.HANDOFF
    if requests == 1 and (cost_us >= policy.split_min_us or (
            policy.preferred and rows >= min(policy.preferred))):
        return Dispatch.PASS_THROUGH
    if (rows >= policy.max_batch_size or rows in policy.preferred
            or cost_us >= policy.split_min_us):
        return Dispatch.HANDOFF
    return Dispatch.WAIT


class CostEstimate:
    """Run time of one model version as ``fixed + per_row x rows``, learnt from its batches.

    An exponentially weighted least-squares fit over the measured (rows, run time) pairs, so
    it follows a changing machine; while every batch had the same size it scales that size's
    time in proportion. Unknown (``math.inf``) until a batch ran.
    """

    __slots__ = ("_n", "_x", "_xx", "_xy", "_y")

    def __init__(self) -> None:
        self._n = 0
        self._x = self._y = self._xx = self._xy = 0.0  # weighted means: rows, ns, rows², rows·ns

    def cost_us(self, rows: int) -> float:
        """Estimated run time of a batch of ``rows`` rows, microseconds (inf while unknown)."""
        if not self._n:
            return math.inf
        fixed, per_row = self.fit()
        return (fixed + per_row * rows) / 1e3

    def fit(self) -> tuple[float, float]:
        """(fixed, per-row) run time in nanoseconds; (nan, nan) while unknown."""
        if not self._n:
            return math.nan, math.nan
        var = self._xx - self._x * self._x
        if var > 0.25:  # batch sizes vary enough to tell the two parts apart
            per_row = max(0.0, (self._xy - self._x * self._y) / var)
            fixed = max(0.0, self._y - per_row * self._x)
            return fixed, per_row
        return 0.0, self._y / self._x

    def observe(self, rows: int, run_ns: int) -> None:
        """Fold one batch's measured run time (nanoseconds, ``rows`` rows) into the fit."""
        if rows <= 0:
            return
        w = 1.0 if not self._n else EWMA_WEIGHT
        self._n += 1
        self._x += w * (rows - self._x)
        self._y += w * (run_ns - self._y)
        self._xx += w * (rows * rows - self._xx)
        self._xy += w * (rows * run_ns - self._xy)
