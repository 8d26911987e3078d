"""The batch-inference job: classify a whole dataset or folder through the server.

``cnnserve batch`` calls :func:`run_batch_job`. Items are read from the input
(:mod:`cnnserve.client.batch.sources`), sent in requests of ``batch_size`` with ``concurrency``
requests in flight, and written in input order to a JSONL or CSV file
(:mod:`cnnserve.client.batch.results`). While the server is down or restarting, every request
waits for it (:mod:`cnnserve.client.batch.outage`), up to ``max_outage`` seconds; an overloaded
server is retried with backoff; a request the server refuses for good is recorded item by
item with its error and the job goes on. Rerunning with the same output resumes: items
already written are skipped, and the file ends up byte for byte as an uninterrupted run's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence

import grpc
import numpy as np

from cnnserve.client import _infer
from cnnserve.client._model import ModelInfo
from cnnserve.client._retry import RetryPolicy
from cnnserve.client.aio import AsyncInferenceClient
from cnnserve.client.batch.outage import OutageError, OutageGate
from cnnserve.client.batch.progress import Progress
from cnnserve.client.batch.results import OutputError, Record, ResultsFile, os_reason
from cnnserve.client.batch.sources import Source, open_source
from cnnserve.client.batch.summary import Summary
from cnnserve.client.errors import InferenceServerError
from cnnserve.client.options import BatchOptions
from cnnserve.common.errors import CnnserveError

__all__ = ["BatchOptions", "Summary", "run_batch_async", "run_batch_job"]

log = logging.getLogger(__name__)

#: Retried per request with backoff: an overloaded server. A server that is down is no
#: reason to spend a request's retries: the outage gate waits for it instead.
BATCH_RETRYABLE_CODES = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED})


class _Job:
    """One run: the client, the model, the source and the output, and their counters."""

    def __init__(self, options: BatchOptions, client: AsyncInferenceClient, gate: OutageGate,
                 info: ModelInfo, source: Source, results: ResultsFile,
                 summary: Summary) -> None:
        self.options, self.client, self.gate, self.info = options, client, gate, info
        self.source, self.results, self.summary = source, results, summary

    def _truth(self, item: int) -> tuple[str | None, int | None]:
        if self.source.labels is None:
            return None, None
        index = int(self.source.labels[item])
        return self.info.label(index), index

    async def process(self, items: Sequence[int]) -> list[Record]:
        """Records for ``items`` (ids in order); failures become error records.

        Raises :class:`~cnnserve.client.batch.outage.OutageError` when the server stays
        away too long: those items get no record, so a rerun does them.
        """
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

        async def send() -> tuple[dict[str, np.ndarray], float]:
            start = time.perf_counter()
            outputs = await self.client.infer(
                info.name, {info.image_input.name: inputs}, version=self.options.model_version,
                outputs=_infer.classify_outputs(info))
            return outputs, time.perf_counter() - start

        try:
            outputs, latency_s = await self.gate.call(send)
        except InferenceServerError as exc:
            log.warning("%d items failed: %s", len(ok), exc)
            return {p: self._record(items[p], error=str(exc)) for p in ok}
        self.summary.latencies_s.append(latency_s)
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

    def write(self, records: list[Record]) -> None:
        """Append ``records``; raises :class:`OutputError` saying how to resume."""
        try:
            self.results.write(records)
        except OSError as exc:
            done = self.summary.skipped + self.summary.processed
            raise OutputError(
                f"cannot write {self.results.path}: {os_reason(exc)}. It holds the complete "
                f"records of {done} of {self.summary.total} items; make room (or make it "
                "writable) and rerun the same command to resume") from exc
        self.account(records)

    async def run(self, chunks: list[list[int]]) -> None:
        """Process chunks with ``concurrency`` in flight, writing results in input order."""
        pending: deque[asyncio.Task[list[Record]]] = deque()
        upcoming = iter(chunks)
        total = sum(len(c) for c in chunks)
        with Progress(total, what=self.info.name, enabled=self.options.progress) as progress:
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
                    self.write(records)
                    progress.update(len(records))
            finally:
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)


async def run_batch_async(options: BatchOptions) -> Summary:
    """Run the job; see :func:`run_batch_job`."""
    summary = Summary()
    start = time.perf_counter()
    try:
        await _run(options, summary)
    except OutageError as exc:
        done = summary.skipped + summary.processed
        where = (f"{done} of {summary.total} items are in {options.output}; "
                 if summary.total else "")
        summary.stopped = f"{exc}. {where}rerun the same command once the server is back"
        raise OutageError(summary.stopped) from exc
    except CnnserveError as exc:
        summary.stopped = str(exc)
        raise
    finally:
        summary.elapsed_s = time.perf_counter() - start
        if options.summary_json is not None:
            _write_summary(summary, options)
    return summary


async def _run(options: BatchOptions, summary: Summary) -> None:
    policy = RetryPolicy(retries=options.retries, codes=BATCH_RETRYABLE_CODES)
    async with AsyncInferenceClient(options.address, timeout=options.timeout,
                                    tls=options.tls_setting(), token=options.token,
                                    retries=policy) as client:
        gate = OutageGate(client, options.model, options.model_version,
                          max_outage_s=options.max_outage)
        try:
            info = await gate.call(lambda: client.model_info(options.model,
                                                             options.model_version))
        except InferenceServerError as exc:
            raise CnnserveError(str(exc)) from exc
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
            await _Job(options, client, gate, info, source, results, summary).run(chunks)
        finally:
            results.close()
            summary.outages, summary.outage_s = gate.outages, gate.outage_s


def _write_summary(summary: Summary, options: BatchOptions) -> None:
    assert options.summary_json is not None
    try:
        summary.write_json(options.summary_json)
    except OSError as exc:
        log.error("cannot write the summary to %s: %s", options.summary_json, os_reason(exc))


def run_batch_job(options: BatchOptions) -> Summary:
    """Classify every item of ``options.input`` and append the results to ``options.output``.

    Returns the :class:`Summary`; ``summary.failed`` says whether any item has an error record.
    Raises :class:`~cnnserve.common.errors.CnnserveError` when the job cannot start (the model
    is unknown, the input is missing or does not fit the model, the output file is not one
    this job wrote) or must stop: the server stayed away longer than ``max_outage`` seconds
    (:class:`~cnnserve.client.batch.outage.OutageError`) or the output cannot be written
    (:class:`~cnnserve.client.batch.results.OutputError`). A stopped job's output holds whole
    records in input order; rerunning the same job completes it. With ``engine="ray"`` the
    job runs on Ray Data instead (:func:`cnnserve.client.batch.raydata.job.run_ray_job`).
    """
    if options.engine == "ray":
        from cnnserve.client.batch.raydata.job import run_ray_job

        return run_ray_job(options)
    return asyncio.run(run_batch_async(options))
