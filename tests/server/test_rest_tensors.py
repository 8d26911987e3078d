"""REST infer bodies to and from protocol messages: JSON data, binary data, their errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cnnserve.proto import grpc_service_pb2 as pb
from cnnserve.server.errors import InvalidRequest
from cnnserve.server.grpc.codec import decode_inputs
from cnnserve.server.http.tensors import from_response, to_request


def _body(*inputs: dict[str, object], **extra: object) -> bytes:
    return json.dumps({"inputs": list(inputs), **extra}).encode()


def test_json_data_of_every_kind_becomes_raw_contents() -> None:
    rest = to_request("m", "2", _body(
        {"name": "a", "datatype": "UINT8", "shape": [2, 2], "data": [[0, 1], [254, 255]]},
        {"name": "b", "datatype": "BOOL", "shape": [2], "data": [True, False]},
        {"name": "c", "datatype": "BYTES", "shape": [2], "data": ["x", "héllo"]},
        {"name": "d", "datatype": "FP32", "shape": [1, 2], "data": [1, 2.5]},
        id="r", parameters={"timeout": 5}), None)
    request = rest.request
    assert (request.model_name, request.model_version, request.id) == ("m", "2", "r")
    assert request.parameters["timeout"].int64_param == 5
    a, b, c, d = decode_inputs(request)
    np.testing.assert_array_equal(a.data, np.array([[0, 1], [254, 255]], np.uint8))
    assert b.data.tolist() == [True, False]
    assert c.data.tolist() == [b"x", "héllo".encode()]
    assert d.data.dtype == np.float32 and d.data.tolist() == [[1.0, 2.5]]


def test_binary_inputs_follow_the_json_header() -> None:
    x = np.arange(4, dtype=np.float32)
    header = _body({"name": "x", "datatype": "FP32", "shape": [4],
                    "parameters": {"binary_data_size": 16}},
                   outputs=[{"name": "y", "parameters": {"binary_data": True}}, {"name": "z"}])
    rest = to_request("m", "", header + x.tobytes(), str(len(header)))
    (tensor,) = decode_inputs(rest.request)
    np.testing.assert_array_equal(tensor.data, x)
    assert rest.binary_outputs == {"y"}

    response = pb.ModelInferResponse(model_name="m", model_version="1", id="q")
    response.outputs.add(name="y", datatype="FP32", shape=[2])
    response.outputs.add(name="z", datatype="INT64", shape=[2])
    response.raw_output_contents.extend([np.array([1, 2], np.float32).tobytes(),
                                         np.array([3, 4], np.int64).tobytes()])
    body, length = from_response(response, rest)
    assert length is not None
    doc = json.loads(body[:length])
    assert doc["outputs"][0]["parameters"] == {"binary_data_size": 8}
    assert doc["outputs"][1]["data"] == [3, 4] and doc["id"] == "q"
    assert np.frombuffer(body[length:], np.float32).tolist() == [1.0, 2.0]


def test_binary_data_output_makes_every_output_binary() -> None:
    rest = to_request("m", "", _body({"name": "x", "datatype": "FP32", "shape": [1],
                                      "data": [1]}, parameters={"binary_data_output": True}),
                      None)
    response = pb.ModelInferResponse(model_name="m", model_version="1")
    response.outputs.add(name="y", datatype="BYTES", shape=[1])
    response.raw_output_contents.append(b"\x02\x00\x00\x00hi")
    body, length = from_response(response, rest)
    assert length is not None and body[length:] == b"\x02\x00\x00\x00hi"
    assert "binary_data_output" not in rest.request.parameters


@pytest.mark.parametrize(("body", "header", "message"), [
    (b"\xff\xfe", None, "not valid JSON"),
    (_body({"name": "x", "datatype": "UINT8", "shape": [1], "data": [256]}), None,
     "data does not fit UINT8"),
    (_body({"name": "x", "datatype": "INT32", "shape": [1], "data": [1.5]}), None,
     "data does not fit INT32"),
    (_body({"name": "x", "datatype": "FP32", "shape": [2], "data": [[1], [2, 3]]}), None,
     "ragged"),
    (_body({"name": "x", "datatype": "FP32", "shape": "2", "data": [1, 2]}), None,
     "'shape' must be a list of integers"),
    (_body({"name": "x", "datatype": "FP32", "shape": [1]}), None, "neither 'data' nor"),
    (_body({"name": "x", "datatype": "BYTES", "shape": [1], "data": [1]}), None,
     "BYTES data must be strings"),
    (b"{}", "99", "Inference-Header-Content-Length must be a byte count"),
    (_body({"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}) + b"junk",
     str(len(_body({"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}))),
     "4 bytes of binary data that no input"),
    (_body({"name": "x", "datatype": "FP32", "shape": [1], "data": [1]},
           outputs=[{"name": 3}]), None, "output name must be a string"),
    (_body({"name": "x", "datatype": "FP32", "shape": [1], "data": [1]},
           parameters={"p": [1]}), None, "request parameter 'p' must be a bool, number"),
])
def test_malformed_bodies_are_invalid_requests(body: bytes, header: str | None,
                                               message: str) -> None:
    with pytest.raises(InvalidRequest, match=message.replace("(", r"\(")):
        to_request("m", "", body, header)
