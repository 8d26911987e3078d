"""The Ray job's output folder: one part file per block of items, and what resume reads.

The input's items (in the single-machine job's order) are cut into blocks of ``block_size``;
block ``k`` always holds the same items, whatever was done before, and its records go to
``part-<k>.<format>``, written atomically once the whole block is done. So a part file that
exists is complete, a rerun skips those blocks, and no item is ever written twice. For JSONL
and CSV (header in part 0 only), the parts concatenated in name order are byte for byte the
file ``--engine local`` writes. ``_job.json`` records what the folder holds, so a rerun with
another input, model, format or block size is refused instead of mixing results.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnserve.client.batch.results import (
    CSV_FIELDS,
    OutputError,
    Record,
    Resumed,
    format_header,
    format_record,
    os_reason,
)
from cnnserve.client.options import Format
from cnnserve.common.errors import CnnserveError
from cnnserve.common.files import write_atomically

MANIFEST = "_job.json"


@dataclass(frozen=True)
class Layout:
    """Where block ``k``'s records go, and which items it holds."""

    folder: Path
    fmt: Format
    block_size: int
    total: int

    @property
    def blocks(self) -> int:
        """Number of blocks (the last one may be short)."""
        return math.ceil(self.total / self.block_size)

    def part(self, block: int) -> Path:
        """The part file of ``block``, e.g. ``part-00003.jsonl``."""
        return self.folder / f"part-{block:05d}.{self.fmt}"

    def items(self, block: int) -> range:
        """Positions (into the input's items) of ``block``."""
        return range(block * self.block_size, min(self.total, (block + 1) * self.block_size))


def prepare(layout: Layout, identity: dict[str, Any]) -> set[int]:
    """Create the folder and its manifest, or check that they describe this job.

    Returns the blocks already finished. Raises :class:`CnnserveError` when the folder holds
    another job, :class:`OutputError` when it cannot be created or read.
    """
    manifest = layout.folder / MANIFEST
    try:
        if layout.folder.exists() and not layout.folder.is_dir():
            raise OutputError(f"--output {layout.folder} must be a folder with --engine ray; "
                              "it is a file")
        layout.folder.mkdir(parents=True, exist_ok=True)
        if manifest.exists():
            earlier = json.loads(manifest.read_text())
            if earlier != identity:
                changed = sorted(k for k in identity if earlier.get(k) != identity[k])
                raise CnnserveError(f"{layout.folder} holds the output of another job "
                                    f"({', '.join(changed)} differ: {earlier}); rerun with the "
                                    "same flags or choose another --output")
        else:
            write_atomically(manifest, json.dumps(identity, indent=2, sort_keys=True) + "\n")
        return {k for k in range(layout.blocks) if layout.part(k).exists()}
    except OSError as exc:
        raise OutputError(f"cannot use {layout.folder} as the output: {os_reason(exc)}") from exc


def encode_part(records: Sequence[Record], fmt: Format, *, header: bool) -> bytes:
    """The bytes of one part file: JSONL/CSV lines (CSV header if ``header``) or Parquet."""
    if fmt == "parquet":
        return _parquet(records)
    text = (format_header(fmt) if header else "") + "".join(format_record(r, fmt)
                                                           for r in records)
    return text.encode("utf-8")


def _parquet(records: Sequence[Record]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    ok = [r.error is None for r in records]
    table = pa.table({
        "id": [r.id for r in records],
        "label": [r.top_k[0][0] if good else None for r, good in zip(records, ok, strict=True)],
        "index": pa.array([r.top_k[0][1] if good else None
                           for r, good in zip(records, ok, strict=True)], pa.int64()),
        "probability": pa.array([r.top_k[0][2] if good else None
                                 for r, good in zip(records, ok, strict=True)], pa.float64()),
        "top_k_labels": pa.array([[t[0] for t in r.top_k] for r in records],
                                 pa.list_(pa.string())),
        "top_k_indices": pa.array([[t[1] for t in r.top_k] for r in records],
                                  pa.list_(pa.int64())),
        "top_k_probabilities": pa.array([[t[2] for t in r.top_k] for r in records],
                                        pa.list_(pa.float64())),
        "true_label": pa.array([r.true_label for r in records], pa.string()),
        "true_index": pa.array([r.true_index for r in records], pa.int64()),
        "error": pa.array([r.error for r in records], pa.string()),
    })
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def read_finished(layout: Layout, blocks: set[int]) -> Resumed:
    """Ids, errors and accuracy of the records in the finished ``blocks``' part files."""
    resumed = Resumed()
    for block in sorted(blocks):
        try:
            for rid, error, correct in _records(layout, block):
                resumed.done.add(rid)
                resumed.errors += error
                if correct is not None:
                    resumed.labelled += 1
                    resumed.correct += correct
        except OSError as exc:
            raise OutputError(f"cannot read {layout.part(block)}: {os_reason(exc)}") from exc
    return resumed


def _records(layout: Layout, block: int) -> list[tuple[str, bool, bool | None]]:
    path = layout.part(block)
    if layout.fmt == "parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path, columns=["id", "index", "true_index", "error"]).to_pydict()
        return [(rid, err is not None, None if err is not None or truth is None
                 else index == truth)
                for rid, index, truth, err in zip(table["id"], table["index"],
                                                  table["true_index"], table["error"],
                                                  strict=True)]
    lines = path.read_text(encoding="utf-8").splitlines()
    if layout.fmt == "jsonl":
        out = []
        for line in lines:
            data = json.loads(line)
            error = "error" in data
            truth = data.get("true_index")
            out.append((str(data["id"]), error,
                        None if truth is None or error else data["index"] == truth))
        return out
    rows = [dict(zip(CSV_FIELDS, row, strict=True))
            for row in csv.reader(lines[1:] if block == 0 else lines)]
    return [(r["id"], bool(r["error"]), None if r["error"] or not r["true_label"]
             else r["label"] == r["true_label"]) for r in rows]
