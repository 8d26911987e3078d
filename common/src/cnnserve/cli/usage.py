"""Checks of command-line values that argparse cannot make alone, as ``type=`` functions.

Standard library only (the parts' ``cli`` modules describe their flags without importing
numpy or torch). A value that fails is a usage error: argparse prints the message with the
usage line and exits 2, before any data is loaded.
"""

from __future__ import annotations

import argparse


def dataset_name(text: str) -> str:
    """``text`` if it names a registered dataset; raises ArgumentTypeError (exit 2) listing
    the choices. The registry is standard-library only, so this loads no data."""
    from cnnserve.common.data import registry

    try:
        registry.resolve(text)
    except registry.DatasetError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text
