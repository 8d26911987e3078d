"""The batch job rides out a server outage up to --max-outage and loses nothing past it.

A real ``cnnserve serve`` process is killed mid-job (a crash: nothing drains) and started again
on the same port. Every test compares the output with an uninterrupted run's, byte for byte.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.support.models import write_test_model
from tests.support.serve import ServeProcess

N = 600


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    repo = tmp_path_factory.mktemp("models")
    write_test_model(repo, "linear", 1, max_batch_size=16)
    with ServeProcess(repo, tmp_path_factory.mktemp("server")) as s:
        yield s


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "data.npy"
    np.save(path, np.random.default_rng(11).integers(0, 256, (N, 1, 4, 4), dtype=np.uint8))
    return path


@pytest.fixture(scope="module")
def reference(server: ServeProcess, data: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> bytes:
    out = tmp_path_factory.mktemp("reference") / "out.jsonl"
    done = subprocess.run(_job(server, data, out), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return out.read_bytes()


def _job(server: ServeProcess, data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cnnserve.cli", "batch", "--url", server.url, "--model",
            "linear", "--input", str(data), "--output", str(out), "--batch-size", "1",
            "--concurrency", "2", *extra]


def _start_and_kill_server_midway(server: ServeProcess, data: Path, out: Path,
                                  *extra: str) -> subprocess.Popen[str]:
    """Start the job, wait until it has written 30 records, then kill the server."""
    proc = subprocess.Popen(_job(server, data, out, *extra), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (out.exists() and out.read_bytes().count(b"\n") >= 30):
        assert proc.poll() is None, "the job ended before the server went away"
        assert time.monotonic() < deadline, "the job wrote nothing in 60 s"
        time.sleep(0.005)  # no event crosses the process boundary
    server.kill()
    assert out.read_bytes().count(b"\n") < N, "the server went away too late"
    return proc


def _finish(proc: subprocess.Popen[str], timeout_s: float = 120) -> str:
    try:
        _, stderr = proc.communicate(timeout=timeout_s)
    finally:
        proc.kill()
    return stderr


def test_a_crashed_server_is_waited_for_without_spending_any_retries(
        server: ServeProcess, data: Path, reference: bytes, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    # --retries 0: the old job turned every item in flight into an error record at once
    proc = _start_and_kill_server_midway(server, data, out, "--retries", "0",
                                         "--max-outage", "60")
    time.sleep(3)  # the outage itself
    server.start()
    stderr = _finish(proc)
    assert proc.returncode == 0, stderr
    assert out.read_bytes() == reference  # in input order, no error records
    assert "ready again after" in stderr and "server outages ridden out: 1" in stderr
    assert "items failed" not in stderr and "retry" not in stderr


def test_a_server_gone_for_good_stops_the_job_at_max_outage_and_a_rerun_completes_it(
        server: ServeProcess, data: Path, reference: bytes, tmp_path: Path) -> None:
    out, summary = tmp_path / "out.jsonl", tmp_path / "summary.json"
    proc = _start_and_kill_server_midway(server, data, out, "--max-outage", "2",
                                         "--summary-json", str(summary))
    gone = time.monotonic()
    stderr = _finish(proc)
    took = time.monotonic() - gone
    assert proc.returncode == 1, stderr
    assert 2 <= took < 15, f"the job stopped {took:.1f} s after the server went away"
    assert "unavailable for more than 2 s (--max-outage)" in stderr
    assert "rerun the same command once the server is back" in stderr
    assert "Traceback" not in stderr
    written = out.read_bytes()
    assert written.endswith(b"\n") and reference.startswith(written)  # whole, ordered, no errors
    report = json.loads(summary.read_text())
    assert report["completed"] is False and "--max-outage" in report["stopped"]

    server.start()
    rerun = subprocess.run(_job(server, data, out, "--summary-json", str(summary)),
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert out.read_bytes() == reference
    report = json.loads(summary.read_text())
    assert report["completed"] is True and report["skipped"] == written.count(b"\n")
    assert report["skipped"] + report["processed"] == N


@pytest.mark.slow
def test_an_outage_longer_than_the_old_retry_budget_with_default_flags(
        server: ServeProcess, data: Path, reference: bytes, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    proc = _start_and_kill_server_midway(server, data, out)
    time.sleep(20)  # past the ~16 s that 8 retries with backoff used to last
    server.start()
    stderr = _finish(proc)
    assert proc.returncode == 0, stderr
    assert out.read_bytes() == reference
    assert "still unavailable after" in stderr  # one warning, not a line per retry
