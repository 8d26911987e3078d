"""Tensor decoding and encoding between protocol messages and numpy arrays."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from cnnserve.common.datatypes import datatype_of
from cnnserve.proto import grpc_service_pb2 as pb
from cnnserve.server.errors import InvalidRequest
from cnnserve.server.grpc.codec import (
    OutputTensor,
    decode_inputs,
    encode_outputs,
    to_raw,
)


def _request(*inputs: tuple[str, str, list[int]]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="fashion")
    for name, datatype, shape in inputs:
        request.inputs.add(name=name, datatype=datatype, shape=shape)
    return request


def test_raw_fp32_decodes_to_the_same_values() -> None:
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    request = _request(("x", "FP32", [2, 3]))
    request.raw_input_contents.append(values.tobytes())
    (tensor,) = decode_inputs(request)
    assert tensor.name == "x" and tensor.datatype == "FP32" and tensor.shape == (2, 3)
    np.testing.assert_array_equal(tensor.data, values)


@pytest.mark.parametrize("datatype", ["BOOL", "UINT8", "INT16", "INT32", "INT64", "UINT64",
                                      "FP16", "FP64"])
def test_raw_round_trip_keeps_values_for_every_fixed_size_datatype(datatype: str) -> None:
    dtype = {"BOOL": np.bool_, "UINT8": np.uint8, "INT16": np.int16, "INT32": np.int32,
             "INT64": np.int64, "UINT64": np.uint64, "FP16": np.float16,
             "FP64": np.float64}[datatype]
    values = (np.arange(4) % 2 == 0) if datatype == "BOOL" else np.arange(4).astype(dtype)
    assert datatype_of(values) == datatype
    request = _request(("x", datatype, [4]))
    request.raw_input_contents.append(to_raw(datatype, values))
    np.testing.assert_array_equal(decode_inputs(request)[0].data, values)


def test_raw_bytes_elements_carry_a_little_endian_length_prefix() -> None:
    raw = struct.pack("<I", 3) + b"cat" + struct.pack("<I", 0) + struct.pack("<I", 2) + b"ok"
    request = _request(("s", "BYTES", [3]))
    request.raw_input_contents.append(raw)
    (tensor,) = decode_inputs(request)
    assert tensor.data.tolist() == [b"cat", b"", b"ok"]
    assert to_raw("BYTES", tensor.data) == raw


@pytest.mark.parametrize(("raw", "message"), [
    (struct.pack("<I", 5) + b"abc", "declares 5 bytes, only 3 remain"),
    (b"\x01\x00", "cut off inside its 4-byte length prefix"),
    (struct.pack("<I", 1) + b"a", "holds 1 BYTES elements, shape needs 2"),
])
def test_malformed_raw_bytes_are_refused(raw: bytes, message: str) -> None:
    request = _request(("s", "BYTES", [2]))
    request.raw_input_contents.append(raw)
    with pytest.raises(InvalidRequest, match=message):
        decode_inputs(request)


def test_raw_size_must_match_shape_times_itemsize() -> None:
    request = _request(("input", "FP32", [1, 1, 28, 28]))
    request.raw_input_contents.append(b"\0" * 100)
    with pytest.raises(InvalidRequest) as info:
        decode_inputs(request)
    assert str(info.value) == ("model 'fashion' input 'input': raw_input_contents holds 100 "
                               "bytes, but shape [1,1,28,28] of FP32 needs 3136")


def test_typed_contents_decode_per_datatype() -> None:
    request = _request(("f", "FP32", [2]), ("i", "INT8", [3]), ("b", "BYTES", [1]))
    request.inputs[0].contents.fp32_contents.extend([1.5, -2.0])
    request.inputs[1].contents.int_contents.extend([-128, 0, 127])
    request.inputs[2].contents.bytes_contents.append(b"hi")
    f, i, b = decode_inputs(request)
    assert f.data.dtype == np.float32 and f.data.tolist() == [1.5, -2.0]
    assert i.data.dtype == np.int8 and i.data.tolist() == [-128, 0, 127]
    assert b.data.tolist() == [b"hi"]


def test_typed_contents_out_of_range_for_a_narrow_type_are_refused() -> None:
    request = _request(("i", "INT8", [1]))
    request.inputs[0].contents.int_contents.append(300)
    with pytest.raises(InvalidRequest, match=r"outside the INT8 range \[-128, 127\]"):
        decode_inputs(request)


def test_typed_contents_count_must_match_shape() -> None:
    request = _request(("f", "FP32", [2, 2]))
    request.inputs[0].contents.fp32_contents.extend([1.0, 2.0, 3.0])
    with pytest.raises(InvalidRequest, match=r"holds 3 elements, shape \[2,2\] needs 4"):
        decode_inputs(request)


def test_fp16_has_no_typed_contents() -> None:
    request = _request(("h", "FP16", [1]))
    request.inputs[0].contents.fp32_contents.append(1.0)
    with pytest.raises(InvalidRequest, match="FP16 has no typed contents field"):
        decode_inputs(request)


def test_raw_and_typed_contents_together_are_refused() -> None:
    request = _request(("a", "FP32", [1]), ("b", "FP32", [1]))
    request.inputs[1].contents.fp32_contents.append(1.0)
    request.raw_input_contents.extend([b"\0" * 4, b"\0" * 4])
    with pytest.raises(InvalidRequest, match=r"inputs \['b'\] must not also carry typed"):
        decode_inputs(request)


def test_raw_entry_count_must_match_inputs() -> None:
    request = _request(("a", "FP32", [1]), ("b", "FP32", [1]))
    request.raw_input_contents.append(b"\0" * 4)
    with pytest.raises(InvalidRequest, match="has 1 entries for 2 inputs"):
        decode_inputs(request)


def test_input_without_any_data_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="input 'a' has no data"):
        decode_inputs(_request(("a", "FP32", [1])))


@pytest.mark.parametrize(("datatype", "shape", "message"), [
    ("FLOAT", [1], "datatype 'FLOAT' is not one of"),
    ("FP32", [1, -1], r"shape \[1,-1\] has a negative dimension"),
])
def test_unknown_datatype_or_negative_dimension_is_refused(datatype: str, shape: list[int],
                                                           message: str) -> None:
    request = _request(("a", datatype, shape))
    request.raw_input_contents.append(b"")
    with pytest.raises(InvalidRequest, match=message):
        decode_inputs(request)


def test_outputs_are_encoded_raw_in_order_with_their_shapes() -> None:
    scores = np.array([[0.25, 0.75]], dtype=np.float32)
    labels = np.array([[b"a", b"bc"]], dtype=object)
    response = pb.ModelInferResponse()
    encode_outputs(response, [OutputTensor("scores", "FP32", scores),
                              OutputTensor("classes", "BYTES", labels)])
    assert [o.name for o in response.outputs] == ["scores", "classes"]
    assert [list(o.shape) for o in response.outputs] == [[1, 2], [1, 2]]
    assert [o.datatype for o in response.outputs] == ["FP32", "BYTES"]
    assert not response.outputs[0].HasField("contents")
    assert np.frombuffer(response.raw_output_contents[0], np.float32).tolist() == [0.25, 0.75]
    assert response.raw_output_contents[1] == b"\x01\0\0\0a\x02\0\0\0bc"


def test_datatype_of_refuses_dtypes_the_protocol_lacks() -> None:
    with pytest.raises(ValueError, match="complex64"):
        datatype_of(np.zeros(1, dtype=np.complex64))
