"""Quality targets of the training recipes, measured the way a user runs them.

Each recipe is one ``cnnserve train`` process (start-up, data loading, training and the final
test evaluation all count towards its time); the table shows test accuracy against target:

    fashion-cnn on fashion-mnist   `cnnserve train` with no options   >= 92.0 % within 600 s
    lenet5 on mnist                --arch lenet5 --dataset mnist ...  >= 99.0 %
    resnet8, resnet20 on synthetic:3x32x32   speed per epoch of the residual presets on RGB
                                   32x32 images (CIFAR-sized; the accuracy is not judged)
    resnet8 on cifar10             only when CNNSERVE_CIFAR10=DIR names the binary release
                                   (or --download fetches it): >= 80 % after 30 epochs of SGD

Usage::

    python benchmarks/train_quality.py                 # full run (minutes; run on a quiet machine)
    python benchmarks/train_quality.py --epochs 1      # smoke test: targets are not judged
    python benchmarks/train_quality.py --only lenet5 --json
    python benchmarks/train_quality.py --only resnet8-rgb --nproc-per-node 2   # data-parallel

Exit status 0 when every judged target passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Recipe:
    """One benchmarked training recipe and its targets."""

    name: str
    dataset: str
    arch: str
    args: tuple[str, ...]            # flags beyond --dataset/--arch (none: the CLI defaults)
    target_accuracy: float           # test accuracy, fraction
    max_seconds: float | None        # wall-clock limit of the whole command, or None


_SGD = ("--optimizer", "sgd", "--lr", "0.1", "--weight-decay", "5e-4", "--batch-size", "128")
RECIPES = (
    Recipe("fashion-cnn", "fashion-mnist", "fashion-cnn", (), 0.92, 600.0),
    Recipe("lenet5", "mnist", "lenet5", ("--epochs", "15", "--augment"), 0.99, None),
    # Speed rows: a target of 0 judges only that the run completes.
    Recipe("resnet8-rgb", "synthetic:3x32x32", "resnet8", ("--epochs", "3", *_SGD), 0.0, None),
    Recipe("resnet20-rgb", "synthetic:3x32x32", "resnet20", ("--epochs", "3", *_SGD), 0.0,
           None),
)


def cifar_recipes() -> tuple[Recipe, ...]:
    """The CIFAR-10 row, when CNNSERVE_CIFAR10 names a folder with the binary release."""
    folder = os.environ.get("CNNSERVE_CIFAR10")
    if not folder:
        return ()
    return (Recipe("resnet8-cifar10", f"cifar10:{folder}", "resnet8",
                   ("--epochs", "30", *_SGD, "--color-jitter", "0.2"), 0.80, None),)


@dataclass
class Row:
    """One line of the results table."""

    recipe: Recipe
    seconds: float                   # wall clock of the whole command
    epochs: int = 0
    training_seconds: float = 0.0
    test_accuracy: float | None = None
    passed: bool | None = None       # None: not judged (epochs overridden)
    error: str = ""
    command: str = ""
    processes: int = 1               # --nproc-per-node (data-parallel ranks)

    def to_dict(self) -> dict[str, object]:
        """JSON form for --json."""
        out = asdict(self)
        out["recipe"] = self.recipe.name
        out.update(dataset=self.recipe.dataset, arch=self.recipe.arch,
                   target=self.recipe.target_accuracy, max_seconds=self.recipe.max_seconds)
        return out


def run_recipe(recipe: Recipe, out: Path, epochs: int | None, threads: int | None,
               processes: int = 1) -> Row:
    """Run one recipe in a fresh ``cnnserve train`` process (or ``processes`` data-parallel
    ranks) and judge it."""
    args = list(recipe.args)
    if epochs is not None:
        args = [a for i, a in enumerate(args)
                if a != "--epochs" and (i == 0 or args[i - 1] != "--epochs")]
        args += ["--epochs", str(epochs)]
    if threads is not None:
        args += ["--threads", str(threads)]
    if processes > 1:
        args += ["--nproc-per-node", str(processes)]
    command = [sys.executable, "-m", "cnnserve.cli", "train", "--dataset", recipe.dataset,
               "--arch", recipe.arch, "--out", str(out), "--quiet", *args]
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    row = Row(recipe, time.monotonic() - started, command=" ".join(command[2:]),
              processes=processes)
    if done.returncode != 0:
        row.error = (done.stderr.strip().splitlines() or ["failed"])[-1]
        row.passed = False
        return row
    metrics = json.loads((out / "metrics.json").read_text())
    row.epochs = len(metrics["epochs"])
    row.training_seconds = float(metrics["training_seconds"])
    row.test_accuracy = float(metrics["test_accuracy"])
    if epochs is None:
        row.passed = row.test_accuracy >= recipe.target_accuracy and (
            recipe.max_seconds is None or row.seconds <= recipe.max_seconds)
    return row


def format_table(rows: list[Row]) -> str:
    """The results as a fixed-width text table."""
    lines = [f"{'dataset':<18} {'arch':<12} {'procs':>5} {'epochs':>6} {'seconds':>8} "
             f"{'s/epoch':>8} "
             f"{'test acc':>9} {'target':>16} {'pass':>5}"]
    for r in rows:
        limit = f" in {r.recipe.max_seconds:.0f}s" if r.recipe.max_seconds else ""
        target = f">={r.recipe.target_accuracy * 100:.1f}%{limit}"
        acc = "error" if r.test_accuracy is None else f"{r.test_accuracy * 100:.2f}%"
        verdict = {True: "yes", False: "NO", None: "n/a"}[r.passed]
        per_epoch = r.training_seconds / r.epochs if r.epochs else 0.0
        dataset = r.recipe.dataset.split(":")[0] if r.recipe.dataset.startswith("cifar10:") \
            else r.recipe.dataset
        lines.append(f"{dataset:<18} {r.recipe.arch:<12} {r.processes:>5} {r.epochs:>6} "
                     f"{r.seconds:>8.1f} {per_epoch:>8.1f} {acc:>9} {target:>16} {verdict:>5}"
                     + (f"  {r.error}" if r.error else ""))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    recipes_known = (*RECIPES, *cifar_recipes())
    parser.add_argument("--only", choices=[r.name for r in recipes_known], action="append",
                        help="run only this recipe (repeatable)")
    parser.add_argument("--epochs", type=int, help="override the epochs (smoke test; targets "
                                                   "are then not judged)")
    parser.add_argument("--threads", type=int, help="pass --threads to cnnserve train")
    parser.add_argument("--nproc-per-node", type=int, default=1, metavar="N",
                        help="train each recipe data-parallel in N processes (default: 1)")
    parser.add_argument("--out", type=Path, help="keep the runs here (default: a temp folder)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    recipes = [r for r in recipes_known if not args.only or r.name in args.only]
    with tempfile.TemporaryDirectory(prefix="cnnserve-quality-") as tmp:
        base = args.out or Path(tmp)
        rows: list[Row] = []
        for recipe in recipes:
            rows.append(run_recipe(recipe, base / recipe.name, args.epochs, args.threads,
                                   args.nproc_per_node))
            print(f"finished {recipe.name} in {rows[-1].seconds:.0f} s", file=sys.stderr,
                  flush=True)
    print(json.dumps([r.to_dict() for r in rows], indent=2) if args.json
          else format_table(rows))
    if args.epochs is not None:
        print("(epochs overridden: targets not judged)", file=sys.stderr)
    return 0 if all(r.passed is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
