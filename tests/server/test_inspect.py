"""``cnnserve inspect`` prints what the server would serve, and fails where the server would;
``cnnserve serve --model-repository`` is Triton's spelling of ``--repository``."""

from __future__ import annotations

from pathlib import Path

import pytest

from cnnserve.cli import build_parser, main
from cnnserve.server.process.settings import Settings
from tests.support.third_party import (
    classifier,
    fixed_shape,
    light_model,
    symbolic_batch,
    write_pbtxt,
    write_version,
)


def test_a_bare_onnx_file_is_described_from_its_graph(
        model_repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_version(model_repo, "squeezenet", symbolic_batch(light_model("squeezenet")))
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "signature from the graph" in out
    assert ("max_batch_size 32 (default 32), derived: every input and output has a symbolic "
            "first dimension 'N'") in out
    assert "input  data_0 FP32 [-1,3,224,224]" in out
    assert "output softmaxout_1 FP32 [-1,1000,1,1]" in out


def test_a_fixed_batch_graph_is_described_as_unbatched(
        model_repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_version(model_repo, "fixed", fixed_shape())
    assert main(["inspect", str(model_repo / "fixed")]) == 0
    out = capsys.readouterr().out
    assert "max_batch_size 0 (no batching), derived: the graph's input 'x' has a fixed first " \
           "dimension (3)" in out
    assert "input  x INT32 [3,4]" in out


def test_a_triton_model_folder_shows_its_policy_and_reshapes(
        model_repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for version in (1, 2):
        write_version(model_repo, "cls", classifier(), version)
    write_pbtxt(model_repo, "cls", """
        max_batch_size: 8
        input [ { name: "image" dims: [ 48 ] reshape: { shape: [ 3, 4, 4 ] } } ]
        dynamic_batching { max_queue_delay_microseconds: 100 }
        instance_group [ { count: 2 kind: KIND_CPU } ]
        version_policy: { latest: { num_versions: 1 } }
    """)
    assert main(["inspect", str(model_repo)]) == 0
    out = capsys.readouterr().out
    assert "policy from config.pbtxt: versions {\"latest\": 1}, max_queue_delay 100 us" in out
    assert "instances 2, device cpu" in out
    assert "versions [1]: not served (version policy)" in out
    assert "input  image FP32 [-1,48] (graph: [-1,3,4,4])" in out


def test_problems_exit_1_with_the_servers_message(
        model_repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_version(model_repo, "fixed", fixed_shape())
    write_pbtxt(model_repo, "fixed", "max_batch_size: 4")
    assert main(["inspect", str(model_repo / "fixed" / "1")]) == 1
    assert ("version 1: error: model 'fixed' version 1: config.pbtxt sets max_batch_size 4 but "
            "the graph cannot batch") in capsys.readouterr().out
    assert main(["inspect", str(model_repo / "absent.onnx")]) == 1


def test_serve_accepts_model_repository_as_an_alias() -> None:
    args = build_parser().parse_args(["serve", "--model-repository", "/srv/models"])
    assert Settings.build(vars(args), {}).repository == Path("/srv/models")


def test_the_server_reads_graphs_without_the_onnx_package() -> None:
    import subprocess
    import sys

    probe = ("import sys, cnnserve.server.process.inspect, cnnserve.server.engine.core\n"
             "print(' '.join(sorted(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=120, check=True)
    loaded = set(result.stdout.split())
    assert "cnnserve.server.runtime.signature" in loaded
    assert "onnx" not in loaded and "torch" not in loaded
