"""The README's serve-only quick start, run as written: a fresh virtual environment with only
the ``serve`` extra (no torch, no training or development packages) serves a repository."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.deploy import stop_process, wait_until
from tests.support.deploy_server import probe
from tests.support.models import write_test_model

ROOT = Path(__file__).resolve().parents[2]


def serve_only_block() -> list[str]:
    section = (ROOT / "README.md").read_text().split("\n### Serve only\n", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S)
    assert block is not None
    return [line.split("  #", 1)[0].strip() for line in block.group(1).splitlines()]


def test_the_serve_only_block_is_what_this_test_runs() -> None:
    assert serve_only_block() == ["python3 -m venv .venv && . .venv/bin/activate",
                                  "pip install -c constraints.txt '.[serve]'",
                                  "cnnserve serve models"]
    readme = (ROOT / "README.md").read_text()
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in readme


@pytest.mark.slow
def test_a_serve_only_install_serves_without_torch(tmp_path: Path) -> None:
    venv = tmp_path / ".venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-c", "constraints.txt",
           ".[serve]"]
    result = subprocess.run(pip, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    found = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import importlib.util as u; print([m for m in ('torch', 'onnx', "
                            "'matplotlib', 'pytest', 'PIL') if u.find_spec(m)])"],
                           capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "[]"
    models = tmp_path / "models"
    write_test_model(models, "linear", 1)
    port_file = tmp_path / "ports.json"
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [str(venv / "bin" / "cnnserve"), "serve", "models", "--host", "127.0.0.1",
             "--grpc-port", "0", "--metrics-port", "0", "--port-file", str(port_file)],
            cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, env={"PATH": "/usr/bin:/bin"})
    try:
        wait_until(lambda: port_file.exists() or server.poll() is not None, 90, "serving")
        assert server.poll() is None, log.read_text()
        import json
        address = f"127.0.0.1:{json.loads(port_file.read_text())['grpc_port']}"
        assert probe(address).returncode == 0, log.read_text()
    finally:
        assert stop_process(server) == 0, log.read_text()
