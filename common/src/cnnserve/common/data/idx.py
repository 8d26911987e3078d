"""Read and write IDX files, the format of the original MNIST and Fashion-MNIST releases.

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of dimensions),
one big-endian uint32 per dimension, then the data in C order, big-endian. Files whose name
ends in ``.gz`` are (de)compressed transparently. Only numpy and the standard library are
imported, so the client's batch job can read IDX images without torch.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from cnnserve.common.errors import CnnserveError
from cnnserve.common.files import write_atomically

#: IDX type code -> big-endian numpy dtype.
_DTYPES: dict[int, str] = {
    0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8",
}
_CODES: dict[str, int] = {np.dtype(v).newbyteorder("=").str: k for k, v in _DTYPES.items()}


class IdxError(CnnserveError):
    """An IDX file that is missing, truncated or not IDX at all."""


def _read_bytes(path: Path) -> bytes:
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise IdxError(f"IDX file not found: {path}") from exc
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise IdxError(f"cannot read IDX file {path}: {exc}") from exc


def read_idx(path: Path | str) -> np.ndarray:
    """Return the array stored in the IDX file ``path`` (native byte order).

    Raises :class:`IdxError` when the file is missing, is not gzip although named ``.gz``,
    has a bad magic number or type code, or holds fewer or more bytes than its header says.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise IdxError(f"{path}: {len(raw)} bytes is too short for an IDX header")
    zero, code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or code not in _DTYPES:
        raise IdxError(f"{path}: bad IDX magic number 0x{raw[:4].hex()} "
                       f"(expected 0x0000 then a type code in "
                       f"{[hex(c) for c in sorted(_DTYPES)]})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IdxError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header} "
                       f"for {ndim} dimensions)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_DTYPES[code])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual = len(raw) - header
    if actual != expected:
        raise IdxError(f"{path}: IDX header says dimensions {list(dims)} ({expected} data "
                       f"bytes) but the file holds {actual} data bytes (truncated or corrupt)")
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return data.astype(dtype.newbyteorder("="))


def write_idx(path: Path | str, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` as IDX (gzip-compressed if the name ends in ``.gz``).

    The write is atomic: a temporary file in the same folder is renamed into place.
    Raises :class:`IdxError` for a dtype IDX cannot hold (e.g. int64) or more than 255 dims.
    """
    path = Path(path)
    arr = np.ascontiguousarray(array)
    code = _CODES.get(arr.dtype.newbyteorder("=").str)
    if code is None:
        raise IdxError(f"IDX cannot store dtype {arr.dtype}; use one of "
                       f"{sorted(np.dtype(v).name for v in _DTYPES.values())}")
    if arr.ndim > 255:
        raise IdxError(f"IDX holds at most 255 dimensions, got {arr.ndim}")
    payload = (struct.pack(">HBB", 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
               + arr.astype(_DTYPES[code]).tobytes())
    if path.name.endswith(".gz"):
        payload = gzip.compress(payload, mtime=0)
    write_atomically(path, payload, durable=False)
