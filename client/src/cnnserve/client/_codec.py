"""Tensors on the wire: numpy arrays <-> Open Inference Protocol v2 tensors.

Inputs always travel as ``raw_input_contents`` (what tritonclient sends and what the server
reads fastest): the elements' little-endian bytes in row-major order, or for ``BYTES`` a
4-byte little-endian length before each element. Outputs are read from
``raw_output_contents``, or from the typed ``contents`` when a server answers that way.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cnnserve.client.errors import InvalidInputError
from cnnserve.common import datatypes
from cnnserve.common.datatypes import CONTENTS_FIELD, NUMPY_DTYPES, BytesCodecError, decode_bytes
from cnnserve.proto import grpc_service_pb2 as pb

__all__ = ["datatype_of", "decode_bytes", "decode_output", "encode_bytes", "encode_input",
           "numpy_dtype"]


def datatype_of(array: np.ndarray) -> str:
    """Return the protocol datatype of ``array``'s dtype; raises :class:`InvalidInputError`.

    Strings (``str``/``bytes`` arrays, or object arrays of them) map to ``BYTES``.
    """
    try:
        return datatypes.datatype_of(array)
    except ValueError as exc:
        raise InvalidInputError(str(exc)) from None


def numpy_dtype(datatype: str) -> np.dtype[Any]:
    """Return the numpy dtype for protocol ``datatype``; raises :class:`InvalidInputError`."""
    try:
        return NUMPY_DTYPES[datatype]
    except KeyError:
        raise InvalidInputError(f"datatype '{datatype}' is not supported by this client; "
                                f"expected one of {sorted(NUMPY_DTYPES)}") from None


def encode_bytes(array: np.ndarray) -> bytes:
    """Serialise a BYTES tensor: per element, a uint32 LE length then the bytes (row-major).

    ``str`` elements are UTF-8 encoded; anything else must already be ``bytes``.
    """
    try:
        return datatypes.encode_bytes(array.ravel(order="C"))
    except BytesCodecError as exc:
        raise InvalidInputError(str(exc)) from None


def encode_input(name: str, array: np.ndarray,
                 datatype: str | None = None) -> tuple[pb.ModelInferRequest.InferInputTensor,
                                                       bytes]:
    """Return the tensor description and its raw contents for input ``name``."""
    dt = datatype or datatype_of(array)
    tensor = pb.ModelInferRequest.InferInputTensor(name=name, datatype=dt,
                                                   shape=list(array.shape))
    if dt == "BYTES":
        return tensor, encode_bytes(array)
    wire = numpy_dtype(dt)
    return tensor, np.ascontiguousarray(array, dtype=wire).tobytes()


def decode_output(tensor: pb.ModelInferResponse.InferOutputTensor,
                  raw: bytes | None) -> np.ndarray:
    """Return output ``tensor`` as a numpy array (native byte order, writable).

    ``raw`` is its entry of ``raw_output_contents``, or None to read the typed ``contents``.
    Raises :class:`ValueError` if the bytes do not match the shape and datatype.
    """
    shape = tuple(int(d) for d in tensor.shape)
    count = int(np.prod(shape, dtype=np.int64))
    dt = tensor.datatype
    if dt == "BYTES":
        if raw is None:
            flat = np.array(list(tensor.contents.bytes_contents), dtype=object)
        else:
            flat = decode_bytes(raw, count)
        return flat.reshape(shape)
    dtype = numpy_dtype(dt)
    if raw is None:
        field = CONTENTS_FIELD.get(dt)
        if field is None:
            raise ValueError(f"output '{tensor.name}': {dt} cannot travel in typed contents")
        values = np.asarray(getattr(tensor.contents, field), dtype=dtype.newbyteorder("="))
    else:
        if len(raw) != count * dtype.itemsize:
            raise ValueError(f"output '{tensor.name}': {len(raw)} bytes do not hold {dt} "
                             f"shape {list(shape)} ({count * dtype.itemsize} bytes)")
        values = np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="))
    if values.size != count:
        raise ValueError(f"output '{tensor.name}': {values.size} elements for shape "
                         f"{list(shape)}")
    return values.reshape(shape)
