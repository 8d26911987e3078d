"""Tensors between protocol messages and numpy arrays.

Inputs arrive either as ``raw_input_contents`` (one bytes entry per input, in the order of
``inputs``; what tritonclient always sends) or as each input's typed ``contents``; a request
that mixes the two is refused. Outputs always leave as ``raw_output_contents`` in the order of
``outputs``, which is all tritonclient reads. Raw bytes are little-endian; BYTES elements are
each a 4-byte little-endian length followed by that many bytes.

Every failure raises :class:`~cnnserve.server.errors.InvalidRequest` naming the model and the
tensor. Checking the request against the model's signature is validation.py's job; this
module only checks that each tensor is self-consistent (its data matches its own shape and
datatype).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from math import prod
from typing import Any, NamedTuple

import numpy as np

from cnnserve.common.repository import DATATYPES
from cnnserve.proto import grpc_service_pb2 as pb
from cnnserve.server.errors import InvalidRequest

_LENGTH = struct.Struct("<I")

#: numpy dtype of each fixed-size datatype (explicitly little-endian, as on the wire).
_DTYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(numpy_name).newbyteorder("<")
    for name, numpy_name in DATATYPES.items() if name != "BYTES"}

#: The typed ``InferTensorContents`` field of each datatype (FP16 has none: raw only).
_CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
    "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
    "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


class InputTensor(NamedTuple):
    """One decoded request input: ``data`` has ``shape`` and the dtype of ``datatype``.

    A NamedTuple rather than a frozen dataclass: one is built per tensor per request, and
    a tuple is several times cheaper to construct.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray[Any, Any]


def decode_inputs(request: pb.ModelInferRequest) -> list[InputTensor]:
    """Decode every input of ``request`` into an array, in request order.

    Raw contents are wrapped without a copy (the arrays are read-only). Raises
    InvalidRequest for an unknown datatype, a negative dimension, raw and typed contents
    mixed, a raw entry count that differs from the input count, missing data, or data
    whose size does not match the tensor's shape and datatype.
    """
    model = request.model_name
    tensors = request.inputs
    raw = request.raw_input_contents
    if raw:
        typed = [t.name for t in tensors if t.HasField("contents")]
        if typed:
            raise InvalidRequest(
                f"model '{model}': request uses raw_input_contents, so inputs {typed} must "
                "not also carry typed contents")
        if len(raw) != len(tensors):
            raise InvalidRequest(
                f"model '{model}': raw_input_contents has {len(raw)} entries for "
                f"{len(tensors)} inputs; expected one per input")
    decoded = []
    for index, tensor in enumerate(tensors):
        name, datatype = tensor.name, tensor.datatype
        shape = _checked_shape(model, name, datatype, tensor.shape)
        if raw:
            # Each read of a repeated bytes field copies it out of the message: read once.
            data = _from_raw(model, name, datatype, shape, raw[index])
        else:
            data = _from_contents(model, tensor, shape)
        decoded.append(InputTensor(name, datatype, shape, data))
    return decoded


def _checked_shape(model: str, name: str, datatype: str,
                   dims: Sequence[int]) -> tuple[int, ...]:
    if datatype not in DATATYPES:
        raise InvalidRequest(
            f"model '{model}' input '{name}': datatype '{datatype}' is not one "
            f"of {sorted(DATATYPES)}")
    shape = tuple(dims)
    if shape and min(shape) < 0:
        raise InvalidRequest(f"model '{model}' input '{name}': shape "
                             f"{format_shape(shape)} has a negative dimension")
    return shape


def _from_raw(model: str, name: str, datatype: str, shape: tuple[int, ...],
              data: bytes) -> np.ndarray[Any, Any]:
    count = prod(shape)
    if datatype == "BYTES":
        return _split_bytes(model, name, data, count).reshape(shape)
    dtype = _DTYPES[datatype]
    expected = count * dtype.itemsize
    if len(data) != expected:
        raise InvalidRequest(
            f"model '{model}' input '{name}': raw_input_contents holds {len(data)} bytes, "
            f"but shape {format_shape(shape)} of {datatype} needs {expected}")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _split_bytes(model: str, name: str, data: bytes, count: int) -> np.ndarray[Any, Any]:
    items: list[bytes] = []
    offset = 0
    while offset < len(data):
        if offset + 4 > len(data):
            raise InvalidRequest(f"model '{model}' input '{name}': BYTES element {len(items)} "
                                 "is cut off inside its 4-byte length prefix")
        (length,) = _LENGTH.unpack_from(data, offset)
        offset += 4
        if offset + length > len(data):
            raise InvalidRequest(f"model '{model}' input '{name}': BYTES element {len(items)} "
                                 f"declares {length} bytes, only {len(data) - offset} remain")
        items.append(data[offset:offset + length])
        offset += length
    if len(items) != count:
        raise InvalidRequest(f"model '{model}' input '{name}': raw_input_contents holds "
                             f"{len(items)} BYTES elements, shape needs {count}")
    array = np.empty(count, dtype=object)
    array[:] = items
    return array


def _from_contents(model: str, tensor: pb.ModelInferRequest.InferInputTensor,
                   shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
    name, datatype = tensor.name, tensor.datatype
    field = _CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidRequest(f"model '{model}' input '{name}': {datatype} has no typed "
                             "contents field; send it in raw_input_contents")
    if not tensor.HasField("contents"):
        raise InvalidRequest(f"model '{model}' input '{name}' has no data: set its contents "
                             "or the request's raw_input_contents")
    values = getattr(tensor.contents, field)
    count = prod(shape)
    if len(values) != count:
        raise InvalidRequest(
            f"model '{model}' input '{name}': contents.{field} holds {len(values)} elements, "
            f"shape {format_shape(shape)} needs {count}")
    if datatype == "BYTES":
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    dtype = _DTYPES[datatype]
    if dtype.kind in "iu" and count:
        # int_contents/uint_contents are 32-bit on the wire; narrower types must fit.
        wide = np.asarray(values, dtype=np.int64 if dtype.kind == "i" else np.uint64)
        info = np.iinfo(dtype)
        if wide.min() < info.min or wide.max() > info.max:
            raise InvalidRequest(f"model '{model}' input '{name}': contents.{field} has "
                                 f"values outside the {datatype} range [{info.min}, {info.max}]")
        return wide.astype(dtype).reshape(shape)
    return np.asarray(values, dtype=dtype).reshape(shape)


class OutputTensor(NamedTuple):
    """One response output; ``data``'s dtype matches ``datatype`` (object of bytes for BYTES)."""

    name: str
    datatype: str
    data: np.ndarray[Any, Any]


def encode_outputs(response: pb.ModelInferResponse, outputs: Sequence[OutputTensor]) -> None:
    """Append ``outputs`` to ``response`` as tensor metadata plus raw_output_contents, in order."""
    for output in outputs:
        tensor = response.outputs.add()
        tensor.name = output.name
        tensor.datatype = output.datatype
        tensor.shape.extend(output.data.shape)
        response.raw_output_contents.append(to_raw(output.datatype, output.data))


def to_raw(datatype: str, data: np.ndarray[Any, Any]) -> bytes:
    """Serialise ``data`` the way raw contents carry ``datatype`` (row-major, little-endian)."""
    if datatype == "BYTES":
        parts = []
        for item in data.reshape(-1):
            value = item if isinstance(item, bytes) else str(item).encode("utf-8")
            parts.append(_LENGTH.pack(len(value)))
            parts.append(value)
        return b"".join(parts)
    return np.ascontiguousarray(data, dtype=_DTYPES[datatype]).tobytes()


def datatype_of(array: np.ndarray[Any, Any]) -> str:
    """The protocol datatype of a numpy array; raises ValueError for one the protocol lacks."""
    if array.dtype == object:
        return "BYTES"
    for name, dtype in _DTYPES.items():
        if array.dtype == dtype:
            return name
    raise ValueError(f"numpy dtype {array.dtype} has no protocol datatype")


def format_shape(shape: Sequence[int]) -> str:
    """``[-1,1,28,28]``: the compact shape notation error messages use."""
    return "[" + ",".join(str(d) for d in shape) + "]"
