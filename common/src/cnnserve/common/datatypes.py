"""Tensor datatypes of the Open Inference Protocol v2, and the BYTES wire codec.

The one table of datatypes that the repository format, the server and the client share:
protocol name -> numpy dtype (explicitly little-endian, as on the wire; ``BYTES`` is an object
array of ``bytes``), the ONNX Runtime type string of each, and the typed ``contents`` field
that carries each in a protobuf message. BYTES raw contents hold, per element in row-major
order, a 4-byte little-endian length and then that many bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any

import numpy as np
import numpy.typing as npt

#: A tensor: any numpy array.
Array = npt.NDArray[Any]

#: Protocol datatype -> numpy dtype (little-endian; BYTES: object array of bytes).
NUMPY_DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("bool"), "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"), "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
    "BYTES": np.dtype("object"),
}

#: Every datatype name cnnserve understands.
DATATYPES: frozenset[str] = frozenset(NUMPY_DTYPES)

#: ONNX Runtime's type string of a tensor (``NodeArg.type``) -> protocol datatype.
ONNX_TYPES: dict[str, str] = {
    "tensor(bool)": "BOOL", "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32", "tensor(uint64)": "UINT64", "tensor(int8)": "INT8",
    "tensor(int16)": "INT16", "tensor(int32)": "INT32", "tensor(int64)": "INT64",
    "tensor(float16)": "FP16", "tensor(float)": "FP32", "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

#: The typed ``InferTensorContents`` field that holds each datatype (FP16 has none: raw only).
CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
    "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
    "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}

_LENGTH = struct.Struct("<I")


class BytesCodecError(ValueError):
    """A BYTES tensor's raw contents that do not parse; the message says where and why."""


def numpy_dtype(datatype: str) -> np.dtype[Any]:
    """The numpy dtype of protocol ``datatype``; raises :class:`KeyError` for an unknown one."""
    return NUMPY_DTYPES[datatype]


def datatype_of(array: np.ndarray[Any, Any]) -> str:
    """The protocol datatype of ``array``; raises :class:`ValueError` if the protocol has none.

    Object, ``str`` and ``bytes`` arrays are BYTES; any byte order of a numeric type matches.
    """
    if array.dtype.kind in "OSU":
        return "BYTES"
    little = array.dtype.newbyteorder("<")
    for name, dtype in NUMPY_DTYPES.items():
        if name != "BYTES" and little == dtype:
            return name
    raise ValueError(f"numpy dtype {array.dtype} has no protocol datatype; use one of "
                     f"{sorted(str(d) for n, d in NUMPY_DTYPES.items() if n != 'BYTES')}")


def encode_bytes(items: Iterable[Any]) -> bytes:
    """Serialise BYTES elements (``bytes``; ``str`` is UTF-8 encoded) as raw contents.

    Raises :class:`BytesCodecError` for an element that is neither str nor bytes.
    """
    parts: list[bytes] = []
    for item in items:
        data = item.encode("utf-8") if isinstance(item, str) else item
        if not isinstance(data, bytes | bytearray | np.bytes_):
            raise BytesCodecError(f"BYTES elements must be str or bytes, got "
                                  f"{type(item).__name__}")
        parts.append(_LENGTH.pack(len(data)))
        parts.append(bytes(data))
    return b"".join(parts)


def decode_bytes(raw: bytes, count: int, field: str = "raw contents") -> np.ndarray[Any, Any]:
    """Parse raw BYTES contents that must hold exactly ``count`` elements.

    ``field`` names the contents in messages (e.g. ``raw_input_contents``).

    Returns a 1-D object array of ``bytes``. Raises :class:`BytesCodecError` for a truncated
    length prefix, an element that runs past the end, or the wrong number of elements. Stops
    at the first element past ``count``, so a hostile body costs at most ``count`` steps.
    """
    items: list[bytes] = []
    offset, end = 0, len(raw)
    while offset < end:
        if len(items) == count:
            raise BytesCodecError(f"{field} holds more than the {count} BYTES elements the "
                                  "shape needs")
        if offset + 4 > end:
            raise BytesCodecError(f"BYTES element {len(items)} is cut off inside its 4-byte "
                                  "length prefix")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += 4
        if offset + length > end:
            raise BytesCodecError(f"BYTES element {len(items)} declares {length} bytes, only "
                                  f"{end - offset} remain")
        items.append(raw[offset:offset + length])
        offset += length
    if len(items) != count:
        raise BytesCodecError(f"{field} holds {len(items)} BYTES elements, shape needs {count}")
    array = np.empty(count, dtype=object)
    array[:] = items
    return array
