"""The ``cnnserve export`` subcommand (standard library only; the handler imports torch)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

_DESCRIPTION = """\
Export a training checkpoint to ONNX into a model repository, as
REPOSITORY/NAME/VERSION/model.onnx + config.json (and REPOSITORY/NAME/model.json with the
default serving policy when absent). The graph takes UINT8 'input' [batch, C, H, W] (raw
pixels 0..255; the normalisation (x/255 - mean)/std runs inside the graph), or with
--input float the normalised float32 pixels, and returns float32 'logits' and
'probabilities' [batch, classes].

The export is verified before anything is written: ONNX Runtime runs the graph on the test
images of the checkpoint's dataset at batch sizes 1, 7, 64 and --max-batch-size and must
match PyTorch within --tolerance with identical argmax. --quantize int8 and --fp16 graphs are
judged by test accuracy instead: a drop of more than --max-accuracy-drop points fails the
export. On failure nothing is written and the exit status is 1.
"""


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add the ``export`` subcommand to the ``cnnserve`` parser."""
    p = sub.add_parser("export", help="export a checkpoint to a verified ONNX model version",
                       description=_DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, metavar="CHECKPOINT",
                   help="checkpoint file written by `cnnserve train`")
    p.add_argument("--repository", type=Path, required=True, metavar="DIR",
                   help="model repository folder (created if missing)")
    p.add_argument("--name", required=True, help="model name: the folder under DIR")
    p.add_argument("--version", type=int, default=None, metavar="N",
                   help="version number (positive integer; default: the next free one)")
    p.add_argument("--force", action="store_true", help="replace an existing version N")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default: %(default)s)")
    p.add_argument("--max-batch-size", type=int, default=256, metavar="N",
                   help="largest batch the server may send; also the largest batch size "
                        "verified (default: %(default)s)")
    precision = p.add_mutually_exclusive_group()
    precision.add_argument("--quantize", choices=["int8"], default=None,
                           help="write a static INT8 (QDQ, per-channel) graph calibrated on "
                                "training images; reports accuracy and CPU speed before/after")
    precision.add_argument("--fp16", action="store_true",
                           help="write an FP16 graph for CUDA serving (float32 inputs and "
                                "outputs, casts inside)")
    p.add_argument("--input", choices=["pixels", "float"], default="pixels",
                   help="pixels: the graph takes UINT8 [batch, C, H, W] pixels and normalises "
                        "them itself, so any client can send an image's bytes; float: it "
                        "takes float32 pixels the client normalised (default: %(default)s)")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="max abs difference of FP32 logits/probabilities vs PyTorch "
                        "(default: %(default)s)")
    p.add_argument("--fp16-tolerance", type=float, default=5e-2,
                   help="max abs difference of FP16 logits vs PyTorch (default: %(default)s)")
    p.add_argument("--max-accuracy-drop", type=float, default=0.5, metavar="POINTS",
                   help="largest test-accuracy drop of an INT8/FP16 graph vs FP32, in "
                        "percentage points (default: %(default)s)")
    p.add_argument("--verify-dataset", default=None, metavar="NAME",
                   help="verify on this dataset's test split instead of the checkpoint's own")
    p.add_argument("--verify-images", type=int, default=1024, metavar="N",
                   help="test images compared with PyTorch at each batch size "
                        "(default: %(default)s; accuracy always uses the whole test split)")
    p.add_argument("--calibration-images", type=int, default=512, metavar="N",
                   help="training images that calibrate INT8 ranges (default: %(default)s)")
    p.add_argument("--benchmark-seconds", type=float, default=1.0, metavar="S",
                   help="time spent measuring each graph's CPU speed with --quantize "
                        "(default: %(default)s; 0 skips it)")
    p.add_argument("--allow-unverified-fp16", action="store_true",
                   help="write an FP16 graph even if ONNX Runtime on this machine cannot run "
                        "it (recorded as unverified in config.json)")
    p.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace) -> int:
    """Handler of ``cnnserve export``: print the verification figures; 0 on success."""
    from cnnserve.training.export.exporter import ExportOptions, export_checkpoint

    options = ExportOptions(
        verify_dataset=args.verify_dataset, verify_images=args.verify_images,
        fp16_tolerance=args.fp16_tolerance, max_accuracy_drop=args.max_accuracy_drop,
        calibration_images=args.calibration_images, benchmark_seconds=args.benchmark_seconds,
        allow_unverified_fp16=args.allow_unverified_fp16, pixel_input=args.input == "pixels")
    result = export_checkpoint(
        args.checkpoint, args.repository, args.name, version=args.version, opset=args.opset,
        max_batch_size=args.max_batch_size, quantize=args.quantize, fp16=args.fp16,
        tolerance=args.tolerance, force=args.force, options=options)
    print(result.summary())
    return 0
