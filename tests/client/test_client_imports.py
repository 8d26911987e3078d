"""The client stays light: no torch or onnxruntime behind the SDK or the batch command."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "onnxruntime", "onnx")


def _loaded_after(code: str) -> set[str]:
    script = f"""
import sys
{code}
print(",".join(sorted({{m.split(".")[0] for m in sys.modules}})))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return set(result.stdout.strip().splitlines()[-1].split(","))


def test_importing_the_sdk_loads_neither_torch_nor_onnxruntime() -> None:
    loaded = _loaded_after("import cnnserve.client\nfrom cnnserve.client import images, cli\n"
                           "from cnnserve.client.batch import job, sources, results")
    assert "grpc" in loaded and "numpy" in loaded
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_batch_and_classify_help_load_neither_torch_nor_onnxruntime() -> None:
    for command in ("batch", "classify"):
        code = f"""
from cnnserve.cli import main
try:
    main(["{command}", "--help"])
except SystemExit as exc:
    assert exc.code == 0, exc.code
"""
        loaded = _loaded_after(code)
        assert not loaded & set(HEAVY), (command, sorted(loaded & set(HEAVY)))


def test_batch_help_documents_the_flags() -> None:
    result = subprocess.run([sys.executable, "-m", "cnnserve.cli", "batch", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for flag in ("--url", "--model", "--input", "--output", "--format", "--batch-size",
                 "--concurrency", "--top-k", "--token", "--tls-ca", "--timeout", "--retries"):
        assert flag in result.stdout, flag
