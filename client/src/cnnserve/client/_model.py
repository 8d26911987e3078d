"""What the client knows about the server and its models, as plain frozen values.

Built from the protocol's answers (ModelMetadata, ModelConfig, ...) so the rest of the SDK
never touches protobuf messages. :class:`ModelInfo` merges a model's metadata with the parts of
its configuration the client needs: max batch size, class labels and input normalisation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from cnnserve.client.errors import InvalidInputError
from cnnserve.common.names import LOGITS, PROBABILITIES
from cnnserve.proto import grpc_service_pb2 as pb
from cnnserve.proto import model_config_pb2 as mc

#: Output names of models exported by ``cnnserve export``.


@dataclass(frozen=True)
class ServerMetadata:
    """The server's name, version and protocol extensions (``"model_repository"``, ...)."""

    name: str
    version: str
    extensions: tuple[str, ...]


@dataclass(frozen=True)
class TensorMetadata:
    """One input or output: ``shape`` has -1 for variable dimensions (batch first)."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelMetadata:
    """A model's versions, platform and tensor signature."""

    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorMetadata, ...]
    outputs: tuple[TensorMetadata, ...]

    @classmethod
    def from_proto(cls, msg: pb.ModelMetadataResponse) -> ModelMetadata:
        """Convert the ModelMetadata RPC's answer."""
        def tensors(items: Any) -> tuple[TensorMetadata, ...]:
            return tuple(TensorMetadata(t.name, t.datatype, tuple(int(d) for d in t.shape))
                         for t in items)
        return cls(name=msg.name, versions=tuple(msg.versions), platform=msg.platform,
                   inputs=tensors(msg.inputs), outputs=tensors(msg.outputs))


@dataclass(frozen=True)
class RepositoryModel:
    """One model version in the repository index: ``state`` is READY, UNAVAILABLE, ..."""

    name: str
    version: str
    state: str
    reason: str


@dataclass(frozen=True)
class ModelInfo:
    """Everything the SDK needs to call one model: signature, batching, labels, statistics.

    ``max_batch_size`` 0 means the model does not batch (its shapes hold every dimension).
    ``mean``/``std`` are the per-channel normalisation ``(pixel/255 - mean) / std`` the model
    was trained with; None when the server does not publish them (then ``pixel/255``).
    """

    metadata: ModelMetadata
    max_batch_size: int
    labels: tuple[str, ...] = ()
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @classmethod
    def from_protos(cls, metadata: pb.ModelMetadataResponse,
                    config: mc.ModelConfig) -> ModelInfo:
        """Merge the ModelMetadata and ModelConfig answers for one model."""
        params = {k: v.string_value for k, v in config.parameters.items()}
        mean, std = _normalization(params)
        return cls(metadata=ModelMetadata.from_proto(metadata),
                   max_batch_size=int(config.max_batch_size),
                   labels=_labels(params), mean=mean, std=std)

    @property
    def name(self) -> str:
        """The model's name."""
        return self.metadata.name

    @property
    def image_input(self) -> TensorMetadata:
        """The single image input ``[-1, C, H, W]``; raises :class:`InvalidInputError`."""
        inputs = self.metadata.inputs
        if len(inputs) != 1 or len(inputs[0].shape) != 4 or min(inputs[0].shape[1:]) < 1:
            raise InvalidInputError(
                f"model '{self.name}' is not an image classifier with one [-1, C, H, W] input "
                f"(inputs: {[(t.name, list(t.shape)) for t in inputs]}); use infer()")
        return inputs[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one input image."""
        c, h, w = self.image_input.shape[1:]
        return c, h, w

    @property
    def logits_output(self) -> str:
        """The output whose argmax is the prediction: ``logits`` if present, else the first."""
        names = [t.name for t in self.metadata.outputs]
        return LOGITS if LOGITS in names else names[0]

    @property
    def probabilities_output(self) -> str | None:
        """The softmax output when the model has one (else the client applies softmax)."""
        names = [t.name for t in self.metadata.outputs]
        return PROBABILITIES if PROBABILITIES in names else None

    def label(self, index: int) -> str:
        """Class label of output index ``index`` (the index as text when unlabelled)."""
        return self.labels[index] if 0 <= index < len(self.labels) else str(index)


def _json(params: dict[str, str], key: str) -> Any:
    text = params.get(key)
    if not text:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _labels(params: dict[str, str]) -> tuple[str, ...]:
    value = _json(params, "labels")
    if isinstance(value, list):
        return tuple(str(v) for v in value)
    if isinstance(value, str):  # newline-separated, like Triton's label files
        return tuple(line for line in value.splitlines() if line)
    return ()


def _normalization(params: dict[str, str]) -> tuple[tuple[float, ...] | None,
                                                    tuple[float, ...] | None]:
    norm = _json(params, "normalization")
    if isinstance(norm, dict):
        mean, std = norm.get("mean"), norm.get("std")
    else:
        mean, std = _json(params, "mean"), _json(params, "std")
    if isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) and mean:
        return tuple(float(m) for m in mean), tuple(float(s) for s in std)
    return None, None
