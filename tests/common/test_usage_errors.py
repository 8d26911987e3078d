"""Usage errors exit 2 (as the README promises), before any data is loaded or model built."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cnnserve.cli", *args], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("command", [("train", "--dataset", "nosuch", "--epochs", "1"),
                                     ("evaluate", "model.onnx", "--dataset", "nosuch"),
                                     ("train", "--dataset", "idx:")])
def test_an_unknown_dataset_exits_2_naming_the_choices(command: tuple[str, ...]) -> None:
    result = run(*command)
    assert result.returncode == 2, result.stderr
    assert "unknown dataset" in result.stderr and "fashion-mnist" in result.stderr


def test_a_usage_error_raised_by_a_handler_exits_2(tmp_path: object) -> None:
    # A bad --url is found by the SDK, not argparse: it is still a usage error.
    result = run("classify", "--url", "http://127.0.0.1:8001", "--model", "m", "x.png")
    assert result.returncode == 2, result.stderr
    assert "host:port" in result.stderr
