"""The model repository: which versions exist on disk, which are served, and their states.

:class:`Repository` keeps a record per model and version (READY, LOADING, UNAVAILABLE,
UNLOADING, with the reason when not ready) and applies the model's version policy. Loading
itself is delegated to an injected ``opener`` (the engine builds the session and batcher).
A new or changed version is opened and warmed up *before* it replaces anything; if it fails,
the versions already serving keep serving. Retiring a version closes it, which waits for its
queued and running requests. Disk access happens in a worker thread, never on the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from cnnserve.common.repository import (
    LOADING,
    READY,
    UNAVAILABLE,
    UNLOADING,
    ModelPolicy,
    ModelState,
)
from cnnserve.server.engine.scan import (
    Layout,
    ModelScan,
    detect_layout,
    scan_model,
    scan_repository,
    select_versions,
)
from cnnserve.server.errors import ModelLoadError, ModelNotFound, ModelNotReady
from cnnserve.server.telemetry.metrics import Metrics

log = logging.getLogger(__name__)


T = TypeVar("T")


class Servable(Protocol):
    """A loaded version as the repository sees it."""

    async def close(self) -> None:
        """Finish queued and running requests, then release the session."""
        ...


S = TypeVar("S", bound=Servable)
Opener = Callable[[str, int, Path, ModelPolicy], Awaitable[S]]


@dataclass(frozen=True)
class IndexEntry:
    """One row of the repository index."""

    name: str
    version: str
    state: ModelState
    reason: str  # why not ready; "" when READY


@dataclass
class _Version(Generic[S]):
    state: ModelState = UNAVAILABLE
    reason: str = ""
    servable: S | None = None
    loaded: object = None  # fingerprint the servable was built from
    attempted: object = None  # fingerprint of the last load attempt (success or failure)


@dataclass
class _Model(Generic[S]):
    name: str
    versions: dict[int, _Version[S]] = field(default_factory=dict)
    error: str = ""  # model-level problem (bad model.json, no versions)
    scan: ModelScan | None = None  # what the last sync saw
    latest: S | None = None  # newest READY version, for version ""


class _NamedLock:
    """A model's lock and how many callers hold or wait for it."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


class Repository(Generic[S]):
    """Records, version policy and load/unload orchestration for every model."""

    def __init__(self, root: Path, opener: Opener[S], read_policy: Callable[[Path], ModelPolicy],
                 executor: Executor, metrics: Metrics, names: Sequence[str] = ()) -> None:
        """``read_policy(model_folder)`` reads a model's serving policy (blocking); ``names``
        are the models asked for at start, which name a single-model root (see Layout)."""
        self._root = root
        self._names = tuple(names)
        self.layout = Layout(root)
        self._open = opener
        self._read_policy = read_policy
        self._executor = executor
        self._metrics = metrics
        self._models: dict[str, _Model[S]] = {}
        self._locks: dict[str, _NamedLock] = {}
        self.known: set[str] = set()  # model folders as of the last scan

    @contextlib.asynccontextmanager
    async def _locked(self, name: str) -> AsyncIterator[None]:
        """Hold ``name``'s lock; it is dropped once unused while ``name`` has no record, so
        names that are not models (any client can send millions) leave no state behind."""
        entry = self._locks.get(name)
        if entry is None:
            entry = self._locks[name] = _NamedLock()
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if not entry.users and name not in self._models:
                del self._locks[name]

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def rescan(self) -> dict[str, ModelScan]:
        """Scan every model folder (in the worker thread) and refresh :attr:`known`."""
        self.layout = await self._run(detect_layout, self._root, self._names)
        scans = await self._run(scan_repository, self.layout)
        self.known = set(scans)
        return scans

    async def load(self, name: str, *, force: bool = True) -> None:
        """Bring ``name`` in line with its folder and policy.

        ``force`` retries versions that failed before with unchanged files (polls do not).
        Raises ModelNotFound (no such folder) or ModelLoadError naming every failure.
        """
        async with self._locked(name):
            scan = await self._run(scan_model, self.layout, name)
            if scan is None:
                self.known.discard(name)
                raise ModelNotFound(f"model '{name}' is not in the repository; "
                                    f"known models: {sorted(self.known) or 'none'}")
            self.known.add(name)
            model = self._models.setdefault(name, _Model(name))
            await self._sync(model, scan, force)

    async def _sync(self, model: _Model[S], scan: ModelScan, force: bool) -> None:
        model.scan = scan
        try:
            policy = await self._run(self._read_policy, self.layout.model_dir(model.name))
        except Exception as exc:  # ConfigError or OSError: keep serving what we have
            self._failed(model.name, f"model '{model.name}': {exc}")
            model.error = str(exc)
            raise ModelLoadError(f"model '{model.name}': {exc}") from exc
        model.error = ""
        candidates, missing = select_versions(policy, scan.versions)
        limit = policy.version_policy.get("latest")
        serving: list[int] = []
        visited: set[int] = set(missing)
        failures: list[str] = []
        for v in candidates:
            if limit is not None and len(serving) >= limit:
                break
            visited.add(v)
            if await self._ensure(model, v, (scan.policy, scan.versions[v]), policy, force,
                                  failures):
                serving.append(v)
        for v in missing:
            reason = f"version {v} is in the version policy but not in the repository"
            self._set(model, v, UNAVAILABLE, reason)
            failures.append(f"model '{model.name}' {reason}")
        for v in sorted(model.versions):
            if v not in serving:
                await self._retire(model, v, "unloaded: not selected by the version policy"
                                   if v in scan.versions else "unloaded: removed from disk")
                if v not in visited:
                    del model.versions[v]
        if not scan.versions:
            model.error = (f"model '{model.name}' has no version folders (positive integers) "
                           f"in {self.layout.model_dir(model.name)}")
            failures.append(model.error)
        if failures:
            raise ModelLoadError("; ".join(failures))

    async def _ensure(self, model: _Model[S], v: int, fp: object, policy: ModelPolicy,
                      force: bool, failures: list[str]) -> bool:
        """Make version ``v`` serve the files ``fp``; True if it serves (old or new files)."""
        rec = model.versions.setdefault(v, _Version())
        if rec.servable is not None and rec.loaded == fp:
            return True
        if not force and rec.attempted == fp:
            return rec.servable is not None  # failed before with these very files
        rec.attempted = fp
        if rec.servable is None:
            self._set(model, v, LOADING, "")
        try:
            new = await self._open(model.name, v, self.layout.version_dir(model.name, v), policy)
        except Exception as exc:
            reason = str(exc) or type(exc).__name__
            self._failed(model.name, reason, exc_info=not isinstance(exc, ModelLoadError))
            failures.append(reason)
            if rec.servable is None:
                self._set(model, v, UNAVAILABLE, reason)
            else:
                log.warning("model '%s' version %d keeps serving its previous files", model.name, v)
            return rec.servable is not None
        old, rec.servable, rec.loaded = rec.servable, new, fp
        self._set(model, v, READY, "")
        if old is not None:
            await old.close()  # requests already holding the old session complete
        return True

    async def _retire(self, model: _Model[S], v: int, reason: str) -> None:
        rec = model.versions[v]
        servable = rec.servable
        if servable is not None:
            self._set(model, v, UNLOADING, reason)
            await servable.close()
            rec.servable = None
            rec.loaded = rec.attempted = None
            self._set(model, v, UNAVAILABLE, reason)
            log.info("model '%s' version %d %s", model.name, v, reason)

    async def unload(self, name: str, reason: str = "unloaded") -> None:
        """Retire every version of ``name``; raises ModelNotFound for an unknown model."""
        async with self._locked(name):
            model = self._models.get(name)
            if model is None:
                if name in self.known:
                    return
                raise ModelNotFound(self._unknown(name))
            for v in sorted(model.versions):
                await self._retire(model, v, reason)
                model.versions[v].reason = reason
            model.scan = None

    async def poll(self, wanted: Callable[[str], bool]) -> None:
        """Load new or changed models and versions, retire removed ones; never raises."""
        scans = await self.rescan()
        for name in sorted(set(self._models) - set(scans)):
            await self.unload(name, "unloaded: removed from the repository")
            self._models.pop(name, None)
        for name, scan in sorted(scans.items()):
            model = self._models.get(name)
            if not wanted(name) or (model is not None and model.scan == scan):
                continue
            with contextlib.suppress(ModelLoadError, ModelNotFound):  # logged, in the index
                await self.load(name, force=False)

    def _set(self, model: _Model[S], v: int, state: ModelState, reason: str) -> None:
        rec = model.versions.setdefault(v, _Version())
        rec.state, rec.reason = state, reason
        self._metrics.set_model_state(model.name, v, state)
        ready = [x for x in sorted(model.versions, reverse=True)
                 if model.versions[x].state == READY]
        model.latest = model.versions[ready[0]].servable if ready else None

    def _failed(self, name: str, reason: str, exc_info: bool = False) -> None:
        self._metrics.load_failed(name)
        log.error("load failed: %s", reason, exc_info=exc_info)

    def _unknown(self, name: str) -> str:
        return f"unknown model '{name}'; known models: {self.names()}"

    # -- request-path lookups (no I/O, no awaits) -----------------------------------------
    def lookup(self, name: str, version: str = "") -> S:
        """The servable of ``name``/``version`` ("" = newest READY); see Engine.get."""
        model = self._models.get(name)
        if model is None:
            if name in self.known:
                raise ModelNotReady(f"model '{name}' is not loaded")
            raise ModelNotFound(self._unknown(name))
        if not version:
            if model.latest is not None:
                return model.latest
            raise ModelNotReady(f"model '{name}' has no ready version ({self._why(model)})")
        rec = model.versions.get(int(version)) if version.isdigit() else None
        if rec is None:
            ready = [v for v, r in sorted(model.versions.items()) if r.state == READY]
            raise ModelNotFound(f"model '{name}' has no version '{version}'; available "
                                f"versions: {ready or 'none'}")
        if rec.servable is None or rec.state != READY:
            raise ModelNotReady(f"model '{name}' version {version} is {rec.state}"
                                + (f": {rec.reason}" if rec.reason else ""))
        return rec.servable

    def _why(self, model: _Model[S]) -> str:
        parts = [f"version {v} {r.state}" + (f": {r.reason}" if r.reason else "")
                 for v, r in sorted(model.versions.items())]
        return "; ".join([model.error, *parts] if model.error else parts) or "not loaded"

    def ready_versions(self, name: str) -> list[S]:
        """Every READY servable of ``name``, oldest first; raises ModelNotFound if unknown."""
        model = self._models.get(name)
        if model is None and name not in self.known:
            raise ModelNotFound(self._unknown(name))
        versions = model.versions.items() if model is not None else ()
        return [r.servable for _, r in sorted(versions)
                if r.state == READY and r.servable is not None]

    def names(self) -> list[str]:
        """Every model known from the last scan or with a record, sorted."""
        return sorted(self.known | set(self._models))

    def servables(self) -> list[S]:
        """Every loaded servable of every model (READY or retiring)."""
        return [r.servable for m in self._models.values() for r in m.versions.values()
                if r.servable is not None]

    def has_ready(self, name: str) -> bool:
        model = self._models.get(name)
        return model is not None and model.latest is not None

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        """One entry per version with a state; models never loaded appear with version ""."""
        entries = []
        for name in self.names():
            model = self._models.get(name)
            if model is None or not model.versions:
                why = model.error if model is not None and model.error else "not loaded"
                entries.append(IndexEntry(name, "", UNAVAILABLE, why))
                continue
            entries.extend(IndexEntry(name, str(v), r.state, "" if r.state == READY else r.reason)
                           for v, r in sorted(model.versions.items()))
        return [e for e in entries if e.state == READY] if ready_only else entries
