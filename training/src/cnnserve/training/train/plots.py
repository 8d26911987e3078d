"""PNG figures of a training run: loss/accuracy curves and the test confusion matrix.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot, no display,
no global figure state), so plotting works on a headless machine and in threads.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

if TYPE_CHECKING:
    from cnnserve.training.train.trainer import EpochStats


def plot_training_curve(history: Sequence[EpochStats], path: Path,
                        best_epoch: int | None = None) -> None:
    """Write train/validation loss (left) and accuracy (right) per epoch to PNG ``path``."""
    epochs = [h.epoch for h in history]
    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    loss_ax, acc_ax = fig.subplots(1, 2)
    loss_ax.plot(epochs, [h.train_loss for h in history], "o-", label="train")
    loss_ax.plot(epochs, [h.val_loss for h in history], "o-", label="validation")
    loss_ax.set(title="Cross-entropy loss", xlabel="epoch", ylabel="loss")
    acc_ax.plot(epochs, [h.train_accuracy * 100 for h in history], "o-", label="train")
    acc_ax.plot(epochs, [h.val_accuracy * 100 for h in history], "o-", label="validation")
    acc_ax.set(title="Accuracy", xlabel="epoch", ylabel="accuracy (%)")
    for ax in (loss_ax, acc_ax):
        if best_epoch:
            ax.axvline(best_epoch, color="grey", linestyle=":", label=f"best (epoch {best_epoch})")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")


def plot_confusion_matrix(confusion: np.ndarray, class_names: Sequence[str], path: Path,
                          title: str = "Confusion matrix (test)") -> None:
    """Write the confusion matrix (rows true class, columns prediction) as PNG ``path``.

    Cells are shaded by the fraction of their row, and labelled with the count.
    """
    n = len(class_names)
    rows = confusion.sum(axis=1, keepdims=True)
    share = np.divide(confusion, rows, out=np.zeros(confusion.shape, dtype=float),
                      where=rows > 0)
    size = max(5.0, 0.6 * n + 2)
    fig = Figure(figsize=(size + 1, size), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, label="fraction of true class")
    ax.set(title=title, xlabel="predicted", ylabel="true", xticks=range(n), yticks=range(n))
    ax.set_xticklabels(class_names, rotation=45, ha="right")
    ax.set_yticklabels(class_names)
    if n <= 30:  # beyond that the numbers are unreadable anyway
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(int(confusion[i, j])), ha="center", va="center", fontsize=8,
                        color="white" if share[i, j] > 0.5 else "black")
    fig.tight_layout()
    fig.savefig(path, format="png")
