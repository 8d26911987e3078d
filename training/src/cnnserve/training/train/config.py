"""A training recipe as one frozen value (standard library only, so the CLI can show its
defaults in ``--help`` without importing torch)."""

from __future__ import annotations

from dataclasses import dataclass

from cnnserve.common.errors import CnnserveError

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("none", "cosine", "step")


@dataclass(frozen=True)
class TrainConfig:
    """One training recipe. The defaults are the measured Fashion-MNIST recipe: fashion-cnn,
    24 epochs of Adam with cosine decay and light augmentation reach 92.0 % test accuracy
    in about 6-8 minutes on 2 CPU cores (benchmarks/train_quality.py). Without augmentation
    this small network overfits (91.3 % after 12 epochs); with it, it needs the epochs."""

    dataset: str = "fashion-mnist"
    arch: str = "fashion-cnn"        # preset name, spec text or @file
    epochs: int = 24
    batch_size: int = 128
    lr: float = 1e-3                 # initial learning rate
    optimizer: str = "adam"          # "adam" or "sgd"
    momentum: float = 0.9            # SGD only
    weight_decay: float = 0.0
    schedule: str = "cosine"         # "none", "cosine" (to 0 over all epochs) or "step"
    step_size: int = 0               # "step": epochs between decays; 0 = max(1, epochs // 3)
    gamma: float = 0.1               # "step": decay factor
    augment: bool = True             # random shifts of 1-2 px (+ flips where label-safe)
    seed: int = 0
    val_fraction: float = 0.1
    download: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (self.optimizer in OPTIMIZERS,
             f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"),
            (0 <= self.momentum < 1, f"--momentum must be in [0, 1), got {self.momentum}"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (self.schedule in SCHEDULES,
             f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"),
            (self.step_size >= 0, f"--step-size must be >= 0, got {self.step_size}"),
            (0 < self.gamma <= 1, f"--gamma must be in (0, 1], got {self.gamma}"),
            (0 < self.val_fraction < 1,
             f"--val-fraction must be between 0 and 1, got {self.val_fraction}"),
        ]
        for ok, message in checks:
            if not ok:
                raise CnnserveError(message)
