"""The batch job's output on a disk that refuses it, its summary and its progress lines.

A full disk is a tiny tmpfs (mounting needs root, which the test environment is; elsewhere
those tests skip and say why); a read-only folder is a tmpfs mounted read-only, since root
ignores permission bits.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from cnnserve.client.batch.results import Record, ResultsFile
from tests.support.client import ServerThread
from tests.support.models import write_test_model

N = 600  # about 100 kB of JSONL records


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    repo = tmp_path_factory.mktemp("models")
    write_test_model(repo, "linear", 1, max_batch_size=16)
    with ServerThread(repo, models=("linear",)) as s:
        yield s


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "data.npy"
    np.save(path, np.random.default_rng(12).integers(0, 256, (N, 1, 4, 4), dtype=np.uint8))
    return path


Mount = Callable[..., Path]


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Mount]:
    """``tmpfs(size, *options)`` mounts a fresh tmpfs of ``size`` and returns its folder."""
    mounted: list[Path] = []

    def mount(size: str, *options: str) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}",
                                 *options]), "tmpfs", str(folder)], capture_output=True,
                                text=True, timeout=30)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=True, timeout=30)


def _job(server: ServerThread, data: Path, out: Path, *extra: str
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cnnserve.cli", "batch", "--url", server.url, "--model", "linear",
         "--input", str(data), "--output", str(out), "--top-k", "2", *extra],
        capture_output=True, text=True, timeout=300)


def _error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("cnnserve batch: error:")]


def test_a_full_disk_stops_the_job_with_one_message_and_a_resumable_output(
        server: ServerThread, data: Path, tmpfs: Mount, tmp_path: Path) -> None:
    reference = tmp_path / "reference.jsonl"
    assert _job(server, data, reference).returncode == 0
    disk = tmpfs("64k")
    out = disk / "out.jsonl"
    for attempt in range(2):  # the second run finds the disk still full
        run = _job(server, data, out)
        assert run.returncode == 1, run.stderr
        assert "Traceback" not in run.stderr, run.stderr
        [message] = _error_lines(run.stderr)
        assert f"cannot write {out}: No space left on device" in message
        assert "rerun the same command to resume" in message
        written = out.read_bytes()
        assert written and reference.read_bytes().startswith(written), attempt  # whole records
        assert [p.name for p in disk.iterdir()] == ["out.jsonl"]  # no temporary file left
    subprocess.run(["mount", "-o", "remount,size=1m", str(disk)], check=True, timeout=30)
    run = _job(server, data, out)
    assert run.returncode == 0, run.stderr
    assert out.read_bytes() == reference.read_bytes()


def test_a_read_only_folder_or_a_file_in_the_way_is_one_clear_error(
        server: ServerThread, data: Path, tmpfs: Mount, tmp_path: Path) -> None:
    read_only = tmpfs("64k", "ro")
    run = _job(server, data, read_only / "out.csv")
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    [message] = _error_lines(run.stderr)
    assert f"cannot use {read_only / 'out.csv'} as the output: Read-only file system" in message
    (tmp_path / "file").write_text("in the way")
    run = _job(server, data, tmp_path / "file" / "out.jsonl")
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert f"{tmp_path / 'file'} is a file, not a folder" in _error_lines(run.stderr)[0]


def test_resume_drops_a_partial_line_on_a_full_disk(tmpfs: Mount) -> None:
    disk = tmpfs("16k")
    out = ResultsFile(disk / "out.jsonl", "jsonl")
    out.resume()
    out.write([Record(str(i), (("x", 0, 0.5),)) for i in range(20)])
    out.close()
    whole = (disk / "out.jsonl").read_bytes()
    with (disk / "out.jsonl").open("ab") as fh:
        fh.write(b'{"id": "20", "lab')  # killed mid-write
    with (disk / "filler").open("wb") as fh, pytest.raises(OSError):
        fh.write(b"\0" * 64 * 1024)  # the disk is now full
    again = ResultsFile(disk / "out.jsonl", "jsonl")
    assert len(again.resume().done) == 20
    again.close()
    assert (disk / "out.jsonl").read_bytes() == whole


def test_summary_json_plain_progress_lines_and_nothing_to_do(
        server: ServerThread, data: Path, tmp_path: Path) -> None:
    out, summary = tmp_path / "out.jsonl", tmp_path / "summary.json"
    run = _job(server, data, out, "--summary-json", str(summary), "--batch-size", "32")
    assert run.returncode == 0, run.stderr
    assert "\r" not in run.stderr  # stderr is a pipe: lines, not a bar
    assert f"linear: {N}/{N} items (100.0%)" in run.stderr
    report = json.loads(summary.read_text())
    assert (report["completed"], report["total"], report["processed"], report["errors"],
            report["requests"]) == (True, N, N, 0, 19)
    assert 0 < report["latency_ms"]["p50"] <= report["latency_ms"]["p99"]
    assert report["items_per_s"] > 0

    again = _job(server, data, out, "--summary-json", str(summary))
    assert again.returncode == 0, again.stderr
    assert "nothing to do: every item is already in the output" in again.stderr
    assert "p50" not in again.stderr and "items/s" not in again.stderr
    report = json.loads(summary.read_text())
    assert (report["processed"], report["skipped"], report["latency_ms"]) == (0, N, None)


def test_a_parquet_file_of_encoded_images_with_labels(
        server: ServerThread, tmp_path: Path) -> None:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    pixels = np.random.default_rng(13).integers(0, 256, (20, 1, 4, 4), dtype=np.uint8)
    encoded = []
    for image in pixels:
        buf = io.BytesIO()
        Image.fromarray(image[0]).save(buf, format="PNG")
        encoded.append(buf.getvalue())
    encoded[3] = b"not an image"
    labels = np.arange(20) % 3
    pq.write_table(pa.table({"id": [f"img{i}" for i in range(20)], "image": encoded,
                             "label": labels}), tmp_path / "data.parquet")
    np.save(tmp_path / "data.npy", pixels)
    from_parquet, from_npy = tmp_path / "p.jsonl", tmp_path / "n.jsonl"
    assert _job(server, tmp_path / "data.parquet", from_parquet).returncode == 1  # one bad row
    assert _job(server, tmp_path / "data.npy", from_npy).returncode == 0
    got = [json.loads(line) for line in from_parquet.read_text().splitlines()]
    want = [json.loads(line) for line in from_npy.read_text().splitlines()]
    assert [r["id"] for r in got] == [f"img{i}" for i in range(20)]
    assert "row 3" in got[3]["error"]
    assert [r.get("index") for i, r in enumerate(got) if i != 3] == [
        r["index"] for i, r in enumerate(want) if i != 3]
    assert [r.get("true_index") for r in got] == labels.tolist()
