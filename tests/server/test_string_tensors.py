"""BYTES tensors reach ONNX Runtime as the text they hold, and come back as the same bytes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from tests.support.wire import stub

STRINGS = [b"item 0", "caf\u00e9".encode(), b""]


def _identity_model(repo: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["text"], ["same"])], "strings",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["N"])],
        [helper.make_tensor_value_info("same", TensorProto.STRING, ["N"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder = repo / "echo" / "1"
    folder.mkdir(parents=True)
    onnx.save_model(model, str(folder / "model.onnx"))


async def test_bytes_elements_round_trip_through_a_string_model(model_repo: Path,
                                                              wire_server: Any) -> None:
    from cnnserve.common.datatypes import decode_bytes, encode_bytes
    from cnnserve.proto import grpc_service_pb2 as pb

    _identity_model(model_repo)
    server = await wire_server(model_repo)
    request = pb.ModelInferRequest(model_name="echo")
    request.inputs.add(name="text", datatype="BYTES", shape=[len(STRINGS)])
    request.raw_input_contents.append(encode_bytes(STRINGS))
    async with server.channel() as channel:
        reply = await stub(channel).ModelInfer(request)
    assert reply.outputs[0].datatype == "BYTES"
    got = decode_bytes(reply.raw_output_contents[0], len(STRINGS))
    assert list(got) == STRINGS  # not "b'item 0'": the text, byte for byte
    assert np.asarray(got).shape == (3,)
