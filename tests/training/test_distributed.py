"""Data-parallel training: two gloo ranks on CPU equal one process, and the run survives.

Every test starts real processes through torchrun's engine (``cnnserve train
--nproc-per-node 2``) or ``torchrun`` itself, on the loopback interface only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cnnserve.training.export.exporter import export_checkpoint
from cnnserve.training.train.checkpoint import load_checkpoint
from cnnserve.training.train.evaluate import evaluate

pytestmark = pytest.mark.slow

NET = "conv(4, 3, pad=1) -> bn -> relu -> maxpool(2) -> fc(16) -> bn -> relu -> fc(10)"
#: 900 training images (divisible by both ranks), 15 steps of a global batch of 60. SGD, not
#: Adam: a conv bias before batch norm gets a zero gradient up to rounding, which Adam scales
#: up to full-size steps, so its value would depend on the summation order.
RECIPE = ("--dataset", "synthetic:1x8x8", "--arch", NET, "--batch-size", "60", "--optimizer",
          "sgd", "--lr", "0.05", "--no-augment", "--schedule", "none", "--epochs", "1",
          "--seed", "3", "--quiet")


def _env() -> dict[str, str]:
    return {**os.environ, "MASTER_ADDR": "127.0.0.1"}


def cnnserve(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cnnserve.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=_env())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("ddp")
    one = cnnserve("train", *RECIPE, "--threads", "1", "--out", str(base / "one"))
    assert one.returncode == 0, one.stderr
    two = cnnserve("train", *RECIPE, "--nproc-per-node", "2", "--out", str(base / "two"))
    assert two.returncode == 0, two.stderr
    return {"one": base / "one" / "checkpoint.pt", "two": base / "two" / "checkpoint.pt"}


def test_two_ranks_reach_the_parameters_of_one_process(runs: dict[str, Path]) -> None:
    one, two = load_checkpoint(runs["one"]), load_checkpoint(runs["two"])
    assert one.train_state is not None and two.train_state is not None
    last_one, last_two = one.train_state["model"], two.train_state["model"]
    assert set(last_one) == set(last_two)
    for name, value in last_one.items():  # weights and the synced batch-norm statistics
        torch.testing.assert_close(last_two[name], value, rtol=1e-4, atol=1e-4, msg=name)
    history = json.loads((runs["two"].parent / "metrics.json").read_text())["epochs"]
    assert len(history) == 1


def test_a_two_rank_checkpoint_evaluates_and_exports_like_one(runs: dict[str, Path],
                                                              tmp_path: Path) -> None:
    assert evaluate(runs["two"], "synthetic:1x8x8").images == 300
    result = export_checkpoint(runs["two"], tmp_path / "repo", "ddp")
    assert not result.parity.failures(exact_argmax=True)


def test_torchrun_runs_the_training_entry_point(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "cnnserve.training.distributed", *RECIPE, "--out", str(tmp_path / "t")],
        capture_output=True, text=True, timeout=300, env=_env())
    assert done.returncode == 0, done.stderr
    ckpt = load_checkpoint(tmp_path / "t" / "checkpoint.pt")
    assert ckpt.train_state is not None and ckpt.train_state["epoch"] == 1
    assert sorted(p.name for p in (tmp_path / "t").iterdir() if p.name.startswith(".")) == []


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found += [int(c) for c in text]
    return found


def _rank_of(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    values = dict(e.split(b"=", 1) for e in environ if b"=" in e)
    return int(values[b"RANK"]) if b"RANK" in values else None


def test_a_killed_rank_ends_the_job_clearly_and_the_run_resumes(tmp_path: Path) -> None:
    out = tmp_path / "k"
    args = ["train", "--dataset", "synthetic:1x28x28", "--arch", NET, "--batch-size", "20",
            "--no-augment", "--epochs", "4", "--quiet", "--nproc-per-node", "2",
            "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "cnnserve.cli", *args], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoint.pt").exists():  # written by rank 0 after epoch 1
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        victim = next(p for p in _children(proc.pid) if _rank_of(p) == 1)
        os.kill(victim, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1
    assert "rank 1" in stderr and "--resume" in stderr and "Traceback" not in stderr
    ckpt = load_checkpoint(out / "checkpoint.pt")  # the last good checkpoint is intact
    assert ckpt.train_state is not None and 1 <= ckpt.train_state["epoch"] < 4
    done = cnnserve("train", "--resume", str(out / "checkpoint.pt"), "--nproc-per-node", "2",
                    "--quiet")
    assert done.returncode == 0, done.stderr
    history = json.loads((out / "metrics.json").read_text())["epochs"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
