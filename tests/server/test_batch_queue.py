"""The batcher's queue: which waiting requests form the next batch, and when."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from cnnserve.server.batching.queue import BatchPolicy, QueuedRequest, RequestQueue
from cnnserve.server.errors import DeadlineExceeded


def queue_of(policy: BatchPolicy, *row_counts: int, deadline: float | None = None
             ) -> tuple[RequestQueue, list[QueuedRequest]]:
    queue = RequestQueue(policy, "model 'm' version 1")
    loop = asyncio.get_running_loop()
    requests = [QueuedRequest({"x": np.zeros((n, 2), np.float32)}, (), n, loop.create_future(),
                              deadline) for n in row_counts]
    for request in requests:
        queue.append(request)
    return queue, requests


async def test_plan_sends_full_batches_whole_requests_only() -> None:
    queue, _ = queue_of(BatchPolicy(max_batch_size=8), 3, 4, 2)
    assert queue.plan(time.monotonic()) == 2  # 3 + 4 rows; the 2-row request does not fit
    assert [r.rows for r in queue.take(2)] == [3, 4] and queue.rows == 2


async def test_plan_waits_out_the_delay_unless_a_preferred_size_is_reached() -> None:
    policy = BatchPolicy(max_batch_size=64, max_queue_delay_us=50_000, preferred_batch_sizes=(4,))
    queue, _ = queue_of(policy, 1, 1)
    wait = queue.plan(time.monotonic())
    assert isinstance(wait, float) and 0 < wait <= 0.05
    queue.append(QueuedRequest({}, (), 2, asyncio.get_running_loop().create_future(), None))
    assert queue.plan(time.monotonic()) == 3  # 1 + 1 + 2 rows: preferred size 4


async def test_beside_a_running_batch_only_a_full_batch_goes() -> None:
    queue, _ = queue_of(BatchPolicy(max_batch_size=4), 1, 2)
    assert queue.plan(time.monotonic(), busy=True) is None
    assert queue.plan(time.monotonic(), busy=False) == 2
    queue.append(QueuedRequest({}, (), 1, asyncio.get_running_loop().create_future(), None))
    assert queue.plan(time.monotonic(), busy=True) == 3


async def test_a_request_whose_deadline_passes_while_waiting_fails_and_leaves() -> None:
    queue, (request,) = queue_of(BatchPolicy(max_batch_size=4), 1,
                                 deadline=time.monotonic() + 0.02)
    with pytest.raises(DeadlineExceeded, match="dropped before compute"):
        await asyncio.wait_for(request.future, 5)
    assert len(queue) == 0 and queue.rows == 0
