"""Riding out a server outage: every worker pauses until the server is ready again.

A request that fails because the server is down, restarting or draining (``UNAVAILABLE``, or
``CANCELLED``: the job never cancels its own calls, so that is a server that dropped them)
closes the :class:`OutageGate`. Every worker then waits at the gate instead of spending its
own retries, while one probe asks the server whether the model is ready, with exponential
backoff. When it is, the gate opens and the failed requests are sent again; items that merely
waited get ordinary records, never error records. An outage longer than ``max_outage_s``
stops the job with :class:`OutageError`, leaving an output that a rerun completes.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from cnnserve.client._core import NOT_GRPC
from cnnserve.client.aio import AsyncInferenceClient
from cnnserve.client.errors import InferenceServerError
from cnnserve.common.errors import CnnserveError

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Statuses that mean "the server is not there now", as opposed to "this request is wrong".
OUTAGE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})
#: An outage still going on after this many seconds is logged as a warning.
WARN_AFTER_S = 5.0


class OutageError(CnnserveError):
    """The server stayed unreachable for longer than the job's ``--max-outage``."""


class OutageGate:
    """Lets calls through while the server answers; holds all of them while it does not.

    ``max_outage_s`` bounds one outage (seconds from the first failure to the server being
    ready again); probes wait ``initial_backoff_s`` doubling up to ``max_backoff_s``,
    jittered, and each probe's deadline is ``probe_timeout_s``.
    """

    def __init__(self, client: AsyncInferenceClient, model: str, version: str | None, *,
                 max_outage_s: float, initial_backoff_s: float = 0.1,
                 max_backoff_s: float = 2.0, probe_timeout_s: float = 5.0) -> None:
        self.client, self.model, self.version = client, model, version
        self.max_outage_s = max_outage_s
        self.initial_backoff_s, self.max_backoff_s = initial_backoff_s, max_backoff_s
        self.probe_timeout_s = probe_timeout_s
        self._open = asyncio.Event()
        self._open.set()
        self._failed: OutageError | None = None
        self._probe: asyncio.Task[None] | None = None
        #: Number of outages ridden out, and their total length in seconds.
        self.outages = 0
        self.outage_s = 0.0

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """``await fn()``, again after each outage, until it answers or the limit passes.

        Raises :class:`OutageError` once an outage outlasts ``max_outage_s``; any other
        error of ``fn`` propagates unchanged.
        """
        while True:
            await self._open.wait()
            if self._failed is not None:
                raise self._failed
            try:
                return await fn()
            except InferenceServerError as exc:
                # A port that answers plain HTTP (the metrics port) is a wrong address, not
                # an outage: waiting for it to become a gRPC server would be pointless.
                if exc.code not in OUTAGE_CODES or NOT_GRPC in exc.message:
                    raise
                self._close(exc)

    def _close(self, exc: InferenceServerError) -> None:
        if not self._open.is_set():
            return  # another worker saw it first; the probe is already running
        self._open.clear()
        log.info("server %s unavailable (%s: %s); pausing all requests until it is ready "
                 "(up to %g s, --max-outage)", self.client.url, exc.code.name, exc.message,
                 self.max_outage_s)
        self._probe = asyncio.create_task(self._wait_until_ready(str(exc)))

    async def _wait_until_ready(self, first_error: str) -> None:
        start = time.monotonic()
        deadline = start + self.max_outage_s
        backoff, warned, last = self.initial_backoff_s, False, first_error
        while True:
            now = time.monotonic()
            if now >= deadline:
                self._failed = OutageError(
                    f"server {self.client.url} was unavailable for more than "
                    f"{self.max_outage_s:g} s (--max-outage); last error: {last}")
                break
            await asyncio.sleep(min(random.uniform(backoff / 2, backoff), deadline - now))
            backoff = min(self.max_backoff_s, backoff * 2)
            try:
                if await asyncio.wait_for(self.client.model_ready(self.model, self.version),
                                          self.probe_timeout_s):
                    break
                last = f"model '{self.model}' is not ready"
            except InferenceServerError as exc:
                last = str(exc)
            except TimeoutError:
                last = f"no answer to a readiness check within {self.probe_timeout_s:g} s"
            if not warned and time.monotonic() - start > WARN_AFTER_S:
                warned = True
                log.warning("server %s still unavailable after %.0f s (%s); waiting up to "
                            "%g s in all", self.client.url, time.monotonic() - start, last,
                            self.max_outage_s)
        elapsed = time.monotonic() - start
        self.outages += 1
        self.outage_s += elapsed
        if self._failed is None:
            log.info("server %s ready again after %.1f s; resuming", self.client.url, elapsed)
        self._open.set()
