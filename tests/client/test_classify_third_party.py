"""``cnnserve classify`` and the SDK classify a third-party image model from a Triton
repository: labels from its label_filename, pixel scaling from flags (the repository says
nothing about normalisation), one request per image when the model does not batch."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnserve.cli import main
from cnnserve.client import InferenceClient, PixelScaling
from cnnserve.server.engine.autocomplete import DEFAULT_MAX_BATCH_SIZE
from tests.support.client import ServerThread
from tests.support.third_party import classifier, ort_run, write_pbtxt, write_version

LABELS = ["cat", "dog", "fox", "owl", "yak"]
MEAN, STD, SCALE = (100.0, 120.0, 140.0), (50.0, 60.0, 70.0), 1.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    repo = tmp_path_factory.mktemp("models")
    write_version(repo, "batched", classifier())
    write_version(repo, "single", classifier(batch=1))  # fixed batch: served unbatched
    for name in ("batched", "single"):
        write_pbtxt(repo, name, """
            output [ { name: "scores" label_filename: "labels.txt" } ]
        """, labels__txt="\n".join(LABELS) + "\n")
    with ServerThread(repo) as running:
        yield running


def _images(tmp_path: Path, count: int) -> tuple[list[Path], np.ndarray]:
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, size=(count, 4, 4, 3), dtype=np.uint8)
    paths = []
    for i, image in enumerate(pixels):
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(image).save(paths[-1])
    return paths, pixels.transpose(0, 3, 1, 2)


def _expected(pixels: np.ndarray) -> list[list[str]]:
    x = (pixels.astype(np.float32) * np.float32(SCALE)
         - np.array(MEAN, np.float32).reshape(1, 3, 1, 1)) / \
        np.array(STD, np.float32).reshape(1, 3, 1, 1)
    scores = ort_run(classifier(), {"image": x})["scores"]
    return [[LABELS[i] for i in np.argsort(-row, kind="stable")[:2]] for row in scores]


@pytest.mark.parametrize("model", ["batched", "single"])
def test_the_cli_classifies_with_the_label_file_and_pixel_flags(
        server: ServerThread, tmp_path: Path, model: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    paths, pixels = _images(tmp_path, 3)
    code = main(["classify", "--url", server.url, "--model", model, "--top-k", "2",
                 "--scale", str(SCALE), "--mean", ",".join(map(str, MEAN)),
                 "--std", ",".join(map(str, STD)), *map(str, paths)])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    got = [[part.split()[0] for part in line.split(": ", 1)[1].split(", ")] for line in lines]
    assert got == _expected(pixels)


def test_the_sdk_takes_the_same_scaling(server: ServerThread, tmp_path: Path) -> None:
    _, pixels = _images(tmp_path, 2)
    with InferenceClient(server.url) as client:
        assert client.model_info("batched").max_batch_size == DEFAULT_MAX_BATCH_SIZE
        assert client.model_info("single").max_batch_size == 0
        assert client.model_info("single").labels == tuple(LABELS)
        result = client.classify("single", pixels, top_k=2,
                                 scaling=PixelScaling(SCALE, MEAN, STD))
    assert [[p.label for p in row] for row in result] == _expected(pixels)
