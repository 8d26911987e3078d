"""``cnnserve batch --engine ray``: the batch job as a Ray Data pipeline.

The driver resolves the model (its config.json in in-process mode, else the first server's
metadata) and the input exactly as the single-machine job does, cuts the items into fixed
blocks (:mod:`.blocks`), skips the blocks whose part file exists, and maps the rest over a pool
of actors (:class:`.predict.BlockPredictor`), one dataset row per block. Each finished block's
records are written by the driver, atomically, as they stream back: the output needs to be
reachable from the driver only. Ray retries the blocks of an actor that dies; a job stopped
for any reason is completed by running it again.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from cnnserve.client.batch.raydata.blocks import Layout, prepare, read_finished
from cnnserve.client.batch.raydata.predict import BlockPredictor, Task, info_from_config
from cnnserve.client.batch.results import OutputError, os_reason
from cnnserve.client.batch.sources import open_source
from cnnserve.client.batch.summary import Summary
from cnnserve.client.options import BatchOptions
from cnnserve.common.errors import CnnserveError
from cnnserve.common.files import write_atomically

log = logging.getLogger(__name__)

INSTALL = "pip install 'cnnserve[batch-ray]'  (or: pip install 'ray[data]')"


def import_ray() -> Any:
    """The ``ray`` module with Ray Data; raises CnnserveError with the install command."""
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise CnnserveError(f"--engine ray needs Ray Data, which is not installed ({exc}); "
                            f"install it with: {INSTALL}") from exc
    return ray


def run_ray_job(options: BatchOptions) -> Summary:
    """Run the job on Ray; same contract as :func:`cnnserve.client.batch.job.run_batch_job`.

    ``options.output`` is a folder of part files. Ray is joined (``--ray-address``) or
    started if this process is not connected yet, and shut down at the end only if this
    call started it. ``summary.startup_s`` is the time that took, outside ``elapsed_s``.
    """
    ray = import_ray()
    summary = Summary()
    try:
        _run(ray, options, summary)
    except CnnserveError as exc:
        summary.stopped = str(exc)
        raise
    finally:
        if options.summary_json is not None:
            try:
                summary.write_json(options.summary_json)
            except OSError as exc:
                log.error("cannot write the summary to %s: %s", options.summary_json,
                          os_reason(exc))
    return summary


def _run(ray: Any, options: BatchOptions, summary: Summary) -> None:
    task = _task(options)
    layout, source = task.layout, task.source
    finished = prepare(layout, {"input": options.input, "model": task.info.name,
                                "version": options.model_version, "items": layout.total,
                                "ids": _fingerprint(source.ids), "format": layout.fmt,
                                "block_size": layout.block_size})
    earlier = read_finished(layout, finished)
    summary.total = layout.total
    summary.skipped = len(earlier.done)
    summary.earlier_errors = earlier.errors
    summary.correct, summary.labelled = earlier.correct, earlier.labelled
    todo = [k for k in range(layout.blocks) if k not in finished]
    if not todo:
        return
    started = time.perf_counter()
    own = not ray.is_initialized()
    if own:
        ray.init(address=options.ray_address, include_dashboard=False)
    summary.startup_s = time.perf_counter() - started
    try:
        start = time.perf_counter()
        try:
            for row in _dataset(ray, task, todo).iter_rows():
                if not summary.warmup_s:
                    summary.warmup_s = time.perf_counter() - start
                _write(layout, row, summary)
        except CnnserveError:
            raise
        except Exception as exc:  # a block failed for good (Ray's or the actor's error)
            log.debug("the Ray job failed", exc_info=True)
            done = summary.skipped + summary.processed
            raise CnnserveError(f"the Ray job failed: {_first_line(exc)}. {done} of "
                                f"{summary.total} items are in {layout.folder}; rerun the "
                                "same command to resume") from exc
        finally:
            summary.elapsed_s = time.perf_counter() - start
    finally:
        if own:
            ray.shutdown()


def _task(options: BatchOptions) -> Task:
    version_dir: Path | None = None
    if options.repository is not None:
        from cnnserve.common.repository import VersionConfig, list_versions

        model_dir = options.repository / options.model
        version = options.model_version or str(max(list_versions(model_dir), default=""))
        version_dir = model_dir / version
        if not version or not (version_dir / "model.onnx").is_file():
            raise CnnserveError(f"no model.onnx for model '{options.model}' version "
                                f"{version or '(none)'} in {options.repository}")
        info = info_from_config(VersionConfig.load(version_dir / "config.json"), version)
    else:
        info = _server_info(options)
    source = open_source(options.input, info)
    layout = Layout(options.output, options.output_format, options.block_size,
                    len(source.ids))
    return Task(source, info, layout, options, version_dir)


def _server_info(options: BatchOptions) -> Any:
    from cnnserve.client.errors import InferenceServerError
    from cnnserve.client.sync import InferenceClient

    try:
        with InferenceClient(options.url[0], timeout=options.timeout, token=options.token,
                             tls=options.tls_setting(), retries=options.retries) as client:
            return client.model_info(options.model, options.model_version)
    except InferenceServerError as exc:
        raise CnnserveError(str(exc)) from exc


def _dataset(ray: Any, task: Task, todo: list[int]) -> Any:
    options = task.options
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    if task.version_dir is not None:
        per_actor = float(options.ray_threads)
        actors = options.ray_actors or max(1, cpus // options.ray_threads)
    else:  # actors wait on the network: a fraction of a CPU each
        per_actor = 0.25
        actors = options.ray_actors or options.concurrency
    actors = min(actors, len(todo))
    log.info("Ray job: %d blocks of up to %d items on %d actors (%g CPU each, %d CPUs in the "
             "cluster)", len(todo), options.block_size, actors, per_actor, cpus)
    blocks = ray.data.from_items([{"block": k} for k in todo], override_num_blocks=len(todo))
    return blocks.map_batches(BlockPredictor, batch_size=1, fn_constructor_kwargs={"task": task},
                              compute=ray.data.ActorPoolStrategy(size=actors),
                              num_cpus=per_actor)


def _write(layout: Layout, row: dict[str, Any], summary: Summary) -> None:
    block = int(row["block"])
    try:
        write_atomically(layout.part(block), bytes(row["data"]))
    except OSError as exc:
        done = summary.skipped + summary.processed
        raise OutputError(f"cannot write {layout.part(block)}: {os_reason(exc)}. {done} of "
                          f"{summary.total} items are in {layout.folder}; make room and rerun "
                          "the same command to resume") from exc
    summary.processed += int(row["items"])
    summary.errors += int(row["errors"])
    summary.labelled += int(row["labelled"])
    summary.correct += int(row["correct"])
    summary.latencies_s.extend(np.frombuffer(bytes(row["latencies"]), np.float64).tolist())


def _fingerprint(ids: list[str]) -> str:
    """A short digest of the item ids, so a changed input folder is noticed on resume."""
    import hashlib

    digest = hashlib.sha256()
    for item in ids:
        digest.update(item.encode("utf-8", "surrogatepass") + b"\0")
    return digest.hexdigest()[:16]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


__all__ = ["INSTALL", "import_ray", "run_ray_job"]
