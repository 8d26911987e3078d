"""What each Ray actor runs: a block of items in, the block's encoded part file out.

:class:`BlockPredictor` is the callable class given to ``Dataset.map_batches``: Ray creates one
per actor, which loads its model once (an ONNX Runtime session on the repository version
folder, or SDK clients of the servers) and then turns each block number it is given into the
bytes of that block's part file and its counts. Items are loaded and preprocessed exactly as
the single-machine job does (:mod:`cnnserve.client.batch.sources`, the model's own
normalisation), so predictions are the same. An item that cannot be read, or a request the
server refuses, becomes an error record; an actor that dies has its block retried by Ray.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cnnserve.client import _infer
from cnnserve.client._model import ModelInfo, ModelMetadata, TensorMetadata
from cnnserve.client.batch.raydata.blocks import Layout, encode_part
from cnnserve.client.batch.results import Record
from cnnserve.client.batch.sources import Source
from cnnserve.client.options import BatchOptions
from cnnserve.common.repository import VersionConfig

Run = Callable[[np.ndarray], dict[str, np.ndarray]]


def info_from_config(config: VersionConfig, version: str) -> ModelInfo:
    """The :class:`ModelInfo` a server would publish for this config.json."""
    def tensors(specs: Any) -> tuple[TensorMetadata, ...]:
        return tuple(TensorMetadata(t.name, t.datatype, tuple(t.shape)) for t in specs)

    norm = config.normalization
    return ModelInfo(ModelMetadata(config.name, (version,), config.platform,
                                   tensors(config.inputs), tensors(config.outputs)),
                     config.max_batch_size, tuple(config.labels),
                     None if norm is None else tuple(norm.mean),
                     None if norm is None else tuple(norm.std))


@dataclass(frozen=True)
class Task:
    """Everything an actor needs, sent once when it starts."""

    source: Source
    info: ModelInfo
    layout: Layout
    options: BatchOptions
    #: The repository version folder (in-process mode), or None (via servers).
    version_dir: Path | None


class BlockPredictor:
    """Ray Data callable class: ``{"block": [k, ...]}`` -> each block's part file and counts."""

    def __init__(self, task: Task) -> None:
        self.task = task
        self.run: Run = (_onnx_runner(task) if task.version_dir is not None
                         else _server_runner(task))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [self._block(int(k)) for k in batch["block"]]
        # bytes as objects: a numpy bytes column would drop their trailing zero bytes
        return {name: np.array([r[name] for r in rows],
                               dtype=object if isinstance(rows[0][name], bytes) else None)
                for name in rows[0]} if rows else {}

    def _block(self, block: int) -> dict[str, Any]:
        t = self.task
        positions = list(t.layout.items(block))
        records: list[Record] = []
        latencies: list[float] = []
        size = t.options.batch_size
        for start in range(0, len(positions), size):
            chunk = positions[start:start + size]
            records.extend(classify_chunk(t.source, t.info, chunk, self.run,
                                          t.options.top_k, latencies))
        errors = sum(r.error is not None for r in records)
        judged = [r.correct for r in records if r.correct is not None]
        return {"block": block,
                "data": encode_part(records, t.layout.fmt, header=block == 0),
                "items": len(records), "errors": errors, "labelled": len(judged),
                "correct": sum(judged),
                "latencies": np.asarray(latencies, np.float64).tobytes()}


def classify_chunk(source: Source, info: ModelInfo, items: Sequence[int], run: Run,
                   top_k: int, latencies: list[float]) -> list[Record]:
    """Records of ``items``, in order; unreadable items and failed runs become error records."""
    def record(item: int, top: tuple[tuple[str, int, float], ...] = (),
               error: str | None = None) -> Record:
        truth = None if source.labels is None else int(source.labels[item])
        return Record(source.ids[item], top, None if truth is None else info.label(truth),
                      truth, error)

    from cnnserve.client.batch.outage import OutageError

    try:
        loaded = source.load(items, info)
    except Exception as exc:  # an unreadable array: fail these items, not the block
        return [record(i, error=f"{type(exc).__name__}: {exc}") for i in items]
    out: dict[int, Record] = {p: record(items[p], error=e) for p, e in loaded.errors.items()}
    if loaded.ok:
        start = time.perf_counter()
        try:
            outputs = run(loaded.inputs)
        except OutageError:
            raise  # not the items' fault: the block fails and a rerun redoes it
        except Exception as exc:  # refused by the server or by ONNX Runtime, for good
            out.update({p: record(items[p], error=str(exc)) for p in loaded.ok})
        else:
            latencies.append(time.perf_counter() - start)
            order, probs = _infer.rank(info, outputs, top_k)
            for p, row, prow in zip(loaded.ok, order, probs, strict=True):
                out[p] = record(items[p], tuple((info.label(int(i)), int(i), float(q))
                                                for i, q in zip(row, prow, strict=True)))
    return [out[p] for p in range(len(items))]


def _onnx_runner(task: Task) -> Run:
    import onnxruntime as ort  # in the actor only: the client never imports it otherwise

    assert task.version_dir is not None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = task.options.ray_threads
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(task.version_dir / "model.onnx"), opts,
                                   providers=["CPUExecutionProvider"])
    info = task.info
    names = _infer.classify_outputs(info)

    def run(inputs: np.ndarray) -> dict[str, np.ndarray]:
        results = session.run(names, {info.image_input.name: inputs})
        return dict(zip(names, results, strict=True))

    return run


def _server_runner(task: Task) -> Run:
    """Requests through the SDK, spread over the servers; an outage is waited out.

    While every server answers UNAVAILABLE the actor waits with backoff up to
    ``--max-outage`` seconds, then fails the block, which Ray retries and a rerun redoes.
    """
    import grpc

    from cnnserve.client._retry import RetryPolicy
    from cnnserve.client.batch.outage import OUTAGE_CODES, OutageError
    from cnnserve.client.errors import InferenceServerError
    from cnnserve.client.sync import InferenceClient

    o, info = task.options, task.info
    policy = RetryPolicy(retries=o.retries,
                         codes=frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED}))
    clients = [InferenceClient(url, timeout=o.timeout, tls=o.tls_setting(), token=o.token,
                               retries=policy) for url in o.url]
    names = _infer.classify_outputs(info)
    turn = random.randrange(len(clients))

    def run(inputs: np.ndarray) -> dict[str, np.ndarray]:
        nonlocal turn
        deadline, backoff = time.monotonic() + o.max_outage, 0.1
        while True:
            turn = (turn + 1) % len(clients)
            try:
                return clients[turn].infer(info.name, {info.image_input.name: inputs},
                                           version=o.model_version, outputs=names)
            except InferenceServerError as exc:
                if exc.code not in OUTAGE_CODES:
                    raise
                if time.monotonic() > deadline:
                    raise OutageError(f"no server of {', '.join(o.url)} answered for more "
                                      f"than {o.max_outage:g} s (--max-outage); last error: "
                                      f"{exc}") from exc
                if turn == len(clients) - 1:  # every server tried: wait before the next round
                    time.sleep(random.uniform(backoff / 2, backoff))
                    backoff = min(2.0, backoff * 2)

    return run
