"""The engine end to end on real ONNX Runtime sessions of tiny models."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from cnnserve.common.errors import CnnserveError
from cnnserve.common.repository import ConfigError, DynamicBatching, ModelPolicy
from cnnserve.server.batching.dispatch import DispatchPolicy
from cnnserve.server.batching.threads import ThreadSplit
from cnnserve.server.engine import core as engine_module
from cnnserve.server.engine.core import Engine, EngineOptions, IndexEntry
from cnnserve.server.errors import (
    DeadlineExceeded,
    ModelLoadError,
    ModelNotFound,
    ModelNotReady,
    QueueFull,
    ServerShuttingDown,
    Unsupported,
)
from cnnserve.server.telemetry.metrics import Metrics
from tests.support.models import ORT_TOLERANCE, linear_expected, write_test_model

MakeEngine = Callable[..., Awaitable[Engine]]


@pytest.fixture
async def make_engine(model_repo: Path) -> AsyncIterator[MakeEngine]:
    engines: list[Engine] = []

    async def make(metrics: Metrics | None = None, **options: Any) -> Engine:
        engine = Engine(EngineOptions(repository=model_repo, **options), metrics or Metrics())
        engines.append(engine)
        await engine.start()
        return engine

    yield make
    for engine in engines:
        await engine.stop(0)


def images(n: int, seed: int = 0) -> np.ndarray[Any, Any]:
    return np.random.default_rng(seed).random((n, 1, 4, 4), np.float32)


async def eventually(condition: Callable[[], bool], within_s: float = 10.0) -> None:
    """Wait for a condition the engine reaches on its own (a poll), checking every 20 ms."""
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def test_start_serves_every_model_with_correct_values(model_repo: Path,
                                                            make_engine: MakeEngine) -> None:
    write_test_model(model_repo, "m", 1, kind="linear")
    write_test_model(model_repo, "d", 1, kind="double")
    engine = await make_engine()
    assert engine.ready and engine.is_ready("m") and engine.is_ready("d", "1")
    assert engine.index() == [IndexEntry("d", "1", "READY", ""), IndexEntry("m", "1", "READY", "")]
    model = engine.get("m")
    assert (model.name, model.version, model.providers) == ("m", 1, ("CPUExecutionProvider",))
    x = images(3)
    out = await model.infer({"input": x}, ())
    np.testing.assert_allclose(out["output"], linear_expected(x), **ORT_TOLERANCE)
    xd = np.array([[1.0, 2.0]], np.float32)
    assert (await engine.get("d").infer({"x": xd}, ["z"])).keys() == {"z"}


async def test_concurrent_batch1_callers_share_ort_runs_and_get_their_own_rows(
        model_repo: Path, make_engine: MakeEngine) -> None:
    write_test_model(model_repo, "m", 1)
    engine = await make_engine()
    model = engine.get("m")
    xs = [images(1, seed=i) for i in range(32)]
    results = await asyncio.gather(*(model.infer({"input": x}, ()) for x in xs))
    for x, out in zip(xs, results, strict=True):
        np.testing.assert_allclose(out["output"], linear_expected(x), **ORT_TOLERANCE)
    (stats,) = engine.statistics("m")
    assert stats.inference_count == 32 and stats.success_count == 32
    assert stats.execution_count < 32 / 4  # many rows per run, not one run per request


async def test_a_missing_repository_is_a_user_error(tmp_path: Path) -> None:
    engine = Engine(EngineOptions(repository=tmp_path / "nowhere"), Metrics())
    with pytest.raises(CnnserveError, match="nowhere does not exist"):
        await engine.start()


async def test_a_corrupt_new_version_does_not_take_down_the_good_one(
        model_repo: Path, make_engine: MakeEngine) -> None:
    write_test_model(model_repo, "m", 1)
    metrics = Metrics()
    engine = await make_engine(metrics, control_mode="explicit", models=("m",))
    write_test_model(model_repo, "m", 2, corrupt=True)
    with pytest.raises(ModelLoadError, match="model 'm' version 2: onnxruntime cannot load"):
        await engine.load("m")
    assert engine.get("m").version == 1 and engine.ready
    (v1, v2) = engine.index()
    assert v1 == IndexEntry("m", "1", "READY", "")
    assert (v2.version, v2.state) == ("2", "UNAVAILABLE") and "cannot load" in v2.reason
    with pytest.raises(ModelNotReady, match="version 2 is UNAVAILABLE"):
        engine.get("m", "2")
    assert metrics.registry.get_sample_value("cnnserve_model_load_failures_total",
                                             {"model": "m"}) == 1
    x = images(2)
    np.testing.assert_allclose((await engine.get("m").infer({"input": x}))["output"],
                               linear_expected(x), **ORT_TOLERANCE)


async def test_model_control_is_refused_unless_explicit(model_repo: Path,
                                                        make_engine: MakeEngine) -> None:
    write_test_model(model_repo, "m", 1)
    engine = await make_engine(control_mode="none")
    with pytest.raises(Unsupported, match="model control mode is 'none'"):
        await engine.load("m")
    with pytest.raises(Unsupported):
        await engine.unload("m")


async def test_reload_and_unload_while_requests_run_lose_none(
        model_repo: Path, make_engine: MakeEngine) -> None:
    write_test_model(model_repo, "m", 1, kind="slow", slow_iterations=200)
    engine = await make_engine(control_mode="explicit", models=("m",))
    served: dict[int, int] = {}
    errors: list[BaseException] = []
    stop = asyncio.Event()
    v1_served, v2_served = asyncio.Event(), asyncio.Event()

    async def client(seed: int) -> None:
        x = np.full((1, 4), float(seed), np.float32)
        while not stop.is_set():
            model = engine.get("m")
            try:
                out = await model.infer({"x": x})
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)
                continue
            assert out["y"].tolist() == x.tolist()
            served[model.version] = served.get(model.version, 0) + 1
            if served[model.version] >= 20:
                (v1_served if model.version == 1 else v2_served).set()

    clients = [asyncio.ensure_future(client(i)) for i in range(8)]
    await asyncio.wait_for(v1_served.wait(), 10)
    write_test_model(model_repo, "m", 2, kind="slow", slow_iterations=200)
    await engine.load("m")
    await asyncio.wait_for(v2_served.wait(), 10)
    stop.set()
    await asyncio.gather(*clients)
    assert errors == [] and served[1] >= 20 and served[2] >= 20
    assert engine.index() == [IndexEntry("m", "2", "READY", "")]

    held = engine.get("m")
    in_flight = [asyncio.ensure_future(held.infer({"x": np.full((1, 4), i, np.float32)}))
                 for i in range(10)]
    await asyncio.sleep(0)
    await engine.unload("m")
    assert [r["y"][0, 0] for r in await asyncio.gather(*in_flight)] == list(range(10))
    with pytest.raises(ModelNotReady):
        engine.get("m")
    with pytest.raises(ModelNotReady, match="unloaded"):
        await held.infer({"x": np.zeros((1, 4), np.float32)})
    assert not engine.ready  # a model asked for at start is gone


async def test_poll_mode_notices_new_removed_and_broken_versions(
        model_repo: Path, make_engine: MakeEngine) -> None:
    write_test_model(model_repo, "m", 1)
    engine = await make_engine(control_mode="poll", poll_interval_s=0.02)
    write_test_model(model_repo, "m", 2)
    await eventually(lambda: engine.is_ready("m", "2") and not engine.is_ready("m", "1"))
    shutil.rmtree(model_repo / "m" / "2")
    await eventually(lambda: engine.is_ready("m") and engine.get("m").version == 1)
    write_test_model(model_repo, "m", 3, corrupt=True)
    await eventually(lambda: any(e.version == "3" and e.state == "UNAVAILABLE"
                                 for e in engine.index()))
    assert engine.get("m").version == 1
    write_test_model(model_repo, "n", 1, kind="double")
    await eventually(lambda: engine.is_ready("n"))
    shutil.rmtree(model_repo / "n")
    await eventually(lambda: all(e.name != "n" for e in engine.index()))


async def test_cuda_in_model_json_without_cuda_fails_that_model_clearly(
        model_repo: Path, make_engine: MakeEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    write_test_model(model_repo, "gpu", 1, policy=ModelPolicy(device="cuda"))
    write_test_model(model_repo, "cpu", 1)
    engine = await make_engine()
    assert engine.is_ready("cpu") and not engine.ready
    (entry,) = [e for e in engine.index() if e.name == "gpu"]
    assert entry.state == "UNAVAILABLE"
    assert "device 'cuda' was requested but this onnxruntime build has no " \
           "CUDAExecutionProvider" in entry.reason
    with pytest.raises(ModelNotReady, match="CUDAExecutionProvider"):
        engine.get("gpu")


async def test_version_policy_batching_defaults_and_overrides(
        model_repo: Path, make_engine: MakeEngine) -> None:
    policy = ModelPolicy(version_policy={"latest": 2}, max_batch_size=4)
    for v in (1, 2, 3):
        write_test_model(model_repo, "m", v, policy=policy)
    write_test_model(model_repo, "q", 1, kind="double")  # no model.json: server defaults
    # One worker: the second request must queue (with a free worker it could run beside).
    engine = await make_engine(max_queue_size=1, execution_workers=1)
    assert [e.version for e in engine.index() if e.name == "m"] == ["2", "3"]
    assert engine.get("m").version == 3 and engine.get("m", "2").version == 2
    assert engine.get("m").config.max_batch_size == 4
    with pytest.raises(ModelNotFound, match=r"no version '1'; available versions: \[2, 3\]"):
        engine.get("m", "1")
    with pytest.raises(ModelNotFound, match=r"unknown model 'zz'; known models: \['m', 'q'\]"):
        engine.get("zz")
    q = engine.get("q")
    assert q.policy.dynamic_batching == DynamicBatching(max_queue_size=1)
    x = np.ones((1, 2), np.float32)
    running = asyncio.ensure_future(q.infer({"x": x}))
    queued = asyncio.ensure_future(q.infer({"x": x}))
    await asyncio.sleep(0)  # the first is sent at once, the second waits behind it
    with pytest.raises(QueueFull, match="max_queue_size 1"):
        await q.infer({"x": x})
    await asyncio.gather(running, queued)
    with pytest.raises(DeadlineExceeded):
        await q.infer({"x": x}, deadline=time.monotonic() - 0.001)


async def test_statistics_count_requests_rows_and_runs(model_repo: Path,
                                                       make_engine: MakeEngine) -> None:
    write_test_model(model_repo, "m", 1)
    write_test_model(model_repo, "d", 1, kind="double")
    engine = await make_engine()
    for n in (1, 3):
        await engine.get("m").infer({"input": images(n)})
    (stats,) = engine.statistics("m", "1")
    assert (stats.name, stats.version) == ("m", "1")
    assert (stats.success_count, stats.inference_count, stats.execution_count) == (2, 4, 2)
    assert stats.success_ns > 0 and stats.compute_infer_ns > 0 and stats.last_inference_ms > 0
    assert [(b.batch_size, b.compute_infer_count) for b in stats.batch_stats] == [(1, 1), (3, 1)]
    assert [(s.name, s.execution_count) for s in engine.statistics()] == [("d", 0), ("m", 2)]
    with pytest.raises(ModelNotFound):
        engine.statistics("zz")


async def test_loading_runs_off_the_event_loop_and_shows_loading(
        model_repo: Path, make_engine: MakeEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    write_test_model(model_repo, "a", 1)
    engine = await make_engine(control_mode="explicit", models=("a",))
    gate = threading.Event()
    real_open = engine_module.load_version

    def slow_open(*args: Any) -> Any:
        assert gate.wait(10)
        return real_open(*args)

    monkeypatch.setattr(engine_module, "load_version", slow_open)
    write_test_model(model_repo, "b", 1)
    loading = asyncio.ensure_future(engine.load("b"))
    await eventually(lambda: IndexEntry("b", "1", "LOADING", "") in engine.index())
    x = images(1)  # serving goes on while "b" is being built
    np.testing.assert_allclose((await engine.get("a").infer({"input": x}))["output"],
                               linear_expected(x), **ORT_TOLERANCE)
    with pytest.raises(ModelNotReady, match="version 1 LOADING"):
        engine.get("b")
    gate.set()
    await loading
    assert engine.is_ready("b")


async def test_stop_drains_in_flight_requests_and_refuses_new_ones(
        model_repo: Path, make_engine: MakeEngine) -> None:
    write_test_model(model_repo, "m", 1, kind="slow", slow_iterations=500, max_batch_size=1)
    engine = await make_engine()
    model = engine.get("m")
    calls = [asyncio.ensure_future(model.infer({"x": np.full((1, 4), i, np.float32)}))
             for i in range(5)]
    await asyncio.sleep(0)
    stopping = asyncio.ensure_future(engine.stop(grace_s=30))
    await asyncio.sleep(0)
    assert not engine.ready
    with pytest.raises(ServerShuttingDown):
        await model.infer({"x": np.zeros((1, 4), np.float32)})
    assert [r["y"][0, 0] for r in await asyncio.gather(*calls)] == [0, 1, 2, 3, 4]
    await stopping


async def test_stop_fails_what_the_grace_period_could_not_finish(
        model_repo: Path, make_engine: MakeEngine) -> None:
    write_test_model(model_repo, "m", 1, kind="slow", slow_iterations=20000, max_batch_size=1)
    engine = await make_engine()
    model = engine.get("m")
    calls = [asyncio.ensure_future(model.infer({"x": np.zeros((1, 4), np.float32)}))
             for _ in range(6)]
    await asyncio.sleep(0)
    await asyncio.wait_for(engine.stop(grace_s=0.01), 10)
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    assert any(isinstance(o, ServerShuttingDown) for o in outcomes)
    assert all(isinstance(o, dict | ServerShuttingDown) for o in outcomes)


async def test_instance_count_bounds_how_many_batches_of_a_model_run_at_once(
        model_repo: Path, make_engine: MakeEngine) -> None:
    # Full (one-row) batches of a slow model: with two instances the second request runs
    # beside the first; with one it waits in the queue for the whole first run.
    write_test_model(model_repo, "two", 1, kind="slow", slow_iterations=100_000,
                     max_batch_size=1)
    write_test_model(model_repo, "one", 1, kind="slow", slow_iterations=100_000,
                     max_batch_size=1, policy=ModelPolicy(instance_count=1))
    engine = await make_engine(execution_workers=2)
    x = {"x": np.ones((1, 4), np.float32)}
    started = time.monotonic()
    await engine.get("one").infer(x)
    run_s = time.monotonic() - started
    queued_s = {}
    for name in ("two", "one"):
        model = engine.get(name)
        await asyncio.gather(model.infer(x), model.infer(x))
        queued_s[name] = model.statistics().queue_ns / 1e9
    assert queued_s["one"] > 0.5 * run_s > queued_s["two"], (queued_s, run_s)


def test_instance_count_must_be_positive(tmp_path: Path) -> None:
    (tmp_path / "model.json").write_text('{"instance_count": 0}')
    with pytest.raises(ConfigError, match="instance_count 0 must be a positive integer"):
        ModelPolicy.load(tmp_path / "model.json")
    (tmp_path / "model.json").write_text('{"intra_op_threads": -1}')
    with pytest.raises(ConfigError, match="intra_op_threads -1 must be an integer >= 0"):
        ModelPolicy.load(tmp_path / "model.json")


async def test_threads_default_from_the_cores_and_model_json_overrides_them(
        model_repo: Path, make_engine: MakeEngine) -> None:
    write_test_model(model_repo, "plain", 1)
    write_test_model(model_repo, "tuned", 1,
                     policy=ModelPolicy(instance_count=1, intra_op_threads=3))
    engine = await make_engine(cores=16)
    assert engine.thread_split == ThreadSplit(workers=4, intra_op_threads=4)
    plain, tuned = engine.get("plain"), engine.get("tuned")
    assert (plain.instance_count, plain.intra_op_threads) == (4, 4)
    assert (tuned.instance_count, tuned.intra_op_threads) == (1, 3)
    flagged = await make_engine(cores=16, execution_workers=8)
    assert flagged.thread_split == ThreadSplit(workers=8, intra_op_threads=2)


async def test_every_dispatch_mode_returns_each_caller_its_own_rows(
        model_repo: Path, make_engine: MakeEngine) -> None:
    write_test_model(model_repo, "m", 1)
    write_test_model(model_repo, "slow", 1, kind="slow", slow_iterations=100_000,
                     policy=ModelPolicy(instance_count=2))
    # Inline up to 20 ms of measured work: the tiny linear model is far below it on any host
    # (even a loaded CI runner), the slow model (0.5-2 s a run) far above. The default
    # threshold (0.5 ms) would make "cheap" depend on the machine's load.
    engine = await make_engine(execution_workers=2,
                               dispatch=DispatchPolicy(inline_max_us=20_000))
    cheap, slow = engine.get("m"), engine.get("slow")
    for seed in (1, 2, 3, 4):  # unknown cost: a worker; then measured cheap: inline
        x = images(2, seed=seed)
        out = await cheap.infer({"input": x})
        np.testing.assert_allclose(out["output"], linear_expected(x), **ORT_TOLERANCE)
    assert cheap.dispatched["handoff"] == 1 and cheap.dispatched["inline"] >= 1
    xs = [images(1, seed=10 + i) for i in range(16)]  # company: merged on a worker
    for x, out in zip(xs, await asyncio.gather(*(cheap.infer({"input": x}) for x in xs)),
                      strict=True):
        np.testing.assert_allclose(out["output"], linear_expected(x), **ORT_TOLERANCE)
    assert cheap.dispatched["handoff"] >= 2

    await slow.infer({"x": np.zeros((1, 4), np.float32)})  # measures a costly run
    xs = [np.full((3, 4), v, np.float32) + np.arange(3, dtype=np.float32)[:, None]
          for v in (10.0, 20.0)]
    outs = await asyncio.gather(*(slow.infer({"x": x}) for x in xs))
    for x, out in zip(xs, outs, strict=True):  # the second ran beside the first, alone
        np.testing.assert_array_equal(out["y"], x)
    assert slow.dispatched == {"inline": 0, "handoff": 2, "pass_through": 1}
