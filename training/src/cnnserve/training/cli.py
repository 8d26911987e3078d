"""``cnnserve train`` and ``cnnserve evaluate`` (and ``cnnserve export`` via export_cli).

Only the standard library and cnnserve's standard-library modules are imported here; torch,
numpy and onnxruntime are imported by the handlers when they run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

from cnnserve.cli.usage import dataset_name
from cnnserve.common.errors import CnnserveError

#: Options that make up the recipe; --resume takes them from the checkpoint instead.
_RECIPE = ("dataset", "arch", "batch_size", "lr", "optimizer", "momentum", "weight_decay",
           "schedule", "step_size", "gamma", "augment", "seed", "val_fraction")

DATASET_HELP = ("dataset: fashion-mnist, mnist, digits, synthetic[:CxHxW] or idx:DIR (a folder "
                "of train-/t10k- IDX files)")

_TRAIN_EPILOG = """\
architecture spec (--arch "SPEC" or --arch @FILE), presets:
{presets}

{language}
examples:
  cnnserve train                                   # fashion-cnn on Fashion-MNIST
  cnnserve train --dataset mnist --arch lenet5 --epochs 12 --out runs/lenet5
  cnnserve train --dataset digits --epochs 20 \\
      --arch "[conv(16, 3, pad=1) -> relu]*2 -> maxpool(2) -> fc(64) -> relu -> fc(10)"
  cnnserve train --resume runs/fashion-cnn/checkpoint.pt --epochs 15

outputs in --out: checkpoint.pt, metrics.json, training_curve.png, confusion_matrix.png
"""


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``train``, ``evaluate`` and ``export`` to the parser."""
    from cnnserve.training.export import cli as export_cli
    _register_train(sub)
    _register_evaluate(sub)
    export_cli.register(sub)


def _register_train(sub: argparse._SubParsersAction[Any]) -> None:
    from cnnserve.training.train import spec
    from cnnserve.training.train.config import OPTIMIZERS, SCHEDULES, TrainConfig

    d = TrainConfig()
    presets = "\n".join(f"  {name:<12} {text}" for name, text in spec.PRESETS.items())
    language = (spec.__doc__ or "").split("\n\n", 1)[1].replace("::", ":").replace("``", "")
    p = sub.add_parser(
        "train", help="train a CNN and write a checkpoint, metrics and plots",
        description="Train a CNN (Adam + cross-entropy by default) with validation every "
                    "epoch; the best validation epoch's weights are kept. With no options this "
                    "trains the default recipe: fashion-cnn on Fashion-MNIST.",
        epilog=_TRAIN_EPILOG.format(presets=presets, language=language),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS)
    data = p.add_argument_group("data")
    data.add_argument("--dataset", metavar="NAME", type=dataset_name,
                      help=f"{DATASET_HELP} (default: {d.dataset})")
    data.add_argument("--val-fraction", type=float, metavar="F",
                      help=f"share of the training split held out for validation "
                           f"(default: {d.val_fraction})")
    data.add_argument("--download", action="store_true", default=False,
                      help="download missing official dataset files (sha256-verified) into "
                           "~/.cache/cnnserve")
    data.add_argument("--augment", action=argparse.BooleanOptionalAction,
                      help="light augmentation: random shifts (1 px on fashion-mnist, 2 px on "
                           "mnist) and horizontal flips where labels allow (fashion-mnist) "
                           f"(default: {'on' if d.augment else 'off'})")
    model = p.add_argument_group("model and recipe")
    model.add_argument("--arch", metavar="ARCH",
                       help=f"preset name ({', '.join(spec.PRESETS)}), spec text, or @FILE "
                            f"(default: {d.arch})")
    model.add_argument("--epochs", type=int, metavar="N", help=f"epochs (default: {d.epochs}; "
                       "with --resume: the new total)")
    model.add_argument("--batch-size", type=int, metavar="N",
                       help=f"images per step (default: {d.batch_size})")
    model.add_argument("--lr", type=float, metavar="LR",
                       help=f"initial learning rate (default: {d.lr:g})")
    model.add_argument("--optimizer", choices=OPTIMIZERS,
                       help=f"optimizer (default: {d.optimizer})")
    model.add_argument("--momentum", type=float, metavar="M",
                       help=f"SGD momentum (default: {d.momentum})")
    model.add_argument("--weight-decay", type=float, metavar="W",
                       help=f"L2 weight decay (default: {d.weight_decay:g})")
    model.add_argument("--schedule", choices=SCHEDULES,
                       help=f"learning-rate schedule per epoch: cosine decays to 0 over the "
                            f"run, step multiplies by --gamma every --step-size epochs "
                            f"(default: {d.schedule})")
    model.add_argument("--step-size", type=int, metavar="N",
                       help="epochs between step decays (default: a third of --epochs)")
    model.add_argument("--gamma", type=float, metavar="G",
                       help=f"step decay factor (default: {d.gamma})")
    model.add_argument("--seed", type=int, metavar="N",
                       help=f"seed for the split, initial weights and shuffling "
                            f"(default: {d.seed})")
    run = p.add_argument_group("run")
    run.add_argument("--out", type=Path, metavar="DIR", default=None,
                     help="output folder (default: runs/ARCH-DATASET, or the resumed "
                          "checkpoint's folder)")
    run.add_argument("--resume", type=Path, metavar="CHECKPOINT", default=None,
                     help="continue an interrupted or finished run from its checkpoint.pt "
                          "with the recipe stored in it (only --epochs may change)")
    run.add_argument("--threads", type=int, metavar="N", default=None,
                     help="CPU threads for torch (default: torch's choice, one per core)")
    run.add_argument("--quiet", action="store_true", default=False,
                     help="no progress bars or per-epoch lines; print nothing on success")
    p.set_defaults(handler=_train)


def _register_evaluate(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser(
        "evaluate", help="accuracy of a checkpoint or exported ONNX model on a dataset",
        description="Report overall and per-class accuracy of a training checkpoint "
                    "(PyTorch) or an exported ONNX model (ONNX Runtime; normalisation and "
                    "labels from the config.json beside model.onnx, else from its metadata).")
    p.add_argument("model", type=Path, metavar="CHECKPOINT_OR_ONNX",
                   help="checkpoint.pt, model.onnx, or a repository version folder")
    p.add_argument("--dataset", metavar="NAME", default=None, type=dataset_name,
                   help=f"{DATASET_HELP} (default: the model's training dataset)")
    p.add_argument("--split", choices=("train", "val", "test"), default="test",
                   help="which split (default: test, the official test set)")
    p.add_argument("--seed", type=int, default=0, metavar="N",
                   help="seed of the train/val split, for --split train/val (default: 0)")
    p.add_argument("--batch-size", type=int, default=256, metavar="N",
                   help="images per inference call (default: 256)")
    p.add_argument("--download", action="store_true",
                   help="download missing official dataset files (sha256-verified)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=_evaluate)


def _quiet_openmp() -> None:
    # Idle OpenMP threads spin by default; on a shared or busy machine that spinning starves
    # the threads doing the work (5x slower training measured on 2 loaded cores). It only
    # takes effect before torch is first imported; an explicit setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _train(args: argparse.Namespace) -> int:
    _quiet_openmp()
    from cnnserve.training.train.spec import parse_spec, resolve_arch

    if hasattr(args, "arch"):  # fail on a bad spec before paying for torch and the data
        parse_spec(resolve_arch(args.arch)[1])
    from cnnserve.training.train import report, trainer
    from cnnserve.training.train.checkpoint import load_checkpoint, save_checkpoint
    from cnnserve.training.train.config import TrainConfig
    from cnnserve.training.train.progress import Progress

    given: dict[str, Any] = {k: getattr(args, k) for k in _RECIPE if hasattr(args, k)}
    epochs: int | None = getattr(args, "epochs", None)
    resume = None
    if args.resume is not None:
        if given:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            raise CnnserveError(f"--resume continues the recipe stored in the checkpoint; "
                                f"drop {flags} (only --epochs may change)")
        resume = load_checkpoint(args.resume)
        config = trainer.resume_config(resume, epochs)
        out = args.out or args.resume.parent
    else:
        if epochs is not None:
            given["epochs"] = epochs
        config = TrainConfig(**given)
        out = args.out or Path("runs") / _slug(f"{config.arch}-{config.dataset}")
    if args.download:
        config = dataclasses.replace(config, download=True)
    if args.threads is not None:
        if args.threads < 1:
            raise CnnserveError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    out.mkdir(parents=True, exist_ok=True)
    result = trainer.train(
        config, resume=resume, progress=Progress.for_terminal(args.quiet),
        on_epoch=lambda ckpt: save_checkpoint(ckpt, out / report.CHECKPOINT_FILE))
    run_args = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                if k != "handler"}
    metrics = report.write_outputs(result, config, out, run_args)
    if not args.quiet:
        print(report.format_summary(metrics, out))
    return 0


def _slug(text: str) -> str:
    if len(text) > 40 or not all(c.isalnum() or c in "-_." for c in text):
        return "custom"
    return text


def _evaluate(args: argparse.Namespace) -> int:
    _quiet_openmp()
    from cnnserve.training.train.evaluate import evaluate, format_table

    if args.batch_size < 1:
        raise CnnserveError(f"--batch-size must be >= 1, got {args.batch_size}")
    result = evaluate(args.model, args.dataset, args.split, batch_size=args.batch_size,
                      seed=args.seed, download=args.download)
    if args.json:
        json.dump(result.to_dict(), sys.stdout, indent=2)
        print()
    else:
        print(format_table(result))
    return 0

