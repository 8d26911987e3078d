"""Checks of command-line values that argparse cannot make alone, as ``type=`` functions.

Standard library only (the parts' ``cli`` modules describe their flags without importing
numpy or torch). A value that fails is a usage error: argparse prints the message with the
usage line and exits 2, before any data is loaded.
"""

from __future__ import annotations

import argparse

#: Dataset names every part accepts besides ``synthetic:CxHxW`` and ``idx:DIR``; the same
#: tuple as :data:`cnnserve.common.data.datasets.DATASET_NAMES` (a test keeps them equal).
DATASET_NAMES = ("fashion-mnist", "mnist", "digits", "synthetic")
_PREFIXES = ("synthetic:", "idx:")


def dataset_name(text: str) -> str:
    """``text`` if it names a dataset; raises ArgumentTypeError (exit 2) saying the choices."""
    if text in DATASET_NAMES or (text.startswith(_PREFIXES) and text.partition(":")[2]):
        return text
    raise argparse.ArgumentTypeError(
        f"unknown dataset {text!r}; choose one of {', '.join(DATASET_NAMES)}, "
        "synthetic:CxHxW or idx:DIR (a folder of IDX files)")
