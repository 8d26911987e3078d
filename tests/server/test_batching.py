"""The dynamic batcher with a fake runner that records batch sizes and can be held blocked.

Holding the first batch inside the runner makes the tests deterministic: everything submitted
meanwhile is queued, and the next batch is formed from exactly those requests.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from cnnserve.server.batching.batcher import Batcher, BatchPolicy
from cnnserve.server.batching.dispatch import CostEstimate, Dispatch, DispatchPolicy
from cnnserve.server.errors import (
    DeadlineExceeded,
    InferenceFailed,
    ModelNotReady,
    QueueFull,
    ServerShuttingDown,
)
from cnnserve.server.telemetry.metrics import Metrics
from cnnserve.server.telemetry.statistics import StatsRecorder

Array = np.ndarray[Any, Any]


class FakeRunner:
    """y = 2x, z = x + 1; records batch sizes; ``hold()`` blocks runs until ``release()``."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.inputs: list[Mapping[str, Array]] = []
        self.threads: list[int] = []  # the thread each run ran on
        self.started = threading.Event()
        self._gate = threading.Event()
        self._gate.set()
        self.fail_on: float | None = None  # a batch containing this value raises
        self.drop_row = False  # return one row too few

    def hold(self) -> None:
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    def run(self, inputs: Mapping[str, Array]) -> dict[str, Array]:
        x = inputs["x"]
        self.batches.append(len(x))
        self.inputs.append(inputs)
        self.threads.append(threading.get_ident())
        self.started.set()
        assert self._gate.wait(10), "test never released the runner"
        if self.fail_on is not None and (x == self.fail_on).any():
            raise RuntimeError("bad value in batch")
        if self.drop_row:
            x = x[1:]
        return {"y": x * 2.0, "z": x + 1.0}


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(2)
    yield pool
    pool.shutdown(wait=False, cancel_futures=True)


@pytest.fixture
def runner() -> FakeRunner:
    return FakeRunner()


class Harness:
    def __init__(self, runner: FakeRunner, executor: ThreadPoolExecutor) -> None:
        self.runner = runner
        self.executor = executor
        self.metrics = Metrics()
        self.stats = StatsRecorder("m", 1)
        self.batchers: list[Batcher] = []

    def make(self, max_batch_size: int = 64, delay_us: int = 0, preferred: tuple[int, ...] = (),
             max_queue_size: int = 1024, max_running: int = 1,
             dispatch: DispatchPolicy | None = None,
             cost: CostEstimate | None = None) -> Batcher:
        batcher = Batcher(self.runner, BatchPolicy(max_batch_size, delay_us, preferred,
                                                   max_queue_size),
                          self.executor, ("y", "z"), where="model 'm' version 1",
                          stats=self.stats, metrics=self.metrics.for_version("m", 1),
                          max_running=max_running, dispatch=dispatch, cost=cost)
        batcher.start()
        self.batchers.append(batcher)
        return batcher


@pytest.fixture
async def harness(runner: FakeRunner, executor: ThreadPoolExecutor) -> AsyncIterator[Harness]:
    h = Harness(runner, executor)
    yield h
    runner.release()
    for b in h.batchers:
        await b.abort()


def rows(*values: float) -> dict[str, Array]:
    """One request: a row [v, v] per value."""
    return {"x": np.array([[v, v] for v in values], np.float32)}


async def hold_first(batcher: Batcher, runner: FakeRunner) -> asyncio.Task[dict[str, Array]]:
    """Submit one request and wait until its batch is blocked inside the runner."""
    runner.hold()
    first = asyncio.ensure_future(batcher.submit(rows(-1.0)))
    assert await asyncio.to_thread(runner.started.wait, 10)
    return first


async def test_concurrent_requests_merge_into_one_run_and_each_caller_gets_its_own_rows(
        harness: Harness, runner: FakeRunner) -> None:
    batcher = harness.make()
    first = await hold_first(batcher, runner)
    calls = [asyncio.ensure_future(batcher.submit(rows(i, i + 0.5))) for i in range(20)]
    await asyncio.sleep(0)  # let every call enqueue
    assert batcher.queued == 20
    runner.release()
    results = await asyncio.gather(*calls)
    assert runner.batches == [1, 40]  # 20 requests of 2 rows, one run
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result["y"], [[2 * i] * 2, [2 * i + 1] * 2])
        np.testing.assert_array_equal(result["z"], [[i + 1] * 2, [i + 1.5] * 2])
    assert (await first)["y"].tolist() == [[-2.0, -2.0]]
    stats = harness.stats.snapshot()
    assert (stats.execution_count, stats.inference_count, stats.success_count) == (2, 41, 21)
    assert [(b.batch_size, b.compute_infer_count) for b in stats.batch_stats] == [(1, 1), (40, 1)]


async def test_batches_never_exceed_max_batch_size_and_requests_are_not_split(
        harness: Harness, runner: FakeRunner) -> None:
    batcher = harness.make(max_batch_size=8)
    first = await hold_first(batcher, runner)
    sizes = [1, 3, 3, 2, 1, 8, 1, 1, 4]
    calls = [asyncio.ensure_future(batcher.submit(rows(*[float(i)] * n)))
             for i, n in enumerate(sizes)]
    await asyncio.sleep(0)
    runner.release()
    results = await asyncio.gather(*calls, first)
    # FIFO, whole requests: [1,3,3] (next 2 does not fit), [2,1], [8], [1,1,4]
    assert runner.batches == [1, 7, 3, 8, 6]
    for i, n in enumerate(sizes):
        assert results[i]["y"].tolist() == [[2.0 * i] * 2] * n


async def test_delay_zero_sends_a_lone_request_at_once(harness: Harness) -> None:
    batcher = harness.make(delay_us=0)
    started = time.monotonic()
    await batcher.submit(rows(1.0))
    assert time.monotonic() - started < 1.0
    assert harness.runner.batches == [1]


async def test_delay_waits_for_company_then_sends_what_it_has(harness: Harness) -> None:
    batcher = harness.make(delay_us=500_000)
    started = time.monotonic()
    first = asyncio.ensure_future(batcher.submit(rows(1.0)))
    await asyncio.sleep(0.05)  # arrives within the first request's delay window
    second = asyncio.ensure_future(batcher.submit(rows(2.0)))
    await asyncio.gather(first, second)
    assert time.monotonic() - started >= 0.49
    assert harness.runner.batches == [2]


async def test_full_or_preferred_batch_goes_without_waiting_for_the_delay(
        harness: Harness) -> None:
    full = harness.make(max_batch_size=4, delay_us=30_000_000)
    await asyncio.wait_for(asyncio.gather(*(full.submit(rows(i)) for i in range(4))), 5)
    preferred = harness.make(max_batch_size=16, delay_us=30_000_000, preferred=(3,))
    await asyncio.wait_for(asyncio.gather(*(preferred.submit(rows(i)) for i in range(3))), 5)
    assert harness.runner.batches == [4, 3]


async def test_queue_full_rejects_at_once(harness: Harness, runner: FakeRunner) -> None:
    batcher = harness.make(max_queue_size=2)
    first = await hold_first(batcher, runner)
    queued = [asyncio.ensure_future(batcher.submit(rows(i))) for i in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(QueueFull,
                       match=r"model 'm' version 1: the queue is full .*max_queue_size 2"):
        await batcher.submit(rows(9.0))
    runner.release()
    assert [r["y"].tolist() for r in await asyncio.gather(*queued)] == [[[0, 0]], [[2, 2]]]
    await first
    assert harness.stats.snapshot().fail_count == 1


async def test_deadline_passing_in_the_queue_drops_the_request_before_compute(
        harness: Harness, runner: FakeRunner) -> None:
    batcher = harness.make()
    first = await hold_first(batcher, runner)
    doomed = asyncio.ensure_future(batcher.submit(rows(7.0), deadline=time.monotonic() + 0.05))
    kept = asyncio.ensure_future(batcher.submit(rows(8.0), deadline=time.monotonic() + 30))
    with pytest.raises(DeadlineExceeded, match="dropped before compute"):
        await doomed  # answered at its deadline while the runner is still blocked
    assert batcher.queued == 1
    runner.release()
    assert (await kept)["y"].tolist() == [[16.0, 16.0]]
    await first
    assert runner.batches == [1, 1]  # the expired request never reached the runner
    assert all(7.0 not in inputs["x"] for inputs in runner.inputs)
    with pytest.raises(DeadlineExceeded):
        await batcher.submit(rows(1.0), deadline=time.monotonic() - 1)


async def test_a_failing_batch_fails_only_its_requests_and_the_next_batch_works(
        harness: Harness, runner: FakeRunner) -> None:
    batcher = harness.make()
    first = await hold_first(batcher, runner)
    runner.fail_on = 666.0
    bad = [asyncio.ensure_future(batcher.submit(rows(v))) for v in (1.0, 666.0)]
    await asyncio.sleep(0)
    runner.release()
    assert (await first)["y"].tolist() == [[-2.0, -2.0]]
    for call in bad:
        with pytest.raises(InferenceFailed, match=r"model 'm' version 1: .*bad value in batch"):
            await call
    assert (await batcher.submit(rows(3.0)))["y"].tolist() == [[6.0, 6.0]]
    stats = harness.stats.snapshot()
    assert (stats.success_count, stats.fail_count, stats.execution_count) == (2, 2, 2)


async def test_a_runner_returning_the_wrong_row_count_fails_the_batch(
        harness: Harness, runner: FakeRunner) -> None:
    runner.drop_row = True
    batcher = harness.make()
    with pytest.raises(InferenceFailed, match=r"output '.' has 1 rows but the batch had 2"):
        await batcher.submit(rows(1.0, 2.0))


async def test_requested_outputs_and_no_copy_for_a_single_request(
        harness: Harness, runner: FakeRunner) -> None:
    batcher = harness.make()
    request = rows(1.0, 2.0)
    result = await batcher.submit(request, ("z",))
    assert list(result) == ["z"] and result["z"].tolist() == [[2.0, 2.0], [3.0, 3.0]]
    assert runner.inputs[0]["x"] is request["x"]  # a one-request batch is passed as is


async def test_a_cancelled_caller_is_not_computed(harness: Harness, runner: FakeRunner) -> None:
    batcher = harness.make()
    first = await hold_first(batcher, runner)
    gone = asyncio.ensure_future(batcher.submit(rows(5.0)))
    await asyncio.sleep(0)
    gone.cancel()
    await asyncio.gather(gone, return_exceptions=True)
    assert batcher.queued == 0
    runner.release()
    await first
    assert runner.batches == [1]


async def test_drain_finishes_queued_work_then_refuses(harness: Harness,
                                                       runner: FakeRunner) -> None:
    batcher = harness.make()
    first = await hold_first(batcher, runner)
    queued = asyncio.ensure_future(batcher.submit(rows(4.0)))
    await asyncio.sleep(0)
    draining = asyncio.ensure_future(batcher.drain())
    await asyncio.sleep(0)
    assert not draining.done()
    runner.release()
    await draining
    assert (await queued)["y"].tolist() == [[8.0, 8.0]]
    await first
    with pytest.raises(ModelNotReady, match="unloaded"):
        await batcher.submit(rows(1.0))


async def test_abort_fails_queued_and_running_requests(harness: Harness,
                                                       runner: FakeRunner) -> None:
    batcher = harness.make()
    first = await hold_first(batcher, runner)
    queued = asyncio.ensure_future(batcher.submit(rows(4.0)))
    await asyncio.sleep(0)
    await batcher.abort()
    for call in (first, queued):
        with pytest.raises(ServerShuttingDown):
            await call
    assert harness.metrics.registry.get_sample_value(
        "cnnserve_queue_depth", {"model": "m", "version": "1"}) == 0


async def test_queued_requests_show_in_the_queue_depth_gauge(harness: Harness,
                                                           runner: FakeRunner) -> None:
    batcher = harness.make()
    first = await hold_first(batcher, runner)
    queued = [asyncio.ensure_future(batcher.submit(rows(float(i)))) for i in range(3)]
    await asyncio.sleep(0)
    depth = {"model": "m", "version": "1"}
    assert harness.metrics.registry.get_sample_value("cnnserve_queue_depth", depth) == 3
    runner.release()
    await asyncio.gather(first, *queued)
    assert harness.metrics.registry.get_sample_value("cnnserve_queue_depth", depth) == 0


async def test_queued_deadlines_expire_each_at_its_own_time(harness: Harness,
                                                            runner: FakeRunner) -> None:
    batcher = harness.make()
    first = await hold_first(batcher, runner)
    now = time.monotonic()
    # Submitted latest-deadline first, so the earliest deadline arrives after the others.
    late = asyncio.ensure_future(batcher.submit(rows(2.0), deadline=now + 1.0))
    kept = asyncio.ensure_future(batcher.submit(rows(3.0), deadline=now + 30))
    soon = asyncio.ensure_future(batcher.submit(rows(1.0), deadline=now + 0.1))
    with pytest.raises(DeadlineExceeded, match="dropped before compute"):
        await soon
    assert not late.done() and batcher.queued == 2
    with pytest.raises(DeadlineExceeded, match="dropped before compute"):
        await late
    assert batcher.queued == 1
    runner.release()
    assert (await kept)["y"].tolist() == [[6.0, 6.0]]
    await first
    assert runner.batches == [1, 1]


async def runs_started(runner: FakeRunner, count: int) -> None:
    """Wait until the runner has been entered ``count`` times (runs may be held inside)."""
    for _ in range(1000):
        if len(runner.batches) >= count:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"expected {count} runs, saw {runner.batches}")


def measured(per_row_us: float) -> CostEstimate:
    """A cost estimate that has seen batches taking ``per_row_us`` per row."""
    cost = CostEstimate()
    for rows in (1, 2, 4):
        cost.observe(rows, int(per_row_us * 1e3 * rows))
    return cost


async def test_beside_a_running_batch_a_cheap_model_starts_only_full_batches(
        harness: Harness, runner: FakeRunner) -> None:
    # Never inline (the held first batch must block a worker, not the test's loop).
    batcher = harness.make(max_batch_size=4, max_running=2, cost=measured(1.0),
                           dispatch=DispatchPolicy(inline_max_us=0))
    first = await hold_first(batcher, runner)
    small = [asyncio.ensure_future(batcher.submit(rows(float(i)))) for i in range(3)]
    await asyncio.sleep(0.05)
    assert runner.batches == [1] and batcher.queued == 3  # not full: waits behind the run
    small.append(asyncio.ensure_future(batcher.submit(rows(3.0))))  # now 4 rows: full
    await runs_started(runner, 2)
    assert runner.batches == [1, 4] and batcher.queued == 0
    more = [asyncio.ensure_future(batcher.submit(rows(4.0, 5.0, 6.0, 7.0))) for _ in range(2)]
    await asyncio.sleep(0.05)
    assert runner.batches == [1, 4] and batcher.queued == 2  # both workers busy
    runner.release()
    results = await asyncio.gather(first, *small, *more)
    assert sorted(runner.batches) == [1, 4, 4, 4]
    assert [r["y"][:, 0].tolist() for r in results] == [
        [-2.0], [0.0], [2.0], [4.0], [6.0], [8.0, 10.0, 12.0, 14.0], [8.0, 10.0, 12.0, 14.0]]


async def test_drain_and_abort_cover_every_running_batch(harness: Harness,
                                                         runner: FakeRunner) -> None:
    draining_batcher = harness.make(max_batch_size=1, max_running=2)
    first = await hold_first(draining_batcher, runner)
    second = asyncio.ensure_future(draining_batcher.submit(rows(2.0)))
    await runs_started(runner, 2)
    draining = asyncio.ensure_future(draining_batcher.drain())
    await asyncio.sleep(0.05)
    assert not draining.done()  # both batches still running
    runner.release()
    await draining
    assert [(await c)["y"].tolist() for c in (first, second)] == [[[-2.0, -2.0]], [[4.0, 4.0]]]

    aborted = harness.make(max_batch_size=1, max_running=2)
    runner.started.clear()
    first = await hold_first(aborted, runner)
    second = asyncio.ensure_future(aborted.submit(rows(2.0)))
    await runs_started(runner, 4)
    await aborted.abort()
    for call in (first, second):
        with pytest.raises(ServerShuttingDown, match="before the batch finished"):
            await call


async def test_after_a_shared_batch_the_collector_gathers_requests_still_on_their_way(
        harness: Harness, runner: FakeRunner) -> None:
    batcher = harness.make()
    first = await hold_first(batcher, runner)
    company = [asyncio.ensure_future(batcher.submit(rows(float(i)))) for i in range(3)]
    await asyncio.sleep(0)
    runner.release()
    await asyncio.gather(first, *company)  # batches [1, 3]: load, so the next one gathers

    async def arriving(value: float, rounds: int) -> dict[str, Array]:
        for _ in range(rounds):  # still inside gRPC for a couple of loop rounds
            await asyncio.sleep(0)
        return await batcher.submit(rows(value))

    late = await asyncio.gather(arriving(7.0, 0), arriving(8.0, 2))
    assert runner.batches == [1, 3, 2]
    assert [r["y"].tolist() for r in late] == [[[14.0, 14.0]], [[16.0, 16.0]]]


async def test_an_idle_cheap_request_runs_inline_on_the_event_loop(
        harness: Harness, runner: FakeRunner) -> None:
    batcher = harness.make(cost=measured(1.0))
    result = await batcher.submit(rows(1.0, 2.0))
    assert result["y"].tolist() == [[2.0, 2.0], [4.0, 4.0]]
    assert runner.threads == [threading.get_ident()]
    assert batcher.dispatched[Dispatch.INLINE] == 1


async def test_a_run_of_unknown_or_high_cost_goes_to_a_worker(harness: Harness,
                                                            runner: FakeRunner) -> None:
    unknown = harness.make()  # nothing measured yet
    costly = harness.make(cost=measured(10_000.0))  # 10 ms per row
    for batcher, value in ((unknown, 1.0), (costly, 2.0)):
        assert (await batcher.submit(rows(value)))["z"].tolist() == [[value + 1] * 2]
        assert batcher.dispatched[Dispatch.HANDOFF] == 1
    assert threading.get_ident() not in runner.threads


async def test_requests_arriving_right_after_an_inline_run_batch_on_a_worker(
        harness: Harness, runner: FakeRunner) -> None:
    batcher = harness.make(cost=measured(1.0))
    await batcher.submit(rows(0.0))  # inline; then the batcher probes for company
    results = await asyncio.gather(*(batcher.submit(rows(float(i), -float(i)))
                                     for i in range(1, 4)))
    assert runner.batches == [1, 6]  # the three merged, not three inline runs
    assert runner.threads[1] != threading.get_ident()
    for i, result in enumerate(results, start=1):
        assert result["y"].tolist() == [[2.0 * i] * 2, [-2.0 * i] * 2]
    await asyncio.sleep(0.01)  # the probe is over: a lone caller runs inline again
    assert (await batcher.submit(rows(9.0)))["y"].tolist() == [[18.0, 18.0]]
    assert runner.threads[-1] == threading.get_ident()


async def test_a_large_request_passes_through_beside_a_running_batch_without_a_copy(
        harness: Harness, runner: FakeRunner) -> None:
    batcher = harness.make(max_running=2, cost=measured(100.0),
                           dispatch=DispatchPolicy(inline_max_us=0))
    first = await hold_first(batcher, runner)
    request = rows(*[float(v) for v in range(16)])  # 16 rows: 1.6 ms of work
    big = asyncio.ensure_future(batcher.submit(request))
    await runs_started(runner, 2)
    assert runner.inputs[1]["x"] is request["x"]  # alone, not concatenated
    assert batcher.queued == 0 and batcher.dispatched[Dispatch.PASS_THROUGH] == 1
    runner.release()
    assert (await big)["y"][:, 0].tolist() == [2.0 * v for v in range(16)]
    assert (await first)["y"].tolist() == [[-2.0, -2.0]]


async def test_waiting_work_of_a_costly_model_starts_beside_the_running_batch(
        harness: Harness, runner: FakeRunner) -> None:
    # The withdrawn rule ("a further batch only when full") left a core idle here.
    batcher = harness.make(max_batch_size=8, max_running=2, cost=measured(10_000.0))
    first = await hold_first(batcher, runner)
    waiting = [asyncio.ensure_future(batcher.submit(rows(float(i)))) for i in range(3)]
    await runs_started(runner, 2)
    assert runner.batches == [1, 1] and batcher.queued == 2  # started without being full
    runner.release()
    results = await asyncio.gather(first, *waiting)
    assert runner.batches == [1, 1, 2]
    assert [r["y"][0, 0] for r in results] == [-2.0, 0.0, 2.0, 4.0]


async def test_an_inline_run_that_fails_fails_only_its_request(harness: Harness,
                                                               runner: FakeRunner) -> None:
    batcher = harness.make(cost=measured(1.0))
    runner.fail_on = 666.0
    with pytest.raises(InferenceFailed, match="bad value in batch"):
        await batcher.submit(rows(666.0))
    await asyncio.sleep(0.01)  # past the probe
    assert (await batcher.submit(rows(3.0)))["y"].tolist() == [[6.0, 6.0]]
    assert runner.threads == [threading.get_ident()] * 2
