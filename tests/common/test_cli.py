"""The `cnnserve` command: every subcommand is registered and documented; exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest

SUBCOMMANDS = ("train", "evaluate", "export", "serve", "inspect", "batch", "classify")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cnnserve.cli", *args], capture_output=True,
                          text=True, timeout=120)


def test_top_level_help_lists_every_subcommand() -> None:
    result = run("--help")
    assert result.returncode == 0
    for name in SUBCOMMANDS:
        assert name in result.stdout


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_each_subcommand_has_complete_help(name: str) -> None:
    result = run(name, "--help")
    assert result.returncode == 0, result.stderr
    assert f"usage: cnnserve {name}" in result.stdout
    # Every option carries a help text (argparse prints options without one bare).
    assert result.stdout.count("--") >= 3


def test_unknown_subcommand_is_a_usage_error() -> None:
    result = run("fly")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0 and result.stdout.startswith("cnnserve ")
