"""Subcommands of cnnserve.client (placeholder until implemented)."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add this part's subcommands to the `cnnserve` parser."""
