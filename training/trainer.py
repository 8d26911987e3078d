"""The training loop: Adam (or SGD) + cross-entropy, validation each epoch, best-epoch weights.

Read :func:`train` top to bottom: load the data and normalise it once into float32 tensors,
build the network from its spec, then per epoch shuffle (on every device), optionally
augment, step the optimizer, validate, keep the best validation weights, and save a
resumable checkpoint. The test split is touched once, at the end, with the best weights.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from cnnserve.datasets import Dataset, load_dataset
from cnnserve.preprocess import channel_stats
from cnnserve.training.checkpoint import Checkpoint
from cnnserve.training.config import TrainConfig
from cnnserve.training.data import augment_batch, predict_logits, to_tensor
from cnnserve.training.model import build_network
from cnnserve.training.progress import Progress
from cnnserve.training.spec import format_spec, parse_spec, resolve_arch

logger = logging.getLogger(__name__)

#: --augment per dataset: (max shift in px, horizontal flips). Clothes survive a mirror,
#: digits do not; Fashion-MNIST items are centred, so they get a smaller shift than digits.
AUGMENT_POLICY: dict[str, tuple[int, bool]] = {"fashion-mnist": (1, True), "mnist": (2, False)}

__all__ = ["EpochStats", "TrainConfig", "TrainResult", "resume_config", "run_epoch", "train"]


@dataclass(frozen=True)
class EpochStats:
    """Figures of one epoch; losses are mean cross-entropy, accuracies fractions in [0, 1]."""

    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    lr: float
    seconds: float


@dataclass
class TrainResult:
    """What :func:`train` produced: the best-epoch checkpoint and the figures behind it."""

    checkpoint: Checkpoint
    history: list[EpochStats]
    best_epoch: int
    test_loss: float
    test_predictions: np.ndarray
    test_labels: np.ndarray
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)


def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
    logits = predict_logits(model, x)
    loss = float(nn.functional.cross_entropy(logits, y)) if len(y) else float("nan")
    return loss, logits.argmax(dim=1)


def make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Adam (default) or SGD with momentum, per ``config``."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def make_scheduler(config: TrainConfig,
                   opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The per-epoch learning-rate schedule of ``config`` (None for "none")."""
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.epochs)
    if config.schedule == "step":
        step = config.step_size or max(1, config.epochs // 3)
        return torch.optim.lr_scheduler.StepLR(opt, step_size=step, gamma=config.gamma)
    return None


def run_epoch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer,
              batch_size: int, generator: torch.Generator, progress: Progress,
              augment: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[float, float]:
    """One pass over the training data in a fresh random order; returns (mean loss, accuracy)."""
    model.train()
    # Shuffle every epoch on every device (pytorch/examples only did it on accelerators).
    order = torch.randperm(len(x), generator=generator)
    total_loss, correct, seen = 0.0, 0, 0
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        xb, yb = x[idx], y[idx]
        if augment is not None:
            xb = augment(xb)
        opt.zero_grad(set_to_none=True)
        logits = model(xb)
        loss = nn.functional.cross_entropy(logits, yb)
        torch.autograd.backward(loss)
        opt.step()
        total_loss += loss.item() * len(idx)
        correct += int((logits.argmax(dim=1) == yb).sum())
        seen += len(idx)
        progress.batch(len(idx), loss=total_loss / seen, acc=correct / seen)
    return total_loss / seen, correct / seen


@dataclass
class _Best:
    epoch: int = 0
    accuracy: float = -1.0
    loss: float = float("inf")
    weights: dict[str, torch.Tensor] = field(default_factory=dict)

    def offer(self, stats: EpochStats, model: nn.Module) -> bool:
        """Keep ``model``'s weights if this epoch beats the best (accuracy, then loss)."""
        if (stats.val_accuracy, -stats.val_loss) <= (self.accuracy, -self.loss):
            return False
        self.epoch, self.accuracy, self.loss = stats.epoch, stats.val_accuracy, stats.val_loss
        self.weights = copy.deepcopy(model.state_dict())
        return True


def train(config: TrainConfig, *, dataset: Dataset | None = None,
          resume: Checkpoint | None = None, progress: Progress | None = None,
          on_epoch: Callable[[Checkpoint], None] | None = None) -> TrainResult:
    """Train per ``config`` and return the best-validation-epoch model and its figures.

    ``dataset`` skips loading by name; ``resume`` continues from a checkpoint's train_state
    (same recipe, up to ``config.epochs``); ``on_epoch`` receives a resumable checkpoint after
    every epoch (the CLI saves it). Raises SpecError before training if the architecture
    does not fit the data, DatasetError for data problems.
    """
    progress = progress or Progress(enabled=False)
    torch.manual_seed(config.seed)
    arch_name, spec_text = resolve_arch(config.arch)
    layers = parse_spec(spec_text)
    data = dataset or load_dataset(config.dataset, seed=config.seed,
                                   val_fraction=config.val_fraction, download=config.download)
    model = build_network(layers, data.input_shape, len(data.class_names))
    mean, std = channel_stats(data.train.images)  # training split only: no leakage
    x_train, y_train = to_tensor(data.train.images, mean, std), torch.from_numpy(data.train.labels)
    x_val, y_val = to_tensor(data.val.images, mean, std), torch.from_numpy(data.val.labels)
    opt = make_optimizer(config, model)
    sched = make_scheduler(config, opt)
    gen = torch.Generator().manual_seed(config.seed)
    history: list[EpochStats] = []
    best, elapsed = _Best(), 0.0
    if resume is not None:
        history, elapsed = _restore(resume, model, opt, sched, gen, best)
        _stretch_cosine(sched, opt, config.epochs)
    background = torch.tensor([-m / s for m, s in zip(mean, std, strict=True)])
    shift, flip = AUGMENT_POLICY.get(data.name, (max(1, min(data.input_shape[1:]) // 16), False))
    augment = ((lambda xb: augment_batch(xb, background, flip, gen, shift))
               if config.augment else None)
    meta = Checkpoint(spec=format_spec(layers), input_shape=data.input_shape,
                      class_names=data.class_names, mean=mean, std=std, dataset=data.name,
                      metrics={}, state_dict={})
    started = time.monotonic() - elapsed
    progress.start(config.epochs, len(history))
    for epoch in range(len(history) + 1, config.epochs + 1):
        t0 = time.monotonic()
        lr = float(opt.param_groups[0]["lr"])
        progress.start_epoch(epoch, len(x_train))
        train_loss, train_acc = run_epoch(model, x_train, y_train, opt, config.batch_size, gen,
                                          progress, augment)
        val_loss, val_pred = _evaluate(model, x_val, y_val)
        if sched is not None:
            sched.step()
        stats = EpochStats(epoch, train_loss, train_acc, val_loss,
                           float((val_pred == y_val).float().mean()), lr, time.monotonic() - t0)
        history.append(stats)
        improved = best.offer(stats, model)
        progress.end_epoch(stats, improved)
        if on_epoch is not None:
            state = _train_state(config, model, opt, sched, gen, history, best,
                                 time.monotonic() - started)
            on_epoch(replace(meta, metrics=_summary(arch_name, history, best, None),
                             state_dict=best.weights, train_state=state))
    progress.close()
    # The resumable state holds the last epoch's weights; the checkpoint serves the best.
    state = _train_state(config, model, opt, sched, gen, history, best, 0.0)
    if best.weights:
        model.load_state_dict(best.weights)
    x_test, y_test = to_tensor(data.test.images, mean, std), torch.from_numpy(data.test.labels)
    test_loss, test_pred = _evaluate(model, x_test, y_test)
    test_acc = float((test_pred == y_test).float().mean())
    seconds = state["elapsed_seconds"] = time.monotonic() - started
    ckpt = replace(meta, metrics=_summary(arch_name, history, best, test_acc, seconds),
                   state_dict=copy.deepcopy(model.state_dict()), train_state=state)
    return TrainResult(ckpt, history, best.epoch, test_loss, test_pred.numpy(),
                       data.test.labels, seconds, {"arch_name": arch_name})


def _train_state(config: TrainConfig, model: nn.Module, opt: torch.optim.Optimizer,
                 sched: torch.optim.lr_scheduler.LRScheduler | None, gen: torch.Generator,
                 history: list[EpochStats], best: _Best, elapsed: float) -> dict[str, Any]:
    """Everything --resume needs, as plain values and tensors (loadable with weights_only)."""
    return {
        "config": asdict(config),
        "epoch": len(history),
        "history": [asdict(h) for h in history],
        "model": copy.deepcopy(model.state_dict()),
        "optimizer": copy.deepcopy(opt.state_dict()),
        "scheduler": None if sched is None else sched.state_dict(),
        "generator": gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "best_epoch": best.epoch, "best_val_accuracy": best.accuracy,
        "best_val_loss": best.loss,
        "elapsed_seconds": elapsed,
    }


def _restore(ckpt: Checkpoint, model: nn.Module, opt: torch.optim.Optimizer,
             sched: torch.optim.lr_scheduler.LRScheduler | None, gen: torch.Generator,
             best: _Best) -> tuple[list[EpochStats], float]:
    """Load a checkpoint's train_state into the fresh objects; returns (history, elapsed s)."""
    from cnnserve.training.checkpoint import CheckpointError

    state = ckpt.train_state
    if not state:
        raise CheckpointError("this checkpoint has no training state to resume from")
    try:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if sched is not None and state.get("scheduler"):
            sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        history = [EpochStats(**h) for h in state["history"]]
        best.epoch, best.accuracy = int(state["best_epoch"]), float(state["best_val_accuracy"])
        best.loss = float(state["best_val_loss"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot resume: the checkpoint's training state does not fit "
                              f"this recipe ({exc})") from exc
    best.weights = copy.deepcopy(ckpt.state_dict)
    return history, float(state.get("elapsed_seconds", 0.0))


def _stretch_cosine(sched: torch.optim.lr_scheduler.LRScheduler | None,
                    opt: torch.optim.Optimizer, epochs: int) -> None:
    """Re-plan a resumed cosine schedule for a new total of ``epochs``.

    The scheduler updates the rate recursively from its current value, so a finished run
    (rate 0) would stay at 0; instead set the rate the new plan has at this epoch.
    """
    if not isinstance(sched, torch.optim.lr_scheduler.CosineAnnealingLR) \
            or sched.T_max == epochs:
        return
    sched.T_max = epochs
    progress = math.cos(math.pi * sched.last_epoch / epochs)
    for group, base in zip(opt.param_groups, sched.base_lrs, strict=True):
        group["lr"] = sched.eta_min + (base - sched.eta_min) * (1 + progress) / 2


def resume_config(ckpt: Checkpoint, epochs: int | None) -> TrainConfig:
    """The recipe stored in ``ckpt``'s train_state, with ``epochs`` (new total) if given."""
    from cnnserve.training.checkpoint import CheckpointError

    if not ckpt.train_state or "config" not in ckpt.train_state:
        raise CheckpointError("this checkpoint has no training state to resume from")
    config = TrainConfig(**ckpt.train_state["config"])
    return config if epochs is None else replace(config, epochs=epochs)


def _summary(arch_name: str, history: list[EpochStats], best: _Best,
             test_accuracy: float | None, seconds: float | None = None) -> dict[str, Any]:
    """The short metrics stored inside the checkpoint (metrics.json has the full set)."""
    out: dict[str, Any] = {"arch": arch_name, "epochs": len(history), "best_epoch": best.epoch,
                           "val_accuracy": best.accuracy}
    if test_accuracy is not None:
        out["test_accuracy"] = test_accuracy
    if seconds is not None:
        out["training_seconds"] = seconds
    return out
