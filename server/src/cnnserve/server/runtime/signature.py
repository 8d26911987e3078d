"""What an ONNX graph says about itself: input and output tensors, and its metadata.

Read through ONNX Runtime (the server never imports the ``onnx`` package), from a session
created from the file's path so that external-data models (``model.onnx`` beside
``model.onnx.data``) load as they will be served. Everything here is blocking.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import onnxruntime as ort

from cnnserve.common.datatypes import ONNX_TYPES


@dataclass(frozen=True)
class GraphTensor:
    """One graph input or output as ONNX Runtime reports it.

    ``datatype`` is the protocol datatype ("FP32") or, when the protocol has none (a sequence,
    a map, bfloat16), ONNX Runtime's own type string. ``shape`` has -1 for a symbolic or
    unknown dimension; ``dim_names`` holds the symbol of each ("" when fixed or unnamed).
    """

    name: str
    datatype: str
    shape: tuple[int, ...]
    dim_names: tuple[str, ...]
    onnx_type: str

    @property
    def supported(self) -> bool:
        """Whether the protocol can carry this tensor."""
        return self.onnx_type in ONNX_TYPES


@dataclass(frozen=True)
class GraphSignature:
    """A graph's tensors and metadata (producer, graph name, custom metadata properties)."""

    inputs: tuple[GraphTensor, ...]
    outputs: tuple[GraphTensor, ...]
    producer: str = ""
    graph_name: str = ""
    description: str = ""
    metadata: tuple[tuple[str, str], ...] = ()


def _tensors(args: Sequence[Any]) -> tuple[GraphTensor, ...]:
    tensors = []
    for arg in args:
        dims = list(arg.shape) if arg.shape is not None else []
        shape = tuple(d if isinstance(d, int) and d > 0 else -1 for d in dims)
        names = tuple(d if isinstance(d, str) else "" for d in dims)
        tensors.append(GraphTensor(arg.name, ONNX_TYPES.get(arg.type, arg.type), shape, names,
                                   arg.type))
    return tuple(tensors)


def read_signature(session: ort.InferenceSession) -> GraphSignature:
    """The signature of an open session."""
    meta = session.get_modelmeta()
    return GraphSignature(
        inputs=_tensors(session.get_inputs()), outputs=_tensors(session.get_outputs()),
        producer=meta.producer_name, graph_name=meta.graph_name,
        description=meta.description,
        metadata=tuple(sorted(meta.custom_metadata_map.items())))

