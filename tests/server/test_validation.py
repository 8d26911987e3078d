"""Requests are checked against the model's signature with messages a user can act on."""

from __future__ import annotations

import numpy as np
import pytest

from cnnserve.common.repository import TensorSpec, VersionConfig
from cnnserve.proto import grpc_service_pb2 as pb
from cnnserve.server.errors import InvalidRequest
from cnnserve.server.grpc.classification import classify
from cnnserve.server.grpc.codec import InputTensor
from cnnserve.server.grpc.validation import RequestedOutput, validate_inputs, validate_outputs

CONFIG = VersionConfig(
    name="fashion",
    inputs=(TensorSpec("input", "FP32", (-1, 1, 28, 28)),),
    outputs=(TensorSpec("logits", "FP32", (-1, 10)), TensorSpec("probs", "FP32", (-1, 10))),
    max_batch_size=8,
    labels=tuple(f"class{i}" for i in range(10)),
)


def _input(shape: tuple[int, ...], name: str = "input", datatype: str = "FP32") -> InputTensor:
    return InputTensor(name, datatype, shape, np.zeros(shape, dtype=np.float32))


def test_a_matching_request_passes_with_inputs_by_name() -> None:
    inputs = validate_inputs("fashion", CONFIG, [_input((3, 1, 28, 28))])
    assert list(inputs) == ["input"] and inputs["input"].shape == (3, 1, 28, 28)


@pytest.mark.parametrize(("tensors", "message"), [
    ([_input((1, 28, 28))],
     "model 'fashion' input 'input' expects shape [-1,1,28,28], got [1,28,28]"),
    ([_input((1, 3, 28, 28))],
     "model 'fashion' input 'input' expects shape [-1,1,28,28], got [1,3,28,28]"),
    ([_input((1, 1, 28, 28), datatype="FP64")],
     "model 'fashion' input 'input' expects datatype FP32, got FP64"),
    ([_input((9, 1, 28, 28))],
     "model 'fashion' input 'input': batch size 9 exceeds the model's max_batch_size 8"),
    ([_input((0, 1, 28, 28))],
     "model 'fashion' input 'input': batch size must be at least 1, got shape [0,1,28,28]"),
    ([], "model 'fashion' input 'input' is missing (expects FP32 [-1,1,28,28])"),
    ([_input((1, 1, 28, 28)), _input((1,), name="extra")],
     "model 'fashion' has no input 'extra'; its inputs are ['input']"),
    ([_input((1, 1, 28, 28)), _input((1, 1, 28, 28))],
     "model 'fashion': input 'input' appears twice"),
])
def test_each_mismatch_is_named_with_expected_and_got(tensors: list[InputTensor],
                                                      message: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        validate_inputs("fashion", CONFIG, tensors)
    assert str(info.value) == message


def test_inputs_must_share_one_batch_size() -> None:
    config = VersionConfig(name="two", inputs=(TensorSpec("a", "FP32", (-1, 2)),
                                               TensorSpec("b", "FP32", (-1, 2))),
                           outputs=(TensorSpec("y", "FP32", (-1, 2)),))
    with pytest.raises(InvalidRequest, match="must share one batch size"):
        validate_inputs("two", config, [_input((1, 2), "a"), _input((2, 2), "b")])


def _requested(name: str, **params: pb.InferParameter) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest()
    output = request.outputs.add(name=name)
    for key, value in params.items():
        output.parameters[key].CopyFrom(value)
    return request


def test_no_requested_outputs_means_all_in_model_order() -> None:
    assert validate_outputs("fashion", CONFIG, []) == [RequestedOutput("logits"),
                                                       RequestedOutput("probs")]


def test_requested_outputs_keep_request_order_and_class_count() -> None:
    request = _requested("probs", classification=pb.InferParameter(int64_param=3))
    request.outputs.add(name="logits")
    assert validate_outputs("fashion", CONFIG, request.outputs) == [
        RequestedOutput("probs", 3), RequestedOutput("logits")]


@pytest.mark.parametrize(("request_", "message"), [
    (_requested("nope"), "model 'fashion' has no output 'nope'; its outputs are "
                         "['logits', 'probs']"),
    (_requested("probs", classification=pb.InferParameter(int64_param=0)),
     "model 'fashion' output 'probs': parameter 'classification' must be a positive integer"),
    (_requested("probs", classification=pb.InferParameter(string_param="3")),
     "model 'fashion' output 'probs': parameter 'classification' must be a positive integer"),
])
def test_bad_requested_outputs_are_refused(request_: pb.ModelInferRequest,
                                           message: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        validate_outputs("fashion", CONFIG, request_.outputs)
    assert str(info.value).startswith(message)


def test_an_output_requested_twice_is_refused() -> None:
    request = _requested("probs")
    request.outputs.add(name="probs")
    with pytest.raises(InvalidRequest, match="output 'probs' is requested twice"):
        validate_outputs("fashion", CONFIG, request.outputs)


def test_classification_formats_value_index_label_best_first() -> None:
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25]], dtype=np.float32)
    result = classify(scores, 2, ["cat", "dog", "eel"])
    assert result.shape == (2, 2)
    assert result.tolist() == [[b"0.700000:1:dog", b"0.200000:2:eel"],
                               [b"0.500000:0:cat", b"0.250000:1:dog"]]


def test_classification_caps_k_prints_integers_plainly_and_omits_missing_labels() -> None:
    result = classify(np.array([[3, 9]], dtype=np.int32), 5, ["only-first"])
    assert result.tolist() == [[b"9:1", b"3:0:only-first"]]
