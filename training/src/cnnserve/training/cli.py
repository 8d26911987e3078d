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
from typing import TYPE_CHECKING, Any

from cnnserve.common.errors import CnnserveError
from cnnserve.common.options import build_options, flag_of, option_fields
from cnnserve.training.train.config import RECIPE, TrainConfig, TrainRunOptions

if TYPE_CHECKING:
    from cnnserve.training.train.parallel import Parallel

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
  cnnserve train --dataset cifar10 --download --arch resnet20 --optimizer sgd --lr 0.1 \\
      --weight-decay 5e-4 --epochs 60
  cnnserve train --dataset folder:photos --image-size 64x64 --arch resnet8 --epochs 30

your own images (--dataset folder:DIR): one sub-folder per class; the folder names,
sorted, are the labels. Any image Pillow reads (PNG, JPEG, WebP, BMP, ...; grayscale, RGB,
RGBA, palette; any size) is converted to --channels and resized to --image-size (bilinear,
the same code `cnnserve classify` and the batch job use). With DIR/train and DIR/test those
are the splits; else 20% of each class (seed 0) is the test set, recorded in the checkpoint.
  photos/                         photos/train/cat/...   photos/test/cat/...
    cat/  IMG_0001.jpg  b.png     photos/train/dog/...   photos/test/dog/...
    dog/  a.webp  c.jpeg
An unreadable file is reported by path and left out (--on-bad-image fail stops instead).
A spec's last fc(N) must have N = the number of classes; presets adapt theirs.

outputs in --out: checkpoint.pt, metrics.json, training_curve.png, confusion_matrix.png
"""


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``train``, ``evaluate`` and ``export`` to the parser."""
    from cnnserve.training.export import cli as export_cli
    _register_train(sub)
    _register_evaluate(sub)
    export_cli.register(sub)


def _register_train(sub: argparse._SubParsersAction[Any]) -> None:
    from cnnserve.common.options import add_flags
    from cnnserve.training.train import spec
    from cnnserve.training.train.config import LaunchOptions

    presets = "\n".join(f"  {name:<12} {text}" for name, text in spec.PRESETS.items())
    language = (spec.__doc__ or "").split("\n\n", 1)[1].replace("::", ":").replace("``", "")
    p = sub.add_parser(
        "train", help="train a CNN and write a checkpoint, metrics and plots",
        description="Train a CNN (Adam + cross-entropy by default) with validation every "
                    "epoch; the best validation epoch's weights are kept. With no options this "
                    "trains the default recipe: fashion-cnn on Fashion-MNIST.",
        epilog=_TRAIN_EPILOG.format(presets=presets, language=language),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(p.add_argument_group("data, model and recipe"), TrainConfig)
    add_flags(p.add_argument_group("run"), TrainRunOptions)
    add_flags(p.add_argument_group("data-parallel training (torch.distributed; also "
                                   "`torchrun ... -m cnnserve.training.distributed FLAGS`)"),
              LaunchOptions)
    p.set_defaults(handler=_train)


def _register_evaluate(sub: argparse._SubParsersAction[Any]) -> None:
    from cnnserve.common.options import add_flags
    from cnnserve.training.train.config import EvaluateOptions

    p = sub.add_parser(
        "evaluate", help="accuracy of a checkpoint or exported ONNX model on a dataset",
        description="Report overall and per-class accuracy of a training checkpoint "
                    "(PyTorch) or an exported ONNX model (ONNX Runtime; normalisation and "
                    "labels from the config.json beside model.onnx, else from its metadata).")
    add_flags(p, EvaluateOptions)
    p.set_defaults(handler=_evaluate)


def _quiet_openmp() -> None:
    # Idle OpenMP threads spin by default; on a shared or busy machine that spinning starves
    # the threads doing the work (5x slower training measured on 2 loaded cores). It only
    # takes effect before torch is first imported; an explicit setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _train(args: argparse.Namespace) -> int:
    _quiet_openmp()
    from cnnserve.common.options import build_options
    from cnnserve.training.train.config import LaunchOptions, TrainRunOptions
    from cnnserve.training.train.spec import parse_spec, resolve_arch

    flags = vars(args)
    run = build_options(TrainRunOptions, flags)
    launch = build_options(LaunchOptions, flags)
    if flags.get("arch") is not None:  # fail on a bad spec before paying for torch and data
        parse_spec(resolve_arch(flags["arch"])[1])
    if launch.nproc_per_node is not None:
        from cnnserve.training.train.launch import launch as launch_ranks

        _check_recipe_flags(flags, run)
        return launch_ranks(launch, _train_argv(flags), _out_dir(flags, run))
    from cnnserve.training.train import parallel as par

    rank = par.from_environment()  # set by torchrun; a single process otherwise
    par.start(rank)
    try:
        return _train_rank(flags, run, rank)
    except RuntimeError as exc:
        # A peer rank that dies mid-step breaks the collective this rank is in (gloo:
        # "Connection closed by peer"); the launcher then reports which rank failed. Say so
        # in one line instead of a traceback of the all-reduce.
        if not rank.active or not par.is_peer_failure(exc):
            raise
        raise CnnserveError(f"rank {rank.rank}: lost contact with the other ranks ({exc}); "
                            "stopping") from None
    finally:
        par.stop(rank)


def _train_rank(flags: dict[str, Any], run: TrainRunOptions, rank: Parallel) -> int:
    from cnnserve.training.train import report, trainer
    from cnnserve.training.train.checkpoint import load_checkpoint, save_checkpoint
    from cnnserve.training.train.parallel import threads_per_rank
    from cnnserve.training.train.progress import Progress

    _check_recipe_flags(flags, run)
    resume = None if run.resume is None else load_checkpoint(run.resume)
    if resume is not None:
        config = trainer.resume_config(resume, flags.get("epochs"))
    else:
        config = build_options(TrainConfig, flags)
    if run.download:
        config = dataclasses.replace(config, download=True)
    if run.threads is not None or rank.active:
        import torch

        torch.set_num_threads(run.threads or threads_per_rank(rank))
    out = _out_dir(flags, run)
    if rank.is_main:
        out.mkdir(parents=True, exist_ok=True)
    result = trainer.train_rank(
        config, resume=resume, progress=Progress.for_terminal(run.quiet or not rank.is_main),
        on_epoch=lambda ckpt: save_checkpoint(ckpt, out / report.CHECKPOINT_FILE),
        parallel=rank)
    if result is None:  # not rank 0: rank 0 writes every file
        return 0
    run_args = {k: (str(v) if isinstance(v, Path) else v) for k, v in flags.items()
                if k != "handler" and v is not None}
    metrics = report.write_outputs(result, config, out, run_args)
    if not run.quiet:
        print(report.format_summary(metrics, out))
    return 0


def _check_recipe_flags(flags: dict[str, Any], run: TrainRunOptions) -> None:
    if run.resume is not None and (given := [k for k in RECIPE if flags.get(k) is not None]):
        names = ", ".join("--" + k.replace("_", "-") for k in given)
        raise CnnserveError(f"--resume continues the recipe stored in the checkpoint; "
                            f"drop {names} (only --epochs may change)")


def _out_dir(flags: dict[str, Any], run: TrainRunOptions) -> Path:
    """--out, else the resumed checkpoint's folder, else runs/ARCH-DATASET."""
    if run.out is not None:
        return run.out
    if run.resume is not None:
        return run.resume.parent
    config = build_options(TrainConfig, flags)  # also checks the recipe before any launch
    return Path("runs") / _slug(f"{config.arch}-{config.dataset}")


def _train_argv(flags: dict[str, Any]) -> list[str]:
    """The recipe and run flags given, as a command line for each rank (no launch flags)."""
    argv: list[str] = []
    for cls in (TrainConfig, TrainRunOptions):
        for f in option_fields(cls):
            value = flags.get(f.name)
            if value is None:
                continue
            flag = flag_of(cls, f.name)
            if isinstance(value, bool):
                argv.append(flag if value else "--no-" + flag[2:])
            else:
                argv += [flag, str(value)]
    return argv


def _slug(text: str) -> str:
    if len(text) > 40 or not all(c.isalnum() or c in "-_." for c in text):
        return "custom"
    return text


def _evaluate(args: argparse.Namespace) -> int:
    _quiet_openmp()
    from cnnserve.common.options import build_options
    from cnnserve.training.train.config import EvaluateOptions
    from cnnserve.training.train.evaluate import evaluate, format_table

    opts = build_options(EvaluateOptions, vars(args))
    result = evaluate(opts.model, opts.dataset, opts.split, batch_size=opts.batch_size,
                      seed=opts.seed, download=opts.download)
    if opts.as_json:
        json.dump(result.to_dict(), sys.stdout, indent=2)
        print()
    else:
        print(format_table(result))
    return 0
