"""The training loop: Adam (or SGD) + cross-entropy, validation each epoch, best-epoch weights.

Read :func:`train` top to bottom: load the data and normalise it once into float32 tensors,
build the network from its spec, then per epoch shuffle (on every device), optionally
augment, step the optimizer, validate, keep the best validation weights, and save a
resumable checkpoint. The test split is touched once, at the end, with the best weights.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from cnnserve.common.data.datasets import Dataset, load_dataset
from cnnserve.common.data.registry import canonical_name
from cnnserve.common.preprocess import channel_stats
from cnnserve.training.train.checkpoint import Checkpoint
from cnnserve.training.train.config import TrainConfig
from cnnserve.training.train.data import augment_batch, predict_logits, to_tensor
from cnnserve.training.train.network import build_network
from cnnserve.training.train.optim import make_optimizer, make_scheduler, stretch_cosine
from cnnserve.training.train.parallel import (
    SINGLE,
    Parallel,
    all_sum,
    convert_batch_norm,
    epoch_order,
    local_batch,
    wrap,
)
from cnnserve.training.train.progress import Progress
from cnnserve.training.train.spec import (
    PRESETS,
    format_spec,
    parse_spec,
    resolve_arch,
    with_classes,
)

#: --augment per dataset: (max shift in px, horizontal flips). Clothes survive a mirror,
#: digits do not; Fashion-MNIST items are centred, so they get a smaller shift than digits.
#: CIFAR-10 gets the usual 4 px padded crops and flips (He et al.).
AUGMENT_POLICY: dict[str, tuple[int, bool]] = {"fashion-mnist": (1, True), "mnist": (2, False),
                                               "cifar10": (4, True)}


def augment_policy(name: str, shape: tuple[int, int, int]) -> tuple[int, bool]:
    """(max shift in px, flips) for dataset ``name`` of images ``shape``: the table above,
    else RGB images (photos) shift by an eighth of their size and flip, grayscale ones
    (often text or digits) shift by a sixteenth and never flip."""
    base = name.split(":")[0] if name.startswith("cifar10") else name
    if base in AUGMENT_POLICY:
        return AUGMENT_POLICY[base]
    if shape[0] == 3:
        return max(1, min(shape[1:]) // 8), True
    return max(1, min(shape[1:]) // 16), False

__all__ = ["EpochStats", "TrainConfig", "TrainResult", "resume_config", "run_epoch", "train",
           "train_rank"]


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


def run_epoch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer,
              batch_size: int, generator: torch.Generator, progress: Progress,
              augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
              order: torch.Tensor | None = None) -> tuple[float, float]:
    """One pass over the training data in a fresh random order; returns (mean loss, accuracy).

    ``order`` gives the indices to visit (this rank's shard, see
    :func:`cnnserve.training.train.parallel.epoch_order`); else a permutation from
    ``generator``."""
    model.train()
    if order is None:
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


@dataclass
class _Run:
    """Everything one training run works with, built by :func:`_setup`."""

    config: TrainConfig
    arch_name: str
    data: Dataset
    model: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler | None
    gen: torch.Generator
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    meta: Checkpoint                      # spec, shapes, labels, normalisation; no weights
    augment: Callable[[torch.Tensor], torch.Tensor] | None
    history: list[EpochStats] = field(default_factory=list)
    best: _Best = field(default_factory=_Best)
    elapsed: float = 0.0                  # seconds spent by earlier runs (resume)
    parallel: Parallel = SINGLE
    step_model: nn.Module | None = None   # what training steps call: DDP when parallel

    def checkpoint(self, weights: dict[str, torch.Tensor], seconds: float,
                   test_accuracy: float | None = None) -> Checkpoint:
        """A checkpoint with ``weights`` and a resumable state of the run so far."""
        state = _train_state(self, seconds)
        return replace(self.meta, state_dict=weights, train_state=state,
                       metrics=_summary(self.arch_name, self.history, self.best,
                                        test_accuracy, seconds, self.data.info))


def _setup(config: TrainConfig, dataset: Dataset | None, resume: Checkpoint | None,
           parallel: Parallel = SINGLE) -> _Run:
    torch.manual_seed(config.seed)
    arch_name, spec_text = resolve_arch(config.arch)
    layers = parse_spec(spec_text)
    data = dataset or load_dataset(
        canonical_name(config.dataset, config.image_hw(), config.channels), seed=config.seed,
        val_fraction=config.val_fraction, download=config.download,
        on_bad_image=config.on_bad_image)
    if config.arch in PRESETS:  # presets end in fc(10); they fit any number of classes
        layers = with_classes(layers, len(data.class_names))
    model: nn.Module = build_network(layers, data.input_shape, len(data.class_names))
    if parallel.active:  # before the optimizer: it swaps the batch-norm modules
        model = convert_batch_norm(model)
    mean, std = channel_stats(data.train.images)  # training split only: no leakage
    opt = make_optimizer(config, model)
    gen = torch.Generator().manual_seed(config.seed)
    background = torch.tensor([-m / s for m, s in zip(mean, std, strict=True)])
    shift, flip = augment_policy(data.name, data.input_shape)
    jitter = config.color_jitter if data.input_shape[0] == 3 else 0.0
    pixel_stats = (torch.tensor(mean), torch.tensor(std))
    run = _Run(
        config, arch_name, data, model, opt, make_scheduler(config, opt), gen,
        to_tensor(data.train.images, mean, std), torch.from_numpy(data.train.labels),
        to_tensor(data.val.images, mean, std), torch.from_numpy(data.val.labels),
        Checkpoint(spec=format_spec(layers), input_shape=data.input_shape,
                   class_names=data.class_names, mean=mean, std=std, dataset=data.name,
                   metrics={}, state_dict={}),
        (lambda xb: augment_batch(xb, background, flip, gen, shift, jitter=jitter,
                                  stats=pixel_stats)) if config.augment else None)
    if resume is not None:
        _restore(resume, run)
        stretch_cosine(run.sched, opt, config.epochs)
    if parallel.rank:  # augmentation draws its own numbers on every rank
        gen.manual_seed(config.seed * 1_000_003 + parallel.rank * 7919 + len(run.history))
    run.parallel, run.step_model = parallel, wrap(model, parallel)
    return run


def train(config: TrainConfig, *, dataset: Dataset | None = None,
          resume: Checkpoint | None = None, progress: Progress | None = None,
          on_epoch: Callable[[Checkpoint], None] | None = None) -> TrainResult:
    """Train per ``config`` and return the best-validation-epoch model and its figures.

    ``dataset`` skips loading by name; ``resume`` continues from a checkpoint's train_state
    (same recipe, up to ``config.epochs``); ``on_epoch`` receives a resumable checkpoint after
    every epoch (the CLI saves it). Raises SpecError before training if the architecture
    does not fit the data, DatasetError for data problems.
    """
    result = train_rank(config, dataset=dataset, resume=resume, progress=progress,
                        on_epoch=on_epoch)
    assert result is not None  # one process is rank 0
    return result


def train_rank(config: TrainConfig, *, dataset: Dataset | None = None,
               resume: Checkpoint | None = None, progress: Progress | None = None,
               on_epoch: Callable[[Checkpoint], None] | None = None,
               parallel: Parallel = SINGLE) -> TrainResult | None:
    """:func:`train` as rank ``parallel.rank`` of a data-parallel job (process group joined).

    Every rank trains on its shard of each global batch of ``config.batch_size``; rank 0
    alone validates, calls ``on_epoch`` and tests, and returns the result (the others None).
    """
    progress = progress or Progress(enabled=False)
    run = _setup(config, dataset, resume, parallel)
    assert run.step_model is not None
    batch = local_batch(config.batch_size, parallel)
    started = time.monotonic() - run.elapsed
    progress.start(config.epochs, len(run.history))
    for epoch in range(len(run.history) + 1, config.epochs + 1):
        t0 = time.monotonic()
        lr = float(run.opt.param_groups[0]["lr"])
        order = epoch_order(len(run.x_train), config.seed, epoch, parallel)
        progress.start_epoch(epoch, len(order))
        loss, acc = run_epoch(run.step_model, run.x_train, run.y_train, run.opt, batch,
                              run.gen, progress, run.augment, order)
        loss_sum, correct, seen = all_sum([loss * len(order), acc * len(order), len(order)],
                                          parallel)
        if run.sched is not None:
            run.sched.step()
        val_loss, val_acc = _validate(run)
        stats = EpochStats(epoch, loss_sum / seen, correct / seen, val_loss, val_acc, lr,
                           time.monotonic() - t0)
        run.history.append(stats)
        if parallel.is_main:
            progress.end_epoch(stats, run.best.offer(stats, run.model))
            if on_epoch is not None:
                on_epoch(run.checkpoint(run.best.weights, time.monotonic() - started))
    progress.close()
    return _finish(run, started) if parallel.is_main else None


def _validate(run: _Run) -> tuple[float, float]:
    """Validation loss and accuracy, on rank 0 only (NaN elsewhere: never saved)."""
    if not run.parallel.is_main:
        return float("nan"), float("nan")
    val_loss, val_pred = _evaluate(run.model, run.x_val, run.y_val)
    return val_loss, float((val_pred == run.y_val).float().mean())


def _finish(run: _Run, started: float) -> TrainResult:
    """Test the best epoch's weights once and package the result."""
    last = run.checkpoint({}, 0.0)  # the resumable state keeps the last epoch's weights
    if run.best.weights:
        run.model.load_state_dict(run.best.weights)
    mean, std = run.meta.mean, run.meta.std
    x_test, y_test = to_tensor(run.data.test.images, mean, std), torch.from_numpy(
        run.data.test.labels)
    test_loss, test_pred = _evaluate(run.model, x_test, y_test)
    test_acc = float((test_pred == y_test).float().mean())
    seconds = time.monotonic() - started
    assert last.train_state is not None
    last.train_state["elapsed_seconds"] = seconds
    ckpt = replace(last, state_dict=copy.deepcopy(run.model.state_dict()),
                   metrics=_summary(run.arch_name, run.history, run.best, test_acc, seconds,
                                    run.data.info))
    return TrainResult(ckpt, run.history, run.best.epoch, test_loss, test_pred.numpy(),
                       run.data.test.labels, seconds, {"arch_name": run.arch_name})


def _train_state(run: _Run, elapsed: float) -> dict[str, Any]:
    """Everything --resume needs, as plain values and tensors (loadable with weights_only)."""
    return {
        "config": asdict(run.config),
        "epoch": len(run.history),
        "history": [asdict(h) for h in run.history],
        "model": copy.deepcopy(run.model.state_dict()),
        "optimizer": copy.deepcopy(run.opt.state_dict()),
        "scheduler": None if run.sched is None else run.sched.state_dict(),
        "generator": run.gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "best_epoch": run.best.epoch, "best_val_accuracy": run.best.accuracy,
        "best_val_loss": run.best.loss,
        "elapsed_seconds": elapsed,
    }


def _restore(ckpt: Checkpoint, run: _Run) -> None:
    """Load a checkpoint's train_state into the freshly set-up ``run``."""
    from cnnserve.training.train.checkpoint import CheckpointError

    state = ckpt.train_state
    if not state:
        raise CheckpointError("this checkpoint has no training state to resume from")
    try:
        run.model.load_state_dict(state["model"])
        run.opt.load_state_dict(state["optimizer"])
        if run.sched is not None and state.get("scheduler"):
            run.sched.load_state_dict(state["scheduler"])
        run.gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        run.history = [EpochStats(**h) for h in state["history"]]
        run.best.epoch, run.best.loss = int(state["best_epoch"]), float(state["best_val_loss"])
        run.best.accuracy = float(state["best_val_accuracy"])
        run.elapsed = float(state.get("elapsed_seconds", 0.0))
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot resume: the checkpoint's training state does not fit "
                              f"this recipe ({exc})") from exc
    run.best.weights = copy.deepcopy(ckpt.state_dict)


def resume_config(ckpt: Checkpoint, epochs: int | None) -> TrainConfig:
    """The recipe stored in ``ckpt``'s train_state, with ``epochs`` (new total) if given."""
    from cnnserve.training.train.checkpoint import CheckpointError

    if not ckpt.train_state or "config" not in ckpt.train_state:
        raise CheckpointError("this checkpoint has no training state to resume from")
    config = TrainConfig(**ckpt.train_state["config"])
    return config if epochs is None else replace(config, epochs=epochs)


def _summary(arch_name: str, history: list[EpochStats], best: _Best,
             test_accuracy: float | None, seconds: float | None = None,
             dataset_info: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The short metrics stored inside the checkpoint (metrics.json has the full set), with
    how the dataset was read and split (a folder's split rule and file counts)."""
    out: dict[str, Any] = {"arch": arch_name, "epochs": len(history), "best_epoch": best.epoch,
                           "val_accuracy": best.accuracy}
    if dataset_info:
        out["dataset_info"] = dict(dataset_info)
    if test_accuracy is not None:
        out["test_accuracy"] = test_accuracy
    if seconds is not None:
        out["training_seconds"] = seconds
    return out
