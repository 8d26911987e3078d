"""``cnnserve inspect PATH``: what the server would serve from a model folder or ONNX file.

Runs the server's own load (:func:`~cnnserve.server.engine.model_source.load_version`: the
files, the session, auto-complete, the signature check and the warm-up) on each version the
policy selects, and prints the signature, batching and where each value came from. PATH is
an ONNX file (described alone, as if it were the only file of its version folder), a version
folder, a model folder or a whole repository. Exit status 1 when anything would fail to load.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from cnnserve.common.repository import (
    ConfigError,
    ModelPolicy,
    TensorSpec,
    list_versions,
)
from cnnserve.server.engine.model_source import VersionSource, load_version, read_model_policy
from cnnserve.server.engine.scan import select_versions
from cnnserve.server.engine.triton_config import TRITON_CONFIG_FILE
from cnnserve.server.errors import ModelLoadError
from cnnserve.server.runtime.ort import RuntimeOptions

Print = Callable[[str], None]


def inspect_path(path: Path, options: RuntimeOptions, out: Print = print) -> int:
    """Print what would be served from ``path``; return 0, or 1 if anything fails to load."""
    path = path.resolve()
    if path.is_file():
        in_version = path.parent.name.isdigit()  # <model>/<version>/file: the model's name
        name = path.parent.parent.name if in_version else path.stem
        out(f"ONNX file {path}, described alone as model '{name}' version 1 with the "
            "default policy")
        return _inspect_version(name, path.parent, ModelPolicy(), options, out,
                                lone_file=path)
    if not path.is_dir():
        out(f"{path}: no such file or folder")
        return 1
    if path.name.isdigit() and int(path.name) > 0:  # a version folder
        return _inspect_model(path.parent, options, out, only=int(path.name))
    if list_versions(path) or (path / TRITON_CONFIG_FILE).exists():
        return _inspect_model(path, options, out)
    models = [p for p in sorted(path.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    if not models:
        out(f"{path}: neither an ONNX file, a version folder, a model folder nor a repository")
        return 1
    return max(_inspect_model(m, options, out) for m in models)


def _inspect_model(model_dir: Path, options: RuntimeOptions, out: Print,
                   only: int | None = None) -> int:
    name = model_dir.name
    try:
        policy = read_model_policy(model_dir)
    except ConfigError as exc:
        out(f"model '{name}': error: {exc}")
        return 1
    source = ("config.pbtxt" if (model_dir / TRITON_CONFIG_FILE).exists()
              else "model.json" if (model_dir / "model.json").exists() else "defaults")
    out(f"model '{name}' ({model_dir})")
    out(f"  policy from {source}: versions {json.dumps(policy.version_policy)}, "
        f"{_batching(policy)}, instances {policy.instance_count or 'server default'}, "
        f"device {policy.device or 'server default'}")
    available = list_versions(model_dir)
    wanted, missing = select_versions(policy, dict.fromkeys(available))
    limit = policy.version_policy.get("latest")
    chosen = wanted[:limit] if limit else wanted
    status = 0
    for v in missing:
        out(f"  version {v}: error: in the version policy but not in the folder")
        status = 1
    if not available:
        out("  error: no version folders (positive integers)")
        return 1
    skipped = sorted(set(available) - set(chosen))
    if skipped:
        out(f"  versions {skipped}: not served (version policy)")
    for v in sorted(chosen):
        if only is None or v == only:
            status = max(status, _inspect_version(name, model_dir / str(v), policy, options,
                                                  out, version=v))
    return status


def _inspect_version(name: str, folder: Path, policy: ModelPolicy, options: RuntimeOptions,
                     out: Print, version: int = 1, lone_file: Path | None = None) -> int:
    where = f"model '{name}' version {version}"
    try:
        source, runtime = load_version(name, folder, policy, options, where,
                                       lone_file=lone_file)
    except ModelLoadError as exc:
        out(f"  version {version}: error: {exc}")
        return 1
    runtime.close()
    _describe(source, version, out)
    return 0


def _describe(source: VersionSource, version: int, out: Print) -> None:
    config = source.config
    out(f"  version {version}: OK, {source.model_file}")
    out(f"    signature from {source.origin}")
    if not any("max_batch_size" in note for note in source.notes):
        out(f"    max_batch_size {config.max_batch_size}")
    for note in source.notes:
        out(f"    {note}")
    for kind, specs in (("input", config.inputs), ("output", config.outputs)):
        for spec in specs:
            out(f"    {kind:6} {_tensor(spec)}{_graph_shape(source, spec)}")
    labels = ", ".join(f"{k}: {len(v)}" for k, v in source.output_labels.items() if v)
    out(f"    labels: {labels or len(config.labels) or 'none'}; normalization: "
        f"{config.normalization or source.parameters.get('normalization') or 'none'}")
    if config.architecture:
        out(f"    graph name: {config.architecture}")


def _tensor(spec: TensorSpec) -> str:
    return f"{spec.name} {spec.datatype} [{','.join(map(str, spec.shape))}]"


def _graph_shape(source: VersionSource, spec: TensorSpec) -> str:
    graph = {t.name: t for t in (*source.graph.inputs, *source.graph.outputs)}[spec.name]
    return "" if graph.shape == spec.shape else f" (graph: [{','.join(map(str, graph.shape))}])"


def _batching(policy: ModelPolicy) -> str:
    db = policy.dynamic_batching
    return (f"max_queue_delay {db.max_queue_delay_microseconds} us, preferred batch sizes "
            f"{list(db.preferred_batch_size) or 'none'}, max_queue_size {db.max_queue_size}")
