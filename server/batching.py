"""The dynamic batcher: merges concurrent requests of one model version into one ORT run.

One :class:`Batcher` per loaded version holds a bounded FIFO of requests and one collector
task. The collector forms a batch of whole requests, at most ``max_batch_size`` rows, and
sends it when (a) it is full, (b) its rows hit a preferred batch size, or (c) the oldest
request has waited ``max_queue_delay_us`` (0: never wait, send what is queued). It runs one
batch at a time on the execution thread pool: requests arriving meanwhile form the next
batch, which is what makes batching adaptive under load even with a delay of 0.

Per batch there is exactly one thread hop (:func:`run_batch`, which concatenates, runs and
splits in the worker, handed over by :func:`~cnnserve.server.handoff.run_in_thread`), so
the event loop only resolves futures. Per request the loop does as little as it can: no
timer (one timer covers the earliest deadline in the queue) and no metric update while
queued (the queue-depth gauge reads the queue's length when scraped).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

from cnnserve.server.errors import (
    DeadlineExceeded,
    InferenceFailed,
    InvalidRequest,
    ModelNotReady,
    QueueFull,
    ServerShuttingDown,
    ServingError,
)
from cnnserve.server.handoff import run_in_thread
from cnnserve.server.metrics import VersionMetrics
from cnnserve.server.runtime import Array, Runner, run_batch
from cnnserve.server.statistics import StatsRecorder

log = logging.getLogger(__name__)

Result = dict[str, Array]


@dataclass(frozen=True)
class BatchPolicy:
    """Batching limits of one version (Triton's dynamic_batching, in its units)."""

    max_batch_size: int
    max_queue_delay_us: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = 1024


class _Request:
    """One queued request (a plain slotted class: one is built per request)."""

    __slots__ = ("arrival", "arrival_ns", "deadline", "future", "inputs", "outputs", "queued",
                 "rows")

    def __init__(self, inputs: Mapping[str, Array], outputs: Sequence[str], rows: int,
                 future: asyncio.Future[Result], deadline: float | None) -> None:
        self.inputs = inputs
        self.outputs = outputs
        self.rows = rows
        self.future = future
        self.deadline = deadline  # time.monotonic() instant
        self.arrival_ns = time.monotonic_ns()
        self.arrival = self.arrival_ns / 1e9  # the same clock as time.monotonic()
        self.queued = True  # in the deque (not yet taken, expired or cancelled)


class Batcher:
    """Queue, collect, run and split for one model version; use from one event loop."""

    def __init__(self, runner: Runner, policy: BatchPolicy, executor: Executor,
                 output_names: Sequence[str], *, where: str, stats: StatsRecorder,
                 metrics: VersionMetrics) -> None:
        self._runner = runner
        self._policy = policy
        self._executor = executor
        self._outputs = tuple(output_names)
        self._where = where  # "model 'm' version 1", for messages
        self._stats = stats
        self._metrics = metrics
        self._delay_s = policy.max_queue_delay_us / 1e6
        self._preferred = frozenset(policy.preferred_batch_sizes)
        self._max_preferred = max(policy.preferred_batch_sizes, default=0)
        self._queue: deque[_Request] = deque()
        self._waiter: asyncio.Future[None] | None = None
        # One timer for the earliest deadline in the queue rather than one per request:
        # arming and cancelling a TimerHandle per request costs more than the request's
        # whole trip through the batcher. _sweep_at is when it fires (inf: not armed).
        self._sweep: asyncio.TimerHandle | None = None
        self._sweep_at = math.inf
        self._task: asyncio.Task[None] | None = None
        self._draining = False
        self._closed = False

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
            self._forget(request)  # the caller went away: do not compute for nobody
            raise
        self._stats.record_success(time.monotonic_ns() - request.arrival_ns)
        return result

    def _admit(self, inputs: Mapping[str, Array], outputs: Sequence[str],
               deadline: float | None) -> _Request:
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
        loop = asyncio.get_running_loop()
        request = _Request(inputs, outputs, rows, loop.create_future(), deadline)
        if deadline is not None:
            if deadline <= request.arrival:
                self._stats.record_failure(0)
                raise DeadlineExceeded(f"{self._where}: the deadline had passed on arrival")
            if deadline < self._sweep_at:
                self._arm_sweep(loop, deadline)
        self._queue.append(request)
        self._wake()
        return request

    def _forget(self, request: _Request) -> None:
        if request.queued:
            request.queued = False
            self._queue.remove(request)

    def _arm_sweep(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
        self._sweep_at = when
        # loop.time() is time.monotonic(), the clock deadlines are stated in.
        self._sweep = loop.call_at(when, self._expire_due)

    def _cancel_sweep(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        self._sweep_at = math.inf

    def _expire_due(self) -> None:
        """Fail every queued request whose deadline has passed; re-arm for the next one.

        The timer may be stale (its request already left the queue): then it only re-arms.
        """
        self._sweep, self._sweep_at = None, math.inf
        now = time.monotonic()
        expired = [r for r in self._queue if r.deadline is not None and r.deadline <= now]
        for request in expired:
            self._forget(request)
            waited_ms = (now - request.arrival) * 1e3
            _fail(request, DeadlineExceeded(f"{self._where}: the deadline passed after "
                                            f"{waited_ms:.1f} ms in the queue; the request "
                                            "was dropped before compute"))
        upcoming = [r.deadline for r in self._queue if r.deadline is not None]
        if upcoming:
            self._arm_sweep(asyncio.get_running_loop(), min(upcoming))

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
            while (batch := await self._next_batch()) is not None:
                await self._execute(batch)
        except Exception:  # a bug here must not leave callers waiting forever
            log.exception("%s: the batcher stopped", self._where)
            self._fail_queued(lambda: InferenceFailed(f"{self._where}: internal batcher error"))
            self._closed = True
        finally:  # drained, aborted or failed: nothing can be queued any more
            self._metrics.untrack_queue(self._queue)

    async def _next_batch(self) -> list[_Request] | None:
        while True:
            if not self._queue:
                if self._draining:
                    self._closed = True
                    self._cancel_sweep()
                    return None
                await self._sleep(None)
                continue
            plan = self._plan(time.monotonic())
            if isinstance(plan, int):
                return self._take(plan)
            await self._sleep(plan)

    def _plan(self, now: float) -> int | float:
        """How many queued requests to send now, or (a float) how long to wait first."""
        limit = self._policy.max_batch_size
        rows = count = preferred = 0
        for request in self._queue:
            if rows + request.rows > limit:
                return count  # full: the next request does not fit
            rows += request.rows
            count += 1
            if rows == limit:
                return count
            if rows in self._preferred:
                preferred = count
        if preferred:
            return preferred
        if self._max_preferred and rows > self._max_preferred:
            return count  # past every preferred size: waiting only makes it worse
        wait = self._queue[0].arrival + self._delay_s - now
        return count if wait <= 0 else wait

    def _take(self, count: int) -> list[_Request]:
        batch = [self._queue.popleft() for _ in range(count)]
        for request in batch:
            request.queued = False
        return batch

    async def _execute(self, batch: list[_Request]) -> None:
        now, now_ns = time.monotonic(), time.monotonic_ns()
        live = []
        for request in batch:
            if request.deadline is not None and request.deadline <= now:
                _fail(request, DeadlineExceeded(f"{self._where}: the deadline passed in the "
                                                "queue; the request was dropped before compute"))
            if request.future.done():  # expired just now, or the caller went away
                continue
            queued_ns = now_ns - request.arrival_ns
            self._stats.record_queue(queued_ns)
            self._metrics.queue_duration.observe(queued_ns / 1e9)
            live.append(request)
        if not live:
            return
        try:
            results, timings = await run_in_thread(
                self._executor, run_batch, self._runner, [r.inputs for r in live],
                [r.rows for r in live], [r.outputs for r in live])
        except asyncio.CancelledError:
            for request in live:
                _fail(request, ServerShuttingDown(
                    f"{self._where}: the server stopped before the batch finished"))
            raise
        except Exception as exc:
            log.exception("%s: a batch of %d requests failed", self._where, len(live))
            for request in live:
                _fail(request, InferenceFailed(f"{self._where}: inference failed: {exc}"))
            return
        rows = sum(r.rows for r in live)
        self._stats.record_execution(rows, len(live), timings)
        self._metrics.execution(rows, timings.infer_ns / 1e9)
        for request, result in zip(live, results, strict=True):
            if not request.future.done():
                request.future.set_result(result)

    async def drain(self) -> None:
        """Finish every queued and running request, then close (later submits: ModelNotReady).

        Requests submitted while draining are still served (their callers got this version
        before it was retired), so nothing in flight is lost.
        """
        self._draining = True
        self._wake()
        if self._task is not None:
            await asyncio.wait({self._task})  # not cancelled with us; survives abort()
        self._closed = True

    async def abort(self) -> None:
        """Stop now: queued and running requests fail with ServerShuttingDown."""
        self._closed = True
        self._fail_queued(lambda: ServerShuttingDown(
            f"{self._where}: the server stopped before the request was computed"))
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def _fail_queued(self, error: Callable[[], ServingError]) -> None:
        for request in self._take(len(self._queue)):
            _fail(request, error())
        self._cancel_sweep()


def _fail(request: _Request, error: BaseException) -> None:
    if not request.future.done():
        request.future.set_exception(error)


def _release(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
