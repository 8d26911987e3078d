"""Inference bodies of the REST protocol to and from protocol messages (JSON + binary data).

A REST infer body is a JSON object, optionally followed by binary tensor data (Triton's
binary tensor data extension): the ``Inference-Header-Content-Length`` header gives the JSON's
length in bytes, and each input with parameter ``binary_data_size`` takes that many bytes of
what follows, in input order, laid out as gRPC's raw contents (little-endian, row-major,
BYTES elements each after a 4-byte length). :func:`to_request` turns a body into the
ModelInferRequest the gRPC path serves (every input as raw contents), so REST requests are
validated, batched and counted exactly as gRPC ones; :func:`from_response` turns the answer
back into JSON, with outputs as binary data when asked (``binary_data`` per output, or the
request parameter ``binary_data_output`` for all). Malformed bodies raise InvalidRequest.
"""

from __future__ import annotations

import json
from math import prod
from typing import Any, NamedTuple

import numpy as np

from cnnserve.common.datatypes import NUMPY_DTYPES, BytesCodecError, decode_bytes, encode_bytes
from cnnserve.proto import grpc_service_pb2 as pb
from cnnserve.server.errors import InvalidRequest

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_SIZE = "binary_data_size"


class RestRequest(NamedTuple):
    """A decoded infer body: the protocol request and which outputs go back as binary."""

    request: pb.ModelInferRequest
    binary_outputs: frozenset[str]
    binary_by_default: bool


def to_request(model: str, version: str, body: bytes, header_length: str | None) -> RestRequest:
    """Decode an infer body for ``model`` (``version`` "" = the policy's choice)."""
    if header_length is None:
        header, binary = body, b""
    else:
        try:
            length = int(header_length)
        except ValueError:
            length = -1
        if not 0 <= length <= len(body):
            raise InvalidRequest(f"header {HEADER_LENGTH} must be a byte count between 0 and "
                                 f"the body's {len(body)} bytes, got {header_length!r}")
        header, binary = body[:length], body[length:]
    try:
        doc = json.loads(header)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidRequest("the request body must be a JSON object with an 'inputs' list")
    request = pb.ModelInferRequest(model_name=model, model_version=version,
                                   id=_text(doc.get("id", ""), "id"))
    parameters = _object(doc.get("parameters", {}), "parameters")
    binary_by_default = parameters.pop("binary_data_output", False) is True
    _set_parameters(request.parameters, parameters, "request")
    offset = 0
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidRequest("the request body must have a non-empty 'inputs' list")
    for item in inputs:
        offset = _add_input(request, _object(item, "each input"), binary, offset)
    if offset != len(binary):
        raise InvalidRequest(f"the body has {len(binary) - offset} bytes of binary data that no "
                             f"input's '{BINARY_SIZE}' accounts for")
    binary_outputs = set()
    for item in _list(doc.get("outputs", []), "outputs"):
        out = _object(item, "each output")
        params = _object(out.get("parameters", {}), "output parameters")
        name = _text(out.get("name"), "output name")
        if params.pop("binary_data", binary_by_default) is True:
            binary_outputs.add(name)
        tensor = request.outputs.add(name=name)
        _set_parameters(tensor.parameters, params, f"output '{name}'")
    return RestRequest(request, frozenset(binary_outputs), binary_by_default)


def _add_input(request: pb.ModelInferRequest, item: dict[str, Any], binary: bytes,
               offset: int) -> int:
    name = _text(item.get("name"), "input name")
    datatype = _text(item.get("datatype"), f"input '{name}' datatype")
    shape = item.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int for d in shape):
        raise InvalidRequest(f"input '{name}': 'shape' must be a list of integers")
    params = _object(item.get("parameters", {}), f"input '{name}' parameters")
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    size = params.pop(BINARY_SIZE, None)
    if size is not None:
        if type(size) is not int or not 0 <= size <= len(binary) - offset:
            raise InvalidRequest(f"input '{name}': '{BINARY_SIZE}' {size!r} exceeds the "
                                 f"{len(binary) - offset} bytes of binary data left")
        request.raw_input_contents.append(binary[offset:offset + size])
        return offset + size
    if "data" not in item:
        raise InvalidRequest(f"input '{name}' has neither 'data' nor '{BINARY_SIZE}'")
    request.raw_input_contents.append(_raw(name, datatype, shape, item["data"]))
    return offset


def _raw(name: str, datatype: str, shape: list[int], data: Any) -> bytes:
    """JSON tensor data (flat or nested, row-major) as raw contents of ``datatype``."""
    try:
        flat = np.asarray(data, dtype=object).reshape(-1)
        ragged = any(isinstance(v, list) for v in flat)
    except ValueError:  # numpy refused the nesting
        ragged = True
    if ragged:
        raise InvalidRequest(f"input '{name}': 'data' is ragged; give a flat list or nested "
                             "lists of equal length")
    if min(shape, default=0) >= 0 and flat.size != prod(shape):
        raise InvalidRequest(f"input '{name}': 'data' holds {flat.size} elements, shape "
                             f"{shape} needs {prod(shape)}")
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in flat):
            raise InvalidRequest(f"input '{name}': BYTES data must be strings")
        return encode_bytes(str(v) for v in flat)
    dtype = NUMPY_DTYPES.get(datatype)
    if dtype is None:
        return b""  # an unknown datatype: the shared decoder names the valid ones
    if any(isinstance(v, (str, list, dict)) or v is None for v in flat):
        raise InvalidRequest(f"input '{name}': {datatype} data must be numbers")
    try:
        if dtype.kind in "iu" and any(not isinstance(v, int) for v in flat):
            raise TypeError("not an integer")
        return np.asarray(flat.tolist(), dtype=dtype).tobytes()
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidRequest(f"input '{name}': data does not fit {datatype}: {exc}") from None


def from_response(response: pb.ModelInferResponse, rest: RestRequest) -> tuple[bytes, int | None]:
    """The answer body and, when it carries binary data, the JSON header's length."""
    outputs, binary = [], []
    for index, tensor in enumerate(response.outputs):
        raw = response.raw_output_contents[index]
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype,
                                 "shape": list(tensor.shape)}
        if (tensor.name in rest.binary_outputs if rest.request.outputs
                else rest.binary_by_default):
            entry["parameters"] = {BINARY_SIZE: len(raw)}
            binary.append(raw)
        else:
            entry["data"] = _values(tensor, raw)
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": response.model_name,
                           "model_version": response.model_version, "outputs": outputs}
    if response.id:
        doc["id"] = response.id
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not binary:
        return header, None
    return header + b"".join(binary), len(header)


def _values(tensor: pb.ModelInferResponse.InferOutputTensor, raw: bytes) -> list[Any]:
    count = prod(tensor.shape)
    if tensor.datatype == "BYTES":
        try:
            items = decode_bytes(raw, count, "raw_output_contents")
        except BytesCodecError as exc:  # our own encoder wrote it: a bug, not the client's
            raise RuntimeError(str(exc)) from exc
        return [item.decode("utf-8", "replace") for item in items]
    values: list[Any] = np.frombuffer(raw, NUMPY_DTYPES[tensor.datatype]).tolist()
    return values


def _set_parameters(target: Any, params: dict[str, Any], where: str) -> None:
    for key, value in params.items():
        if isinstance(value, bool):
            target[key].bool_param = value
        elif isinstance(value, int):
            target[key].int64_param = value
        elif isinstance(value, float):
            target[key].double_param = value
        elif isinstance(value, str):
            target[key].string_param = value
        else:
            raise InvalidRequest(f"{where} parameter '{key}' must be a bool, number or string")


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidRequest(f"{what} must be a JSON object")
    return dict(value)


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise InvalidRequest(f"'{what}' must be a JSON list")
    return value


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidRequest(f"{what} must be a string")
    return value
