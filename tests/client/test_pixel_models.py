"""The SDK and the batch job send pixels to models that take them (UINT8 input, normalised in
the graph, as ``cnnserve export`` writes by default) and normalised floats to float models."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cnnserve.client import InferenceClient
from cnnserve.client.batch.job import BatchOptions, run_batch_job
from cnnserve.common.errors import CnnserveError
from cnnserve.common.repository import Normalization, TensorSpec, VersionConfig
from tests.support.client import ServerThread
from tests.support.models import PIXEL_MEAN, PIXEL_STD, pixels_expected, write_test_model


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    repo = tmp_path_factory.mktemp("models")
    write_test_model(repo, "pixels", 1, kind="pixels", max_batch_size=8)
    # The same model with a float input the client must normalise (a third-party model).
    floats = VersionConfig(name="floats", inputs=(TensorSpec("input", "FP32", (-1, 1, 4, 4)),),
                           outputs=(TensorSpec("output", "FP32", (-1, 3)),), max_batch_size=8,
                           labels=("zero", "one", "two"),
                           normalization=Normalization(PIXEL_MEAN, PIXEL_STD))
    write_test_model(repo, "floats", 1, config=floats)
    with ServerThread(repo, models=("pixels", "floats")) as s:
        yield s


def _pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 1, 4, 4), dtype=np.uint8)


def test_classify_sends_pixels_to_a_pixel_model(server: ServerThread) -> None:
    pixels = _pixels(20)
    want = np.argsort(-pixels_expected(pixels), axis=1, kind="stable")[:, :2]
    with InferenceClient(server.url, timeout=10) as client:
        assert client.model_info("pixels").image_input.datatype == "UINT8"
        top = client.classify("pixels", pixels, top_k=2)
        # A float model with the same normalisation gives the same answers.
        assert client.classify("floats", pixels, top_k=2) == top
    labels = ("zero", "one", "two")
    assert [[p.label for p in row] for row in top] == [[labels[i] for i in r] for r in want]


def test_batch_job_on_a_pixel_model(server: ServerThread, tmp_path: Path) -> None:
    pixels = _pixels(30, seed=2)
    np.savez(tmp_path / "data.npz", images=pixels)
    summary = run_batch_job(BatchOptions(
        url=server.url, model="pixels", input=str(tmp_path / "data.npz"),
        output=str(tmp_path / "out.jsonl"), format="jsonl", batch_size=4, concurrency=2,
        top_k=1, progress=False))
    assert summary.failed == 0
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == np.argmax(pixels_expected(pixels), 1).tolist()


def test_float_arrays_are_refused_for_a_pixel_model(server: ServerThread, tmp_path: Path) -> None:
    np.save(tmp_path / "floats.npy", _pixels(3).astype(np.float32))
    with pytest.raises(CnnserveError, match="takes uint8 pixels"):
        run_batch_job(BatchOptions(
            url=server.url, model="pixels", input=str(tmp_path / "floats.npy"),
            output=str(tmp_path / "out.jsonl"), format="jsonl", progress=False))
