"""A training recipe and the options of ``cnnserve train``/``evaluate`` as frozen values.

Each field is a :func:`cnnserve.common.options.option`: its help text (unit and default) is
the flag's help, so ``--help`` and the defaults cannot drift apart. Standard library only, so
the CLI shows the flags without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from cnnserve.cli.usage import dataset_name
from cnnserve.common.data.registry import dataset_help
from cnnserve.common.errors import CnnserveError
from cnnserve.common.options import option

Optimizer = Literal["adam", "sgd"]
Schedule = Literal["none", "cosine", "step"]
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
SCHEDULES: tuple[str, ...] = get_args(Schedule)
Split = Literal["test", "train", "val"]
Channels = Literal[1, 3]
BadImage = Literal["skip", "fail"]

DATASET_HELP = dataset_help()


@dataclass(frozen=True)
class TrainConfig:
    """One training recipe. The defaults are the measured Fashion-MNIST recipe: fashion-cnn,
    24 epochs of Adam with cosine decay and light augmentation reach 92.0 % test accuracy
    in about 6-8 minutes on 2 CPU cores (benchmarks/train_quality.py). Without augmentation
    this small network overfits (91.3 % after 12 epochs); with it, it needs the epochs.

    Every field but ``epochs`` and ``download`` is part of the recipe that ``--resume``
    takes from the checkpoint (:data:`RECIPE`)."""

    dataset: str = option("fashion-mnist", f"{DATASET_HELP} (default: fashion-mnist)",
                          metavar="NAME", parse=dataset_name)
    image_size: str | None = option(
        None, "HxW the images of a folder: dataset are resized to, e.g. 32x32 (default: the "
        "median height and width of its training images)", metavar="HxW")
    channels: Channels | None = option(
        None, "1 (grayscale) or 3 (RGB) channels for a folder: dataset (default: 3 if any "
        "image has colour, else 1)")
    on_bad_image: BadImage = option(
        "skip", "an unreadable or truncated image file in a folder: dataset is reported by "
        "path and left out (skip) or ends the run (fail) (default: skip)")
    val_fraction: float = option(
        0.1, "share of the training split held out for validation (default: 0.1)",
        metavar="F")
    augment: bool = option(
        True, "light augmentation: random shifts with padding (1 px on fashion-mnist, 2 px on "
        "mnist, 4 px on cifar10, an eighth of the size on RGB folders) and horizontal flips "
        "where labels allow (fashion-mnist, RGB data) (default: on)")
    color_jitter: float = option(
        0.0, "with --augment on RGB data: random brightness and contrast factors in "
        "[1-J, 1+J] per image (default: 0 = off)", metavar="J")
    arch: str = option("fashion-cnn", "preset name (see below), spec text, or @FILE "
                       "(default: fashion-cnn)", metavar="ARCH")
    epochs: int = option(24, "epochs (default: 24; with --resume: the new total)",
                         metavar="N")
    batch_size: int = option(128, "images per step (default: 128)", metavar="N")
    lr: float = option(1e-3, "initial learning rate (default: 0.001)", metavar="LR")
    optimizer: Optimizer = option("adam", "optimizer (default: adam)")
    momentum: float = option(0.9, "SGD momentum (default: 0.9)", metavar="M")
    weight_decay: float = option(0.0, "L2 weight decay (default: 0)", metavar="W")
    schedule: Schedule = option(
        "cosine", "learning-rate schedule per epoch: cosine decays to 0 over the run, step "
        "multiplies by --gamma every --step-size epochs (default: cosine)")
    step_size: int = option(0, "epochs between step decays (default: 0 = a third of --epochs)",
                            metavar="N")
    gamma: float = option(0.1, "step decay factor (default: 0.1)", metavar="G")
    seed: int = option(0, "seed for the split, initial weights and shuffling (default: 0)",
                       metavar="N")
    #: Fetch missing official files (set from --download; not part of the recipe).
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
            (0 <= self.color_jitter < 1,
             f"--color-jitter must be in [0, 1), got {self.color_jitter}"),
        ]
        for ok, message in checks:
            if not ok:
                raise CnnserveError(message)
        self.image_hw()  # raises for a malformed --image-size

    def image_hw(self) -> tuple[int, int] | None:
        """``--image-size`` as (height, width), or None when not given."""
        if self.image_size is None:
            return None
        try:
            h, w = (int(v) for v in self.image_size.lower().split("x"))
        except ValueError:
            h = w = 0
        if not (1 <= h <= 4096 and 1 <= w <= 4096):
            raise CnnserveError(f"--image-size must be HxW such as 32x32, got "
                                f"{self.image_size!r}")
        return h, w


#: Options that make up the recipe; --resume takes them from the checkpoint instead.
RECIPE = tuple(name for name in TrainConfig.__dataclass_fields__
               if name not in ("epochs", "download"))


@dataclass(frozen=True)
class TrainRunOptions:
    """How one ``cnnserve train`` run goes, beside its recipe (:class:`TrainConfig`)."""

    out: Path | None = option(None, "output folder (default: runs/ARCH-DATASET, or the "
                              "resumed checkpoint's folder)", metavar="DIR")
    resume: Path | None = option(
        None, "continue an interrupted or finished run from its checkpoint.pt with the recipe "
        "stored in it (only --epochs may change)", metavar="CHECKPOINT")
    threads: int | None = option(None, "CPU threads for torch (default: torch's choice, one "
                                 "per core)", metavar="N")
    quiet: bool = option(False, "no progress bars or per-epoch lines; print nothing on "
                         "success (default: off)")
    download: bool = option(False, "download missing official dataset files (checksum-"
                            "verified) into ~/.cache/cnnserve (default: off)")

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise CnnserveError(f"--threads must be >= 1, got {self.threads}")


@dataclass(frozen=True)
class LaunchOptions:
    """Data-parallel training: how many processes, on how many machines."""

    nproc_per_node: int | None = option(
        None, "train data-parallel in N processes on this machine (torch.distributed, gloo, "
        "through torchrun's engine): --batch-size is the global batch, split evenly, the "
        "learning rate is unchanged, batch norm is synchronised; threads per process: cores "
        "/ N (default: one process)", metavar="N")
    nnodes: int = option(1, "machines taking part, each running this command (default: 1)",
                         metavar="M")
    node_rank: int = option(0, "this machine's rank among --nnodes, 0..M-1 (default: 0)",
                            metavar="R")
    master_addr: str | None = option(
        None, "address of the machine with --node-rank 0 (default: a local rendezvous on "
        "127.0.0.1 when --nnodes is 1)", metavar="ADDR")
    master_port: int = option(29500, "port of that machine (default: 29500)", metavar="PORT")

    def __post_init__(self) -> None:
        if self.nproc_per_node is not None and self.nproc_per_node < 1:
            raise CnnserveError(f"--nproc-per-node must be >= 1, got {self.nproc_per_node}")
        if self.nnodes < 1 or not 0 <= self.node_rank < self.nnodes:
            raise CnnserveError(f"--node-rank must be in 0..{self.nnodes - 1} and --nnodes "
                                f">= 1, got {self.node_rank} of {self.nnodes}")
        if self.nnodes > 1 and self.master_addr is None:
            raise CnnserveError("--nnodes > 1 needs --master-addr (node 0's address)")


@dataclass(frozen=True)
class EvaluateOptions:
    """Everything ``cnnserve evaluate`` is configured by."""

    model: Path = option(help="checkpoint.pt, model.onnx, or a repository version folder",
                         positional=True, metavar="CHECKPOINT_OR_ONNX")
    dataset: str | None = option(None, f"{DATASET_HELP} (default: the model's training "
                                 "dataset)", metavar="NAME", parse=dataset_name)
    split: Split = option("test", "which split (default: test, the official test set)")
    seed: int = option(0, "seed of the train/val split, for --split train/val (default: 0)",
                       metavar="N")
    batch_size: int = option(256, "images per inference call (default: 256)", metavar="N")
    download: bool = option(False, "download missing official dataset files "
                            "(checksum-verified) (default: off)")
    as_json: bool = option(False, "print the result as JSON (default: off)", flag="--json")

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise CnnserveError(f"--batch-size must be >= 1, got {self.batch_size}")
