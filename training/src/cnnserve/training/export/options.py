"""Every option of ``cnnserve export`` as one frozen value (standard library only).

The fields generate the command's flags (:func:`cnnserve.common.options.add_flags`) and are
the keyword arguments of :func:`cnnserve.training.export.exporter.export_checkpoint`, so a
default is written once. Values are checked, all in one place, by the exporter before any
work (:func:`cnnserve.training.export.exporter.check_options`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from cnnserve.common.options import option

Quantize = Literal["int8"]
InputKind = Literal["pixels", "float"]


@dataclass(frozen=True)
class ExportOptions:
    """How a checkpoint is exported and verified; see each field's help for units."""

    #: Options that exclude each other (one precision per graph): mutually exclusive flags,
    #: and checked by the exporter for API callers.
    EXCLUSIVE: ClassVar[tuple[tuple[str, ...], ...]] = (("quantize", "fp16"),)

    version: int | None = option(None, "version number (positive integer; default: the next "
                                 "free one)", metavar="N")
    force: bool = option(False, "replace an existing version N (default: off)")
    opset: int = option(17, "ONNX opset (default: 17)")
    max_batch_size: int = option(256, "largest batch the server may send; also the largest "
                                 "batch size verified (default: 256)", metavar="N")
    quantize: Quantize | None = option(
        None, "write a static INT8 (QDQ, per-channel) graph calibrated on training images; "
        "reports accuracy and CPU speed before/after (not with --fp16)")
    fp16: bool = option(False, "write an FP16 graph for CUDA serving (float32 inputs and "
                        "outputs, casts inside; not with --quantize) (default: off)")
    input: InputKind = option(
        "pixels", "pixels: the graph takes UINT8 [batch, C, H, W] pixels and normalises them "
        "itself, so any client can send an image's bytes; float: it takes float32 pixels the "
        "client normalised (default: pixels)")
    tolerance: float = option(1e-4, "max abs difference of FP32 logits/probabilities vs "
                              "PyTorch (default: 0.0001)")
    fp16_tolerance: float = option(5e-2, "max abs difference of FP16 logits vs PyTorch "
                                   "(default: 0.05)")
    max_accuracy_drop: float = option(0.5, "largest test-accuracy drop of an INT8/FP16 graph "
                                      "vs FP32, in percentage points (default: 0.5)",
                                      metavar="POINTS")
    verify_dataset: str | None = option(None, "verify on this dataset's test split instead of "
                                        "the checkpoint's own (same image shape required)",
                                        metavar="NAME")
    verify_images: int = option(1024, "test images compared with PyTorch at each batch size "
                                "(default: 1024; accuracy always uses the whole test split)",
                                metavar="N")
    calibration_images: int = option(512, "training images that calibrate INT8 ranges "
                                     "(default: 512)", metavar="N")
    benchmark_seconds: float = option(1.0, "seconds spent measuring each graph's CPU speed "
                                      "with --quantize (default: 1; 0 skips it)", metavar="S")
    benchmark_batch_size: int = option(64, "batch size of that speed comparison (default: 64)",
                                       metavar="N")
    allow_unverified_fp16: bool = option(False, "write an FP16 graph even if ONNX Runtime on "
                                         "this machine cannot run it (recorded as unverified "
                                         "in config.json) (default: off)")

    @property
    def precision(self) -> str:
        """``fp32``, ``fp16`` or ``int8``: the graph to write (options checked first)."""
        return "int8" if self.quantize else "fp16" if self.fp16 else "fp32"

    @property
    def pixel_input(self) -> bool:
        """Whether the graph takes UINT8 pixels (the preprocessing built in)."""
        return self.input == "pixels"
