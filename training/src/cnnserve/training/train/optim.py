"""Optimizers and learning-rate schedules of a training recipe."""

from __future__ import annotations

import math

import torch
from torch import nn

from cnnserve.training.train.config import TrainConfig


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


def stretch_cosine(sched: torch.optim.lr_scheduler.LRScheduler | None,
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
