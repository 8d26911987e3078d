"""run_in_thread: a blocking call on a worker thread, its outcome back on the event loop."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from cnnserve.server.handoff import run_in_thread


async def test_the_call_runs_off_the_loop_and_its_result_comes_back() -> None:
    with ThreadPoolExecutor(1) as pool:
        name = await run_in_thread(pool, lambda: threading.current_thread().name)
    assert name != threading.current_thread().name


async def test_an_exception_in_the_call_reaches_the_awaiting_coroutine() -> None:
    def fail(message: str) -> None:
        raise ValueError(message)

    with ThreadPoolExecutor(1) as pool, pytest.raises(ValueError, match="bad batch"):
        await run_in_thread(pool, fail, "bad batch")


async def test_a_cancelled_wait_drops_the_outcome_quietly() -> None:
    gate = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        pending = run_in_thread(pool, gate.wait, 5)
        pending.cancel()
        gate.set()
        assert await run_in_thread(pool, lambda: 42) == 42  # the worker finished the first
    await asyncio.sleep(0)  # the dropped outcome's callback runs without raising
    assert pending.cancelled()


async def test_a_shut_down_executor_refuses_at_once() -> None:
    pool = ThreadPoolExecutor(1)
    pool.shutdown()
    with pytest.raises(RuntimeError):
        run_in_thread(pool, lambda: None)
