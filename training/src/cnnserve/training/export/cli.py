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
    from cnnserve.common.options import add_flags
    from cnnserve.training.export.options import ExportOptions

    p = sub.add_parser("export", help="export a checkpoint to a verified ONNX model version",
                       description=_DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, metavar="CHECKPOINT",
                   help="checkpoint file written by `cnnserve train`")
    p.add_argument("--repository", type=Path, required=True, metavar="DIR",
                   help="model repository folder (created if missing)")
    p.add_argument("--name", required=True, help="model name: the folder under DIR")
    add_flags(p, ExportOptions)
    p.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace) -> int:
    """Handler of ``cnnserve export``: print the verification figures; 0 on success."""
    from cnnserve.common.options import build_options
    from cnnserve.training.export.exporter import export_checkpoint
    from cnnserve.training.export.options import ExportOptions

    options = build_options(ExportOptions, vars(args))
    result = export_checkpoint(args.checkpoint, args.repository, args.name, options)
    print(result.summary())
    return 0
