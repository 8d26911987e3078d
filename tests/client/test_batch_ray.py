"""``cnnserve batch --engine ray`` on a local Ray: same predictions, nothing lost or doubled.

One local Ray (2 CPUs, no dashboard, loopback only) serves the whole session. Models are
exported from tiny training runs; the reference is ``cnnserve evaluate``'s function,
:func:`evaluate_onnx`, over the Fashion-MNIST test images.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cnnserve.client.batch.job import run_batch_job
from cnnserve.client.batch.summary import Summary
from cnnserve.client.options import BatchOptions
from tests.support.client import ServerThread

pytestmark = pytest.mark.slow

#: Enough compute per image (two 32-channel 3x3 convolutions at 28x28) that a job lasts
#: long enough to be interrupted.
HEAVY_SPEC = ("conv(32, 3, pad=1) -> relu -> conv(32, 3, pad=1) -> relu -> maxpool(2) "
              "-> conv(32, 3, pad=1) -> relu -> maxpool(2) -> fc(10)")


@pytest.fixture(scope="session")
def ray_local() -> Iterator[Any]:
    # Ray resolves 127.0.0.1 to the machine's address unless told this is no cluster.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray = pytest.importorskip("ray", reason="ray[data] (the batch-ray extra) is not installed")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cnnserve.training.export.exporter import export_checkpoint
    from tests.support.export import make_checkpoint

    tmp = tmp_path_factory.mktemp("export")
    repo = tmp / "models"
    export_checkpoint(make_checkpoint(tmp / "tiny.pt", dataset="synthetic:1x28x28", epochs=1),
                      repo, "tiny", version=1)
    export_checkpoint(make_checkpoint(tmp / "heavy.pt", dataset="synthetic:1x28x28", epochs=0,
                                      spec=HEAVY_SPEC), repo, "heavy", version=1)
    return repo


@pytest.fixture(scope="module")
def fashion() -> Any:
    from cnnserve.common.data.datasets import load_split

    try:
        return load_split("fashion-mnist", "test")
    except Exception as exc:
        pytest.skip(f"Fashion-MNIST is not installed: {exc}")


def _evaluate(repo: Path, model: str, images: np.ndarray) -> np.ndarray:
    from cnnserve.training.train.evaluate import evaluate_onnx

    return evaluate_onnx(repo / model / "1", images)


def _options(out: Path, **kw: Any) -> BatchOptions:
    values: dict[str, Any] = dict(engine="ray", model="tiny", input="fashion-mnist:test",
                                  output=out, progress=False)
    values.update(kw)
    return BatchOptions(**values)


def _records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for part in sorted(out.glob("part-*.jsonl"))
            for line in part.read_text().splitlines()]


def _run(options: BatchOptions) -> Summary:
    from cnnserve.client.batch.raydata.job import run_ray_job

    return run_ray_job(options)


def test_in_process_ray_predicts_exactly_what_evaluate_does(
        ray_local: Any, repo: Path, fashion: Any, tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = _run(_options(out, repository=repo, block_size=2500, batch_size=256))
    assert (summary.total, summary.processed, summary.errors) == (10_000, 10_000, 0)
    records = _records(out)
    assert [r["id"] for r in records] == [str(i) for i in range(10_000)]
    np.testing.assert_array_equal([r["index"] for r in records],
                                  _evaluate(repo, "tiny", fashion.images))
    assert summary.labelled == 10_000 and summary.latencies_s

    again = _run(_options(out, repository=repo, block_size=2500, batch_size=256))
    assert (again.processed, again.skipped) == (0, 10_000)  # every block already done
    with pytest.raises(Exception, match="holds the output of another job"):
        _run(_options(out, repository=repo, block_size=1000))


def test_via_two_servers_gives_the_same_predictions_in_every_format(
        ray_local: Any, repo: Path, fashion: Any, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    np.save(tmp_path / "images.npy", fashion.images[:1500])
    expected = _evaluate(repo, "tiny", fashion.images[:1500])
    with ServerThread(repo, models=("tiny",)) as one, ServerThread(repo, models=("tiny",)) as two:
        inp = str(tmp_path / "images.npy")
        local = tmp_path / "local.csv"
        run_batch_job(BatchOptions(url=one.url, model="tiny", input=inp, output=local,
                                   batch_size=100, progress=False))
        for fmt in ("csv", "parquet"):
            summary = _run(_options(tmp_path / fmt, input=inp, url=(one.url, two.url),
                                    format=fmt, ray_actors=2, block_size=300, batch_size=100))
            assert (summary.processed, summary.errors) == (1500, 0)
        counts = [server_stats(s) for s in (one, two)]
    assert all(c > 0 for c in counts), counts  # both servers took requests
    parts = sorted((tmp_path / "csv").glob("part-*.csv"))
    assert len(parts) == 5
    joined = "".join(p.read_text() for p in parts).splitlines()
    reference = local.read_text().splitlines()
    assert joined[0] == reference[0]  # one header, in part 0 only
    assert [ln.split(",")[:3] for ln in joined] == [ln.split(",")[:3] for ln in reference]
    table = pq.read_table(sorted((tmp_path / "parquet").glob("part-*.parquet")))
    assert table.column("id").to_pylist() == [str(i) for i in range(1500)]
    np.testing.assert_array_equal(table.column("index").to_numpy(), expected)


def server_stats(server: ServerThread) -> int:
    from cnnserve.client import InferenceClient

    with InferenceClient(server.url) as client:
        return int(client.statistics("tiny").model_stats[0].inference_count)


def _actor_pids() -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"BlockPredictor" in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def _wait_for_parts(out: Path, running: Any, count: int = 1) -> int:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # the parts are files: no event to await
        done = len(list(out.glob("part-*.jsonl")))
        if done >= count:
            return done
        assert running(), "the job ended before it could be interrupted"
        time.sleep(0.05)
    raise AssertionError("no block finished in 240 s")


def _check_complete(out: Path, repo: Path, fashion: Any) -> None:
    records = _records(out)
    assert [r["id"] for r in records] == [str(i) for i in range(10_000)]  # once each, in order
    np.testing.assert_array_equal([r["index"] for r in records],
                                  _evaluate(repo, "heavy", fashion.images))


def test_an_actor_killed_mid_job_loses_or_duplicates_no_item(
        ray_local: Any, repo: Path, fashion: Any, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result: list[Summary] = []
    job = threading.Thread(target=lambda: result.append(_run(_options(
        out, model="heavy", repository=repo, block_size=250, batch_size=50))))
    job.start()
    done = _wait_for_parts(out, job.is_alive)
    [victim, *_] = _actor_pids()
    os.kill(victim, signal.SIGKILL)
    assert done < 40, "the actor was killed after the job had finished"
    job.join(300)
    assert result and result[0].processed == 10_000
    _check_complete(out, repo, fashion)


def test_a_rerun_after_an_interrupted_job_completes_it(
        ray_local: Any, repo: Path, fashion: Any, tmp_path: Path) -> None:
    out = tmp_path / "out"
    address = ray_local.get_runtime_context().gcs_address
    flags = ["--engine", "ray", "--ray-address", address, "--model", "heavy", "--repository",
             str(repo), "--input", "fashion-mnist:test", "--output", str(out),
             "--block-size", "250", "--batch-size", "50", "--no-progress"]
    driver = subprocess.Popen([sys.executable, "-m", "cnnserve.cli", "batch", *flags],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_parts(out, lambda: driver.poll() is None)
        driver.kill()
    finally:
        driver.wait(60)
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.jsonl")}
    assert 0 < len(finished) < 40
    rerun = _run(_options(out, model="heavy", repository=repo, block_size=250, batch_size=50))
    assert rerun.skipped >= 250 * len(finished) and rerun.skipped + rerun.processed == 10_000
    assert all(out.joinpath(n).stat().st_mtime_ns == t for n, t in finished.items())
    _check_complete(out, repo, fashion)


def _start_node(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """``ray start --block ARGS`` in its own process group; waits until the node is up."""
    with log.open("wb") as out:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", "--block",
                                 "--disable-usage-stats", *args], stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 180
    while "Ray runtime started" not in log.read_text(errors="replace"):
        assert proc.poll() is None, log.read_text(errors="replace")
        assert time.monotonic() < deadline, f"ray start did not finish: {log.read_text()}"
        time.sleep(0.2)  # ray start reports in its log only
    return proc


def _stop_node(proc: subprocess.Popen[bytes]) -> None:
    """Stop the node's whole process group (raylet, GCS, workers): `ray stop` would stop
    every Ray on the machine."""
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait_s)
            time.sleep(1)  # the group's other processes exit after their leader
        except subprocess.TimeoutExpired:
            continue


@pytest.mark.skipif(os.environ.get("CNNSERVE_TEST_RAY_CLUSTER") != "1",
                    reason="a multi-node Ray cluster binds the machine's address, not loopback "
                           "(Ray 2.x resolves 127.0.0.1 to it for `ray start`); set "
                           "CNNSERVE_TEST_RAY_CLUSTER=1 to run it where that is allowed")
def test_a_two_process_cluster_runs_the_job_submitted_with_ray_address(
        repo: Path, fashion: Any, tmp_path: Path) -> None:
    import shutil
    import tempfile

    from tests.support.deploy import free_port

    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    env["RAY_AUTH_MODE"] = "disabled"  # a throwaway test cluster
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # Ray's socket paths must stay short
    nodes: list[subprocess.Popen[bytes]] = []
    try:
        nodes.append(_start_node(["--head", "--port", str(free_port()), "--num-cpus", "1",
                                  "--include-dashboard", "false", "--temp-dir", temp],
                                 tmp_path / "head.log", env))
        log = (tmp_path / "head.log").read_text()
        address = log.split("ray start --address='", 1)[1].split("'", 1)[0]
        nodes.append(_start_node(["--address", address, "--num-cpus", "1"],
                                 tmp_path / "worker.log", env))
        out = tmp_path / "out"
        job = subprocess.run(
            [sys.executable, "-m", "cnnserve.cli", "batch", "--engine", "ray", "--ray-address",
             address, "--model", "tiny", "--repository", str(repo), "--input",
             "fashion-mnist:test", "--output", str(out), "--block-size", "1000",
             "--no-progress"], capture_output=True, text=True, timeout=600, env=env)
        assert job.returncode == 0, job.stderr[-3000:]
        # one 1-CPU actor per node: both processes of the cluster ran blocks
        assert "on 2 actors (1 CPU each, 2 CPUs in the cluster)" in job.stderr
        records = _records(out)
        assert [r["id"] for r in records] == [str(i) for i in range(10_000)]
        np.testing.assert_array_equal([r["index"] for r in records],
                                      _evaluate(repo, "tiny", fashion.images))
    finally:
        for node in reversed(nodes):
            _stop_node(node)
        shutil.rmtree(temp, ignore_errors=True)
