"""Tensors on the wire: numpy arrays <-> Open Inference Protocol v2 tensors.

Inputs always travel as ``raw_input_contents`` (what tritonclient sends and what the server
reads fastest): the elements' little-endian bytes in row-major order, or for ``BYTES`` a
4-byte little-endian length before each element. Outputs are read from
``raw_output_contents``, or from the typed ``contents`` when a server answers that way.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from cnnserve.client.errors import InvalidInputError
from cnnserve.proto import grpc_service_pb2 as pb

#: Protocol datatype -> numpy dtype (little-endian on the wire).
DATATYPE_TO_DTYPE: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("bool"), "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"), "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
    "BYTES": np.dtype("object"),
}

#: Typed ``contents`` field that holds each datatype (FP16 has none: raw only).
_CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
    "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
    "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}


def datatype_of(array: np.ndarray) -> str:
    """Return the protocol datatype of ``array``'s dtype; raises :class:`InvalidInputError`.

    Strings (``str``/``bytes`` arrays, or object arrays of them) map to ``BYTES``.
    """
    kind = array.dtype.kind
    if kind in "OSU":
        return "BYTES"
    for name, dtype in DATATYPE_TO_DTYPE.items():
        if name != "BYTES" and array.dtype.newbyteorder("<") == dtype:
            return name
    raise InvalidInputError(f"numpy dtype {array.dtype} has no protocol datatype; use one of "
                            f"{sorted(str(d) for d in DATATYPE_TO_DTYPE.values())}")


def numpy_dtype(datatype: str) -> np.dtype[Any]:
    """Return the numpy dtype for protocol ``datatype``; raises :class:`InvalidInputError`."""
    try:
        return DATATYPE_TO_DTYPE[datatype]
    except KeyError:
        raise InvalidInputError(f"datatype '{datatype}' is not supported by this client; "
                                f"expected one of {sorted(DATATYPE_TO_DTYPE)}") from None


def encode_bytes(array: np.ndarray) -> bytes:
    """Serialise a BYTES tensor: per element, a uint32 LE length then the bytes (row-major).

    ``str`` elements are UTF-8 encoded; anything else must already be ``bytes``.
    """
    parts: list[bytes] = []
    for item in array.ravel(order="C"):
        data = item.encode("utf-8") if isinstance(item, str) else item
        if not isinstance(data, bytes | bytearray | np.bytes_):
            raise InvalidInputError(f"BYTES elements must be str or bytes, got "
                                    f"{type(item).__name__}")
        parts.append(struct.pack("<I", len(data)))
        parts.append(bytes(data))
    return b"".join(parts)


def decode_bytes(raw: bytes, count: int) -> np.ndarray:
    """Parse ``count`` length-prefixed elements from ``raw`` into an object array of bytes.

    Raises :class:`ValueError` if ``raw`` is truncated or holds trailing bytes.
    """
    out = np.empty(count, dtype=object)
    offset = 0
    for i in range(count):
        if offset + 4 > len(raw):
            raise ValueError(f"BYTES tensor truncated at element {i} of {count}")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise ValueError(f"BYTES tensor element {i} claims {size} bytes past the end")
        out[i] = raw[offset:offset + size]
        offset += size
    if offset != len(raw):
        raise ValueError(f"BYTES tensor has {len(raw) - offset} trailing bytes")
    return out


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
        field = _CONTENTS_FIELD.get(dt)
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
