"""ModelStreamInfer: many requests on one stream, ids echoed, errors in-band, stream kept open.

The tritonclient test runs tritonclient.grpc's own streaming API (``start_stream`` /
``async_stream_infer``) in a child process (its generated messages share the ``inference``
proto package with ours); the raw-protobuf tests drive the stream from this event loop.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from cnnserve.proto import grpc_service_pb2 as pb
from cnnserve.server.process.settings import Settings
from tests.support.models import ORT_TOLERANCE, linear_expected, write_test_model
from tests.support.wire import call_error, infer_request, output_array, random_images, stub

_TRITON_STREAM = r"""
import json, queue, sys
import grpc
import numpy as np
import tritonclient.grpc as g

address, count, bad_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
x = np.random.default_rng(5).normal(size=(count, 1, 1, 4, 4)).astype(np.float32)
answers = queue.Queue()
client = g.InferenceServerClient(address)
client.start_stream(callback=lambda result, error: answers.put((result, error)))
for i in range(count):
    if i == bad_at:
        given = g.InferInput("input", [1, 4, 4], "FP32")  # rank 3: invalid
        given.set_data_from_numpy(x[i][0])
    else:
        given = g.InferInput("input", [1, 1, 4, 4], "FP32")
        given.set_data_from_numpy(x[i])
    client.async_stream_infer("linear", [given], request_id=f"r{i}",
                              outputs=[g.InferRequestedOutput("output")])
results, errors = {}, []
for _ in range(count):
    result, error = answers.get(timeout=60)
    if error is not None:
        errors.append(error.message())
    else:
        results[result.get_response().id] = result.as_numpy("output").tolist()
client.stop_stream()
print(json.dumps({"results": results, "errors": errors, "inputs": x.tolist()}))
"""

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tritonclient") is None,
                                reason="tritonclient is not installed")


@pytest.fixture
async def server(wire_server: Any, model_repo: Path) -> Any:
    write_test_model(model_repo, "linear", 1)
    return await wire_server(model_repo)


async def test_tritonclient_stream_of_1000_with_an_invalid_request(server: Any) -> None:
    count, bad_at = 1000, 500
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _TRITON_STREAM, server.address, str(count), str(bad_at),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(child.communicate(), 120)
    assert child.returncode == 0, stderr.decode()
    out = json.loads(stdout)

    assert out["errors"] == ["model 'linear' input 'input' expects shape [-1,1,4,4], "
                             "got [1,4,4]"]
    inputs = np.asarray(out["inputs"], np.float32)
    assert sorted(out["results"]) == sorted(f"r{i}" for i in range(count) if i != bad_at)
    for i in range(count):
        if i != bad_at:  # requests after the invalid one were answered on the same stream
            np.testing.assert_allclose(out["results"][f"r{i}"], linear_expected(inputs[i]),
                                       **ORT_TOLERANCE)


async def test_stream_answers_every_request_with_its_id(server: Any) -> None:
    x = random_images(40, seed=3)
    requests = [infer_request("linear", x[i:i + 1], request_id=f"id-{i}") for i in range(40)]
    requests[7] = infer_request("nope", x[:1], request_id="id-7")
    async with server.channel() as channel:
        answers = [r async for r in stub(channel).ModelStreamInfer(iter(requests))]
    by_id = {a.infer_response.id: a for a in answers}
    assert sorted(by_id) == sorted(f"id-{i}" for i in range(40))
    assert "'nope'" in by_id["id-7"].error_message  # unknown model
    for i in range(40):
        if i != 7:
            answer = by_id[f"id-{i}"]
            assert answer.error_message == ""
            np.testing.assert_allclose(output_array(answer.infer_response, "output"),
                                       linear_expected(x[i:i + 1]), **ORT_TOLERANCE)


async def test_stream_stays_open_after_an_error(server: Any) -> None:
    """Request, read its error, then send another on the same stream: it is answered."""
    x = random_images(1, seed=9)
    async with server.channel() as channel:
        call = stub(channel).ModelStreamInfer()
        await call.write(infer_request("linear", x[0], request_id="bad"))
        first = await call.read()
        assert first.infer_response.id == "bad"
        assert "expects shape [-1,1,4,4], got [1,4,4]" in first.error_message
        await call.write(infer_request("linear", x, request_id="good"))
        second = await call.read()
        assert second.error_message == "" and second.infer_response.id == "good"
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF
    failures = server.metrics.registry.get_sample_value(
        "cnnserve_request_failures_total",
        {"model": "linear", "version": "1", "reason": "invalid_argument"})
    assert failures == 1  # stream requests are counted like unary ones


async def test_stream_needs_the_token(wire_server: Any, model_repo: Path) -> None:
    write_test_model(model_repo, "linear", 1)
    server = await wire_server(model_repo, Settings(host="127.0.0.1", token="s3cret"))
    x = random_images(1, seed=1)
    async with server.channel() as channel:
        call = stub(channel).ModelStreamInfer(iter([infer_request("linear", x)]))
        error = await call_error(_drain(call))
    assert error.code().name == "UNAUTHENTICATED"
    async with server.channel() as channel:
        call = stub(channel).ModelStreamInfer(iter([infer_request("linear", x, request_id="a")]),
                                              metadata=(("authorization", "Bearer s3cret"),))
        answers = [a async for a in call]
    assert [a.infer_response.id for a in answers] == ["a"]


async def _drain(call: Any) -> list[pb.ModelStreamInferResponse]:
    return [a async for a in call]
