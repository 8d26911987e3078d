"""Repository scanning, version policies and load/reload/unload orchestration.

The opener is a fake that builds nothing: it fails for a version folder holding a file named
FAIL, which lets each test decide on disk which loads break (the real ORT path is covered
by test_engine.py).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cnnserve.common.repository import (
    MODEL_FILE,
    POLICY_FILE,
    DynamicBatching,
    ModelPolicy,
)
from cnnserve.server.engine.model_source import read_model_policy
from cnnserve.server.engine.repository import IndexEntry, Repository
from cnnserve.server.engine.scan import (
    Layout,
    read_policy,
    scan_model,
    scan_repository,
    select_versions,
)
from cnnserve.server.errors import ModelLoadError, ModelNotFound, ModelNotReady
from cnnserve.server.telemetry.metrics import Metrics


class FakeServable:
    def __init__(self, name: str, version: int, policy: ModelPolicy) -> None:
        self.name, self.version, self.policy = name, version, policy
        self.closed = False

    async def close(self) -> None:
        self.closed = True


class FakeOpener:
    def __init__(self) -> None:
        self.opened: list[tuple[str, int]] = []

    async def __call__(self, name: str, version: int, folder: Path,
                       policy: ModelPolicy) -> FakeServable:
        self.opened.append((name, version))
        if (folder / "FAIL").exists():
            raise ModelLoadError(f"model '{name}' version {version}: broken on purpose")
        return FakeServable(name, version, policy)


def make_version(repo: Path, name: str, version: int, content: str = "onnx",
                 fail: bool = False) -> Path:
    folder = repo / name / str(version)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MODEL_FILE).write_text(content)
    if fail:
        (folder / "FAIL").write_text("")
    return folder


def set_policy(repo: Path, name: str, **version_policy: object) -> None:
    (repo / name).mkdir(parents=True, exist_ok=True)
    (repo / name / POLICY_FILE).write_text(ModelPolicy(version_policy=version_policy).to_json())


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(1)
    yield pool
    pool.shutdown()


@pytest.fixture
def opener() -> FakeOpener:
    return FakeOpener()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def repo(model_repo: Path, opener: FakeOpener, executor: ThreadPoolExecutor,
         metrics: Metrics) -> Repository[FakeServable]:
    return Repository(model_repo, opener, read_model_policy, executor, metrics)


def states(repo: Repository[FakeServable], name: str) -> dict[str, str]:
    return {e.version: e.state for e in repo.index() if e.name == name}


def test_scan_ignores_dot_folders_and_fingerprints_file_changes(model_repo: Path) -> None:
    make_version(model_repo, "m", 1)
    (model_repo / ".tmp-export").mkdir()
    (model_repo / "m" / ".tmp-2-abc").mkdir()
    (model_repo / "m" / "notes").mkdir()
    before = scan_repository(Layout(model_repo))
    assert list(before) == ["m"] and list(before["m"].versions) == [1]
    make_version(model_repo, "m", 1, content="a different model")
    assert scan_model(Layout(model_repo), "m") != before["m"]
    assert scan_model(Layout(model_repo), "absent") is None


@pytest.mark.parametrize(("policy", "expected"), [
    ({"latest": 2}, ([5, 3, 1], [])),
    ({"all": True}, ([5, 3, 1], [])),
    ({"specific": [1, 4, 5]}, ([5, 1], [4])),
])
def test_select_versions(policy: dict[str, object],
                         expected: tuple[list[int], list[int]]) -> None:
    assert select_versions(ModelPolicy(version_policy=policy), {1: 0, 3: 0, 5: 0}) == expected


def test_read_policy_applies_server_defaults_only_where_model_json_is_silent(
        model_repo: Path) -> None:
    path = model_repo / POLICY_FILE
    assert read_policy(path, 0, 7).dynamic_batching == DynamicBatching(0, (), 7)
    path.write_text('{"dynamic_batching": {"max_queue_delay_microseconds": 900}}')
    assert read_policy(path, 0, 7).dynamic_batching == DynamicBatching(900, (), 7)
    assert read_policy(path).dynamic_batching == DynamicBatching(900, (), 1024)


async def test_latest_one_serves_the_newest_version(repo: Repository[FakeServable],
                                                    model_repo: Path) -> None:
    for v in (1, 2, 3):
        make_version(model_repo, "m", v)
    await repo.load("m")
    assert repo.lookup("m").version == 3
    assert repo.lookup("m", "3").version == 3
    assert repo.index() == [IndexEntry("m", "3", "READY", "")]
    with pytest.raises(ModelNotFound, match=r"model 'm' has no version '1'; available versions: "
                                            r"\[3\]"):
        repo.lookup("m", "1")
    with pytest.raises(ModelNotFound, match=r"unknown model 'x'; known models: \['m'\]"):
        repo.lookup("x")


async def test_latest_n_all_and_specific_policies(repo: Repository[FakeServable],
                                                  model_repo: Path) -> None:
    for name in ("a", "b", "c"):
        for v in (1, 2, 3):
            make_version(model_repo, name, v)
    set_policy(model_repo, "a", latest=2)
    set_policy(model_repo, "b", all=True)
    set_policy(model_repo, "c", specific=[1, 7])
    await repo.load("a")
    await repo.load("b")
    with pytest.raises(ModelLoadError):  # version 7 is not on disk
        await repo.load("c")
    assert states(repo, "a") == {"2": "READY", "3": "READY"}
    assert states(repo, "b") == {"1": "READY", "2": "READY", "3": "READY"}
    assert states(repo, "c") == {"1": "READY", "7": "UNAVAILABLE"}
    assert repo.lookup("c").version == 1
    with pytest.raises(ModelNotReady, match="version 7 is UNAVAILABLE: version 7 is in the "
                                            "version policy but not in the repository"):
        repo.lookup("c", "7")


async def test_a_failing_new_version_leaves_the_previous_one_serving(
        repo: Repository[FakeServable], model_repo: Path, metrics: Metrics) -> None:
    make_version(model_repo, "m", 1)
    await repo.load("m")
    v1 = repo.lookup("m")
    make_version(model_repo, "m", 2, fail=True)
    with pytest.raises(ModelLoadError, match="broken on purpose"):
        await repo.load("m")
    assert repo.lookup("m") is v1 and not v1.closed
    assert repo.index() == [
        IndexEntry("m", "1", "READY", ""),
        IndexEntry("m", "2", "UNAVAILABLE", "model 'm' version 2: broken on purpose")]
    with pytest.raises(ModelNotReady, match=r"version 2 is UNAVAILABLE: .*broken on purpose"):
        repo.lookup("m", "2")
    assert metrics.registry.get_sample_value("cnnserve_model_load_failures_total",
                                             {"model": "m"}) == 1
    (model_repo / "m" / "2" / "FAIL").unlink()  # fixed: now v2 replaces v1
    await repo.load("m")
    assert repo.lookup("m").version == 2 and v1.closed
    assert states(repo, "m") == {"2": "READY"}


async def test_changed_files_reload_the_version_and_close_the_old_one(
        repo: Repository[FakeServable], model_repo: Path, opener: FakeOpener) -> None:
    make_version(model_repo, "m", 1)
    await repo.load("m")
    old = repo.lookup("m")
    await repo.load("m")  # unchanged: nothing to do
    assert opener.opened == [("m", 1)]
    make_version(model_repo, "m", 1, content="retrained")
    await repo.load("m")
    assert repo.lookup("m") is not old and old.closed
    make_version(model_repo, "m", 1, content="broken retrain", fail=True)
    current = repo.lookup("m")
    with pytest.raises(ModelLoadError):
        await repo.load("m")
    assert repo.lookup("m") is current  # keeps serving the files it loaded


async def test_bad_model_json_fails_the_load_and_keeps_what_serves(
        repo: Repository[FakeServable], model_repo: Path) -> None:
    make_version(model_repo, "m", 1)
    await repo.load("m")
    (model_repo / "m" / POLICY_FILE).write_text('{"version_policy": {"latest": 0}}')
    with pytest.raises(ModelLoadError, match=r"model 'm': .*version_policy"):
        await repo.load("m")
    assert repo.lookup("m").version == 1


async def test_unload_retires_every_version(repo: Repository[FakeServable],
                                            model_repo: Path) -> None:
    make_version(model_repo, "m", 1)
    await repo.load("m")
    served = repo.lookup("m")
    await repo.unload("m")
    assert served.closed
    assert repo.index() == [IndexEntry("m", "1", "UNAVAILABLE", "unloaded")]
    with pytest.raises(ModelNotReady, match="model 'm' has no ready version"):
        repo.lookup("m")
    with pytest.raises(ModelNotFound):
        await repo.unload("nothing")
    with pytest.raises(ModelNotFound, match="not in the repository"):
        await repo.load("nothing")


async def test_poll_notices_new_changed_and_removed_versions_and_models(
        repo: Repository[FakeServable], model_repo: Path, opener: FakeOpener) -> None:
    make_version(model_repo, "m", 1)
    await repo.poll(lambda name: True)
    assert repo.lookup("m").version == 1
    make_version(model_repo, "m", 2)
    make_version(model_repo, "n", 1, fail=True)
    await repo.poll(lambda name: True)
    assert repo.lookup("m").version == 2
    assert states(repo, "n") == {"1": "UNAVAILABLE"}
    opened = len(opener.opened)
    await repo.poll(lambda name: True)  # nothing changed: the failure is not retried
    assert len(opener.opened) == opened
    shutil.rmtree(model_repo / "m" / "2")
    await repo.poll(lambda name: True)
    assert repo.lookup("m").version == 1
    shutil.rmtree(model_repo / "n")
    await repo.poll(lambda name: True)
    assert [e.name for e in repo.index()] == ["m"]


async def test_index_lists_models_that_were_never_loaded(repo: Repository[FakeServable],
                                                         model_repo: Path) -> None:
    make_version(model_repo, "m", 1)
    await repo.rescan()
    assert repo.index() == [IndexEntry("m", "", "UNAVAILABLE", "not loaded")]
    assert repo.index(ready_only=True) == []
    with pytest.raises(ModelNotReady, match="model 'm' is not loaded"):
        repo.lookup("m")
