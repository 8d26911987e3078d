"""The batch-inference job: classify a whole dataset or folder through the server.

``cnnserve batch`` calls :func:`run_batch_job`. Items are read from the input
(:mod:`cnnserve.client.batch.sources`), sent in requests of ``batch_size`` with ``concurrency``
requests in flight, and written in input order to a JSONL or CSV file
(:mod:`cnnserve.client.batch.results`). Calls retry with backoff through a server restart or
overload; a batch that still fails is recorded item by item with its error and the job goes
on. Rerunning with the same output resumes: items already written are skipped.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np

from cnnserve.client import _infer
from cnnserve.client._model import ModelInfo
from cnnserve.client._retry import RETRYABLE_CODES, RetryPolicy
from cnnserve.client.aio import AsyncInferenceClient
from cnnserve.client.batch.results import Record, ResultsFile
from cnnserve.client.batch.sources import Source, open_source
from cnnserve.client.errors import InferenceServerError
from cnnserve.client.options import BatchOptions

__all__ = ["BatchOptions", "Summary", "run_batch_async", "run_batch_job"]

log = logging.getLogger(__name__)


@dataclass
class Summary:
    """What the job did. Latencies are per request, seconds; accuracy covers the whole file."""

    total: int = 0
    skipped: int = 0
    processed: int = 0
    errors: int = 0
    earlier_errors: int = 0
    elapsed_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    correct: int = 0
    labelled: int = 0

    @property
    def failed(self) -> bool:
        """Whether any item in the output, from this run or earlier ones, is an error."""
        return self.errors + self.earlier_errors > 0

    @property
    def items_per_s(self) -> float:
        """Items processed by this run per second of its wall time."""
        return self.processed / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def percentile_ms(self, q: float) -> float:
        """Request latency percentile ``q`` (0..100) in milliseconds; 0 without requests."""
        if not self.latencies_s:
            return 0.0
        return float(np.percentile(np.asarray(self.latencies_s), q)) * 1000.0

    def format(self) -> str:
        """A few human-readable lines for the end of the job."""
        lines = [f"items: {self.total} ({self.processed} processed, {self.skipped} already in "
                 f"the output), errors: {self.errors} in this run, {self.earlier_errors} "
                 "earlier",
                 f"throughput: {self.items_per_s:.1f} items/s over {self.elapsed_s:.2f} s",
                 f"latency per request: p50 {self.percentile_ms(50):.1f} ms, "
                 f"p95 {self.percentile_ms(95):.1f} ms, p99 {self.percentile_ms(99):.1f} ms"]
        if self.labelled:
            lines.append(f"accuracy: {self.correct / self.labelled:.4f} "
                         f"({self.correct}/{self.labelled} labelled items)")
        return "\n".join(lines)


class _Job:
    """One run: the client, the model, the source and the output, and their counters."""

    def __init__(self, options: BatchOptions, client: AsyncInferenceClient, info: ModelInfo,
                 source: Source, results: ResultsFile, summary: Summary) -> None:
        self.options, self.client, self.info = options, client, info
        self.source, self.results, self.summary = source, results, summary

    def _truth(self, item: int) -> tuple[str | None, int | None]:
        if self.source.labels is None:
            return None, None
        index = int(self.source.labels[item])
        return self.info.label(index), index

    async def process(self, items: Sequence[int]) -> list[Record]:
        """Records for ``items`` (ids in order); failures become error records."""
        loop = asyncio.get_running_loop()
        try:
            loaded = await loop.run_in_executor(None, self.source.load, items, self.info)
        except Exception as exc:  # a bug or an unreadable array: fail the batch, not the job
            log.exception("loading items %d..%d failed", items[0], items[-1])
            return [self._record(i, error=f"{type(exc).__name__}: {exc}") for i in items]
        records: dict[int, Record] = {p: self._record(items[p], error=e)
                                      for p, e in loaded.errors.items()}
        if loaded.ok:
            records.update(await self._infer(items, loaded.ok, loaded.inputs))
        return [records[p] for p in range(len(items))]

    async def _infer(self, items: Sequence[int], ok: list[int],
                     inputs: np.ndarray) -> dict[int, Record]:
        info = self.info
        start = time.perf_counter()
        try:
            outputs = await self.client.infer(
                info.name, {info.image_input.name: inputs}, version=self.options.model_version,
                outputs=_infer.classify_outputs(info))
        except InferenceServerError as exc:
            log.warning("%d items failed: %s", len(ok), exc)
            return {p: self._record(items[p], error=str(exc)) for p in ok}
        self.summary.latencies_s.append(time.perf_counter() - start)
        order, probs = _infer.rank(info, outputs, self.options.top_k)
        return {p: self._record(items[p], top_k=tuple(
                    (info.label(int(i)), int(i), float(q)) for i, q in zip(row, prow, strict=True)))
                for p, row, prow in zip(ok, order, probs, strict=True)}

    def _record(self, item: int, *, top_k: tuple[tuple[str, int, float], ...] = (),
                error: str | None = None) -> Record:
        true_label, true_index = self._truth(item)
        return Record(self.source.ids[item], top_k, true_label, true_index, error)

    def account(self, records: list[Record]) -> None:
        s = self.summary
        s.processed += len(records)
        for r in records:
            s.errors += r.error is not None
            if r.correct is not None:
                s.labelled += 1
                s.correct += r.correct

    async def run(self, chunks: list[list[int]]) -> None:
        """Process chunks with ``concurrency`` in flight, writing results in input order."""
        from tqdm import tqdm

        pending: deque[asyncio.Task[list[Record]]] = deque()
        upcoming = iter(chunks)
        total = sum(len(c) for c in chunks)
        with tqdm(total=total, unit="img", file=sys.stderr, dynamic_ncols=True,
                  disable=not self.options.progress, desc=self.info.name) as bar:
            try:
                for chunk in upcoming:
                    pending.append(asyncio.create_task(self.process(chunk)))
                    if len(pending) >= self.options.concurrency:
                        break
                while pending:
                    records = await pending.popleft()
                    nxt = next(upcoming, None)
                    if nxt is not None:
                        pending.append(asyncio.create_task(self.process(nxt)))
                    self.results.write(records)
                    self.account(records)
                    bar.update(len(records))
            finally:
                for task in pending:
                    task.cancel()


#: The job never cancels its own requests, so a CANCELLED answer means the server dropped the
#: call (a restart that did not drain): worth retrying, unlike in the SDK, where CANCELLED
#: usually means the caller gave up.
BATCH_RETRYABLE_CODES = RETRYABLE_CODES | {grpc.StatusCode.CANCELLED}


def _batch_policy(retries: int | RetryPolicy) -> RetryPolicy:
    if isinstance(retries, RetryPolicy):
        return retries
    return RetryPolicy(retries=retries, codes=BATCH_RETRYABLE_CODES)


async def run_batch_async(options: BatchOptions) -> Summary:
    """Run the job; see :func:`run_batch_job`."""
    summary = Summary()
    async with AsyncInferenceClient(options.url, timeout=options.timeout, tls=options.tls_setting(),
                                    token=options.token,
                                    retries=_batch_policy(options.retries)) as client:
        info = await client.model_info(options.model, options.model_version)
        source = open_source(options.input, info)
        results = ResultsFile(options.output, options.output_format)
        resumed = results.resume(retry_failed=options.retry_failed)
        try:
            todo = [i for i, rid in enumerate(source.ids) if results.key(rid) not in resumed.done]
            summary.total = len(source.ids)
            summary.skipped = summary.total - len(todo)
            summary.earlier_errors = resumed.errors
            summary.correct, summary.labelled = resumed.correct, resumed.labelled
            chunks = [todo[i:i + options.batch_size]
                      for i in range(0, len(todo), options.batch_size)]
            start = time.perf_counter()
            await _Job(options, client, info, source, results, summary).run(chunks)
            summary.elapsed_s = time.perf_counter() - start
        finally:
            results.close()
    return summary


def run_batch_job(options: BatchOptions) -> Summary:
    """Classify every item of ``options.input`` and append the results to ``options.output``.

    Returns the :class:`Summary`; ``summary.failed`` says whether any item has an error record.
    Raises :class:`~cnnserve.common.errors.CnnserveError` when the job cannot start: the server is
    unreachable after the retries, the model is unknown, the input is missing or does not fit
    the model, or the output file is not one this job wrote.
    """
    return asyncio.run(run_batch_async(options))
