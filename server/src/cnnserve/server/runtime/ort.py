"""ONNX Runtime sessions: one per loaded model version.

:func:`open_runtime` is blocking (it reads the file, builds the session and runs the warm-up)
and is meant to be called from a worker thread, never on the event loop. It fails with
:class:`ModelLoadError` when the file is corrupt, when the ONNX signature disagrees with
config.json, or when CUDA was explicitly asked for but is not what the session runs on.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime as ort

from cnnserve.common.datatypes import NUMPY_DTYPES, ONNX_TYPES, Array
from cnnserve.common.device import Device
from cnnserve.common.repository import TensorSpec, VersionConfig
from cnnserve.server.errors import ModelLoadError

log = logging.getLogger(__name__)

GraphOptimization = Literal["disable", "basic", "extended", "all"]

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

@dataclass(frozen=True)
class RuntimeOptions:
    """How sessions are built (see EngineOptions for the meaning of each field)."""

    device: Device = "cpu"
    intra_op_threads: int = 1  # 0 = ONNX Runtime's default (one per core); see Settings
    inter_op_threads: int = 0
    graph_optimization: GraphOptimization = "all"
    warmup: bool = True


class OrtRuntime:
    """One ONNX Runtime InferenceSession; :meth:`run` is thread-safe."""

    def __init__(self, session: ort.InferenceSession, config: VersionConfig) -> None:
        self._session: ort.InferenceSession | None = session
        self._outputs = [t.name for t in config.outputs]
        self._strings = frozenset(t.name for t in config.inputs if t.datatype == "BYTES")
        self.providers: tuple[str, ...] = tuple(session.get_providers())
        #: Intra-op threads per run as configured (0: ONNX Runtime's default).
        self.intra_op_threads: int = session.get_session_options().intra_op_num_threads

    def run(self, inputs: Mapping[str, Array]) -> dict[str, Array]:
        """Run one batch and return every output of config.json by name."""
        session = self._session
        if session is None:
            raise RuntimeError("the session was closed")
        feeds = dict(inputs)
        for name in self._strings & feeds.keys():
            feeds[name] = _as_text(feeds[name])
        results = session.run(self._outputs, feeds)
        return dict(zip(self._outputs, results, strict=True))

    def close(self) -> None:
        """Drop the session (ORT frees it once no running batch holds it)."""
        self._session = None


def _as_text(array: Array) -> Array:
    """A BYTES tensor (object array of bytes) as ONNX Runtime's string tensors want it.

    ORT turns each element into a string with ``str()``, which would make ``b"cat"`` the text
    ``"b'cat'"``; elements are decoded as UTF-8 (invalid bytes replaced) instead.
    """
    flat = [x.decode("utf-8", "replace") if isinstance(x, bytes | bytearray) else x
            for x in array.reshape(-1)]
    out = np.empty(len(flat), dtype=object)
    out[:] = flat
    return out.reshape(array.shape)


def select_providers(device: Device, where: str) -> list[str]:
    """Providers to ask ORT for; raises ModelLoadError if ``cuda`` cannot be provided."""
    available = ort.get_available_providers()
    if device == "cpu":
        return [CPU]
    if CUDA in available:
        return [CUDA, CPU]
    if device == "auto":
        return [CPU]
    raise ModelLoadError(
        f"{where}: device 'cuda' was requested but this onnxruntime build has no "
        f"{CUDA} (available: {', '.join(available)}); install onnxruntime-gpu with a "
        "matching CUDA, or serve with device 'cpu' or 'auto'")


def open_runtime(model_path: Path, config: VersionConfig, options: RuntimeOptions,
                 where: str, source: str = "config.json") -> OrtRuntime:
    """Build, check and warm up the session of ``model_path`` (blocking).

    ``where`` names the model version in error messages, e.g. "model 'mnist' version 2";
    ``source`` names the file ``config`` came from. Raises ModelLoadError with the reason.
    """
    session = open_session(model_path, options, where)
    return start_runtime(session, config, options, where, source)


def open_session(model_path: Path, options: RuntimeOptions,
                 where: str) -> ort.InferenceSession:
    """Build the session of ``model_path`` on the device asked for (blocking).

    Created from the path, so external data beside the file loads. Raises ModelLoadError
    when the file is missing or corrupt, or CUDA was asked for and is not what it runs on.
    """
    providers = select_providers(options.device, where)
    if not model_path.is_file():
        raise ModelLoadError(f"{where}: {model_path} does not exist")
    try:
        session = ort.InferenceSession(str(model_path), sess_options=_session_options(options),
                                       providers=providers)
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
        raise ModelLoadError(f"{where}: onnxruntime cannot load {model_path}: {exc}") from exc
    active = session.get_providers()
    if options.device == "cuda" and CUDA not in active:
        raise ModelLoadError(
            f"{where}: device 'cuda' was requested but the session runs on {active}: CUDA "
            "could not be initialised (see onnxruntime's log for the missing library); "
            "fix the CUDA installation or serve with device 'cpu' or 'auto'")
    return session


def start_runtime(session: ort.InferenceSession, config: VersionConfig,
                  options: RuntimeOptions, where: str,
                  source: str = "config.json") -> OrtRuntime:
    """Check ``session`` against ``config`` and warm it up; raises ModelLoadError."""
    check_signature(session, config, where, source)
    runtime = OrtRuntime(session, config)
    if options.warmup:
        warm_up(runtime, config, where)
    return runtime


def _session_options(options: RuntimeOptions) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = options.intra_op_threads
    so.inter_op_num_threads = options.inter_op_threads
    so.graph_optimization_level = _OPT_LEVELS[options.graph_optimization]
    # Idle intra-op threads spin by default, burning the cores the event loop and the
    # gRPC threads need between batches; serving prefers to give the CPU back.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3  # errors only: ORT's warnings would duplicate ours
    return so


def check_signature(session: ort.InferenceSession, config: VersionConfig, where: str,
                    source: str = "config.json") -> None:
    """Compare the graph's inputs/outputs with ``config`` (read from the file ``source``).

    Raises ModelLoadError naming the graph and ``source`` on any mismatch.
    """
    problems = _compare("input", session.get_inputs(), config.inputs, source)
    problems += _compare("output", session.get_outputs(), config.outputs, source)
    if problems:
        raise ModelLoadError(f"{where}: the graph disagrees with {source}: "
                             + "; ".join(problems))


def _compare(kind: str, actual: Sequence[Any], expected: Sequence[TensorSpec],
             source: str) -> list[str]:
    graph = {a.name: a for a in actual}
    problems = []
    missing = [t.name for t in expected if t.name not in graph]
    extra = sorted(set(graph) - {t.name for t in expected})
    if missing or extra:
        problems.append(f"{kind}s differ: {source} lists {[t.name for t in expected]}, "
                        f"the graph has {sorted(graph)}")
    for spec in expected:
        node = graph.get(spec.name)
        if node is None:
            continue
        dtype = ONNX_TYPES.get(node.type, node.type)
        if dtype != spec.datatype:
            problems.append(f"{kind} '{spec.name}' is {dtype} in the graph, "
                            f"{spec.datatype} in {source}")
        dims = [d if isinstance(d, int) and d > 0 else -1 for d in node.shape]
        if len(dims) != len(spec.shape):
            problems.append(f"{kind} '{spec.name}' has rank {len(dims)} {dims} in the graph, "
                            f"rank {len(spec.shape)} {list(spec.shape)} in {source}")
        elif any(g != -1 and g != c for g, c in zip(dims, spec.shape, strict=True)):
            problems.append(f"{kind} '{spec.name}' has shape {dims} in the graph, "
                            f"{list(spec.shape)} in {source}")
    return problems


def warm_up(runtime: OrtRuntime, config: VersionConfig, where: str) -> None:
    """Run one batch of zeros so the first real request pays no first-run cost.

    Also proves the graph actually executes; raises ModelLoadError if it does not. A model
    that does not batch (max_batch_size 0) gets its exact shapes (1 for a symbolic size).
    """
    batched = config.max_batch_size > 0
    feeds = {t.name: example_input(t, rows=1 if batched else 0) for t in config.inputs}
    try:
        outputs = runtime.run(feeds)
    except Exception as exc:
        raise ModelLoadError(f"{where}: warm-up inference failed: {exc}") from exc
    for name, value in outputs.items() if batched else ():
        if value.ndim == 0 or value.shape[0] != 1:
            raise ModelLoadError(f"{where}: warm-up with 1 row returned output '{name}' of "
                                 f"shape {list(value.shape)}; the first dimension must be "
                                 "the batch")


def check_batching(runtime: OrtRuntime, config: VersionConfig, where: str) -> None:
    """Run 2 rows of zeros and check every output has 2 rows (blocking).

    For a batch dimension taken on trust from a symbolic first dimension: a graph whose
    symbol is something else (a sequence length, a reduced axis) fails here, at load, rather
    than on the first merged batch. Raises ModelLoadError.
    """
    feeds = {t.name: example_input(t, rows=2) for t in config.inputs}
    try:
        outputs = runtime.run(feeds)
    except Exception as exc:
        raise ModelLoadError(f"{where}: a batch of 2 rows failed, so the first dimension is "
                             f"not a batch dimension ({exc}); set max_batch_size: 0 in "
                             "config.pbtxt") from exc
    bad = {name: list(v.shape) for name, v in outputs.items() if v.ndim == 0 or len(v) != 2}
    if bad:
        raise ModelLoadError(f"{where}: a batch of 2 rows gave outputs of shapes {bad}, so the "
                             "first dimension is not a batch dimension; set max_batch_size: 0 "
                             "in config.pbtxt")


def example_input(spec: TensorSpec, rows: int) -> Array:
    """Zeros (empty strings for BYTES) of the tensor's shape with ``rows`` rows.

    ``rows`` 0: the tensor's own shape, with no batch dimension (1 for a symbolic size).
    """
    tail = (d if d > 0 else 1 for d in (spec.shape if rows == 0 else spec.shape[1:]))
    shape = (*((rows,) if rows else ()), *tail)
    if spec.datatype == "BYTES":
        return np.full(shape, "", dtype=object)
    return np.zeros(shape, dtype=NUMPY_DTYPES[spec.datatype])
