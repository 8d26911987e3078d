"""The dynamic batcher: merges concurrent requests of one model version into one ORT run.

One :class:`Batcher` per loaded version holds a bounded FIFO of requests and one collector
task. The collector forms a batch of whole requests, at most ``max_batch_size`` rows, and
offers it when (a) it is full, (b) its rows hit a preferred batch size, or (c) the oldest
request has waited ``max_queue_delay_us`` (0: never wait, send what is queued).

Where an offered batch runs is :func:`~cnnserve.server.batching.dispatch.decide`'s call:
inline on the loop (idle, uncontended and cheap), on a worker of the execution pool, alone
and uncopied beside running batches (a request that is a batch by itself), or not yet
(beside a running batch, when merging it into the next batch is cheaper than a parallel
run). Up to ``max_running`` batches of one version run at once (Triton's instance count).
Requests arriving while a batch runs queue behind it and form the next batch, which is what
makes batching adaptive under load even with a delay of 0.

Running a batch is :class:`~cnnserve.server.batching.execution.Execution`'s: a hand-off is
one thread hop (merge, run and split all happen in the worker) whose outcome comes back as
one plain callback on the loop. Per request the loop does as
little as it can: no timer (one timer covers the earliest deadline in the queue), no
wake-up of the collector while a batch runs unless it could send something, and no metric
update while queued (the queue-depth gauge reads the queue's length when scraped).

After an inline run the batcher *probes* for a few loop rounds: requests that arrived
while the loop was busy running the model then queue and batch (the collector gathers
them) instead of each running inline alone; a lone caller (concurrency 1) finds the probe
over by the time its next request arrives and runs inline again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor

from cnnserve.common.datatypes import Array
from cnnserve.server.batching.dispatch import CostEstimate, Dispatch, DispatchPolicy, decide
from cnnserve.server.batching.execution import Execution
from cnnserve.server.batching.queue import BatchPolicy, QueuedRequest, RequestQueue, Result
from cnnserve.server.batching.rows import Runner
from cnnserve.server.errors import (
    DeadlineExceeded,
    InferenceFailed,
    InvalidRequest,
    ModelNotReady,
    QueueFull,
    ServerShuttingDown,
    ServingError,
)
from cnnserve.server.telemetry import tracing
from cnnserve.server.telemetry.metrics import VersionMetrics
from cnnserve.server.telemetry.statistics import StatsRecorder

log = logging.getLogger(__name__)

#: Before taking a batch, the collector may let the event loop run up to this many rounds,
#: and stops after this many rounds in a row that brought no request (see _gather).
GATHER_ROUNDS = 32
GATHER_PATIENCE = 4
#: After an inline run, arrivals during this many loop rounds queue and batch (the probe).
PROBE_ROUNDS = 4

__all__ = ["BatchPolicy", "Batcher"]


class Batcher:
    """Queue, collect, run and split for one model version; use from one event loop."""

    def __init__(self, runner: Runner, policy: BatchPolicy, executor: Executor,
                 output_names: Sequence[str], *, where: str, stats: StatsRecorder,
                 metrics: VersionMetrics, max_running: int = 1,
                 dispatch: DispatchPolicy | None = None,
                 cost: CostEstimate | None = None) -> None:
        self._max_running = max(1, max_running)
        self._policy = policy
        # decide()'s limits; the instance count and batch sizes always come from here.
        self._dispatch_policy = dataclasses.replace(
            dispatch or DispatchPolicy(), max_running=self._max_running,
            max_batch_size=policy.max_batch_size,
            preferred=frozenset(policy.preferred_batch_sizes))
        self._execution = Execution(runner, executor, cost or CostEstimate(), where=where,
                                    stats=stats, metrics=metrics, on_free=self._wake)
        self._outputs = tuple(output_names)
        self._where = where  # "model 'm' version 1", for messages
        self._stats = stats
        self._metrics = metrics
        self._queue = RequestQueue(policy, where)
        self._gather_next = False  # the last batch had company: gather before the next
        self._waiter: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._draining = False
        self._closed = False

    @property
    def max_running(self) -> int:
        """How many batches of this version may run at once (its instance count)."""
        return self._max_running

    @property
    def dispatched(self) -> dict[Dispatch, int]:
        """Batches run so far by how they were dispatched (WAIT stays 0)."""
        return dict(self._execution.dispatched)

    @property
    def queued(self) -> int:
        """Requests waiting (not yet taken into a batch)."""
        return len(self._queue)

    def start(self) -> None:
        """Start the collector task on the running loop."""
        self._metrics.track_queue(self._queue)
        self._task = asyncio.get_running_loop().create_task(
            self._collect_forever(), name=f"batcher {self._where}")

    async def submit(self, inputs: Mapping[str, Array], outputs: Sequence[str] = (),
                     deadline: float | None = None) -> Result:
        """Queue one request and wait for its rows of the batch's outputs.

        ``inputs`` share their first dimension (the request's rows); ``outputs`` names the
        outputs to return (empty: all); ``deadline`` is a time.monotonic() instant.
        Raises QueueFull, DeadlineExceeded, InferenceFailed, InvalidRequest, ModelNotReady
        (unloaded) or ServerShuttingDown (aborted at shutdown).
        """
        if self._closed:
            raise ModelNotReady(f"{self._where} was unloaded; retry to reach the current one")
        request = self._admit(inputs, outputs, deadline)
        try:
            result = await request.future
        except ServingError:
            self._stats.record_failure(time.monotonic_ns() - request.arrival_ns)
            raise
        except asyncio.CancelledError:
            self._queue.forget(request)  # the caller went away: do not compute for nobody
            raise
        self._stats.record_success(time.monotonic_ns() - request.arrival_ns)
        return result

    def _admit(self, inputs: Mapping[str, Array], outputs: Sequence[str],
               deadline: float | None) -> QueuedRequest:
        policy = self._policy
        if len(self._queue) >= policy.max_queue_size:
            self._stats.record_failure(0)
            raise QueueFull(f"{self._where}: the queue is full ({len(self._queue)} requests "
                            f"waiting, max_queue_size {policy.max_queue_size}); retry later "
                            "with backoff")
        rows = len(next(iter(inputs.values())))
        if rows > policy.max_batch_size:
            raise InvalidRequest(f"{self._where}: batch of {rows} rows exceeds "
                                 f"max_batch_size {policy.max_batch_size}")
        for name in outputs:
            if name not in self._outputs:
                raise InvalidRequest(f"{self._where}: unknown output '{name}'; the model has "
                                     f"{list(self._outputs)}")
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        request = QueuedRequest(inputs, outputs, rows, future, deadline)
        if tracing.TRACING_ENABLED:
            request.trace = tracing.request_trace(request.arrival_ns)
        if deadline is not None and deadline <= request.arrival:
            self._stats.record_failure(0)
            raise DeadlineExceeded(f"{self._where}: the deadline had passed on arrival")
        running = len(self._execution)
        if not self._queue and not self._draining and not self._gather_next:
            cost = self._execution.cost.cost_us(rows)
            if not (running or policy.max_queue_delay_us):
                # Idle, and no reason to wait: the collector would offer this request alone
                # at once. Deciding here saves waking it, a loop round of latency.
                self._dispatch([request], decide(rows, 1, 0, False, cost,
                                                 self._dispatch_policy))
                return request
            if running and decide(rows, 1, running, True, cost,
                                  self._dispatch_policy) is Dispatch.PASS_THROUGH:
                self._dispatch([request], Dispatch.PASS_THROUGH)
                return request
        self._queue.append(request)
        # While batches run the collector sleeps: it is woken only when it could send
        # something now (a worker is free and, beside a running batch, a batch is full or
        # worth a parallel run).
        if not running or (running < self._max_running and self._worth_parallel()):
            self._wake()
        return request

    def _worth_parallel(self) -> bool:
        """Whether the queue holds a batch that may start beside a running one."""
        queued = self._queue.rows
        policy = self._dispatch_policy
        return (queued >= policy.max_batch_size or bool(policy.preferred)
                or self._execution.cost.cost_us(min(queued, policy.max_batch_size))
                >= policy.split_min_us)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _sleep(self, seconds: float | None) -> None:
        """Wait for a new request (``_wake``) or ``seconds``, whichever comes first."""
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        timer = None if seconds is None else loop.call_later(seconds, _release, waiter)
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    async def _collect_forever(self) -> None:
        try:
            while (offer := await self._next_batch()) is not None:
                self._dispatch(*offer)
        except Exception:  # a bug here must not leave callers waiting forever
            log.exception("%s: the batcher stopped", self._where)
            self._fail_queued(lambda: InferenceFailed(f"{self._where}: internal batcher error"))
            self._closed = True
        finally:  # drained, aborted or failed: nothing can be queued any more
            self._metrics.untrack_queue(self._queue)

    async def _next_batch(self) -> tuple[list[QueuedRequest], Dispatch] | None:
        while True:
            if not self._queue:
                if self._draining:
                    self._closed = True
                    return None
                await self._sleep(None)
                continue
            running = len(self._execution)
            if running >= self._max_running:
                await self._sleep(None)  # woken when a batch finishes
                continue
            if self._gather_next and not running:
                self._gather_next = False
                await self._gather()
                continue  # look again: a deadline or abort() may have emptied the queue
            plan = self._queue.plan(time.monotonic(),
                                    busy=bool(running) and not self._worth_parallel())
            if isinstance(plan, int):
                rows = self._queue.rows_of(plan)
                choice = decide(rows, plan, running, plan < len(self._queue) or plan > 1,
                                self._execution.cost.cost_us(rows), self._dispatch_policy)
                if choice is Dispatch.WAIT:
                    await self._sleep(None)  # woken when a batch finishes
                    continue
                self._gather_next = plan > 1
                return self._queue.take(plan), choice
            await self._sleep(plan)

    async def _gather(self) -> None:
        """Let requests that gRPC has already received join the batch about to be taken.

        Under load, the loop holds handlers of received requests that are ready to run but
        have not reached :meth:`submit` yet. Yielding a few rounds lets them queue, so one
        ORT run (and one thread hop) serves them all: with 32 concurrent batch-1 callers on
        2 cores, batches grew from ~4 to ~10 requests and the server's CPU per request fell
        by about a fifth (403 to 321 us in one measurement). It is only done after a batch
        of several requests, so a lone caller never pays for it, and it stops as soon as
        rounds stop bringing requests.
        """
        idle = 0
        for _ in range(GATHER_ROUNDS):
            before = len(self._queue)
            await asyncio.sleep(0)
            if self._queue.rows >= self._policy.max_batch_size:
                return
            idle = idle + 1 if len(self._queue) == before else 0
            if idle >= GATHER_PATIENCE:
                return

    def _dispatch(self, batch: list[QueuedRequest], choice: Dispatch) -> None:
        if self._execution.start(batch, choice):
            self._probe_after_inline()

    def _probe_after_inline(self) -> None:
        """For PROBE_ROUNDS loop rounds, let arrivals queue (and batch) rather than run
        inline one by one: they may have piled up while the loop ran the model."""
        self._gather_next = True
        asyncio.get_running_loop().call_soon(self._probe, PROBE_ROUNDS)

    def _probe(self, rounds: int) -> None:
        if self._queue or not self._gather_next:
            return  # company came: the collector gathers it
        if rounds > 1:
            asyncio.get_running_loop().call_soon(self._probe, rounds - 1)
        else:
            self._gather_next = False  # nobody came: the next lone request may run inline

    async def drain(self) -> None:
        """Finish every queued and running request, then close (later submits: ModelNotReady).

        Requests submitted while draining are still served (their callers got this version
        before it was retired), so nothing in flight is lost.
        """
        self._draining = True
        self._wake()
        if self._task is not None:
            await asyncio.wait({self._task})  # not cancelled with us; survives abort()
        while self._execution:  # a batch ending (or abort) wakes us
            await self._sleep(None)
        self._closed = True

    async def abort(self) -> None:
        """Stop now: queued and running requests fail with ServerShuttingDown."""
        self._closed = True
        self._fail_queued(lambda: ServerShuttingDown(
            f"{self._where}: the server stopped before the request was computed"))
        self._execution.fail_running()
        self._wake()  # a drain() waiting for running batches
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def _fail_queued(self, error: Callable[[], ServingError]) -> None:
        for request in self._queue.take(len(self._queue)):
            request.fail(error())


def _release(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
