"""The whole product on real Fashion-MNIST: the main job's prepare step trains and exports into
an empty repository, `cnnserve serve` serves it, and the batch job's predictions through the
server equal `cnnserve evaluate`'s in-process predictions item by item."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cnnserve.common.data.datasets import DatasetError, load_split
from tests.support.deploy_server import running_server

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
# Small enough to train one epoch in seconds; good enough to be far from chance.
SPEC = "conv(8, 5, pad=2) -> relu -> maxpool(4) -> fc(10)\n"


def _fashion_available() -> str | None:
    try:
        load_split("fashion-mnist", "test")
    except DatasetError as exc:
        return str(exc)
    return None


_MISSING = _fashion_available()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(_MISSING is not None, reason=f"Fashion-MNIST missing: {_MISSING}"),
]


def _prepare(repo: Path, run_dir: Path, spec: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", CNNSERVE_RUN_DIR=str(run_dir),
               CNNSERVE_TRAIN_ARGS=f"--arch @{spec} --epochs 1 --quiet")
    return subprocess.run([str(ROOT / "scripts" / "prepare-model.sh"), str(repo)], env=env,
                          capture_output=True, text=True, timeout=600, cwd=run_dir.parent.parent)


def test_served_predictions_equal_in_process_evaluation(tmp_path: Path) -> None:
    spec = tmp_path / "small.spec"
    spec.write_text(SPEC)
    repo, run_dir = tmp_path / "models", tmp_path / "runs" / "fashion-cnn"

    first = _prepare(repo, run_dir, spec)
    assert first.returncode == 0, first.stdout + first.stderr
    version_dir = repo / "fashion-cnn" / "1"
    assert (version_dir / "model.onnx").is_file() and (run_dir / "metrics.json").is_file()
    again = _prepare(repo, run_dir, spec)  # a repository with a model is left alone
    assert again.returncode == 0 and "already holds a model" in again.stdout
    assert sorted(p.name for p in (repo / "fashion-cnn").iterdir()) == ["1", "model.json"]

    evaluated = subprocess.run(
        [str(BIN / "cnnserve"), "evaluate", str(version_dir), "--json"],
        capture_output=True, text=True, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr
    accuracy = json.loads(evaluated.stdout)["accuracy"]
    assert accuracy > 0.6  # one epoch of a tiny net; chance is 0.1

    from cnnserve.training.train.evaluate import evaluate_onnx

    test = load_split("fashion-mnist", "test")
    expected = evaluate_onnx(version_dir, test.images)

    out = tmp_path / "preds.jsonl"
    with running_server(repo, tmp_path) as server:
        batch = subprocess.run(
            [str(BIN / "cnnserve"), "batch", "--url", server.address, "--model", "fashion-cnn",
             "--input", "fashion-mnist:test", "--output", str(out), "--batch-size", "256",
             "--concurrency", "4", "--no-progress"],
            capture_output=True, text=True, timeout=300)
    assert batch.returncode == 0, batch.stdout + batch.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == len(test.labels) == 10_000
    served = [r["index"] for r in records]
    mismatched = [i for i, (a, b) in enumerate(zip(served, expected, strict=True)) if a != b]
    assert not mismatched, f"{len(mismatched)} items differ, first at {mismatched[:5]}"
    served_accuracy = sum(r["index"] == r["true_index"] for r in records) / len(records)
    assert served_accuracy == pytest.approx(accuracy, abs=1e-12)
