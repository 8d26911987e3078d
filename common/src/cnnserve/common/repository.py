"""The model repository's on-disk contract, shared by ``cnnserve export`` and the server.

Layout::

    <repository>/<model>/model.json            optional: serving policy for every version
    <repository>/<model>/<version>/model.onnx  the network (version: positive integer)
    <repository>/<model>/<version>/config.json the version's signature and metadata

``config.json`` (:class:`VersionConfig`) is written by export and describes one version: its
tensors, class labels and normalisation. ``model.json`` (:class:`ModelPolicy`) is written by
the operator (export writes the defaults when absent) and says how to serve the model: which
versions, batching, device. Only the standard library is imported here, so the training side
can write what the server reads without pulling grpcio.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from cnnserve.common.datatypes import DATATYPES
from cnnserve.common.device import Device
from cnnserve.common.errors import CnnserveError

CONFIG_FILE = "config.json"
MODEL_FILE = "model.onnx"
POLICY_FILE = "model.json"
FORMAT_VERSION = 1
PLATFORM = "onnxruntime_onnx"

#: The states of a model version in the repository index (Triton's names): READY serves;
#: LOADING and UNLOADING are in transition; UNAVAILABLE failed to load or was unloaded.
ModelState = Literal["READY", "LOADING", "UNAVAILABLE", "UNLOADING"]
READY: ModelState = "READY"
LOADING: ModelState = "LOADING"
UNAVAILABLE: ModelState = "UNAVAILABLE"
UNLOADING: ModelState = "UNLOADING"
MODEL_STATES: tuple[ModelState, ...] = (READY, LOADING, UNAVAILABLE, UNLOADING)



#: A model name is one folder name of the repository: letters, digits, ``_``, ``.``, ``-``,
#: starting with a letter or digit (so never ``.``, ``..`` or a hidden staging folder), with
#: no path separator, at most 128 characters.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
MODEL_NAME_RULE = "1-128 letters, digits, '_', '.', '-', starting with a letter or digit"


class ConfigError(CnnserveError):
    """A config.json or model.json that is missing, unreadable or inconsistent."""


def check_model_name(name: str) -> None:
    """Raise :class:`ConfigError` unless ``name`` is a valid model folder name.

    The message quotes at most the first 64 characters of ``name`` and says nothing about
    the filesystem, so it is safe to send to a client.
    """
    if not MODEL_NAME.fullmatch(name):
        shown = name if len(name) <= 64 else name[:64] + "..."
        raise ConfigError(f"model name {shown!r} is not allowed: use {MODEL_NAME_RULE}")


@dataclass(frozen=True)
class TensorSpec:
    """One input or output tensor.

    ``shape`` includes the batch dimension first, as -1 (any batch size), e.g. [-1, 1, 28, 28];
    in a model that does not batch (max_batch_size 0) it is the tensor's exact shape.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("tensor name must not be empty")
        if self.datatype not in DATATYPES:
            raise ConfigError(f"tensor '{self.name}': datatype '{self.datatype}' is not one of "
                              f"{sorted(DATATYPES)}")
        if any(d < -1 or d == 0 for d in self.shape):
            raise ConfigError(f"tensor '{self.name}': shape {list(self.shape)} may hold only "
                              "positive sizes or -1")


@dataclass(frozen=True)
class Normalization:
    """Per-channel statistics of the training split: ``(pixel/255 - mean) / std``."""

    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class VersionConfig:
    """``<model>/<version>/config.json``: everything needed to serve and call one version."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    #: Most rows one run takes; 0: the model does not batch (as Triton's 0): every request is
    #: run alone with the tensors' exact shapes.
    max_batch_size: int = 256
    platform: str = PLATFORM
    labels: tuple[str, ...] = ()
    normalization: Normalization | None = None
    #: "NCHW" image input; channels, height and width are the input's shape[1:].
    input_layout: str = "NCHW"
    #: "fp32", "fp16" or "int8" (the precision the ONNX graph computes in).
    precision: str = "fp32"
    architecture: str = ""
    dataset: str = ""
    source_checkpoint: str = ""
    #: Free-form figures from training and export (test accuracy, parity check results).
    metrics: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if not self.inputs or not self.outputs:
            raise ConfigError(f"model '{self.name}': config needs at least one input and output")
        if self.max_batch_size < 0:
            raise ConfigError(f"model '{self.name}': max_batch_size must be >= 0, "
                              f"got {self.max_batch_size}")
        if self.platform != PLATFORM:
            raise ConfigError(f"model '{self.name}': platform '{self.platform}' is not supported; "
                              f"expected '{PLATFORM}'")

    def to_json(self) -> str:
        """Serialise as the config.json text (stable key order, one key per line)."""
        data = asdict(self)
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config.json") -> VersionConfig:
        """Build from parsed JSON; raises :class:`ConfigError` naming ``source`` and the field."""
        try:
            norm = data.get("normalization")
            return cls(
                name=str(data["name"]),
                inputs=tuple(_tensor(t) for t in data["inputs"]),
                outputs=tuple(_tensor(t) for t in data["outputs"]),
                max_batch_size=int(data.get("max_batch_size", 256)),
                platform=str(data.get("platform", PLATFORM)),
                labels=tuple(str(x) for x in data.get("labels", ())),
                normalization=None if norm is None else Normalization(
                    mean=tuple(float(x) for x in norm["mean"]),
                    std=tuple(float(x) for x in norm["std"])),
                input_layout=str(data.get("input_layout", "NCHW")),
                precision=str(data.get("precision", "fp32")),
                architecture=str(data.get("architecture", "")),
                dataset=str(data.get("dataset", "")),
                source_checkpoint=str(data.get("source_checkpoint", "")),
                metrics=dict(data.get("metrics", {})),
                format_version=int(data.get("format_version", FORMAT_VERSION)),
            )
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from exc
        except KeyError as exc:
            raise ConfigError(f"{source}: missing required field {exc.args[0]!r}") from exc
        except (TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"{source}: malformed field ({exc})") from exc

    @classmethod
    def load(cls, path: Path) -> VersionConfig:
        """Read a config.json file; raises :class:`ConfigError` if missing or invalid."""
        return cls.from_dict(_read_json(path), source=str(path))


@dataclass(frozen=True)
class DynamicBatching:
    """How concurrent requests are merged (Triton's dynamic_batching, in its units)."""

    #: Longest a request waits for others to join its batch, in microseconds. 0 (the default,
    #: as Triton's): never wait; batching still adapts, since requests that arrive while a
    #: batch runs are sent together as the next one.
    max_queue_delay_microseconds: int = 0
    #: Batch sizes the batcher prefers to send as soon as it has them (empty: max_batch_size).
    preferred_batch_size: tuple[int, ...] = ()
    #: Requests waiting per model version; past it new requests get UNAVAILABLE at once.
    max_queue_size: int = 1024


@dataclass(frozen=True)
class ModelPolicy:
    """``<model>/model.json``: how the server serves a model's versions.

    version_policy is one of ``{"latest": N}``, ``{"all": true}``, ``{"specific": [1, 3]}``.
    """

    version_policy: dict[str, Any] = field(default_factory=lambda: {"latest": 1})
    dynamic_batching: DynamicBatching = field(default_factory=DynamicBatching)
    #: Overrides the versions' max_batch_size when set (it may only be lower).
    max_batch_size: int | None = None
    #: Execution provider; None means the server's --device flag decides.
    device: Device | None = None
    #: Most ONNX Runtime runs of one version at once (Triton's instance count); None means
    #: the server's --execution-workers. 1 serialises the model's batches.
    instance_count: int | None = None
    #: Also accept the image input as BYTES holding PNG/JPEG files, decoded by the server
    #: (needs Pillow: the ``images`` extra).
    encoded_images: bool = False
    #: ONNX Runtime intra-op threads per run of this model; None means the server's
    #: --intra-op-threads (or its default from the cores); 0 means ONNX Runtime's default.
    intra_op_threads: int | None = None

    def __post_init__(self) -> None:
        vp = self.version_policy
        ok = (len(vp) == 1 and (
            ("latest" in vp and isinstance(vp["latest"], int) and vp["latest"] >= 1)
            or ("all" in vp and vp["all"] is True)
            or ("specific" in vp and isinstance(vp["specific"], list) and vp["specific"]
                and all(isinstance(v, int) and v >= 1 for v in vp["specific"]))))
        if not ok:
            raise ConfigError(f"version_policy {vp!r} must be one of {{\"latest\": N>=1}}, "
                              "{\"all\": true}, {\"specific\": [positive versions]}")
        if self.device not in (None, "cpu", "cuda", "auto"):
            raise ConfigError(f"device {self.device!r} must be 'cpu', 'cuda' or 'auto'")
        if self.instance_count is not None and (
                isinstance(self.instance_count, bool) or self.instance_count < 1):
            raise ConfigError(f"instance_count {self.instance_count!r} must be a positive "
                              "integer (or absent: the server's --execution-workers)")
        if not isinstance(self.encoded_images, bool):
            raise ConfigError(f"encoded_images {self.encoded_images!r} must be true or false")
        if self.intra_op_threads is not None and (
                isinstance(self.intra_op_threads, bool) or self.intra_op_threads < 0):
            raise ConfigError(f"intra_op_threads {self.intra_op_threads!r} must be an integer "
                              ">= 0 (or absent: the server's --intra-op-threads)")
        db = self.dynamic_batching
        if db.max_queue_delay_microseconds < 0 or db.max_queue_size < 1:
            raise ConfigError("dynamic_batching: max_queue_delay_microseconds must be >= 0 and "
                              "max_queue_size >= 1")

    def to_json(self) -> str:
        """Serialise as the model.json text."""
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def load(cls, path: Path) -> ModelPolicy:
        """Read model.json; a missing file means the defaults. Raises :class:`ConfigError`."""
        if not path.exists():
            return cls()
        data = _read_json(path)
        try:
            db = data.get("dynamic_batching", {})
            return cls(
                version_policy=dict(data.get("version_policy", {"latest": 1})),
                dynamic_batching=DynamicBatching(
                    max_queue_delay_microseconds=int(db.get("max_queue_delay_microseconds", 0)),
                    preferred_batch_size=tuple(int(x) for x in db.get("preferred_batch_size", ())),
                    max_queue_size=int(db.get("max_queue_size", 1024))),
                max_batch_size=(None if data.get("max_batch_size") is None
                                else int(data["max_batch_size"])),
                device=data.get("device"),
                instance_count=(None if data.get("instance_count") is None
                                else int(data["instance_count"])),
                encoded_images=data.get("encoded_images", False),
                intra_op_threads=(None if data.get("intra_op_threads") is None
                                  else int(data["intra_op_threads"])),
            )
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
        except (TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"{path}: malformed field ({exc})") from exc


def _tensor(data: dict[str, Any]) -> TensorSpec:
    return TensorSpec(name=str(data["name"]), datatype=str(data["datatype"]),
                      shape=tuple(int(d) for d in data["shape"]))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"{path} does not exist") from exc
    except OSError as exc:
        raise ConfigError(f"{path} cannot be read: {exc.strerror}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def list_versions(model_dir: Path) -> list[int]:
    """Versions present under a model folder: sub-folders named by positive integers, sorted."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir()
                  if p.is_dir() and p.name.isdigit() and int(p.name) > 0)
