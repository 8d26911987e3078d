"""The serving engine: the protocol-neutral core every wire layer calls (see ARCHITECTURE.md).

:class:`Engine` ties the repository (what is served), the runtime (ONNX Runtime sessions) and
the batcher (how requests reach them) together, and owns the two thread pools: one runs
ONNX Runtime batches, the other loads models, so a slow load never delays inference.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cnnserve.common.datatypes import Array
from cnnserve.common.errors import CnnserveError
from cnnserve.common.repository import MODEL_NAME, ModelPolicy
from cnnserve.server.batching.batcher import Batcher, BatchPolicy
from cnnserve.server.batching.dispatch import DispatchPolicy
from cnnserve.server.batching.threads import ThreadSplit, detect_cores, resolve_split
from cnnserve.server.engine.model_source import VersionSource, load_version, read_model_policy
from cnnserve.server.engine.names import checked
from cnnserve.server.engine.repository import IndexEntry, Repository
from cnnserve.server.engine.shapes import ShapedRunner
from cnnserve.server.errors import ServerShuttingDown, ServingError, Unsupported
from cnnserve.server.runtime.ort import OrtRuntime, RuntimeOptions
from cnnserve.server.telemetry.metrics import Metrics
from cnnserve.server.telemetry.statistics import BatchStats, StatsRecorder, VersionStats

__all__ = ["BatchStats", "Engine", "EngineOptions", "IndexEntry", "LoadedModel", "VersionStats"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineOptions:
    """How the engine loads and runs models (one per process, built from flags)."""

    repository: Path
    #: Models to load at start; () = every model in the repository (explicit mode: none).
    models: tuple[str, ...] = ()
    #: none: load at start only; explicit: load/unload by RPC; poll: rescan every poll_interval_s.
    control_mode: Literal["none", "explicit", "poll"] = "none"
    poll_interval_s: float = 5.0
    #: Default execution provider; model.json ``device`` overrides it per model.
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    #: ONNX Runtime threads per batch; None: from the cores (batching/threads.py), 0: ORT's
    #: default (one per core). model.json ``intra_op_threads`` overrides it per model.
    intra_op_threads: int | None = None
    inter_op_threads: int = 0
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    warmup: bool = True
    #: Threads running ONNX Runtime batches, shared by all models; also how many batches of
    #: one version may run at once unless its model.json sets instance_count. None: from the
    #: cores, so that workers x intra-op threads fits them (batching/threads.py).
    execution_workers: int | None = None
    #: Usable cores the defaults are sized for; None: detected (affinity, cgroup quota).
    cores: int | None = None
    #: Where batches run (inline, hand-off, pass-through thresholds); None: the measured
    #: defaults of batching/dispatch.py.
    dispatch: DispatchPolicy | None = None
    #: Server-wide batching defaults for models whose model.json does not set them.
    max_queue_delay_us: int | None = None
    max_queue_size: int | None = None
    #: Server readiness requires every model asked for at start to be READY (Triton's
    #: --strict-readiness); False: ready once started and not draining.
    strict_readiness: bool = True


class _Gate:
    """Shared by the engine and its models: once draining, no new requests."""

    draining = False


class LoadedModel:
    """One READY model version; safe to hold across an unload (in-flight requests complete)."""

    def __init__(self, source: VersionSource, version: int, runtime: OrtRuntime,
                 batcher: Batcher, stats: StatsRecorder, gate: _Gate, metrics: Metrics) -> None:
        config = source.config
        self.name = config.name
        self.version = version
        self.version_label = str(version)  # as requests, responses and metrics carry it
        self.config = config
        self.source = source  # where the signature and policy came from
        self.output_datatypes = {t.name: t.datatype for t in config.outputs}
        #: Whether an input is BYTES (decoded element by element, so off the event loop).
        self.bytes_inputs = any(t.datatype == "BYTES" for t in config.inputs)
        self.policy = source.policy
        self._batched = config.max_batch_size > 0
        self.providers = runtime.providers
        self.instance_count = batcher.max_running  # batches that may run at once
        self.intra_op_threads = runtime.intra_op_threads  # ONNX Runtime threads per run
        self._runtime = runtime
        self._batcher = batcher
        self._stats = stats
        self._gate = gate
        self._metrics = metrics
        self._closing: asyncio.Task[None] | None = None

    async def infer(self, inputs: Mapping[str, Array], outputs: Sequence[str] = (), *,
                    deadline: float | None = None) -> dict[str, Array]:
        """Run validated ``inputs`` (same first dim B) through the batcher; see ARCHITECTURE.md.

        Returns the ``outputs`` asked for (all if empty), each with first dim B. Raises
        QueueFull, DeadlineExceeded, ServerShuttingDown, InferenceFailed, ModelNotReady.
        """
        if self._gate.draining:
            raise ServerShuttingDown("the server is shutting down and takes no new requests")
        if self._batched:
            return await self._batcher.submit(inputs, outputs, deadline)
        rows = {k: v[None] for k, v in inputs.items()}  # one row of a virtual batch
        results = await self._batcher.submit(rows, outputs, deadline)
        return {k: v[0] for k, v in results.items()}

    def labels_for(self, output: str) -> tuple[str, ...]:
        """Class labels of ``output`` for the classification extension (may be empty)."""
        return self.source.output_labels.get(output, self.config.labels)

    @property
    def dispatched(self) -> dict[str, int]:
        """Batches run so far by where they ran: inline, handoff, pass_through."""
        return {d.value: n for d, n in self._batcher.dispatched.items() if d.value != "wait"}

    def statistics(self) -> VersionStats:
        """Cumulative statistics since this version was loaded."""
        return self._stats.snapshot()

    async def close(self) -> None:
        """Serve everything queued or running, then release the session (idempotent)."""
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self._close())
        await asyncio.wait({self._closing})

    async def _close(self) -> None:
        await self._batcher.drain()
        self._runtime.close()
        self._metrics.model_unloaded(self.name, self.version, self.providers)

    async def abort(self) -> None:
        """Fail whatever is still queued or running with ServerShuttingDown and release."""
        await self._batcher.abort()
        await self.close()


class Engine:
    """The facade the wire layer uses: lookups, inference models, model control, stats."""

    def __init__(self, options: EngineOptions, metrics: Metrics) -> None:
        self._options = options
        self._metrics = metrics
        cores = options.cores or detect_cores()
        self._split = resolve_split(cores, options.execution_workers, options.intra_op_threads)
        log.info("%d usable cores: %d execution workers x %d intra-op threads", cores,
                 self._split.workers, self._split.intra_op_threads)
        self._executor = ThreadPoolExecutor(self._split.workers,
                                            thread_name_prefix="cnnserve-ort")
        self._loader = ThreadPoolExecutor(2, thread_name_prefix="cnnserve-load")
        self._gate = _Gate()
        policy_reader = functools.partial(
            read_model_policy, max_queue_delay_us=options.max_queue_delay_us,
            max_queue_size=options.max_queue_size)
        self._repo = Repository[LoadedModel](options.repository, self._open_version,
                                             policy_reader, self._loader, metrics,
                                             options.models)
        self._required: set[str] = set()
        self._started = False
        self._poll_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Load the models asked for and warm them up.

        A model that fails is reported (log, metric, index) and leaves the server not ready;
        raises CnnserveError only if the repository folder is missing.
        """
        root = self._options.repository
        if not root.is_dir():
            raise CnnserveError(f"model repository {root} does not exist or is not a folder")
        scans = await self._repo.rescan()
        names = list(self._options.models)
        if not names and self._options.control_mode != "explicit":
            names = sorted(scans)
        self._required = set(names)
        await asyncio.gather(*(self._load_reported(n) for n in names))
        self._started = True
        if self._options.control_mode == "poll":
            self._poll_task = asyncio.get_running_loop().create_task(self._poll_forever())
        log.info("engine started: %d of %d models ready", sum(map(self._repo.has_ready, names)),
                 len(names))

    async def _load_reported(self, name: str) -> None:
        try:
            await self._repo.load(checked(name)[0])
        except ServingError as exc:
            log.error("model %r is not ready: %s", name, exc)

    async def _poll_forever(self) -> None:
        wanted = set(self._options.models)
        while True:
            await asyncio.sleep(self._options.poll_interval_s)
            try:
                # A folder whose name no request could use (a space, say) is not served.
                await self._repo.poll(lambda name: MODEL_NAME.fullmatch(name) is not None
                                      and (not wanted or name in wanted))
                self._required &= self._repo.known  # a removed model is no longer required
            except Exception:  # a bad scan must not end polling
                log.exception("repository poll failed")

    async def _open_version(self, name: str, version: int, folder: Path,
                            policy: ModelPolicy) -> LoadedModel:
        where = f"model '{name}' version {version}"
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        opts = self._options
        threads = (self._split.intra_op_threads if policy.intra_op_threads is None
                   else policy.intra_op_threads)
        runtime_options = RuntimeOptions(opts.device, threads,
                                         opts.inter_op_threads, opts.graph_optimization,
                                         opts.warmup)
        source, runtime = await loop.run_in_executor(self._loader, load_version, name, folder,
                                                     policy, runtime_options, where)
        config = source.config
        batching = policy.dynamic_batching
        # A model that does not batch runs each request alone: one row of a virtual batch.
        limit = config.max_batch_size or 1
        batcher = Batcher(
            ShapedRunner(runtime, config, source.graph) if source.reshaped else runtime,
            BatchPolicy(limit, batching.max_queue_delay_microseconds,
                        tuple(b for b in batching.preferred_batch_size if b <= limit),
                        batching.max_queue_size),
            self._executor, [t.name for t in config.outputs], where=where,
            stats=(stats := StatsRecorder(name, version)),
            metrics=self._metrics.for_version(name, version),
            max_running=policy.instance_count or self._split.workers,
            dispatch=self._options.dispatch)
        batcher.start()
        seconds = time.monotonic() - started
        self._metrics.model_loaded(name, version, seconds, runtime.providers)
        log.info("%s loaded in %.3f s on %s (signature from %s)", where, seconds,
                 ", ".join(runtime.providers), source.origin)
        return LoadedModel(source, version, runtime, batcher, stats, self._gate, self._metrics)

    async def stop(self, grace_s: float) -> None:
        """Refuse new requests, finish queued and running ones within ``grace_s`` seconds,
        then fail the rest with ServerShuttingDown and release every session."""
        self.begin_drain()
        if self._poll_task is not None:
            self._poll_task.cancel()
            await asyncio.gather(self._poll_task, return_exceptions=True)
        closing = {asyncio.ensure_future(m.close()): m for m in self._repo.servables()}
        if closing:
            _, late = await asyncio.wait(closing, timeout=max(grace_s, 0.0))
            if late:
                log.warning("grace period of %.1f s over: failing what is left on %d model "
                            "versions", grace_s, len(late))
                await asyncio.gather(*(closing[task].abort() for task in late))
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._loader.shutdown(wait=False, cancel_futures=True)

    @property
    def thread_split(self) -> ThreadSplit:
        """Execution workers and default intra-op threads per batch, as resolved at start."""
        return self._split

    def begin_drain(self) -> None:
        """From now on new infer() calls raise ServerShuttingDown."""
        self._gate.draining = True

    @property
    def ready(self) -> bool:
        """Started, not draining, and (strict readiness) every model asked for at start has a
        READY version."""
        return (self._started and not self._gate.draining
                and (not self._options.strict_readiness
                     or all(self._repo.has_ready(n) for n in self._required)))

    def get(self, name: str, version: str = "") -> LoadedModel:
        """The READY model version ("" = newest READY allowed by the policy).

        Raises InvalidRequest (a name that is not a model folder name, a version that is not
        ASCII digits), ModelNotFound (unknown model or version; lists what exists) or
        ModelNotReady (loading, failed or unloaded; says why).
        """
        return self._repo.lookup(*checked(name, version))

    def is_ready(self, name: str, version: str = "") -> bool:
        """Whether :meth:`get` would return a model; InvalidRequest for a malformed name."""
        checked(name, version)
        with contextlib.suppress(ServingError):
            self._repo.lookup(name, version)
            return True
        return False

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        """Every model in the repository and the state of each version with one."""
        return self._repo.index(ready_only)

    async def load(self, name: str) -> None:
        """(Re)load ``name`` from disk per its policy (explicit control mode only).

        New versions are warmed up before they take traffic; if one fails, the versions
        serving keep serving and ModelLoadError says why. Raises ModelNotFound, Unsupported.
        """
        checked(name)
        self._check_control("load")
        await self._repo.load(name)

    async def unload(self, name: str) -> None:
        """Retire every version of ``name``; requests in flight on it complete."""
        checked(name)
        self._check_control("unload")
        await self._repo.unload(name)

    def _check_control(self, action: str) -> None:
        mode = self._options.control_mode
        if mode != "explicit":
            raise Unsupported(f"cannot {action} models: model control mode is '{mode}'; start "
                              "the server in 'explicit' mode to load and unload by request")

    def statistics(self, name: str = "", version: str = "") -> list[VersionStats]:
        """Statistics of READY versions: all models ("" name), a model's, or one version's."""
        if not name:
            if version:
                checked("all", version)  # no model: the version is ignored, but well-formed
            models = [m for n in self._repo.names() for m in self._repo.ready_versions(n)]
        elif version:
            models = [self.get(name, version)]
        else:
            models = self._repo.ready_versions(checked(name)[0])
        return [m.statistics() for m in models]
