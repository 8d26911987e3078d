"""Every README command works: the cheap ones (help, version) are run, every `cnnserve`
command line parses, the paths chain from one command to the next, and the SDK snippet runs
against a real server."""

from __future__ import annotations

import itertools
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cnnserve.cli import build_parser
from cnnserve.common.repository import Normalization, TensorSpec, VersionConfig
from tests.support.deploy_server import running_server

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def shell_commands() -> list[str]:
    """The `cnnserve ...` lines of the README's bash blocks, comments stripped."""
    lines = []
    for block in blocks("bash"):
        joined = block.replace("\\\n", " ")  # a continued line is one command
        for line in joined.splitlines():
            command = " ".join(line.split("  #", 1)[0].split())
            if command.startswith("cnnserve "):
                lines.append(command)
    return lines


def cheap_commands() -> list[str]:
    """Help and version commands, in code blocks or inline code."""
    found = {c for c in shell_commands() + re.findall(r"`(cnnserve [^`]*)`", README)
             if c.endswith(("--help", "--version"))}
    return sorted(found)


def test_the_readme_has_commands_to_check() -> None:
    assert len(shell_commands()) >= 8 and len(cheap_commands()) >= 3


@pytest.mark.parametrize("command", cheap_commands())
def test_a_cheap_readme_command_runs(command: str) -> None:
    result = subprocess.run([sys.executable, "-m", "cnnserve.cli", *shlex.split(command)[1:]],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


@pytest.mark.parametrize("command", shell_commands())
def test_every_readme_command_line_parses(command: str) -> None:
    build_parser().parse_args(shlex.split(command)[1:])  # SystemExit(2) on a bad flag


def test_readme_paths_chain_from_command_to_command() -> None:
    """Each checkpoint or ONNX file a command reads is written by a command before it."""
    written: set[str] = set()
    for command in shell_commands():
        args = shlex.split(command)
        given = dict(itertools.pairwise(args))
        if args[1] == "train":
            written.add(given["--out"] + "/checkpoint.pt")
        if args[1] == "export":
            written.add(f"{given['--repository']}/{given['--name']}/1/model.onnx")
        if args[1] in ("evaluate", "export"):
            assert args[2] in written, f"{command!r} reads {args[2]}, which nothing wrote"


FASHION = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
           "Sneaker", "Bag", "Ankle boot")


def write_fashion_shaped_model(repo: Path) -> None:
    """A 1x28x28 -> 10-class model named fashion-cnn, laid out as `cnnserve export` does."""
    w = (np.arange(784 * 10, dtype=np.float32).reshape(784, 10) % 7 - 3) / 100
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"], axis=1),
         helper.make_node("MatMul", ["flat", "w"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)],
        "fashion", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 10])
         for n in ("logits", "probabilities")],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    version = repo / "fashion-cnn" / "1"
    version.mkdir(parents=True)
    onnx.save(model, str(version / "model.onnx"))
    config = VersionConfig(
        name="fashion-cnn", inputs=(TensorSpec("input", "FP32", (-1, 1, 28, 28)),),
        outputs=(TensorSpec("logits", "FP32", (-1, 10)),
                 TensorSpec("probabilities", "FP32", (-1, 10))),
        labels=FASHION, normalization=Normalization((0.286,), (0.353,)), dataset="fashion-mnist")
    (version / "config.json").write_text(config.to_json(), encoding="utf-8")


def test_the_sdk_snippet_runs_against_a_real_server(tmp_path: Path) -> None:
    from PIL import Image

    (snippet,) = [b for b in blocks("python") if "InferenceClient(" in b]
    repo = tmp_path / "models"
    write_fashion_shaped_model(repo)
    Image.fromarray((np.arange(28 * 28) % 255).astype(np.uint8).reshape(28, 28)).save(
        tmp_path / "shirt.png")
    with running_server(repo, tmp_path) as server:
        code = snippet.replace('"localhost:8001"', repr(server.address))
        assert code != snippet, "the snippet no longer connects to localhost:8001"
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert any(label in result.stdout for label in FASHION), result.stdout
