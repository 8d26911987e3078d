"""The batch job's progress on stderr: a bar on a terminal, plain lines in a log."""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import IO, Any

#: Seconds between two plain progress lines.
LINE_INTERVAL_S = 10.0


class Progress:
    """Counts items done out of ``total``; shows them unless ``enabled`` is False.

    On a terminal it is a tqdm bar. Anywhere else (a log file, a pipe, a CI job) it writes a
    plain line at most every ``interval_s`` seconds and one at the end, never the carriage
    returns of a bar.
    """

    def __init__(self, total: int, *, what: str, enabled: bool = True,
                 stream: IO[str] | None = None, interval_s: float = LINE_INTERVAL_S) -> None:
        self.total, self.what, self.done = total, what, 0
        self.stream = stream if stream is not None else sys.stderr
        self.interval_s = interval_s
        self._bar: Any = None
        self._enabled = enabled and total > 0
        self._start = self._last = time.monotonic()
        if self._enabled and self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="img", file=self.stream, dynamic_ncols=True,
                             desc=what)

    def update(self, n: int) -> None:
        """Count ``n`` more items done."""
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._enabled and time.monotonic() - self._last >= self.interval_s:
            self._line()

    def _line(self) -> None:
        self._last = now = time.monotonic()
        rate = self.done / (now - self._start) if now > self._start else 0.0
        print(f"{self.what}: {self.done}/{self.total} items ({100 * self.done / self.total:.1f}%)"
              f", {rate:.1f} items/s", file=self.stream, flush=True)

    def close(self) -> None:
        """End the bar, or write the last plain line."""
        if self._bar is not None:
            self._bar.close()
        elif self._enabled and self.done:
            self._line()
        self._enabled = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
