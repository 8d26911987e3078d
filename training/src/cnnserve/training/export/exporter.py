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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, get_args

import numpy as np

from cnnserve.common import options
from cnnserve.common.repository import CONFIG_FILE, MODEL_FILE, VersionConfig, list_versions
from cnnserve.training.export import writer as repo
from cnnserve.training.export.builder import Built, ExportError, VersionBuilder
from cnnserve.training.export.options import ExportOptions, Quantize
from cnnserve.training.export.verify import ParityReport
from cnnserve.training.export.writer import next_version

log = logging.getLogger(__name__)

__all__ = ["ExportError", "ExportOptions", "ExportResult", "check_options", "export_checkpoint",
           "next_version"]

QUANTIZE_CHOICES: tuple[str, ...] = get_args(Quantize)
MIN_OPSET = 13


@dataclass(frozen=True)
class ExportResult:
    """What one export wrote and the figures that justified writing it (``built``)."""

    version_dir: Path
    version: int
    model_path: Path
    config: VersionConfig
    #: The figures of the written graph: precision, exporter, parity, accuracy, speed.
    built: Built

    @property
    def precision(self) -> str:
        """"fp32", "fp16" or "int8": the precision of the written graph."""
        return self.built.precision

    @property
    def exporter(self) -> str:
        """"dynamo" or "torchscript": the torch.onnx exporter that produced the graph."""
        return self.built.exporter

    @property
    def parity(self) -> ParityReport:
        """The FP32 graph against PyTorch (always checked)."""
        return self.built.parity

    @property
    def reduced_parity(self) -> ParityReport | None:
        """The written FP16/INT8 graph against PyTorch; None for FP32 or unverified FP16."""
        return self.built.reduced_parity

    @property
    def accuracy(self) -> dict[str, float]:
        """Test-split top-1 accuracy in percent, by graph ("fp32", and "int8" or "fp16")."""
        return self.built.accuracy

    @property
    def throughput(self) -> dict[str, float]:
        """CPU images per second at ``throughput_batch_size``, by graph (INT8 only)."""
        return self.built.throughput

    @property
    def throughput_batch_size(self) -> int:
        """Batch size of :attr:`throughput` (0 when not measured)."""
        return self.built.throughput_batch_size

    @property
    def unverified_reason(self) -> str:
        """Why a reduced-precision graph was not verified (empty when it was)."""
        return self.built.unverified_reason

    @property
    def pixel_parity(self) -> ParityReport | None:
        """The pixel-input graph against the float graph on normalised images (None for
        ``--input float``)."""
        return self.built.pixel_parity

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


def export_checkpoint(checkpoint_path: Path, repository: Path, name: str,
                      options: ExportOptions | None = None, **changes: Any) -> ExportResult:
    """Export the checkpoint at ``checkpoint_path`` as ``repository/name/version``.

    ``options`` (default :class:`ExportOptions()`) with ``changes`` applied
    (``version=5, quantize="int8"``...) say how: the version defaults to the next free one;
    an existing version is refused unless ``force``; ``quantize="int8"`` or ``fp16=True``
    write a reduced-precision graph instead of FP32 (not both). Raises :class:`ExportError`
    for bad options, a failed check, a missing verification dataset (quoting the dataset's
    error) or a taken version, TypeError for an unknown keyword, and CheckpointError (a
    :class:`CnnserveError`) for an unreadable checkpoint. Nothing is written on failure.
    """
    opts = replace(options or ExportOptions(), **changes)
    check_options(name, opts)
    precision, version, force = opts.precision, opts.version, opts.force
    model_dir = Path(repository) / name
    if version is not None and version in list_versions(model_dir) and not force:
        raise ExportError(f"version {version} of model '{name}' already exists in "
                          f"{repository}; pass --force to replace it")
    builder = VersionBuilder.load(Path(checkpoint_path), opts)
    created = not model_dir.exists()
    staging = repo.stage(model_dir)
    try:
        built = builder.build(staging, precision=precision, opset=opts.opset,
                              max_batch_size=opts.max_batch_size, tolerance=opts.tolerance)
        if version is None:
            version = next_version(model_dir)
        config = builder.config(name, built, max_batch_size=opts.max_batch_size)
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
    return ExportResult(version_dir=target, version=version, model_path=target / MODEL_FILE,
                        config=config, built=built)


def check_options(name: str, opts: ExportOptions) -> None:
    """Validate the model name and every option before any work; raise :class:`ExportError`."""
    import onnx

    try:
        repo.check_model_name(name)
    except repo.RepositoryWriteError as exc:
        raise ExportError(str(exc)) from exc
    if opts.version is not None and opts.version < 1:
        raise ExportError(f"--version must be a positive integer, got {opts.version}")
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opts.opset <= newest:
        raise ExportError(f"--opset must be between {MIN_OPSET} and {newest}, got {opts.opset}")
    if opts.max_batch_size < 1:
        raise ExportError(f"--max-batch-size must be >= 1, got {opts.max_batch_size}")
    if opts.quantize is not None and opts.quantize not in QUANTIZE_CHOICES:
        raise ExportError(f"--quantize must be one of {QUANTIZE_CHOICES}, "
                          f"got {opts.quantize!r}")
    for names in opts.EXCLUSIVE:
        if len(given := [n for n in names if getattr(opts, n) not in (None, False)]) > 1:
            flags = " and ".join(options.flag_of(ExportOptions, n) for n in given)
            raise ExportError(f"{flags} are mutually exclusive: pick one")
    if not (np.isfinite(opts.tolerance) and opts.tolerance >= 0):
        raise ExportError(f"--tolerance must be a finite number >= 0, got {opts.tolerance}")
    if not (opts.fp16_tolerance >= 0 and opts.max_accuracy_drop >= 0):
        raise ExportError("--fp16-tolerance and --max-accuracy-drop must be >= 0")
    if opts.verify_images < 1 or opts.calibration_images < 1 or opts.benchmark_batch_size < 1:
        raise ExportError("--verify-images, --calibration-images and --benchmark-batch-size "
                          "must be >= 1")
