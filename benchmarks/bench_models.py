"""The server benchmark's models, trained and exported with the cnnserve command line.

Cached under ``.bench/models`` (checkpoints in ``runs/``, model repositories in ``repos/``),
so only the first run trains; delete the folder to start over. Weights barely matter for
speed, so each model trains one epoch and the export checks few images.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

HEAVY_ARCH = ("conv(64, 3, pad=1) -> bn -> relu -> conv(64, 3, pad=1) -> bn -> relu -> maxpool(2)"
              " -> conv(128, 3, pad=1) -> bn -> relu -> conv(128, 3, pad=1) -> bn -> relu"
              " -> maxpool(2) -> conv(256, 3, pad=1) -> bn -> relu -> maxpool(2) -> fc(10)")


@dataclass(frozen=True)
class BenchModel:
    """An exported model: its name in ``repository`` and the per-row input shape."""

    name: str
    repository: Path
    shape: tuple[int, ...]  # C, H, W

    @property
    def onnx(self) -> Path:
        return self.repository / self.name / "1" / "model.onnx"

    @property
    def shape_text(self) -> str:
        """The shape as perf_analyzer's --shape wants it: "1,28,28"."""
        return ",".join(str(d) for d in self.shape)


@dataclass(frozen=True)
class BenchModels:
    """``lenet`` and its copy ``lenet_b`` share one repository; ``heavy`` has its own."""

    lenet: BenchModel
    lenet_b: BenchModel
    heavy: BenchModel


def _run(command: list[str], what: str) -> None:
    print(f"[models] {what} ...", flush=True)
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed (status {done.returncode}): {' '.join(command)}\n"
                           f"{(done.stdout + done.stderr)[-3000:]}")


def _train_and_export(cnnserve: Path, cache: Path, run: str, arch: str, dataset: str,
                      model: BenchModel, max_batch_size: int) -> None:
    if model.onnx.exists():
        return
    checkpoint = cache / "runs" / run / "checkpoint.pt"
    if not checkpoint.exists():
        _run([str(cnnserve), "train", "--dataset", dataset, "--arch", arch, "--epochs", "1",
              "--out", str(checkpoint.parent), "--quiet"], f"training {run} on {dataset}")
    shutil.rmtree(model.repository / model.name, ignore_errors=True)  # a half-written one
    _run([str(cnnserve), "export", str(checkpoint), "--repository", str(model.repository),
          "--name", model.name, "--version", "1", "--max-batch-size", str(max_batch_size),
          "--verify-images", "64"], f"exporting {run} as {model.name}")


def prepare_models(cnnserve: Path, cache: Path) -> BenchModels:
    """Train and export whatever ``cache`` lacks; the models' locations.

    The LeNet-size model is the ``fashion-cnn`` preset, trained on Fashion-MNIST when it is
    installed and on synthetic 1x28x28 images otherwise. Raises RuntimeError if a cnnserve
    command fails.
    """
    lenet_repo, heavy_repo = cache / "repos" / "lenet", cache / "repos" / "heavy"
    models = BenchModels(lenet=BenchModel("fashion_cnn", lenet_repo, (1, 28, 28)),
                         lenet_b=BenchModel("fashion_cnn_b", lenet_repo, (1, 28, 28)),
                         heavy=BenchModel("heavy_cnn", heavy_repo, (3, 96, 96)))
    dataset = "fashion-mnist" if FASHION_MNIST.is_dir() else "synthetic"
    _train_and_export(cnnserve, cache, "fashion-cnn", "fashion-cnn", dataset, models.lenet,
                      max_batch_size=256)
    if not models.lenet_b.onnx.exists():  # the second model: the same graph under a new name
        shutil.rmtree(lenet_repo / models.lenet_b.name, ignore_errors=True)
        shutil.copytree(lenet_repo / models.lenet.name, lenet_repo / models.lenet_b.name)
    _train_and_export(cnnserve, cache, "heavy-cnn", HEAVY_ARCH, "synthetic:3x96x96",
                      models.heavy, max_batch_size=64)
    return models
