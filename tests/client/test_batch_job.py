"""The batch job end to end against a real server: outputs, errors, resume, restarts."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnserve.client import InferenceClient, ModelInfo
from cnnserve.client._infer import softmax
from cnnserve.client.batch.job import BatchOptions, run_batch_job
from cnnserve.client.batch.results import ResultsFile
from cnnserve.common.errors import CnnserveError
from cnnserve.common.repository import Normalization, TensorSpec, VersionConfig
from tests.support.client import ServerThread
from tests.support.models import linear_expected, write_test_model

ROOT = Path(__file__).resolve().parents[2]
MEAN, STD = (0.9,), (0.2,)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    repo = tmp_path_factory.mktemp("models")
    write_test_model(repo, "linear", 1, max_batch_size=16)
    normalised = VersionConfig(name="normed", inputs=(TensorSpec("input", "FP32", (-1, 1, 4, 4)),),
                               outputs=(TensorSpec("output", "FP32", (-1, 3)),),
                               max_batch_size=16, labels=("zero", "one", "two"),
                               normalization=Normalization(MEAN, STD))
    write_test_model(repo, "normed", 1, config=normalised)
    with ServerThread(repo, models=("linear", "normed")) as s:
        yield s


@pytest.fixture(scope="module")
def info(server: ServerThread) -> ModelInfo:
    with InferenceClient(server.url) as c:
        return c.model_info("linear")


def _pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 1, 4, 4), dtype=np.uint8)


def _expected(pixels: np.ndarray, mean: float = 0.0, std: float = 1.0) -> np.ndarray:
    x = (pixels.astype(np.float32) / np.float32(255) - np.float32(mean)) / np.float32(std)
    return softmax(linear_expected(x))


def _image_folder(folder: Path, pixels: np.ndarray) -> list[str]:
    """One PNG per image (some in a sub-folder) and a corrupt one; returns sorted ids."""
    ids = []
    for i, image in enumerate(pixels):
        rel = f"{'sub/' if i % 3 == 0 else ''}img{i:03d}.png"
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0]).save(folder / rel)
        ids.append(rel)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    return sorted([*ids, "broken.png"])


def _options(server: ServerThread, tmp: Path, inp: str | Path, out: str, **kw: object
             ) -> BatchOptions:
    values: dict[str, object] = dict(url=server.url, model="linear", input=str(inp),
                                     output=str(tmp / out), format=out.rsplit(".", 1)[1],
                                     batch_size=4, concurrency=3, top_k=2, progress=False)
    values.update(kw)
    return BatchOptions(**values)  # type: ignore[arg-type]


def _cli(server: ServerThread, inp: Path | str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cnnserve.cli", "batch", "--url", server.url, "--model", "linear",
            "--input", str(inp), "--output", str(out), "--no-progress", *extra]


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_folder_job_writes_every_item_in_order_and_a_corrupt_image_is_not_fatal(
        server: ServerThread, info: ModelInfo, tmp_path: Path, fmt: str) -> None:
    pixels = _pixels(10)
    ids = _image_folder(tmp_path / "images", pixels)
    summary = run_batch_job(_options(server, tmp_path, tmp_path / "images", f"out.{fmt}"))
    assert (summary.total, summary.processed, summary.errors, summary.failed) == (11, 11, 1, True)
    lines = (tmp_path / f"out.{fmt}").read_text().splitlines()
    if fmt == "csv":
        assert lines[0] == "id,label,index,probability,top_k,true_label,error"
        rows = [dict(zip(lines[0].split(","), ln.split(","), strict=True)) for ln in lines[1:]]
        assert [r["id"] for r in rows] == ids
        assert "cannot read image" in rows[0]["error"] and rows[0]["label"] == ""
        got = {r["id"]: (int(r["index"]), float(r["probability"])) for r in rows[1:]}
    else:
        records = [json.loads(ln) for ln in lines]
        assert [r["id"] for r in records] == ids
        assert set(records[0]) == {"id", "error"} and "broken.png" in records[0]["error"]
        assert all(len(r["top_k"]) == 2 for r in records[1:])
        assert all(r["label"] == info.label(r["index"]) for r in records[1:])
        got = {r["id"]: (r["index"], r["probability"]) for r in records[1:]}
    probs = _expected(pixels)
    for i in range(len(pixels)):
        rel = f"{'sub/' if i % 3 == 0 else ''}img{i:03d}.png"
        assert got[rel][0] == int(np.argmax(probs[i]))
        assert got[rel][1] == pytest.approx(probs[i].max(), abs=2e-6)


def test_exit_status_says_whether_anything_failed(server: ServerThread, tmp_path: Path) -> None:
    np.save(tmp_path / "ok.npy", _pixels(20))
    good = subprocess.run(_cli(server, tmp_path / "ok.npy", tmp_path / "ok.jsonl"),
                          capture_output=True, text=True, timeout=120)
    assert good.returncode == 0, good.stderr
    assert "items: 20 (20 processed" in good.stderr and "items/s" in good.stderr
    assert "p50" in good.stderr and "p99" in good.stderr
    _image_folder(tmp_path / "images", _pixels(2))
    bad = subprocess.run(_cli(server, tmp_path / "images", tmp_path / "bad.csv"),
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "1 items failed" in bad.stderr, bad.stderr


def _wait_for_lines(path: Path, count: int, proc: subprocess.Popen[bytes]) -> None:
    """Poll until ``path`` holds ``count`` lines (no event crosses the process boundary)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if path.exists() and path.read_bytes().count(b"\n") >= count:
            return
        assert proc.poll() is None, "the job ended before it could be interrupted"
        time.sleep(0.005)
    raise AssertionError(f"{path} never reached {count} lines")


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_a_killed_job_resumes_to_the_same_bytes_as_an_uninterrupted_run(
        server: ServerThread, tmp_path: Path, fmt: str) -> None:
    n = 600
    np.save(tmp_path / "data.npy", _pixels(n, seed=4))
    flags = ["--batch-size", "1", "--concurrency", "2"]
    reference = tmp_path / f"reference.{fmt}"
    subprocess.run(_cli(server, tmp_path / "data.npy", reference, *flags), check=True,
                   capture_output=True, timeout=300)

    out = tmp_path / f"resumed.{fmt}"
    proc = subprocess.Popen(_cli(server, tmp_path / "data.npy", out, *flags),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_lines(out, 30, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    written = out.read_bytes().count(b"\n")
    assert 30 <= written < n, f"the kill came too late ({written} lines)"

    rerun = subprocess.run(_cli(server, tmp_path / "data.npy", out, *flags),
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    header = 1 if fmt == "csv" else 0
    assert f"{written - header} already in the output" in rerun.stderr
    assert out.read_bytes() == reference.read_bytes()


def test_a_partial_last_line_is_dropped_and_redone(server: ServerThread, tmp_path: Path) -> None:
    pixels = _pixels(12)
    _image_folder(tmp_path / "images", pixels)
    options = _options(server, tmp_path, tmp_path / "images", "out.jsonl")
    run_batch_job(options)
    reference = (tmp_path / "out.jsonl").read_bytes()
    lines = reference.splitlines(keepends=True)
    (tmp_path / "out.jsonl").write_bytes(b"".join(lines[:5]) + lines[5][:17])  # killed mid-write
    summary = run_batch_job(options)
    assert (summary.skipped, summary.processed) == (5, 8)
    assert (tmp_path / "out.jsonl").read_bytes() == reference


def test_rerun_skips_failed_items_unless_asked_to_retry_them(
        server: ServerThread, tmp_path: Path) -> None:
    pixels = _pixels(6)
    _image_folder(tmp_path / "images", pixels)
    options = _options(server, tmp_path, tmp_path / "images", "out.csv")
    assert run_batch_job(options).errors == 1
    Image.fromarray(pixels[0, 0]).save(tmp_path / "images" / "broken.png")  # repaired
    again = run_batch_job(options)
    assert (again.processed, again.skipped, again.earlier_errors, again.failed) == (0, 7, 1, True)
    retried = run_batch_job(_options(server, tmp_path, tmp_path / "images", "out.csv",
                                 retry_failed=True))
    assert (retried.processed, retried.errors, retried.failed) == (1, 0, False)
    rows = (tmp_path / "out.csv").read_text().splitlines()
    assert len(rows) == 1 + 7 and rows[-1].startswith("broken.png,")


def test_job_survives_a_server_restart(server: ServerThread, tmp_path: Path) -> None:
    n = 600
    np.save(tmp_path / "data.npy", _pixels(n, seed=5))
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen(_cli(server, tmp_path / "data.npy", out, "--batch-size", "1",
                                 "--concurrency", "2", "--retries", "30"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for_lines(out, 30, proc)
        server.stop()
        server.start()  # same port, fresh engine
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr.decode()
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == [str(i) for i in range(n)]
    assert not any("error" in r for r in records)
    np.testing.assert_array_equal([r["index"] for r in records],
                                  np.argmax(_expected(_pixels(n, seed=5)), axis=1))


def test_npz_labels_give_accuracy_and_normalisation_comes_from_the_model(
        server: ServerThread, tmp_path: Path) -> None:
    pixels = _pixels(40, seed=6)
    predicted = np.argmax(_expected(pixels, MEAN[0], STD[0]), axis=1)
    assert (predicted != np.argmax(_expected(pixels), axis=1)).any()  # normalisation matters
    labels = predicted.copy()
    labels[::4] = (labels[::4] + 1) % 3  # a quarter wrong on purpose
    np.savez(tmp_path / "data.npz", images=pixels[:, 0], labels=labels)  # [N, H, W] layout
    summary = run_batch_job(_options(server, tmp_path, tmp_path / "data.npz", "out.jsonl",
                                 model="normed", top_k=3))
    assert (summary.labelled, summary.correct) == (40, 30)
    assert "accuracy: 0.7500 (30/40 labelled items)" in summary.format()
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == predicted.tolist()
    assert [r["true_index"] for r in records] == labels.tolist()
    assert records[0]["label"] in ("zero", "one", "two")
    assert len(summary.latencies_s) == 10 and summary.percentile_ms(99) > 0


def test_dataset_name_input(server: ServerThread, tmp_path: Path) -> None:
    summary = run_batch_job(_options(server, tmp_path, "synthetic:1x4x4:test", "out.jsonl",
                                 batch_size=64))
    assert (summary.total, summary.errors, summary.labelled) == (300, 0, 300)
    from cnnserve.common.data.datasets import load_split

    data = load_split("synthetic:1x4x4", "test")
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == np.argmax(_expected(data.images), axis=1).tolist()


def test_inputs_that_do_not_fit_are_refused_up_front(server: ServerThread,
                                                     tmp_path: Path) -> None:
    np.save(tmp_path / "wrong.npy", np.zeros((3, 1, 5, 5), np.uint8))
    with pytest.raises(CnnserveError, match=r"does not fit model 'linear' input 1x4x4"):
        run_batch_job(_options(server, tmp_path, tmp_path / "wrong.npy", "out.jsonl"))
    with pytest.raises(CnnserveError, match="not a folder, file, glob"):
        run_batch_job(_options(server, tmp_path, tmp_path / "missing.png", "out.jsonl"))
    (tmp_path / "foreign.csv").write_text("a,b\n1,2\n")
    np.save(tmp_path / "ok.npy", _pixels(2))
    with pytest.raises(CnnserveError, match="not a CSV written by cnnserve batch"):
        run_batch_job(_options(server, tmp_path, tmp_path / "ok.npy", "foreign.csv"))


def test_results_file_round_trips_awkward_ids(tmp_path: Path) -> None:
    from cnnserve.client.batch.results import Record

    for fmt in ("jsonl", "csv"):
        out = ResultsFile(tmp_path / f"r.{fmt}", fmt)  # type: ignore[arg-type]
        out.resume()
        ids = ["a,b.png", 'quote".png', "new\nline.png", "ünï.png", "bad\udcff.png"]
        out.write([Record(i, (("x", 0, 0.5),)) for i in ids])
        out.close()
        again = ResultsFile(tmp_path / f"r.{fmt}", fmt)  # type: ignore[arg-type]
        done = again.resume().done
        again.close()
        assert all(again.key(i) in done for i in ids), (fmt, done)
        assert (tmp_path / f"r.{fmt}").read_text().count("\n") == len(ids) + (fmt == "csv")


def test_idx_file_with_its_labels_file_and_a_glob_of_labelled_folders(
        server: ServerThread, info: ModelInfo, tmp_path: Path) -> None:
    from cnnserve.common.data.idx import write_idx

    pixels = _pixels(30, seed=8)
    predicted = np.argmax(_expected(pixels), axis=1)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", pixels[:, 0])
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", predicted.astype(np.uint8))
    summary = run_batch_job(_options(server, tmp_path, tmp_path / "t10k-images-idx3-ubyte.gz",
                                 "idx.jsonl"))
    assert (summary.total, summary.labelled, summary.correct) == (30, 30, 30)

    # ImageFolder layout: the folder names are the model's labels, so accuracy is known
    for i, image in enumerate(pixels[:9]):
        folder = tmp_path / "by_class" / info.label(int(predicted[i]))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0]).save(folder / f"{i}.png")
    (tmp_path / "by_class" / "notes.txt").write_text("not an image, not matched")
    summary = run_batch_job(_options(server, tmp_path, str(tmp_path / "by_class" / "*" / "*.png"),
                                 "glob.csv"))
    assert (summary.total, summary.errors, summary.labelled, summary.correct) == (9, 0, 9, 9)
    rows = (tmp_path / "glob.csv").read_text().splitlines()[1:]
    assert [r.split(",")[0] for r in rows] == sorted(
        f"{info.label(int(predicted[i]))}/{i}.png" for i in range(9))


def test_classify_command_prints_top_k_labels(server: ServerThread, info: ModelInfo,
                                              tmp_path: Path) -> None:
    pixels = _pixels(2, seed=9)
    for i, image in enumerate(pixels):
        Image.fromarray(image[0]).resize((13, 9)).save(tmp_path / f"p{i}.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    result = subprocess.run(
        [sys.executable, "-m", "cnnserve.cli", "classify", "--url", server.url, "--model", "linear",
         "--top-k", "2", str(tmp_path / "p0.jpg"), str(tmp_path / "bad.jpg"),
         str(tmp_path / "p1.jpg")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1  # one image could not be read
    assert "bad.jpg: error: cannot read image" in result.stderr
    lines = result.stdout.splitlines()
    assert [ln.split(":")[0] for ln in lines] == [str(tmp_path / "p0.jpg"),
                                                   str(tmp_path / "p1.jpg")]
    for line in lines:
        guesses = line.split(": ", 1)[1].split(", ")
        assert len(guesses) == 2
        assert all(g.rsplit(" ", 1)[0] in {info.label(k) for k in range(3)} for g in guesses)
