"""call_in_thread: a blocking call on a worker thread, its outcome back on the event loop."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from cnnserve.server.batching.handoff import call_in_thread


class Outcome:
    """The on_done callback: records the (value, error) pair and the thread it ran on."""

    def __init__(self) -> None:
        self.done: asyncio.Future[tuple[Any, BaseException | None]] = (
            asyncio.get_running_loop().create_future())
        self.thread = ""

    def __call__(self, value: Any, error: BaseException | None) -> None:
        self.thread = threading.current_thread().name
        self.done.set_result((value, error))


async def test_the_call_runs_off_the_loop_and_its_result_comes_back_on_it() -> None:
    outcome = Outcome()
    with ThreadPoolExecutor(1) as pool:
        call_in_thread(pool, lambda: threading.current_thread().name, (), outcome)
        name, error = await outcome.done
    assert error is None
    assert name != threading.current_thread().name
    assert outcome.thread == threading.current_thread().name


async def test_an_exception_in_the_call_reaches_on_done() -> None:
    def fail(message: str) -> None:
        raise ValueError(message)

    outcome = Outcome()
    with ThreadPoolExecutor(1) as pool:
        call_in_thread(pool, fail, ("bad batch",), outcome)
        value, error = await outcome.done
    assert value is None
    assert isinstance(error, ValueError) and str(error) == "bad batch"


async def test_a_shut_down_executor_refuses_at_once() -> None:
    pool = ThreadPoolExecutor(1)
    pool.shutdown()
    with pytest.raises(RuntimeError):
        call_in_thread(pool, lambda: None, (), lambda value, error: None)
