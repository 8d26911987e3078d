"""Build and verify one model version's files in a staging folder (the torch side of export).

:class:`VersionBuilder` holds a loaded checkpoint, its rebuilt network and the verification
images; :meth:`VersionBuilder.build` writes ``model.onnx`` and returns the figures that
justify it, or raises :class:`ExportError` with those figures when a check fails.
:mod:`cnnserve.training.export.exporter` turns that into a repository version.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import torch

from cnnserve.common.data.sources import sha256_file
from cnnserve.common.errors import CnnserveError
from cnnserve.common.names import INPUT, OUTPUTS
from cnnserve.common.preprocess import normalize
from cnnserve.common.repository import MODEL_FILE, Normalization, TensorSpec, VersionConfig
from cnnserve.training.export import verify
from cnnserve.training.export.graph import (
    GraphError,
    export_onnx,
    stamp_metadata,
)
from cnnserve.training.export.pixels import add_pixel_input
from cnnserve.training.export.quantize import QuantizationError, convert_fp16, quantize_int8

if TYPE_CHECKING:
    from cnnserve.training.export.exporter import ExportOptions
    from cnnserve.training.train.checkpoint import Checkpoint

log = logging.getLogger(__name__)

Array = npt.NDArray[np.float32]


class ExportError(CnnserveError):
    """The export was refused or failed verification; the repository is unchanged."""


@dataclass(frozen=True)
class Built:
    """Figures of a built version (see :class:`cnnserve.training.export.exporter.ExportResult`)."""

    precision: str
    opset: int
    exporter: str
    parity: verify.ParityReport
    reduced_parity: verify.ParityReport | None = None
    #: The pixel-input graph against the same graph fed normalised floats (pixel input only).
    pixel_parity: verify.ParityReport | None = None
    accuracy: dict[str, float] = field(default_factory=dict)
    throughput: dict[str, float] = field(default_factory=dict)
    throughput_batch_size: int = 0
    unverified_reason: str = ""


@dataclass(frozen=True)
class _Images:
    """Verification images: all test images, normalised and as pixels, and their labels."""

    x: Array
    y: npt.NDArray[np.int64]
    pixels: npt.NDArray[np.uint8]


class VersionBuilder:
    """A checkpoint ready to export: network, metadata and verification data."""

    def __init__(self, checkpoint_path: Path, ckpt: Checkpoint, model: torch.nn.Module,
                 dataset: str, test: _Images, options: ExportOptions) -> None:
        self.checkpoint_path = checkpoint_path.resolve()
        self.ckpt = ckpt
        self.model = model
        self.dataset = dataset
        self.test = test
        self.options = options
        self.sha256 = sha256_file(self.checkpoint_path)

    @classmethod
    def load(cls, checkpoint_path: Path, options: ExportOptions) -> VersionBuilder:
        """Load the checkpoint and the test split to verify on.

        Raises CheckpointError for a bad checkpoint and :class:`ExportError` (quoting the
        dataset's own error) when the verification images are unavailable or mis-shaped.
        """
        from cnnserve.common.data.datasets import DatasetError, load_split
        from cnnserve.training.train.checkpoint import load_checkpoint, restore_network

        ckpt = load_checkpoint(checkpoint_path)
        model = restore_network(ckpt)
        dataset = options.verify_dataset or ckpt.dataset
        try:
            test = load_split(dataset, "test")
        except DatasetError as exc:
            raise ExportError(f"export verification needs the test images of '{dataset}': "
                              f"{exc}\n(--verify-dataset NAME verifies on another dataset of "
                              "the same image shape)") from exc
        if tuple(test.images.shape[1:]) != tuple(ckpt.input_shape) or len(test) == 0:
            raise ExportError(f"the test split of '{dataset}' holds {len(test)} images of "
                              f"shape {list(test.images.shape[1:])}; the model expects "
                              f"{list(ckpt.input_shape)}")
        images = _Images(x=normalize(test.images, ckpt.mean, ckpt.std), y=test.labels,
                         pixels=test.images)
        return cls(checkpoint_path, ckpt, model, dataset, images, options)

    def build(self, staging: Path, *, precision: str, opset: int, max_batch_size: int,
              tolerance: float) -> Built:
        """Write ``staging/model.onnx`` in ``precision`` and verify it; return its figures.

        Raises :class:`ExportError` when export, conversion or verification fails.
        """
        try:
            built = self._build(staging, precision, opset, max_batch_size, tolerance)
            if self.options.pixel_input:
                built = self._take_pixels(staging / MODEL_FILE, built, max_batch_size,
                                          tolerance)
            return built
        except (GraphError, QuantizationError) as exc:
            raise ExportError(str(exc)) from exc

    def _build(self, staging: Path, precision: str, opset: int, max_batch_size: int,
               tolerance: float) -> Built:
        final = staging / MODEL_FILE
        fp32_path = final if precision == "fp32" else staging / "fp32.onnx"
        log.info("exporting %s to ONNX opset %d", self.checkpoint_path.name, opset)
        exporter = export_onnx(self.model, fp32_path, self.ckpt.input_shape, opset)
        stamp_metadata(fp32_path, self.metadata("fp32", exporter))
        parity_x = self.test.x[:self.options.verify_images]
        reference = verify.torch_outputs(self.model, parity_x)
        if reference.logits.shape[1] != len(self.ckpt.class_names):
            raise ExportError(f"the network outputs {reference.logits.shape[1]} classes but the "
                              f"checkpoint names {len(self.ckpt.class_names)}")
        batches = verify.parity_batch_sizes(len(parity_x), max_batch_size)
        log.info("verifying against PyTorch on %d test images of '%s' at batch sizes %s",
                 len(parity_x), self.dataset, list(batches))
        session = verify.open_session(str(fp32_path))
        parity = verify.compare(reference, session, parity_x, batches, precision="fp32",
                                tolerance=tolerance)
        log.debug("%s", parity.format_table())
        _raise_if(parity.failures(exact_argmax=True), "the ONNX model does not compute what "
                  "the PyTorch model computes", parity)
        built = Built(precision=precision, opset=opset, exporter=exporter, parity=parity,
                      accuracy={"fp32": verify.accuracy(session, self.test.x, self.test.y,
                                                        batches[-1])})
        if precision != "fp32":
            built = self._reduce(built, fp32_path, final, reference, session, batches)
            fp32_path.unlink()
        return built

    def _take_pixels(self, path: Path, built: Built, max_batch_size: int,
                     tolerance: float) -> Built:
        """Give the graph at ``path`` a UINT8 pixel input and check it against the float one.

        Fed the raw test images, the new graph must match the old one fed the normalised
        images within ``tolerance``, with identical argmax (in practice bit-identical: the
        graph normalises as :func:`normalize` does).
        """
        c, count = self.ckpt, self.options.verify_images
        if built.unverified_reason:  # ONNX Runtime here cannot run this graph at all
            add_pixel_input(path, c.mean, c.std)
            return built
        providers = _providers(built.precision)
        batches = verify.parity_batch_sizes(len(self.test.x[:count]), max_batch_size)
        reference = verify.session_outputs(verify.open_session(str(path), providers),
                                           self.test.x[:count], batches[-1])
        log.info("building the preprocessing into the graph: input UINT8 pixels")
        add_pixel_input(path, c.mean, c.std)
        report = verify.compare(reference, verify.open_session(str(path), providers),
                                self.test.pixels[:count], batches,
                                precision=f"{built.precision} pixels", tolerance=tolerance)
        report = replace(report, reference="the same graph fed normalised floats")
        _raise_if(report.failures(exact_argmax=True), "the pixel-input graph does not compute "
                  "what the graph fed normalised floats computes", report)
        return replace(built, pixel_parity=report)

    def _reduce(self, built: Built, fp32_path: Path, final: Path, reference: verify.Outputs,
                fp32_session: ort.InferenceSession, batches: tuple[int, ...]) -> Built:
        """Derive the INT8/FP16 graph from the FP32 one and judge it against FP32."""
        opts, precision = self.options, built.precision
        log.info("deriving the %s graph", precision)
        if precision == "int8":
            quantize_int8(fp32_path, final, self._calibration_images())
            providers, tolerance = ["CPUExecutionProvider"], None
        else:
            convert_fp16(fp32_path, final)
            providers = _providers("fp16")
            tolerance = opts.fp16_tolerance
        stamp_metadata(final, self.metadata(precision, built.exporter))
        try:
            session = verify.open_session(str(final), providers)
            report = verify.compare(reference, session, self.test.x[:opts.verify_images],
                                    batches, precision=precision, tolerance=tolerance)
        except Exception as exc:  # onnxruntime's Fail/NotImplemented/RuntimeException
            reason = f"ONNX Runtime ({', '.join(providers)}) cannot run it: {exc}"
            if precision == "fp16" and opts.allow_unverified_fp16:
                log.warning("FP16 graph NOT verified: %s", reason)
                return replace(built, unverified_reason=reason)
            raise ExportError(f"cannot verify the {precision} graph: {reason}" + (
                "\n(--allow-unverified-fp16 writes it anyway)" if precision == "fp16" else ""
            )) from exc
        built = self._judge(built, report, session, batches[-1])
        if precision == "int8" and opts.benchmark_seconds > 0:
            b = opts.benchmark_batch_size
            built = replace(built, throughput_batch_size=b, throughput={
                name: verify.throughput(s, self.test.x, b, opts.benchmark_seconds)
                for name, s in (("fp32", fp32_session), ("int8", session))})
        return built

    def _judge(self, built: Built, report: verify.ParityReport,
               session: ort.InferenceSession, batch_size: int) -> Built:
        """Fail unless the reduced graph keeps test accuracy (and FP16 its tolerance)."""
        precision, limit = built.precision, self.options.max_accuracy_drop
        log.debug("%s", report.format_table())
        accuracy = {**built.accuracy, precision: verify.accuracy(
            session, self.test.x, self.test.y, batch_size)}
        drop = accuracy["fp32"] - accuracy[precision]
        failures = report.failures(exact_argmax=False)
        if not drop <= limit:
            failures.append(f"test accuracy fell from {accuracy['fp32']:.2f}% (fp32) to "
                            f"{accuracy[precision]:.2f}% ({precision}), a drop of {drop:.2f} "
                            f"points; at most {limit} is allowed (--max-accuracy-drop)")
        _raise_if(failures, f"the {precision} graph is not accurate enough", report)
        return replace(built, reduced_parity=report, accuracy=accuracy)

    def _calibration_images(self) -> Array:
        """A seeded random sample of normalised training images for INT8 calibration."""
        from cnnserve.common.data.datasets import DatasetError, load_split

        try:
            train = load_split(self.dataset, "train")
        except DatasetError as exc:
            raise ExportError(f"INT8 calibration needs the training images of "
                              f"'{self.dataset}': {exc}") from exc
        rng = np.random.default_rng(0)
        count = min(self.options.calibration_images, len(train))
        pick = np.sort(rng.choice(len(train), size=count, replace=False))
        return normalize(train.images[pick], self.ckpt.mean, self.ckpt.std)

    def metadata(self, precision: str, exporter: str) -> dict[str, str]:
        """The ``cnnserve.*`` ONNX metadata_props entries (JSON text for structured values)."""
        c = self.ckpt
        return {
            "cnnserve.labels": json.dumps(list(c.class_names)),
            "cnnserve.normalization": json.dumps({"mean": list(c.mean), "std": list(c.std)}),
            "cnnserve.architecture": c.spec,
            "cnnserve.source_checkpoint": str(self.checkpoint_path),
            "cnnserve.source_checkpoint_sha256": self.sha256,
            "cnnserve.dataset": c.dataset,
            "cnnserve.input_shape": json.dumps(list(c.input_shape)),
            "cnnserve.precision": precision,
            "cnnserve.input": "pixels" if self.options.pixel_input else "float",
            "cnnserve.exporter": f"torch {torch.__version__} ({exporter})",
        }

    def config(self, name: str, built: Built, *, max_batch_size: int) -> VersionConfig:
        """The version's ``config.json``: signature, labels, normalisation and figures."""
        c = self.ckpt
        classes = len(c.class_names)
        datatype = "UINT8" if self.options.pixel_input else "FP32"
        return VersionConfig(
            name=name,
            inputs=(TensorSpec(INPUT, datatype, (-1, *c.input_shape)),),
            outputs=tuple(TensorSpec(o, "FP32", (-1, classes)) for o in OUTPUTS),
            max_batch_size=max_batch_size, labels=c.class_names,
            normalization=Normalization(mean=c.mean, std=c.std), precision=built.precision,
            architecture=c.spec, dataset=c.dataset, source_checkpoint=str(self.checkpoint_path),
            metrics={"training": {k: v for k, v in c.metrics.items()
                                  if isinstance(v, (int, float, str, bool))},
                     "export": self._export_metrics(built)})

    def _export_metrics(self, built: Built) -> dict[str, Any]:
        out: dict[str, Any] = {
            "opset": built.opset, "exporter": built.exporter, "torch": torch.__version__,
            "onnxruntime": ort.__version__, "verify_dataset": self.dataset,
            "test_images": len(self.test.y), "test_accuracy_percent": built.accuracy,
            "source_checkpoint_sha256": self.sha256, "parity_fp32": built.parity.to_dict(),
        }
        if built.reduced_parity is not None:
            out[f"parity_{built.precision}"] = built.reduced_parity.to_dict()
        if built.pixel_parity is not None:
            out["parity_pixels"] = built.pixel_parity.to_dict()
        if built.throughput:
            out["cpu_throughput_images_per_second"] = {
                "batch_size": built.throughput_batch_size, **built.throughput}
        if built.precision != "fp32":
            out["verified"] = not built.unverified_reason
            if built.unverified_reason:
                out["unverified_reason"] = built.unverified_reason
        return out


def _providers(precision: str) -> list[str]:
    """Where a graph of ``precision`` is verified: FP16 on CUDA when present, else the CPU."""
    if precision != "fp16":
        return ["CPUExecutionProvider"]
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
            if p in ort.get_available_providers()]


def _raise_if(failures: list[str], what: str, report: verify.ParityReport) -> None:
    if failures:
        raise ExportError(f"export failed verification, nothing was written: {what}:\n  "
                          + "\n  ".join(failures) + "\n" + report.format_table())
