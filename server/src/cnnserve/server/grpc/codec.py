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

from collections.abc import Callable, Sequence
from math import prod
from typing import Any, NamedTuple

import numpy as np

from cnnserve.common.datatypes import (
    CONTENTS_FIELD,
    DATATYPES,
    NUMPY_DTYPES,
    BytesCodecError,
    decode_bytes,
    encode_bytes,
)
from cnnserve.proto import grpc_service_pb2 as pb
from cnnserve.server.errors import InvalidRequest


class InputTensor(NamedTuple):
    """One decoded request input: ``data`` has ``shape`` and the dtype of ``datatype``.

    A NamedTuple rather than a frozen dataclass: one is built per tensor per request, and
    a tuple is several times cheaper to construct.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray[Any, Any]


#: ``check(name, datatype, shape)``: raises InvalidRequest for an input the model cannot take.
DeclaredCheck = Callable[[str, str, tuple[int, ...]], None]


def decode_inputs(request: pb.ModelInferRequest,
                  check: DeclaredCheck | None = None) -> list[InputTensor]:
    """Decode every input of ``request`` into an array, in request order.

    ``check`` sees each input's name, datatype and shape before its data is touched, so a
    request the model cannot take (a 64 MiB BYTES body for an FP32 input, a shape of a
    billion rows) is refused before any decoding work. Raw contents are wrapped without a
    copy (the arrays are read-only). Raises InvalidRequest for an unknown datatype, a
    negative dimension, raw and typed contents mixed, a raw entry count that differs from
    the input count, missing data, or data whose size does not match the tensor's shape and
    datatype (and whatever ``check`` raises).
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
        if check is not None:
            check(name, datatype, shape)
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
    dtype = NUMPY_DTYPES[datatype]
    expected = count * dtype.itemsize
    if len(data) != expected:
        raise InvalidRequest(
            f"model '{model}' input '{name}': raw_input_contents holds {len(data)} bytes, "
            f"but shape {format_shape(shape)} of {datatype} needs {expected}")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _split_bytes(model: str, name: str, data: bytes, count: int) -> np.ndarray[Any, Any]:
    try:
        return decode_bytes(data, count, "raw_input_contents")
    except BytesCodecError as exc:
        raise InvalidRequest(f"model '{model}' input '{name}': {exc}") from None


def _from_contents(model: str, tensor: pb.ModelInferRequest.InferInputTensor,
                   shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
    name, datatype = tensor.name, tensor.datatype
    field = CONTENTS_FIELD.get(datatype)
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
    dtype = NUMPY_DTYPES[datatype]
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
        return encode_bytes(item if isinstance(item, bytes) else str(item)
                            for item in data.reshape(-1))
    return np.ascontiguousarray(data, dtype=NUMPY_DTYPES[datatype]).tobytes()


def format_shape(shape: Sequence[int]) -> str:
    """``[-1,1,28,28]``: the compact shape notation error messages use."""
    return "[" + ",".join(str(d) for d in shape) + "]"
