"""Progress display for training: tqdm bars for epochs and batches, or one log line per epoch.

Bars go to stderr and only when it is a terminal (logs of a batch job stay readable); when
bars are off, each epoch is still reported through ``report`` unless that is None (--quiet).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cnnserve.training.train.trainer import EpochStats


class Progress:
    """Epoch and batch progress; every method is a no-op when nothing is shown."""

    def __init__(self, enabled: bool = False,
                 report: Callable[[str], None] | None = None) -> None:
        self.enabled = enabled
        self.report = report
        self._epochs: Any = None
        self._batches: Any = None

    @classmethod
    def for_terminal(cls, quiet: bool) -> Progress:
        """Bars if stderr is a tty and not ``quiet``; otherwise epoch lines unless ``quiet``."""
        bars = not quiet and sys.stderr.isatty()
        return cls(enabled=bars, report=None if quiet else _stderr)

    def start(self, total_epochs: int, done: int) -> None:
        """Begin the run: ``done`` of ``total_epochs`` epochs are already complete (resume)."""
        if self.enabled:
            from tqdm import tqdm

            self._epochs = tqdm(total=total_epochs, initial=done, desc="epochs", unit="epoch",
                                file=sys.stderr, dynamic_ncols=True)

    def start_epoch(self, epoch: int, items: int) -> None:
        """Begin epoch ``epoch`` over ``items`` training images."""
        if self.enabled:
            from tqdm import tqdm

            self._batches = tqdm(total=items, desc=f"epoch {epoch}", unit="img", leave=False,
                                 file=sys.stderr, dynamic_ncols=True)

    def batch(self, items: int, *, loss: float, acc: float) -> None:
        """Advance by one batch of ``items`` images; show the running loss and accuracy."""
        if self._batches is not None:
            self._batches.update(items)
            self._batches.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.4f}", refresh=False)

    def end_epoch(self, stats: EpochStats, improved: bool) -> None:
        """Close the batch bar and show the epoch's figures (``improved``: new best val)."""
        if self._batches is not None:
            self._batches.close()
            self._batches = None
        line = (f"epoch {stats.epoch}: train loss {stats.train_loss:.4f} acc "
                f"{stats.train_accuracy:.4f} | val loss {stats.val_loss:.4f} acc "
                f"{stats.val_accuracy:.4f} | lr {stats.lr:.2e} | {stats.seconds:.1f} s"
                + (" *" if improved else ""))
        if self._epochs is not None:
            self._epochs.update(1)
            self._epochs.write(line, file=sys.stderr)
        elif self.report is not None:
            self.report(line)

    def close(self) -> None:
        """Close any open bar."""
        for bar in (self._batches, self._epochs):
            if bar is not None:
                bar.close()
        self._batches = self._epochs = None


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
