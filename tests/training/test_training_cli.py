"""`cnnserve train` / `cnnserve evaluate` as a user runs them: real processes, exit codes, files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

NET = "conv(8, 3, pad=1) -> relu -> maxpool(2) -> fc(10)"


def cnnserve(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cnnserve.cli", *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd, check=False)


@pytest.mark.parametrize("command", ["train", "evaluate", "export"])
def test_help_of_each_subcommand(command: str) -> None:
    done = cnnserve(command, "--help")
    assert done.returncode == 0, done.stderr
    assert f"usage: cnnserve {command}" in done.stdout


def test_train_help_documents_the_spec_language_and_presets() -> None:
    out = cnnserve("train", "--help").stdout
    for text in ("lenet5", "fashion-cnn", "conv(out, k, stride=1, pad=0)", "(W - F + 2P)/S + 1",
                 "--resume", "--threads", "--augment", "--schedule", "default: fashion-mnist"):
        assert text in out


def test_unknown_arch_exits_1_with_a_message(tmp_path: Path) -> None:
    done = cnnserve("train", "--dataset", "digits", "--arch", "lenet6", "--out", str(tmp_path))
    assert done.returncode == 1
    assert "unknown architecture 'lenet6'" in done.stderr and "Traceback" not in done.stderr


def test_bad_spec_exits_1_naming_the_bad_part(tmp_path: Path) -> None:
    done = cnnserve("train", "--dataset", "digits", "--arch", "conv(8, 3) -> relu -> pool2d(2)"
                    " -> fc(10)", "--out", str(tmp_path))
    assert done.returncode == 1 and "unknown layer 'pool2d'" in done.stderr


def test_spec_too_big_for_the_images_exits_1_with_sizes(tmp_path: Path) -> None:
    done = cnnserve("train", "--dataset", "digits", "--arch", "lenet5", "--out", str(tmp_path))
    assert done.returncode == 1
    assert "below 1x1" in done.stderr and "6x2x2" in done.stderr
    assert not (tmp_path / "checkpoint.pt").exists()


def test_bad_values_and_usage_errors(tmp_path: Path) -> None:
    done = cnnserve("train", "--dataset", "digits", "--epochs", "0", "--out", str(tmp_path))
    assert done.returncode == 1 and "--epochs must be >= 1" in done.stderr
    assert cnnserve("train", "--optimizer", "rmsprop").returncode == 2
    done = cnnserve("train", "--dataset", "nope", "--out", str(tmp_path))
    # A dataset name is a usage error now (exit 2, as the README promises), found by argparse.
    assert done.returncode == 2 and "unknown dataset 'nope'" in done.stderr


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A finished tiny `cnnserve train` run: its folder and the command's stdout+stderr."""
    out = tmp_path_factory.mktemp("cli") / "run"
    done = cnnserve("train", "--dataset", "synthetic", "--arch", NET, "--epochs", "2",
                    "--batch-size", "64", "--augment", "--threads", "1", "--out", str(out))
    assert done.returncode == 0, done.stderr
    return out, done.stdout + "\n" + done.stderr


def test_train_writes_every_output(run_dir: tuple[Path, str]) -> None:
    out, log = run_dir
    assert "test        accuracy" in log and "<- best" in log
    assert "epoch 2:" in log  # per-epoch lines on stderr when it is not a terminal
    for name in ("checkpoint.pt", "metrics.json", "training_curve.png", "confusion_matrix.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "training_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "seconds"} <= \
        set(metrics["epochs"][0])
    assert len(metrics["per_class_accuracy"]) == 10 and len(metrics["confusion_matrix"]) == 10
    assert {"python", "torch", "numpy"} <= set(metrics["versions"])
    assert metrics["seed"] == 0 and metrics["args"]["augment"] is True
    assert metrics["training_seconds"] > 0 and 0.0 <= metrics["test_accuracy"] <= 1.0


def test_evaluate_reports_the_training_test_accuracy(run_dir: tuple[Path, str]) -> None:
    out, _ = run_dir
    metrics = json.loads((out / "metrics.json").read_text())
    done = cnnserve("evaluate", str(out / "checkpoint.pt"), "--dataset", "synthetic", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert result["images"] == 300 and result["kind"] == "checkpoint"
    assert result["per_class_accuracy"] == pytest.approx(metrics["per_class_accuracy"])


@pytest.mark.slow
def test_resume_continues_a_finished_run(run_dir: tuple[Path, str], tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "run"
    shutil.copytree(run_dir[0], out)
    done = cnnserve("train", "--resume", str(out / "checkpoint.pt"), "--lr", "0.1")
    assert done.returncode == 1 and "drop --lr" in done.stderr
    done = cnnserve("train", "--resume", str(out / "checkpoint.pt"), "--epochs", "3", "--quiet")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and "epoch 3" not in done.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2, 3]
    table = cnnserve("evaluate", str(out / "checkpoint.pt")).stdout
    assert "pattern-9" in table and "accuracy" in table


def test_evaluate_of_a_file_that_is_no_checkpoint(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_text("hello")
    done = cnnserve("evaluate", str(junk), "--dataset", "digits")
    assert done.returncode == 1 and "not a cnnserve checkpoint" in done.stderr
    done = cnnserve("evaluate", str(tmp_path / "missing.pt"), "--dataset", "digits")
    assert done.returncode == 1 and "checkpoint not found" in done.stderr


def test_options_classes_generate_the_flags_and_their_defaults() -> None:
    import argparse

    from cnnserve.common.options import add_flags, build_options
    from cnnserve.training.export.options import ExportOptions
    from cnnserve.training.train.config import EvaluateOptions, TrainConfig

    for cls, fixed in ((TrainConfig, {}), (ExportOptions, {}),
                       (EvaluateOptions, {"model": Path("m.pt")})):
        parser = argparse.ArgumentParser()
        add_flags(parser, cls)
        flags = vars(parser.parse_args(["m.pt"] if cls is EvaluateOptions else []))
        assert build_options(cls, flags, **fixed) == cls(**fixed)  # type: ignore[operator]
    parser = argparse.ArgumentParser()
    add_flags(parser, TrainConfig)
    flags = vars(parser.parse_args(["--lr", "0.5", "--no-augment"]))
    config = build_options(TrainConfig, flags)
    assert config.lr == 0.5 and config.augment is False and config.epochs == 24
