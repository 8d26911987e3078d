"""Checkpoints: trained weights plus everything needed to rebuild, evaluate and serve them.

A checkpoint file is ``torch.save`` of a plain dict holding only strings, numbers, lists,
dicts and tensors, so it is loaded with ``torch.load(weights_only=True)``, which never runs
pickled code. Its keys::

    format            "cnnserve-checkpoint" (tells it apart from other PyTorch files)
    format_version    1
    spec              architecture spec text (cnnserve.training.train.spec)
    input_shape       [C, H, W]
    class_names       [str, ...]
    mean, std         per-channel normalisation of the training split (cnnserve.common.preprocess)
    dataset           dataset name it was trained on
    metrics_json      JSON text of the training metrics (JSON keeps numpy types out)
    state_dict        the weights (the best validation epoch's)
    train_state       optimizer/scheduler/epoch/history for --resume, or None
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cnnserve.common.errors import CnnserveError

FORMAT = "cnnserve-checkpoint"
FORMAT_VERSION = 1
_REQUIRED = ("spec", "input_shape", "class_names", "mean", "std", "dataset", "state_dict")


class CheckpointError(CnnserveError):
    """A checkpoint file that is missing, truncated, corrupt or not a cnnserve checkpoint."""


@dataclass(frozen=True)
class Checkpoint:
    """A trained model and its metadata (see the module docstring for the file layout)."""

    spec: str
    input_shape: tuple[int, int, int]
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    dataset: str
    metrics: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    train_state: dict[str, Any] | None = None


def _jsonable(value: Any) -> Any:
    # numpy scalars/arrays and tuples become plain JSON values.
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"metrics value of type {type(value).__name__} is not JSON-serialisable")


def save_checkpoint(ckpt: Checkpoint, path: Path) -> None:
    """Write ``ckpt`` to ``path`` atomically (temporary file + rename; never half-written).

    Raises :class:`CheckpointError` if the metrics are not JSON-serialisable, and OSError if
    the folder is not writable.
    """
    path = Path(path)
    try:
        metrics_json = json.dumps(ckpt.metrics, default=_jsonable, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"cannot store checkpoint metrics: {exc}") from exc
    payload: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "spec": ckpt.spec,
        "input_shape": [int(v) for v in ckpt.input_shape],
        "class_names": list(ckpt.class_names),
        "mean": [float(v) for v in ckpt.mean],
        "std": [float(v) for v in ckpt.std],
        "dataset": ckpt.dataset,
        "metrics_json": metrics_json,
        "state_dict": {k: v.detach().cpu() for k, v in ckpt.state_dict.items()},
        "train_state": ckpt.train_state,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        Path(tmp).chmod(0o644)  # mkstemp creates 0600; a checkpoint is meant to be shared
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Uses ``torch.load(weights_only=True)`` only. Raises :class:`CheckpointError` when the
    file is missing, truncated or corrupt, is some other PyTorch/pickle file, or was written
    by a newer cnnserve.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != b"PK\x03\x04":  # torch.save writes a zip archive
        raise CheckpointError(f"{path} is not a cnnserve checkpoint: it is not a PyTorch zip "
                              f"archive (wrong file, or the start of the file is damaged)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc):
            raise CheckpointError(f"{path} is not a cnnserve checkpoint: it holds pickled "
                                  "Python objects, which are never loaded (only plain values "
                                  "and tensors are accepted)") from exc
        raise CheckpointError(f"{path} is corrupt: its contents cannot be decoded") from exc
    except Exception as exc:  # torch raises RuntimeError, EOFError, zip errors, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{path} is truncated or corrupt and cannot be read: "
                              f"{first}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a PyTorch file but not a cnnserve checkpoint (no "
                              f"'format': '{FORMAT}' entry); train one with `cnnserve train`")
    version = data.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {version!r}; this cnnserve "
                              f"reads versions up to {FORMAT_VERSION} (upgrade cnnserve)")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise CheckpointError(f"{path} is missing checkpoint fields {missing}")
    try:
        return Checkpoint(
            spec=str(data["spec"]),
            input_shape=_shape3(data["input_shape"]),
            class_names=tuple(str(c) for c in data["class_names"]),
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
            dataset=str(data["dataset"]),
            metrics=dict(json.loads(data.get("metrics_json") or "{}")),
            state_dict=_tensors(data["state_dict"]),
            train_state=data.get("train_state"),
        )
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} has a malformed field: {exc}") from exc


def _shape3(value: Any) -> tuple[int, int, int]:
    dims = tuple(int(v) for v in value)
    if len(dims) != 3 or min(dims) < 1:
        raise ValueError(f"input_shape must be [C, H, W] of positive sizes, got {value!r}")
    return dims[0], dims[1], dims[2]


def _tensors(value: Any) -> dict[str, torch.Tensor]:
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()):
        raise TypeError("state_dict must map parameter names to tensors")
    return dict(value)


def restore_network(ckpt: Checkpoint) -> torch.nn.Module:
    """Rebuild the network from ``ckpt.spec``, load its weights, and put it in eval() mode.

    Raises :class:`CheckpointError` if the spec no longer parses or the weights do not fit it.
    """
    from cnnserve.training.train.network import build_network
    from cnnserve.training.train.spec import SpecError, parse_spec

    try:
        layers = parse_spec(ckpt.spec)
        model = build_network(layers, ckpt.input_shape, len(ckpt.class_names))
    except SpecError as exc:
        raise CheckpointError(f"checkpoint architecture is invalid: {exc}") from exc
    try:
        model.load_state_dict(ckpt.state_dict, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint weights do not match its architecture "
                              f"'{ckpt.spec}': {str(exc).splitlines()[0]}") from exc
    return model.eval()
