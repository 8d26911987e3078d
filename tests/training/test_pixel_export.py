"""Exports that take pixels (the default) or normalised floats (``--input float``).

The pixel graph normalises inside itself exactly as :func:`normalize` does, so raw test images
give what the float graph gives for the normalised ones; ``cnnserve evaluate`` and export's
parity check handle both kinds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from cnnserve.common.data.datasets import load_split
from cnnserve.common.preprocess import normalize
from cnnserve.training.export.exporter import ExportOptions, ExportResult, export_checkpoint
from cnnserve.training.export.graph import GraphError, read_metadata
from cnnserve.training.export.pixels import add_pixel_input, input_datatype
from cnnserve.training.train.checkpoint import load_checkpoint
from cnnserve.training.train.evaluate import evaluate_onnx
from tests.support.export import make_checkpoint

FAST = ExportOptions(verify_images=128)


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.fixture(scope="module")
def both(ckpt_path: Path, tmp_path_factory: pytest.TempPathFactory
         ) -> tuple[ExportResult, ExportResult]:
    repo = tmp_path_factory.mktemp("repo")
    pixels = export_checkpoint(ckpt_path, repo, "pixels", max_batch_size=64, options=FAST)
    floats = export_checkpoint(ckpt_path, repo, "floats", max_batch_size=64,
                               options=ExportOptions(verify_images=128, input="float"))
    return pixels, floats


def test_default_export_takes_uint8_pixels(both: tuple[ExportResult, ExportResult]) -> None:
    pixels, _ = both
    assert [(t.name, t.datatype, t.shape) for t in pixels.config.inputs] == [
        ("input", "UINT8", (-1, 1, 28, 28))]
    assert input_datatype(pixels.model_path) == "UINT8"
    assert read_metadata(pixels.model_path)["cnnserve.input"] == "pixels"
    report = pixels.pixel_parity
    assert report is not None and report.argmax_mismatches == 0 and report.images == 128
    assert report.max_abs_diff <= 1e-4
    assert pixels.config.metrics["export"]["parity_pixels"]["argmax_mismatches"] == 0
    assert "fp32 pixels" in pixels.summary()


def test_float_export_keeps_the_normalised_float_input(
        both: tuple[ExportResult, ExportResult]) -> None:
    _, floats = both
    assert [(t.datatype, t.shape) for t in floats.config.inputs] == [("FP32", (-1, 1, 28, 28))]
    assert input_datatype(floats.model_path) == "FP32" and floats.pixel_parity is None
    assert read_metadata(floats.model_path)["cnnserve.input"] == "float"


def test_pixel_graph_on_pixels_equals_float_graph_on_normalised(
        both: tuple[ExportResult, ExportResult], ckpt_path: Path) -> None:
    pixels, floats = both
    ckpt = load_checkpoint(ckpt_path)
    images = load_split("synthetic", "test").images[:64]
    run = {path: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
           for path in (pixels.model_path, floats.model_path)}
    (from_pixels,) = run[pixels.model_path].run(["logits"], {"input": images})
    (from_floats,) = run[floats.model_path].run(
        ["logits"], {"input": normalize(images, ckpt.mean, ckpt.std)})
    np.testing.assert_allclose(from_pixels, from_floats, atol=1e-5, rtol=0)
    assert (from_pixels.argmax(1) == from_floats.argmax(1)).all()


def test_evaluate_gives_the_same_predictions_for_both_kinds(
        both: tuple[ExportResult, ExportResult]) -> None:
    pixels, floats = both
    images = load_split("synthetic", "test").images
    np.testing.assert_array_equal(evaluate_onnx(pixels.version_dir, images),
                                  evaluate_onnx(floats.version_dir, images))


def test_pixel_input_refuses_a_graph_without_float_input(
        both: tuple[ExportResult, ExportResult], tmp_path: Path) -> None:
    pixels, _ = both
    copy = tmp_path / "model.onnx"
    onnx.save(onnx.load(str(pixels.model_path)), str(copy))
    with pytest.raises(GraphError, match="no float32 input 'input'"):
        add_pixel_input(copy, (0.5,), (0.25,))
