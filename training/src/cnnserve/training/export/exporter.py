"""``cnnserve export``: a checkpoint becomes a verified ONNX version in the model repository.

Steps, all inside a hidden staging folder of ``<repository>/<name>/``:

1. rebuild the network from the checkpoint and export it to ONNX (:mod:`.onnx_graph`);
2. verify the FP32 graph against PyTorch on real test images of the checkpoint's dataset at
   batch sizes 1, 7, 64 and ``max_batch_size`` (:mod:`.verify`): any logit or probability
   further than ``tolerance`` from PyTorch's, or any differing argmax, fails the export;
3. optionally derive an INT8 or FP16 graph (:mod:`.quantize`) and judge it by test accuracy
   against the FP32 graph: a drop of more than ``max_accuracy_drop`` points fails the export
   (FP16 must also stay within ``fp16_tolerance`` of PyTorch's logits);
4. unless ``pixel_input`` is off, build the normalisation into the graph (:mod:`.pixels`):
   ``input`` becomes UINT8 pixels, checked against the float graph on the same images;
5. write metadata, ``config.json``, flush, and rename the folder to ``<name>/<version>``.

Any failure leaves the repository as it was. Verification needs the dataset: a missing one
fails the export with the dataset's own error (``verify_dataset`` names another source).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnnserve.common.repository import CONFIG_FILE, MODEL_FILE, VersionConfig, list_versions
from cnnserve.training.export import writer as repo
from cnnserve.training.export.builder import ExportError, VersionBuilder
from cnnserve.training.export.verify import ParityReport
from cnnserve.training.export.writer import next_version

log = logging.getLogger(__name__)

__all__ = ["ExportError", "ExportOptions", "ExportResult", "export_checkpoint", "next_version"]

QUANTIZE_CHOICES = ("int8",)
MIN_OPSET = 13


@dataclass(frozen=True)
class ExportResult:
    """What one export wrote and the figures that justified writing it."""

    version_dir: Path
    version: int
    model_path: Path
    config: VersionConfig
    #: "fp32", "fp16" or "int8": the precision of the written graph.
    precision: str
    #: "dynamo" or "torchscript": the torch.onnx exporter that produced the graph.
    exporter: str
    #: The FP32 graph against PyTorch (always checked).
    parity: ParityReport
    #: The written FP16/INT8 graph against PyTorch; None for FP32 or unverified FP16.
    reduced_parity: ParityReport | None = None
    #: The pixel-input graph against itself fed normalised floats; None for float input.
    pixel_parity: ParityReport | None = None
    #: Test-split top-1 accuracy in percent, by graph ("fp32", and "int8" or "fp16").
    accuracy: dict[str, float] = field(default_factory=dict)
    #: CPU images per second at batch size ``throughput_batch_size``, by graph (INT8 only).
    throughput: dict[str, float] = field(default_factory=dict)
    throughput_batch_size: int = 0
    #: Why a reduced-precision graph was not verified (empty when it was).
    unverified_reason: str = ""

    def summary(self) -> str:
        """Multi-line human summary: parity tables, accuracy, speed, where it was written."""
        parts = [self.parity.format_table()]
        if self.reduced_parity is not None:
            parts.append(self.reduced_parity.format_table())
        if self.pixel_parity is not None:
            parts.append(self.pixel_parity.format_table())
        if self.accuracy:
            parts.append("test accuracy: " + ", ".join(
                f"{k} {v:.2f}%" for k, v in self.accuracy.items()))
        if self.throughput:
            parts.append(f"CPU throughput at batch {self.throughput_batch_size}: " + ", ".join(
                f"{k} {v:,.0f} images/s" for k, v in self.throughput.items()))
        if self.unverified_reason:
            parts.append(f"WARNING: the {self.precision} graph was NOT verified: "
                         f"{self.unverified_reason}")
        parts.append(f"wrote {self.precision} model version {self.version} to {self.version_dir}")
        return "\n".join(parts)


@dataclass(frozen=True)
class ExportOptions:
    """Verification knobs of :func:`export_checkpoint` beyond the common ones."""

    #: Dataset to verify on instead of the checkpoint's own (same image shape required).
    verify_dataset: str | None = None
    #: Test images compared with PyTorch at every batch size (accuracy uses all of them).
    verify_images: int = 1024
    #: Max abs logit difference allowed for an FP16 graph (FP32 uses ``tolerance``).
    fp16_tolerance: float = 5e-2
    #: Largest allowed drop of test accuracy, in percentage points, for FP16/INT8 graphs.
    max_accuracy_drop: float = 0.5
    #: Training images used to calibrate INT8 activation ranges.
    calibration_images: int = 512
    #: Seconds spent timing each graph for the INT8 speed comparison (0 skips it).
    benchmark_seconds: float = 1.0
    #: Batch size of the speed comparison.
    benchmark_batch_size: int = 64
    #: Write an FP16 graph that ONNX Runtime here cannot run, instead of failing.
    allow_unverified_fp16: bool = False
    #: Build the preprocessing into the graph: ``input`` takes UINT8 pixels [batch, C, H, W]
    #: (False: float32, normalised by the client, as before).
    pixel_input: bool = True


def export_checkpoint(checkpoint_path: Path, repository: Path, name: str, *,
                      version: int | None = None, opset: int = 17, max_batch_size: int = 256,
                      quantize: str | None = None, fp16: bool = False,
                      tolerance: float = 1e-4, force: bool = False,
                      options: ExportOptions | None = None) -> ExportResult:
    """Export the checkpoint at ``checkpoint_path`` as ``repository/name/version``.

    ``version`` defaults to the next free one; an existing version is refused unless
    ``force``. ``quantize="int8"`` or ``fp16=True`` write a reduced-precision graph instead
    of FP32 (not both); ``options`` tunes verification. Raises :class:`ExportError` for bad
    arguments, a failed check, a missing verification dataset (quoting the dataset's error)
    or a taken version, and CheckpointError (a :class:`CnnserveError`) for an unreadable
    checkpoint. Nothing is written on failure.
    """
    opts = options or ExportOptions()
    precision = _check_arguments(name, version, opset, max_batch_size, quantize, fp16,
                                 tolerance, opts)
    model_dir = Path(repository) / name
    if version is not None and version in list_versions(model_dir) and not force:
        raise ExportError(f"version {version} of model '{name}' already exists in "
                          f"{repository}; pass --force to replace it")
    builder = VersionBuilder.load(Path(checkpoint_path), opts)
    created = not model_dir.exists()
    staging = repo.stage(model_dir)
    try:
        built = builder.build(staging, precision=precision, opset=opset,
                              max_batch_size=max_batch_size, tolerance=tolerance)
        if version is None:
            version = next_version(model_dir)
        config = builder.config(name, built, max_batch_size=max_batch_size)
        (staging / CONFIG_FILE).write_text(config.to_json(), encoding="utf-8")
        try:
            target = repo.publish(staging, model_dir, version, force=force)
        except repo.RepositoryWriteError as exc:
            raise ExportError(str(exc)) from exc
    except BaseException:
        repo.discard(staging, model_dir, created_model_dir=created)
        raise
    # After the version: a server that sees no model.json uses these same defaults.
    repo.ensure_policy(model_dir)
    log.debug("wrote %s version %d of '%s' to %s", precision, version, name, target)
    return ExportResult(
        version_dir=target, version=version, model_path=target / MODEL_FILE, config=config,
        precision=precision, exporter=built.exporter, parity=built.parity,
        reduced_parity=built.reduced_parity, pixel_parity=built.pixel_parity,
        accuracy=built.accuracy,
        throughput=built.throughput, throughput_batch_size=built.throughput_batch_size,
        unverified_reason=built.unverified_reason)


def _check_arguments(name: str, version: int | None, opset: int, max_batch_size: int,
                     quantize: str | None, fp16: bool, tolerance: float,
                     opts: ExportOptions) -> str:
    """Validate the arguments before any work; return the precision to write."""
    import onnx

    try:
        repo.check_model_name(name)
    except repo.RepositoryWriteError as exc:
        raise ExportError(str(exc)) from exc
    if version is not None and version < 1:
        raise ExportError(f"--version must be a positive integer, got {version}")
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise ExportError(f"--opset must be between {MIN_OPSET} and {newest}, got {opset}")
    if max_batch_size < 1:
        raise ExportError(f"--max-batch-size must be >= 1, got {max_batch_size}")
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise ExportError(f"--quantize must be one of {QUANTIZE_CHOICES}, got {quantize!r}")
    if quantize and fp16:
        raise ExportError("--quantize int8 and --fp16 are mutually exclusive: pick one precision")
    if not (np.isfinite(tolerance) and tolerance >= 0):
        raise ExportError(f"--tolerance must be a finite number >= 0, got {tolerance}")
    if not (opts.fp16_tolerance >= 0 and opts.max_accuracy_drop >= 0):
        raise ExportError("--fp16-tolerance and --max-accuracy-drop must be >= 0")
    if opts.verify_images < 1 or opts.calibration_images < 1:
        raise ExportError("--verify-images and --calibration-images must be >= 1")
    return "int8" if quantize else "fp16" if fp16 else "fp32"

