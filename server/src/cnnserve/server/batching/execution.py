"""Running the batches of one model version: inline on the event loop or on a worker.

:class:`Execution` takes a batch the batcher decided to run (see dispatch.py for where),
drops the requests that expired or whose callers left, runs the rest as one model run
(:func:`~cnnserve.server.batching.rows.run_merged`) and answers each caller with its rows.
It keeps the batches running on workers (``len()``), so the batcher knows how many
instances are busy and shutdown can fail them; and it feeds every run's measured cost back
into the version's :class:`~cnnserve.server.batching.dispatch.CostEstimate`. Use from one
event loop.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor

from cnnserve.server.batching.dispatch import CostEstimate, Dispatch
from cnnserve.server.batching.handoff import call_in_thread
from cnnserve.server.batching.queue import QueuedRequest
from cnnserve.server.batching.rows import Merged, Runner, run_merged
from cnnserve.server.errors import DeadlineExceeded, InferenceFailed, ServerShuttingDown
from cnnserve.server.telemetry import tracing
from cnnserve.server.telemetry.metrics import VersionMetrics
from cnnserve.server.telemetry.statistics import StatsRecorder

log = logging.getLogger(__name__)


class Execution:
    """Runs batches of one version; ``on_free`` is called on the loop when a worker's batch
    ends (a worker of the version is free again)."""

    def __init__(self, runner: Runner, executor: Executor, cost: CostEstimate, *, where: str,
                 stats: StatsRecorder, metrics: VersionMetrics,
                 on_free: Callable[[], None]) -> None:
        self._runner = runner
        self._executor = executor
        self.cost = cost
        self._where = where
        self._stats = stats
        self._metrics = metrics
        self._on_free = on_free
        # Batches on workers by id (their live requests): len() is how many instances of the
        # version are busy; fail_running() fails them.
        self._running: dict[int, list[QueuedRequest]] = {}
        self._ids = 0
        self._traced = 0  # batch ids of the tracing spans (inline batches have none above)
        self.dispatched = dict.fromkeys(Dispatch, 0)  # batches run, by where

    def __len__(self) -> int:
        return len(self._running)

    def start(self, batch: list[QueuedRequest], choice: Dispatch) -> bool:
        """Run the live requests of ``batch`` as ``choice`` says (INLINE: now, on the loop,
        returning when done; otherwise on a worker). Returns whether it ran inline."""
        now, now_ns = time.monotonic(), time.monotonic_ns()
        live = []
        for request in batch:
            if request.deadline is not None and request.deadline <= now:
                request.fail(DeadlineExceeded(f"{self._where}: the deadline passed in the "
                                              "queue; the request was dropped before compute"))
            if request.future.done():  # expired just now, or the caller went away
                continue
            queued_ns = now_ns - request.arrival_ns
            self._stats.record_queue(queued_ns)
            self._metrics.queue_duration.observe(queued_ns / 1e9)
            if request.trace is not None:
                tracing.dispatched(request.trace, now_ns)
            live.append(request)
        if not live:
            return False
        self.dispatched[choice] += 1
        args = (self._runner, [r.inputs for r in live], [r.rows for r in live],
                [r.outputs for r in live])
        if choice is Dispatch.INLINE:
            try:
                outcome: Merged | None = run_merged(*args)
                error: BaseException | None = None
            except Exception as exc:  # reported to the batch's callers, like a worker's
                outcome, error = None, exc
            self._complete(live, outcome, error)
            return True
        batch_id = self._ids = self._ids + 1
        self._running[batch_id] = live
        try:
            call_in_thread(self._executor, run_merged, args,
                           functools.partial(self._finish, batch_id))
        except RuntimeError:  # the executor was shut down: the server is stopping
            del self._running[batch_id]
            for request in live:
                request.fail(ServerShuttingDown(
                    f"{self._where}: the server stopped before the batch ran"))
        return False

    def fail_running(self) -> None:
        """Fail every request of the batches on workers with ServerShuttingDown (their
        outcomes are dropped when they come back)."""
        running, self._running = self._running, {}
        for live in running.values():
            for request in live:
                request.fail(ServerShuttingDown(
                    f"{self._where}: the server stopped before the batch finished"))

    def _finish(self, batch_id: int, outcome: Merged | None,
                error: BaseException | None) -> None:
        """A batch came back from its worker (on the loop): answer its requests."""
        live = self._running.pop(batch_id, None)
        self._on_free()
        if live is not None:  # else aborted meanwhile: its requests have failed already
            self._complete(live, outcome, error)

    def _complete(self, live: list[QueuedRequest], outcome: Merged | None,
                  error: BaseException | None) -> None:
        if outcome is None:
            log.error("%s: a batch of %d requests failed", self._where, len(live),
                      exc_info=error)
            for request in live:
                request.fail(InferenceFailed(f"{self._where}: inference failed: {error}"))
            return
        results, timings, run_cpu_ns = outcome
        rows = sum(r.rows for r in live)
        self.cost.observe(rows, run_cpu_ns)
        self._stats.record_execution(rows, len(live), timings)
        self._metrics.execution(rows, timings.infer_ns / 1e9)
        if tracing.TRACING_ENABLED:
            self._traced = self._traced + 1
            tracing.batch_finished(live, self._traced, rows, timings)
        for request, result in zip(live, results, strict=True):
            if not request.future.done():
                request.future.set_result(result)
