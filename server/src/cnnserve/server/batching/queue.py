"""The batcher's queue: the waiting requests of one model version, their deadlines, and
which of them form the next batch.

:class:`RequestQueue` is FIFO and counts its rows. It keeps one timer for the earliest
deadline among its requests rather than one per request (arming and cancelling a
TimerHandle per request costs more than the request's whole trip through the batcher) and
fails a request whose deadline passes while it waits. :meth:`RequestQueue.plan` decides how
many requests the next batch takes, or how long to wait for more. Use from one event loop.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cnnserve.common.datatypes import Array
from cnnserve.server.errors import DeadlineExceeded

if TYPE_CHECKING:
    from cnnserve.server.telemetry.tracing import RequestTrace

Result = dict[str, Array]


@dataclass(frozen=True)
class BatchPolicy:
    """Batching limits of one version (Triton's dynamic_batching, in its units)."""

    max_batch_size: int
    max_queue_delay_us: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = 1024


class QueuedRequest:
    """One request on its way through the batcher (slotted: one is built per request)."""

    __slots__ = ("arrival", "arrival_ns", "deadline", "future", "inputs", "outputs", "queued",
                 "rows", "trace")

    def __init__(self, inputs: Mapping[str, Array], outputs: Sequence[str], rows: int,
                 future: asyncio.Future[Result], deadline: float | None) -> None:
        self.inputs = inputs
        self.outputs = outputs
        self.rows = rows
        self.future = future
        self.deadline = deadline  # time.monotonic() instant
        self.arrival_ns = time.monotonic_ns()
        self.arrival = self.arrival_ns / 1e9  # the same clock as time.monotonic()
        self.queued = False  # in a RequestQueue (not yet taken, expired or cancelled)
        self.trace: RequestTrace | None = None  # set only while tracing is on (tracing.py)

    def fail(self, error: BaseException) -> None:
        """Answer the caller with ``error`` unless it was answered (or left) already."""
        if not self.future.done():
            self.future.set_exception(error)


class RequestQueue:
    """The waiting requests of one version; ``where`` names the version in messages."""

    def __init__(self, policy: BatchPolicy, where: str) -> None:
        self._policy = policy
        self._where = where
        self._delay_s = policy.max_queue_delay_us / 1e6
        self._preferred = frozenset(policy.preferred_batch_sizes)
        self._max_preferred = max(policy.preferred_batch_sizes, default=0)
        self._items: deque[QueuedRequest] = deque()
        self.rows = 0  # rows of the waiting requests
        self._sweep: asyncio.TimerHandle | None = None
        self._sweep_at = math.inf  # when the deadline timer fires (inf: not armed)

    def __len__(self) -> int:
        return len(self._items)

    def append(self, request: QueuedRequest) -> None:
        """Add ``request`` at the back (its deadline, if any, is watched from now on)."""
        deadline = request.deadline
        if deadline is not None and deadline < self._sweep_at:
            self._arm_sweep(deadline)
        self._items.append(request)
        request.queued = True
        self.rows += request.rows

    def forget(self, request: QueuedRequest) -> None:
        """Remove ``request`` if it is still waiting (its caller went away)."""
        if request.queued:
            request.queued = False
            self._items.remove(request)
            self.rows -= request.rows
            if not self._items:
                self._cancel_sweep()

    def rows_of(self, count: int) -> int:
        """Rows of the ``count`` oldest requests (what :meth:`take` would return)."""
        if count >= len(self._items):
            return self.rows
        return sum(self._items[i].rows for i in range(count))

    def take(self, count: int) -> list[QueuedRequest]:
        """Remove and return the ``count`` oldest requests."""
        batch = [self._items.popleft() for _ in range(count)]
        for request in batch:
            request.queued = False
            self.rows -= request.rows
        if not self._items:
            self._cancel_sweep()
        return batch

    def plan(self, now: float, busy: bool = False) -> int | float | None:
        """How many requests to send now, or how long to wait first (None: until something
        changes). ``busy``: another batch of the version is running, so only a full or
        preferred-size batch goes now; the rest waits to batch behind it."""
        limit = self._policy.max_batch_size
        rows = count = preferred = 0
        for request in self._items:
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
        if busy:
            return None
        wait = self._items[0].arrival + self._delay_s - now
        return count if wait <= 0 else wait

    def _cancel_sweep(self) -> None:
        """Stop watching deadlines: every way out of the queue calls this once it is empty."""
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        self._sweep_at = math.inf

    def _arm_sweep(self, when: float) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
        self._sweep_at = when
        # loop.time() is time.monotonic(), the clock deadlines are stated in.
        self._sweep = asyncio.get_running_loop().call_at(when, self._expire_due)

    def _expire_due(self) -> None:
        """Fail every waiting request whose deadline has passed; re-arm for the next one.

        The timer may be stale (its request already left the queue): then it only re-arms.
        """
        self._sweep, self._sweep_at = None, math.inf
        now = time.monotonic()
        expired = [r for r in self._items if r.deadline is not None and r.deadline <= now]
        for request in expired:
            self.forget(request)
            waited_ms = (now - request.arrival) * 1e3
            request.fail(DeadlineExceeded(
                f"{self._where}: the deadline passed after {waited_ms:.1f} ms in the queue; "
                "the request was dropped before compute"))
        upcoming = [r.deadline for r in self._items if r.deadline is not None]
        if upcoming:
            self._arm_sweep(min(upcoming))

