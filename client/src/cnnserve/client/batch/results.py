"""The batch job's output file: JSONL or CSV records, written in input order, resumable.

One record per item: its id, the predicted label, class index and probability, the top-k
classes with probabilities, the true label when known, or the error that stopped it. Records
are appended in input order and flushed after each batch, so a job killed at any moment
leaves complete records plus at most one partial line; :meth:`ResultsFile.resume` drops
that line and reports which ids are done, so a rerun skips them and appends the rest:
no lost work, no duplicates, and the same bytes as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cnnserve.client.options import Format
from cnnserve.common.errors import CnnserveError
from cnnserve.common.files import FILE_MODE, write_atomically

CSV_FIELDS = ("id", "label", "index", "probability", "top_k", "true_label", "error")
#: Digits kept of each probability: enough to rank, few enough to be stable across runs.
PROBABILITY_DIGITS = 6


@dataclass(frozen=True)
class Record:
    """One item's result: ``top_k`` is ``(label, index, probability)`` best first."""

    id: str
    top_k: tuple[tuple[str, int, float], ...] = ()
    true_label: str | None = None
    true_index: int | None = None
    error: str | None = None

    @property
    def correct(self) -> bool | None:
        """Whether the prediction matches the true class; None when either is unknown."""
        if self.error is not None or self.true_index is None or not self.top_k:
            return None
        return self.top_k[0][1] == self.true_index


def _one_line(text: str) -> str:
    """Text safe for one CSV line: no line breaks, no lone surrogates (odd file names)."""
    # Records are one line each: resume reads the file line by line.
    flat = text.replace("\r\n", " ").replace("\n", " ").replace("\r", " ")
    return flat.encode("utf-8", "backslashreplace").decode("utf-8")


def format_record(record: Record, fmt: Format) -> str:
    """The record's line, newline included."""
    if fmt == "jsonl":
        data: dict[str, object] = {"id": record.id}
        if record.error is not None:
            data["error"] = _one_line(record.error)
        else:
            label, index, prob = record.top_k[0]
            data.update(label=label, index=index, probability=round(prob, PROBABILITY_DIGITS),
                        top_k=[{"label": lb, "index": i, "probability": round(p,
                                                                              PROBABILITY_DIGITS)}
                               for lb, i, p in record.top_k])
        if record.true_index is not None:
            data.update(true_label=record.true_label, true_index=record.true_index)
        # ASCII escapes keep every id (even undecodable file names) on one valid UTF-8 line.
        return json.dumps(data) + "\n"
    buf = io.StringIO()
    ok = record.error is None
    top = record.top_k[0] if ok else ("", "", "")
    csv.writer(buf, lineterminator="\n").writerow([
        _one_line(record.id), top[0], top[1],
        f"{top[2]:.{PROBABILITY_DIGITS}f}" if ok else "",
        ";".join(f"{lb}:{p:.{PROBABILITY_DIGITS}f}" for lb, _, p in record.top_k),
        record.true_label or "", _one_line(record.error or "")])
    return buf.getvalue()


@dataclass
class Resumed:
    """What an existing output file already holds."""

    done: set[str] = field(default_factory=set)
    errors: int = 0
    correct: int = 0
    labelled: int = 0


class OutputError(CnnserveError):
    """The output file cannot be read or written (read-only folder, disk full...)."""


class ResultsFile:
    """An output file opened for appending records of format ``fmt`` (``jsonl`` or ``csv``).

    Writes either append whole records or, when the system refuses them (disk full,
    read-only), leave the file as it was and raise :class:`OutputError`: the file always
    holds complete records, so a rerun resumes it.
    """

    def __init__(self, path: Path, fmt: Format) -> None:
        self.path = path
        self.fmt = fmt
        self._fd: int | None = None
        self._size = 0

    def resume(self, *, retry_failed: bool = False) -> Resumed:
        """Read what earlier runs wrote and open the file for appending.

        A partial last line (a run killed mid-write) is cut off. With ``retry_failed``,
        records of failed items are removed so those items run again. Raises
        :class:`CnnserveError` if the file is not output of this job in format ``fmt``, and
        :class:`OutputError` if it cannot be read, fixed up or opened for writing.
        """
        try:
            return self._resume(retry_failed)
        except OSError as exc:
            raise OutputError(f"cannot use {self.path} as the output: {os_reason(exc)}") from exc

    def _resume(self, retry_failed: bool) -> Resumed:
        parent = self.path.parent
        if parent.exists() and not parent.is_dir():
            raise OutputError(f"cannot use {self.path} as the output: {parent} is a file, "
                              "not a folder")
        parent.mkdir(parents=True, exist_ok=True)
        raw = self.path.read_bytes() if self.path.exists() else b""
        keep = raw[:raw.rfind(b"\n") + 1]
        lines = [line + "\n" for line in
                 keep.decode("utf-8", errors="replace").split("\n")[:-1]]
        header = format_header(self.fmt)
        if header and lines and lines[0] != header:
            raise CnnserveError(f"{self.path} exists but is not a CSV written by cnnserve batch "
                                f"(header {lines[0].strip()!r}); choose another --output")
        body = lines[1:] if header and lines else lines
        resumed, kept = Resumed(), []
        for number, line in enumerate(body, start=2 if header else 1):
            rid, error, correct = self._parse(line, number)
            if error and retry_failed:
                continue
            kept.append(line)
            resumed.done.add(rid)
            resumed.errors += error
            if correct is not None:
                resumed.labelled += 1
                resumed.correct += correct
        text = ((header or "") + "".join(kept)).encode("utf-8")
        if raw.startswith(text) and raw:
            if len(text) < len(raw):  # only a partial last line to drop: no space needed
                os.truncate(self.path, len(text))
        elif text != raw:
            write_atomically(self.path, text)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
        self._size = os.fstat(self._fd).st_size
        return resumed

    def _parse(self, line: str, number: int) -> tuple[str, bool, bool | None]:
        """(id, failed, correct) of one line; raises for a line this job did not write."""
        try:
            if self.fmt == "jsonl":
                data = json.loads(line)
                rid, error = str(data["id"]), "error" in data
                truth = data.get("true_index")
                correct = None if truth is None or error else data["index"] == truth
                return rid, error, correct
            row = next(csv.reader([line]))
            if len(row) != len(CSV_FIELDS):
                raise ValueError(f"{len(row)} fields, expected {len(CSV_FIELDS)}")
            values = dict(zip(CSV_FIELDS, row, strict=True))
            error = bool(values["error"])
            correct = (None if error or not values["true_label"]
                       else values["label"] == values["true_label"])
            return values["id"], error, correct
        except (ValueError, KeyError, TypeError) as exc:
            raise CnnserveError(f"{self.path} line {number} is not a {self.fmt} record of "
                                f"cnnserve batch ({exc}); choose another --output") from exc

    def key(self, item_id: str) -> str:
        """The id as this format stores it (CSV flattens line breaks); compare with ``done``."""
        return item_id if self.fmt == "jsonl" else _one_line(item_id)

    def write(self, records: Iterable[Record]) -> None:
        """Append ``records`` (to the operating system, not fsynced); all or none of them.

        Raises :class:`OSError` when the system refuses (disk full, read-only); the file is
        then cut back to the records it held before.
        """
        if self._fd is None:
            raise RuntimeError("call resume() before write()")
        data = memoryview("".join(format_record(r, self.fmt) for r in records).encode("utf-8"))
        written = 0
        try:
            while written < len(data):  # a full disk may take part of it before refusing
                written += os.write(self._fd, data[written:])
        except OSError:
            with contextlib.suppress(OSError):  # if this fails too, resume drops the tail
                os.ftruncate(self._fd, self._size)
            raise
        self._size += written

    @property
    def size(self) -> int:
        """Bytes in the file: whole records only."""
        return self._size

    def close(self) -> None:
        """Close the file (records already written stay)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def format_header(fmt: Format) -> str:
    """The first line of a ``csv`` file; empty for ``jsonl``."""
    if fmt != "csv":
        return ""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(CSV_FIELDS)
    return buf.getvalue()


def os_reason(exc: OSError) -> str:
    """``No space left on device`` rather than ``[Errno 28] No space left on device: 'x'``."""
    return exc.strerror or str(exc)
