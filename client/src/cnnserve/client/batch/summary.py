"""What a batch job did: counts, throughput, request latencies, accuracy; as text or JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cnnserve.common.files import write_atomically


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
    #: Server outages ridden out, and their total length in seconds.
    outages: int = 0
    outage_s: float = 0.0
    #: Why the job stopped before the end (None: it finished).
    stopped: str | None = None
    #: Seconds spent starting or joining a Ray cluster (--engine ray), not in ``elapsed_s``.
    startup_s: float = 0.0
    #: Seconds from the start of a --engine ray job to its first finished block (actors
    #: starting, models loading), part of ``elapsed_s``.
    warmup_s: float = 0.0

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
                 "earlier"]
        if self.processed:
            lines.append(f"throughput: {self.items_per_s:.1f} items/s over "
                         f"{self.elapsed_s:.2f} s")
        elif self.stopped is None:
            lines.append("nothing to do: every item is already in the output")
        if self.latencies_s:
            lines.append(f"latency per request: p50 {self.percentile_ms(50):.1f} ms, "
                         f"p95 {self.percentile_ms(95):.1f} ms, "
                         f"p99 {self.percentile_ms(99):.1f} ms")
        if self.startup_s:
            lines.append(f"Ray start-up: {self.startup_s:.2f} s (not in the throughput); first "
                         f"block after {self.warmup_s:.2f} s (actors starting)")
        if self.outages:
            lines.append(f"server outages ridden out: {self.outages} ({self.outage_s:.1f} s)")
        if self.labelled:
            lines.append(f"accuracy: {self.correct / self.labelled:.4f} "
                         f"({self.correct}/{self.labelled} labelled items)")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """The summary as JSON-ready values; latencies in ms (null without requests)."""
        latency = ({f"p{q}": round(self.percentile_ms(q), 3) for q in (50, 95, 99)}
                   if self.latencies_s else None)
        return {"completed": self.stopped is None, "stopped": self.stopped,
                "total": self.total, "processed": self.processed, "skipped": self.skipped,
                "errors": self.errors, "earlier_errors": self.earlier_errors,
                "failed": self.failed, "elapsed_s": round(self.elapsed_s, 6),
                "items_per_s": round(self.items_per_s, 3), "requests": len(self.latencies_s),
                "latency_ms": latency, "outages": self.outages,
                "outage_s": round(self.outage_s, 3), "startup_s": round(self.startup_s, 3),
                "warmup_s": round(self.warmup_s, 3),
                "labelled": self.labelled,
                "correct": self.correct,
                "accuracy": self.correct / self.labelled if self.labelled else None}

    def write_json(self, path: Path) -> None:
        """Write :meth:`as_dict` to ``path`` atomically; raises OSError."""
        write_atomically(path, json.dumps(self.as_dict(), indent=2) + "\n")
