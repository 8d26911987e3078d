"""Train on your own images: a folder of coloured shapes -> checkpoint -> served model.

The folder has several classes, mixed formats (PNG, JPEG, WebP, BMP) and sizes, a truncated
JPEG, a grayscale and a palette image among the RGB ones. Training reaches high held-out
accuracy; the exported model, served, names the right folder for a JPEG of another size; and
``evaluate``, the SDK's ``classify`` and the batch job agree image by image, because all of
them read files with :func:`cnnserve.common.images.load_image`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cnnserve.client import InferenceClient
from cnnserve.client.batch.job import BatchOptions, run_batch_job
from cnnserve.common.data import folders
from cnnserve.common.data.datasets import load_split
from cnnserve.training.export.exporter import export_checkpoint
from cnnserve.training.train.evaluate import evaluate_onnx
from tests.support.client import ServerThread
from tests.support.image_folders import shape_image, write_shapes_folder

NET = ("conv(8, 3, pad=1) -> bn -> relu -> maxpool(2) -> conv(16, 3, pad=1) -> bn -> relu"
       " -> gap -> fc(3)")


@pytest.mark.slow
def test_an_image_folder_trains_exports_serves_and_every_reader_agrees(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib

    monkeypatch.setenv("MPLCONFIGDIR", matplotlib.get_cachedir())  # keep its font cache
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = tmp_path / "shapes"
    special = write_shapes_folder(root, per_class=30)
    done = subprocess.run(
        [sys.executable, "-m", "cnnserve.cli", "train", "--dataset", f"folder:{root}",
         "--image-size", "16x16", "--arch", NET, "--epochs", "8", "--batch-size", "16",
         "--lr", "0.01", "--threads", "1", "--out", str(tmp_path / "run"), "--quiet"],
        capture_output=True, text=True, timeout=300, env=os.environ)
    assert done.returncode == 0, done.stderr
    assert str(special["corrupt"]) in done.stderr  # reported by path, not a traceback
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["dataset"] == f"folder:3x16x16:{root.resolve()}"
    assert metrics["test_accuracy"] >= 0.9

    result = export_checkpoint(tmp_path / "run" / "checkpoint.pt", tmp_path / "repo", "shapes")
    assert result.config.labels == ("circle", "square", "triangle")
    photo = tmp_path / "big-circle.jpg"
    shape_image("circle", (57, 41), np.random.default_rng(7)).save(photo, quality=90)

    layout = folders.scan(root)
    test_files = [p for p, _ in layout.test if p != special["corrupt"]]
    batch_in = tmp_path / "batch"
    batch_in.mkdir()
    for i, path in enumerate(test_files):
        shutil.copy(path, batch_in / f"{i:03d}{path.suffix}")

    with ServerThread(tmp_path / "repo", models=("shapes",)) as server:
        with InferenceClient(server.url) as client:
            assert client.classify("shapes", photo)[0][0].label == "circle"
            served = [p[0].label for p in client.classify("shapes", test_files)]
        run_batch_job(BatchOptions(url=server.url, model="shapes", input=str(batch_in),
                                   output=str(tmp_path / "out.jsonl"), progress=False))
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    batch = [r["label"] for r in sorted(records, key=lambda r: r["id"])]

    test = load_split(metrics["dataset"], "test")
    evaluated = evaluate_onnx(result.model_path, test.images)
    names = [result.config.labels[i] for i in evaluated]
    assert len(names) == len(test_files) == len(served) == len(batch)
    assert names == served == batch
    truth = [layout.class_names[label] for path, label in layout.test
             if path != special["corrupt"]]
    assert np.mean([a == b for a, b in zip(names, truth, strict=True)]) >= 0.9
