"""Triton's ``config.pbtxt``: read it, refuse what cnnserve cannot honour, keep the rest.

The file is Triton's ``ModelConfig`` in protobuf text format, parsed with
``google.protobuf.text_format`` into cnnserve's copy of the message (the subset in
``proto/model_config.proto``, with Triton's field numbers). A field cnnserve does not honour
is a load error that names it, never silently ignored: a Triton field missing from the
subset (``sequence_batching``, ``ensemble_scheduling``, ``optimization``, ``model_warmup``,
...) fails the parse, and a field of the subset with a value cnnserve cannot serve (a
``gpus`` list, a queue timeout) fails the checks below. Blocking: it reads files.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import text_format

from cnnserve.common.device import Device
from cnnserve.common.repository import (
    MODEL_FILE,
    PLATFORM,
    ConfigError,
    DynamicBatching,
    ModelPolicy,
)
from cnnserve.proto import model_config_pb2 as mc

TRITON_CONFIG_FILE = "config.pbtxt"
BACKEND = "onnxruntime"
#: ONNX Runtime parameters of Triton's onnxruntime backend that cnnserve honours per model.
THREAD_PARAMETERS = ("intra_op_thread_count", "inter_op_thread_count")
#: Triton's onnxruntime backend parameters cnnserve cannot honour (refused, not ignored).
REFUSED_PARAMETERS = frozenset({
    "execution_mode", "enable_mem_pattern", "enable_mem_arena",
    "memory.enable_memory_arena_shrinkage", "cudnn_conv_algo_search", "gpu_mem_limit",
    "arena_extend_strategy", "do_copy_in_default_stream", "cudnn_conv_use_max_workspace",
    "use_device_allocator_for_initializers", "session.use_device_allocator_for_initializers",
    "enable_cuda_graph", "share_session_between_instances", "policy", "optimization_level"})
_KINDS: dict[int, Device | None] = {mc.ModelInstanceGroup.KIND_AUTO: None,
                                    mc.ModelInstanceGroup.KIND_CPU: "cpu",
                                    mc.ModelInstanceGroup.KIND_GPU: "cuda"}
_FORMATS = {mc.ModelInput.FORMAT_NONE: "NONE", mc.ModelInput.FORMAT_NCHW: "NCHW",
            mc.ModelInput.FORMAT_NHWC: "NHWC"}


@dataclass(frozen=True)
class TritonTensor:
    """An input or output as config.pbtxt lists it; None: not given (the graph decides).

    ``dims`` and ``reshape`` exclude the batch dimension when max_batch_size > 0.
    """

    name: str
    datatype: str | None
    dims: tuple[int, ...] | None
    reshape: tuple[int, ...] | None = None
    layout: str = "NONE"
    labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class TritonModel:
    """What cnnserve serves from a config.pbtxt (every field checked as honourable)."""

    name: str
    max_batch_size: int
    inputs: tuple[TritonTensor, ...]
    outputs: tuple[TritonTensor, ...]
    policy: ModelPolicy
    model_filename: str = MODEL_FILE
    #: ModelConfig.parameters as given (string values), reported back in ModelConfig.
    parameters: tuple[tuple[str, str], ...] = ()
    intra_op_threads: int | None = None
    inter_op_threads: int | None = None


def load_triton_config(model_dir: Path, server_queue_delay_us: int | None = None,
                       server_queue_size: int | None = None) -> TritonModel:
    """Read and check ``<model_dir>/config.pbtxt``.

    ``server_queue_*`` are the server-wide defaults for a dynamic_batching field left at 0
    (for max_queue_size, Triton's "unbounded": cnnserve's queues are bounded). Raises
    ConfigError naming the file, and the field, for anything cnnserve cannot honour.
    """
    path = model_dir / TRITON_CONFIG_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path} cannot be read: {exc.strerror}") from exc
    config = mc.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise ConfigError(f"{path}: {_parse_problem(exc)}") from exc
    try:
        return _convert(config, model_dir, server_queue_delay_us, server_queue_size)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def _parse_problem(exc: text_format.ParseError) -> str:
    message = str(exc)
    marker = 'has no field named "'
    if marker in message:
        field = message.split(marker, 1)[1].split('"', 1)[0]
        where = message.split(" : ", 1)[0]
        return (f"line {where}: field '{field}' is not supported by cnnserve (a Triton field "
                "it cannot honour, or a misspelt one); remove it")
    return message


def _convert(config: mc.ModelConfig, model_dir: Path, queue_delay_us: int | None,
             queue_size: int | None) -> TritonModel:
    if config.name and config.name != model_dir.name:
        raise ConfigError(f"name '{config.name}' differs from the model folder's name "
                          f"'{model_dir.name}'; they must match (or leave name out)")
    if config.platform not in ("", PLATFORM) or config.backend not in ("", BACKEND):
        raise ConfigError(f"platform '{config.platform}' / backend '{config.backend}' is not "
                          f"served by cnnserve: use platform \"{PLATFORM}\" or backend "
                          f"\"{BACKEND}\"")
    if config.max_batch_size < 0:
        raise ConfigError(f"max_batch_size must be >= 0, got {config.max_batch_size}")
    device, count = _instances(config)
    threads = _thread_parameters(config.parameters)
    return TritonModel(
        name=model_dir.name, max_batch_size=config.max_batch_size,
        inputs=tuple(_tensor(t, "input", model_dir) for t in config.input),
        outputs=tuple(_tensor(t, "output", model_dir) for t in config.output),
        policy=ModelPolicy(version_policy=_version_policy(config),
                           dynamic_batching=_batching(config, queue_delay_us, queue_size),
                           device=device, instance_count=count),
        model_filename=_model_filename(config.default_model_filename),
        parameters=tuple(sorted((k, v.string_value) for k, v in config.parameters.items())),
        intra_op_threads=threads.get("intra_op_thread_count"),
        inter_op_threads=threads.get("inter_op_thread_count"))


def _version_policy(config: mc.ModelConfig) -> dict[str, Any]:
    vp = config.version_policy
    kind = vp.WhichOneof("policy_choice")
    if kind == "all":
        return {"all": True}
    if kind == "specific":
        if not vp.specific.versions:
            raise ConfigError("version_policy.specific lists no versions")
        return {"specific": [int(v) for v in vp.specific.versions]}
    if kind == "latest":
        if vp.latest.num_versions < 1:
            raise ConfigError("version_policy.latest.num_versions must be >= 1")
        return {"latest": int(vp.latest.num_versions)}
    return {"latest": 1}


def _batching(config: mc.ModelConfig, queue_delay_us: int | None,
              queue_size: int | None) -> DynamicBatching:
    db = config.dynamic_batching
    queue = db.default_queue_policy
    if db.preserve_ordering:
        raise ConfigError("dynamic_batching.preserve_ordering is not supported (responses "
                          "of concurrent batches may complete out of order)")
    if queue.timeout_action != mc.ModelQueuePolicy.REJECT or queue.default_timeout_microseconds:
        raise ConfigError("dynamic_batching.default_queue_policy: only max_queue_size is "
                          "supported (timeout_action DELAY and default_timeout_microseconds are "
                          "not); clients set a deadline or the 'timeout' parameter instead")
    sizes = tuple(int(b) for b in db.preferred_batch_size)
    if config.max_batch_size == 0 and sizes:
        raise ConfigError("dynamic_batching.preferred_batch_size needs max_batch_size > 0")
    if any(b < 1 or b > config.max_batch_size for b in sizes):
        raise ConfigError(f"dynamic_batching.preferred_batch_size {list(sizes)} must lie in "
                          f"1..max_batch_size ({config.max_batch_size})")
    delay = db.max_queue_delay_microseconds or (queue_delay_us or 0)
    return DynamicBatching(max_queue_delay_microseconds=delay, preferred_batch_size=sizes,
                           max_queue_size=queue.max_queue_size or queue_size or 1024)


def _instances(config: mc.ModelConfig) -> tuple[Device | None, int | None]:
    """(device, instance count): instance groups of one kind, their counts summed."""
    groups = list(config.instance_group)
    if not groups:
        return None, None
    kinds = {g.kind for g in groups}
    if len(kinds) > 1:
        raise ConfigError("instance_group: groups of different kinds are not supported "
                          "(one kind per model: KIND_CPU, KIND_GPU or KIND_AUTO)")
    kind = kinds.pop()
    if kind not in _KINDS:
        raise ConfigError(f"instance_group kind {mc.ModelInstanceGroup.Kind.Name(kind)} is "
                          "not supported (use KIND_CPU, KIND_GPU or KIND_AUTO)")
    if any(list(g.gpus) not in ([], [0]) for g in groups):
        raise ConfigError("instance_group.gpus: cnnserve runs a model on one device, GPU 0 "
                          "(leave gpus out, or list only 0)")
    counts = [g.count or 1 for g in groups]  # Triton: count 0 or absent means 1
    if any(c < 1 for c in counts):
        raise ConfigError(f"instance_group.count must be >= 1, got {counts}")
    return _KINDS[kind], sum(counts)


def _thread_parameters(params: Mapping[str, mc.ModelParameter]) -> dict[str, int]:
    refused = sorted(set(params) & REFUSED_PARAMETERS)
    if refused:
        raise ConfigError(f"parameters {refused}: onnxruntime backend settings cnnserve does "
                          f"not support (it honours {list(THREAD_PARAMETERS)})")
    threads = {}
    for key in THREAD_PARAMETERS:
        if key in params:
            text = params[key].string_value
            if not text.isdigit():
                raise ConfigError(f"parameters '{key}' must be a non-negative integer, got "
                                  f"{text!r}")
            threads[key] = int(text)
    return threads


def _model_filename(name: str) -> str:
    if not name:
        return MODEL_FILE
    if "/" in name or "\\" in name or name.startswith("."):
        raise ConfigError(f"default_model_filename '{name}' must be a plain file name in "
                          "the version folder")
    return name


def _datatype(value: mc.DataType.ValueType, where: str) -> str | None:
    if value == mc.TYPE_INVALID:
        return None
    name = mc.DataType.Name(value).removeprefix("TYPE_")
    if name == "BF16":
        raise ConfigError(f"{where}: data_type TYPE_BF16 is not supported")
    return "BYTES" if name == "STRING" else name


def _tensor(t: mc.ModelInput | mc.ModelOutput, kind: str, model_dir: Path) -> TritonTensor:
    where = f"{kind} '{t.name}'"
    if not t.name:
        raise ConfigError(f"an {kind} has no name")
    dims = tuple(int(d) for d in t.dims) or None
    reshape = tuple(int(d) for d in t.reshape.shape) if t.HasField("reshape") else None
    if dims is not None and any(d < -1 or d == 0 for d in dims):
        raise ConfigError(f"{where}: dims {list(dims)} may hold only positive sizes or -1")
    if reshape is not None:
        if dims is None:
            raise ConfigError(f"{where}: reshape needs dims")
        if any(d < -1 or d == 0 for d in reshape) or reshape.count(-1) > 1:
            raise ConfigError(f"{where}: reshape {list(reshape)} may hold positive sizes and "
                              "at most one -1")
        if dims.count(-1) > 1:
            raise ConfigError(f"{where}: dims {list(dims)} with a reshape may hold at most one "
                              "-1")
        if -1 not in dims + reshape and _product(dims) != _product(reshape):
            raise ConfigError(f"{where}: reshape {list(reshape)} has a different number of "
                              f"elements than dims {list(dims)}")
    labels: tuple[str, ...] = ()
    layout = "NONE"
    if isinstance(t, mc.ModelOutput) and t.label_filename:
        labels = _labels(model_dir, t.label_filename, where)
    if isinstance(t, mc.ModelInput):
        layout = _FORMATS[t.format]
    return TritonTensor(t.name, _datatype(t.data_type, where), dims, reshape, layout, labels)


def _labels(model_dir: Path, filename: str, where: str) -> tuple[str, ...]:
    path = model_dir / filename
    if "/" in filename or "\\" in filename or filename.startswith("."):
        raise ConfigError(f"{where}: label_filename '{filename}' must be a plain file name in "
                          "the model folder")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{where}: label_filename {path} cannot be read: "
                          f"{exc.strerror}") from exc
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[-1]:  # line i is class i: only trailing blank lines go
        lines.pop()
    return tuple(lines)


def _product(dims: tuple[int, ...]) -> int:
    total = 1
    for d in dims:
        total *= d
    return total
