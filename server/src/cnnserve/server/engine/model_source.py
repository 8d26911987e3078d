"""A version's description from whatever is on disk: cnnserve files, Triton's, or the graph.

Precedence (README "The model repository"), most specific first:

- **Signature** (tensors, max_batch_size, labels, normalisation) of one version: its
  ``<version>/config.json`` if present (written by ``cnnserve export``), else
  ``<model>/config.pbtxt``'s input/output/max_batch_size completed from the graph, else the
  graph alone (:mod:`autocomplete`). config.pbtxt's tensors, when listed, are checked against
  the graph even when config.json wins; its max_batch_size (> 0) then caps config.json's.
- **Serving policy** (versions, dynamic batching, instances, device) of the model:
  ``<model>/config.pbtxt`` if present, else ``<model>/model.json``, else the defaults. With
  both, model.json is ignored and a warning says so.
- **Model file**: config.pbtxt's ``default_model_filename``, else ``model.onnx``.

:func:`load_version` runs the whole load the server and ``cnnserve inspect`` share: read the
files, open the session, complete the signature from the graph, check it and warm up.
Blocking: call from a worker thread.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cnnserve.common.repository import (
    CONFIG_FILE,
    MODEL_FILE,
    POLICY_FILE,
    ConfigError,
    ModelPolicy,
    VersionConfig,
)
from cnnserve.server.engine.autocomplete import complete
from cnnserve.server.engine.scan import read_policy
from cnnserve.server.engine.triton_config import (
    TRITON_CONFIG_FILE,
    TritonModel,
    load_triton_config,
)
from cnnserve.server.errors import ModelLoadError
from cnnserve.server.runtime.ort import (
    OrtRuntime,
    RuntimeOptions,
    check_batching,
    open_session,
    start_runtime,
)
from cnnserve.server.runtime.signature import GraphSignature, read_signature

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VersionSource:
    """How one version is served, and from which files that was decided."""

    #: The signature clients see (ModelMetadata, ModelConfig, request validation).
    config: VersionConfig
    #: The signature the ONNX Runtime session takes (differs only by config.pbtxt reshapes).
    graph: VersionConfig
    policy: ModelPolicy
    model_file: Path
    #: The file the signature came from: "config.json", "config.pbtxt" or "the graph".
    origin: str
    #: How each derived or configured value was chosen, for logs and ``cnnserve inspect``.
    notes: tuple[str, ...] = ()
    #: Class labels per output, when they differ per output (config.pbtxt label files).
    output_labels: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    #: config.pbtxt's parameters, reported back in ModelConfig.
    parameters: Mapping[str, str] = field(default_factory=dict)
    intra_op_threads: int | None = None
    inter_op_threads: int | None = None

    @property
    def reshaped(self) -> bool:
        """Whether requests need adapting to the graph (a reshape, or no batching)."""
        return self.config != self.graph or self.config.max_batch_size == 0


def read_model_policy(model_dir: Path, max_queue_delay_us: int | None = None,
                      max_queue_size: int | None = None) -> ModelPolicy:
    """The serving policy of a model folder (config.pbtxt, else model.json, else defaults).

    Blocking. Raises ConfigError for an invalid or unsupported file.
    """
    if (model_dir / TRITON_CONFIG_FILE).exists():
        if (model_dir / POLICY_FILE).exists():
            log.warning("model '%s': both config.pbtxt and model.json exist; config.pbtxt "
                        "decides how it is served and model.json is ignored", model_dir.name)
        triton = load_triton_config(model_dir, max_queue_delay_us, max_queue_size)
        return triton.policy
    return read_policy(model_dir / POLICY_FILE, max_queue_delay_us, max_queue_size)


def _triton(model_dir: Path, policy: ModelPolicy) -> TritonModel | None:
    if not (model_dir / TRITON_CONFIG_FILE).exists():
        return None
    triton = load_triton_config(model_dir)
    # The policy passed in is the one read with the server-wide defaults: keep it.
    return dataclasses.replace(triton, policy=policy)


def load_version(name: str, folder: Path, policy: ModelPolicy, options: RuntimeOptions,
                 where: str, *, lone_file: Path | None = None) -> tuple[VersionSource, OrtRuntime]:
    """Describe version ``folder`` of model ``name``, open its session, check and warm it up.

    ``options`` are the server's; config.pbtxt may override the thread counts and
    ``policy.device`` the device. ``lone_file`` describes that ONNX file alone, as if it were
    the only file of its version (``cnnserve inspect FILE``). Raises ModelLoadError naming
    ``where`` and the file at fault.
    """
    try:
        triton = None if lone_file else _triton(folder.parent, policy)
        config_json = (VersionConfig.load(folder / CONFIG_FILE)
                       if not lone_file and (folder / CONFIG_FILE).exists() else None)
    except ConfigError as exc:
        raise ModelLoadError(f"{where}: {exc}") from exc
    model_file = lone_file or folder / (triton.model_filename if triton else MODEL_FILE)
    options = dataclasses.replace(
        options, device=policy.device or options.device,
        intra_op_threads=_pick(triton.intra_op_threads if triton else None,
                               options.intra_op_threads),
        inter_op_threads=_pick(triton.inter_op_threads if triton else None,
                               options.inter_op_threads))
    session = open_session(model_file, options, where)
    source = describe(name, model_file, policy, triton, config_json,
                      read_signature(session), where)
    runtime = start_runtime(session, source.graph, options, where, source.origin)
    if options.warmup and source.origin != CONFIG_FILE and source.graph.max_batch_size > 1:
        check_batching(runtime, source.graph, where)
    return source, runtime


def _pick(value: int | None, default: int) -> int:
    return default if value is None else value


def describe(name: str, model_file: Path, policy: ModelPolicy, triton: TritonModel | None,
             config_json: VersionConfig | None, signature: GraphSignature,
             where: str) -> VersionSource:
    """The VersionSource of one version from its files and its graph's signature.

    Raises ModelLoadError naming ``where`` and the file at fault.
    """
    try:
        done = complete(name, signature, triton, policy.max_batch_size)
    except ConfigError as exc:
        if config_json is None or triton is not None:
            raise ModelLoadError(f"{where}: {exc}") from exc
        done = None  # config.json describes what the graph alone cannot (checked at start)
    parameters = dict(triton.parameters) if triton else {}
    intra = triton.intra_op_threads if triton else None
    inter = triton.inter_op_threads if triton else None
    if config_json is not None:
        config = _capped(config_json, name, policy, triton)
        notes = (f"signature from {CONFIG_FILE}" + (
            f" (max_batch_size capped to {config.max_batch_size})"
            if config.max_batch_size != config_json.max_batch_size else ""),)
        return VersionSource(config, config, policy, model_file, CONFIG_FILE, notes,
                             parameters=parameters, intra_op_threads=intra,
                             inter_op_threads=inter)
    assert done is not None
    origin = TRITON_CONFIG_FILE if triton else "the graph"
    return VersionSource(done.config, done.graph, policy, model_file, origin, done.notes,
                         done.output_labels, parameters, intra, inter)


def _capped(config: VersionConfig, name: str, policy: ModelPolicy,
            triton: TritonModel | None) -> VersionConfig:
    """config.json with the folder's name and the lower max_batch_size of the policy files."""
    if config.name != name:
        log.warning("config.json names model '%s' but it is served as '%s' (its folder)",
                    config.name, name)
    limit = config.max_batch_size
    caps = [policy.max_batch_size, triton.max_batch_size if triton else None]
    for cap in caps:
        if cap:
            limit = min(limit, cap)
    return dataclasses.replace(config, name=name, max_batch_size=limit)
