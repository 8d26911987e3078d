"""The files and the summary a training run leaves behind.

``<out>/checkpoint.pt`` (saved by the CLI after every epoch and at the end),
``metrics.json``, ``training_curve.png`` and ``confusion_matrix.png``.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from cnnserve.training.train.evaluate import confusion_matrix, per_class_accuracy
from cnnserve.training.train.trainer import TrainConfig, TrainResult

CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.json"
CURVE_FILE = "training_curve.png"
CONFUSION_FILE = "confusion_matrix.png"


def versions() -> dict[str, str]:
    """Versions of the software that produced a result (for reproducibility)."""
    import torch

    from cnnserve.common import __version__
    return {"python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "cnnserve": __version__,
            "platform": platform.platform()}


def build_metrics(result: TrainResult, config: TrainConfig,
                  args: dict[str, Any] | None = None) -> dict[str, Any]:
    """The metrics.json content: per-epoch figures, test accuracy overall and per class,
    the confusion matrix, time, versions, seed and the arguments of the run."""
    ckpt = result.checkpoint
    n = len(ckpt.class_names)
    cm = confusion_matrix(result.test_labels, result.test_predictions, n)
    per_class = per_class_accuracy(cm)
    test_acc = float((result.test_predictions == result.test_labels).mean())
    return {
        "dataset": ckpt.dataset,
        "arch": result.info.get("arch_name", ""),
        "spec": ckpt.spec,
        "input_shape": list(ckpt.input_shape),
        "class_names": list(ckpt.class_names),
        "normalization": {"mean": list(ckpt.mean), "std": list(ckpt.std)},
        "epochs": [asdict(h) for h in result.history],
        "best_epoch": result.best_epoch,
        "best_val_accuracy": ckpt.metrics.get("val_accuracy"),
        "test_accuracy": test_acc,
        "test_loss": result.test_loss,
        "test_images": len(result.test_labels),
        "per_class_accuracy": dict(zip(ckpt.class_names, per_class, strict=True)),
        "confusion_matrix": cm.tolist(),
        "training_seconds": result.seconds,
        "seed": config.seed,
        "config": asdict(config),
        "args": args or {},
        "versions": versions(),
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON atomically (temporary file + rename)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, default=str)
            fh.write("\n")
        Path(tmp).chmod(0o644)  # mkstemp creates 0600
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_outputs(result: TrainResult, config: TrainConfig, out_dir: Path,
                  args: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the checkpoint, metrics.json and both plots into ``out_dir``; return the metrics."""
    from cnnserve.training.train.checkpoint import save_checkpoint
    from cnnserve.training.train.plots import plot_confusion_matrix, plot_training_curve

    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = build_metrics(result, config, args)
    save_checkpoint(result.checkpoint, out_dir / CHECKPOINT_FILE)
    write_json(out_dir / METRICS_FILE, metrics)
    plot_training_curve(result.history, out_dir / CURVE_FILE, result.best_epoch)
    plot_confusion_matrix(np.asarray(metrics["confusion_matrix"]), result.checkpoint.class_names,
                          out_dir / CONFUSION_FILE)
    return metrics


def format_summary(metrics: dict[str, Any], out_dir: Path) -> str:
    """The end-of-run table: one row per epoch, then test accuracy and the output files."""
    best = metrics["best_epoch"]
    lines = [f"{'epoch':>5}  {'train loss':>10}  {'train acc':>9}  {'val loss':>8}  "
             f"{'val acc':>7}  {'lr':>8}  {'seconds':>7}"]
    for e in metrics["epochs"]:
        lines.append(f"{e['epoch']:>5}  {e['train_loss']:>10.4f}  {e['train_accuracy']:>9.2%}  "
                     f"{e['val_loss']:>8.4f}  {e['val_accuracy']:>7.2%}  {e['lr']:>8.2e}  "
                     f"{e['seconds']:>7.1f}" + ("  <- best" if e["epoch"] == best else ""))
    lines += ["",
              f"model       {metrics['arch']} on {metrics['dataset']} "
              f"({'x'.join(map(str, metrics['input_shape']))}, "
              f"{len(metrics['class_names'])} classes)",
              f"best epoch  {best} (validation accuracy {metrics['best_val_accuracy']:.2%})",
              f"test        accuracy {metrics['test_accuracy']:.2%} on "
              f"{metrics['test_images']} images",
              f"time        {metrics['training_seconds']:.1f} s",
              f"outputs     {out_dir / CHECKPOINT_FILE}, {METRICS_FILE}, {CURVE_FILE}, "
              f"{CONFUSION_FILE}"]
    return "\n".join(lines)
