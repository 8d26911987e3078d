"""The REST (HTTP/JSON) front end: every endpoint with stock tritonclient.http, health and
JSON inference with curl, errors with their HTTP status and message, TLS and the token.

tritonclient and curl run in child processes (tritonclient's generated messages clash with
ours in one process, see test_tritonclient_interop.py); the server runs in the test's loop.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cnnserve.common.repository import DynamicBatching, ModelPolicy
from cnnserve.server.process.settings import Settings
from tests.support.models import ORT_TOLERANCE, linear_expected, write_test_model
from tests.support.rest import curl, make_server_certificate, run_python, start_rest
from tests.support.wire import random_images

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("geventhttpclient") is None,
                       reason="tritonclient[http] is not installed"),
    pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl"),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl"),
]

_TRITON_HTTP = r"""
import json, sys
import numpy as np
import tritonclient.http as h
from tritonclient.utils import InferenceServerException

url, data = sys.argv[1], json.loads(sys.argv[2])
x = np.array(data, dtype=np.float32)
client = h.InferenceServerClient(url)
out = {"live": client.is_server_live(), "ready": client.is_server_ready(),
       "model_ready": client.is_model_ready("linear"),
       "v1_ready": client.is_model_ready("linear", "1"),
       "missing_ready": client.is_model_ready("nope"),
       "server_metadata": client.get_server_metadata(),
       "model_metadata": client.get_model_metadata("linear"),
       "version_metadata": client.get_model_metadata("linear", "1"),
       "model_config": client.get_model_config("linear")}
given = h.InferInput("input", list(x.shape), "FP32")
given.set_data_from_numpy(x)  # binary tensor data (tritonclient's default)
result = client.infer("linear", [given], request_id="req-1")
out["binary"] = result.as_numpy("output").tolist()
out["id"] = result.get_response()["id"]
as_json = h.InferInput("input", list(x.shape), "FP32")
as_json.set_data_from_numpy(x, binary_data=False)
result = client.infer("linear", [as_json], model_version="1",
                      outputs=[h.InferRequestedOutput("output", binary_data=False)])
out["json"] = result.as_numpy("output").tolist()
result = client.infer("linear", [given],
                      outputs=[h.InferRequestedOutput("output", class_count=2)])
out["classes"] = [[item.decode() for item in row] for row in result.as_numpy("output")]
bad = h.InferInput("input", [1, 4, 4], "FP32")
bad.set_data_from_numpy(np.zeros((1, 4, 4), np.float32))
try:
    client.infer("linear", [bad])
except InferenceServerException as exc:
    out["error"] = [exc.status(), exc.message()]
out["stats"] = client.get_inference_statistics("linear")
out["all_stats"] = client.get_inference_statistics()
out["index"] = client.get_model_repository_index()
client.unload_model("linear")
out["after_unload"] = client.is_model_ready("linear")
client.load_model("linear")
out["after_load"] = client.is_model_ready("linear")
try:
    client.load_model("nope")
except InferenceServerException as exc:
    out["load_error"] = [exc.status(), exc.message()]
print(json.dumps(out))
"""


@pytest.fixture
async def rest(wire_server: Any, model_repo: Path) -> Any:
    write_test_model(model_repo, "linear", 1)
    server = await wire_server(model_repo, control_mode="explicit", models=("linear",))
    http = await start_rest(server, Settings(host="127.0.0.1"))
    yield f"127.0.0.1:{http.port}"
    await http.stop()


async def test_tritonclient_http_uses_every_endpoint(rest: str) -> None:
    x = random_images(3, seed=4)
    out = await run_python(_TRITON_HTTP, rest, json.dumps(x.tolist()))

    assert out["live"] and out["ready"] and out["model_ready"] and out["v1_ready"]
    assert not out["missing_ready"]
    assert out["server_metadata"]["name"] == "cnnserve"
    assert {"binary_tensor_data", "statistics", "model_repository"} <= set(
        out["server_metadata"]["extensions"])
    meta = out["model_metadata"]
    assert meta == out["version_metadata"]
    assert meta["versions"] == ["1"] and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 4, 4]}]
    config = out["model_config"]
    assert config["max_batch_size"] == 64 and config["input"][0]["dims"] == [1, 4, 4]
    assert config["input"][0]["data_type"] == "TYPE_FP32"

    expected = linear_expected(x)
    np.testing.assert_allclose(out["binary"], expected, **ORT_TOLERANCE)
    np.testing.assert_allclose(out["json"], expected, **ORT_TOLERANCE)
    assert out["id"] == "req-1"
    labels = ("zero", "one", "two")
    for row, classes in enumerate(out["classes"]):
        best = np.argsort(-expected[row], kind="stable")[:2]
        assert [c.split(":", 2)[1:] for c in classes] == [[str(i), labels[i]] for i in best]
    assert out["error"] == ["400", "model 'linear' input 'input' expects shape [-1,1,4,4], "
                                 "got [1,4,4]"]

    (stats,) = out["stats"]["model_stats"]
    assert (stats["name"], stats["version"]) == ("linear", "1")
    assert stats["inference_count"] == 9 and stats["inference_stats"]["success"]["count"] == 3
    assert out["all_stats"]["model_stats"][0]["name"] == "linear"
    assert out["index"] == [{"name": "linear", "version": "1", "state": "READY", "reason": ""}]
    assert out["after_unload"] is False and out["after_load"] is True
    assert out["load_error"][0] in ("400", "404") and "nope" in out["load_error"][1]


async def test_curl_health_and_json_infer(rest: str) -> None:
    base = f"http://{rest}/v2"
    assert await curl(f"{base}/health/live") == (200, {"live": True})
    assert await curl(f"{base}/health/ready") == (200, {"ready": True})
    assert await curl(f"{base}/models/linear/ready") == (200, {"name": "linear", "ready": True})
    x = random_images(2, seed=8)
    body = {"id": "c1", "inputs": [{"name": "input", "shape": [2, 1, 4, 4], "datatype": "FP32",
                                    "data": x.tolist()}]}  # nested lists, row-major
    status, answer = await curl(f"{base}/models/linear/infer", data=json.dumps(body).encode())
    assert status == 200, answer
    assert answer["id"] == "c1" and answer["model_name"] == "linear"
    (output,) = answer["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("output", "FP32", [2, 3])
    np.testing.assert_allclose(np.reshape(output["data"], (2, 3)), linear_expected(x),
                               **ORT_TOLERANCE)


@pytest.mark.parametrize(("path", "body", "status", "message"), [
    ("models/linear/infer", b"{not json", 400, "not valid JSON"),
    ("models/linear/infer", b"[1, 2]", 400, "JSON object"),
    ("models/linear/infer", json.dumps({"inputs": [{"name": "input", "shape": [1, 4, 4],
                                                    "datatype": "FP32", "data": [0.0] * 16}]}),
     400, "model 'linear' input 'input' expects shape [-1,1,4,4], got [1,4,4]"),
    ("models/linear/infer", json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 4, 4],
                                                    "datatype": "FP32", "data": [0.0] * 3}]}),
     400, "'data' holds 3 elements, shape [1, 1, 4, 4] needs 16"),
    ("models/linear/infer", json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 4, 4],
                                                    "datatype": "FP32", "data": ["a"] * 16}]}),
     400, "FP32 data must be numbers"),
    ("models/nope/infer", json.dumps({"inputs": []}), 400, "non-empty 'inputs'"),
    ("models/nope/infer", json.dumps({"inputs": [{"name": "input", "shape": [1],
                                                  "datatype": "FP32", "data": [1.0]}]}),
     404, "'nope'"),
    ("models/linear/versions/7/infer", json.dumps({"inputs": [{
        "name": "input", "shape": [1], "datatype": "FP32", "data": [1.0]}]}), 404, "7"),
    ("no/such/path", b"{}", 404, "Not Found"),
])
async def test_bad_requests_get_status_and_message(rest: str, path: str, body: Any,
                                                   status: int, message: str) -> None:
    data = body if isinstance(body, bytes) else body.encode()
    got, answer = await curl(f"http://{rest}/v2/{path}", data=data)
    assert got == status, answer
    assert message in answer["error"]


async def test_binary_data_size_beyond_the_body_is_refused(rest: str) -> None:
    header = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 4, 4], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 64}}]}).encode()
    status, answer = await curl(
        f"http://{rest}/v2/models/linear/infer", "-H",
        f"Inference-Header-Content-Length: {len(header)}", data=header + b"\0" * 10)
    assert status == 400 and "binary_data_size" in answer["error"]


async def test_rest_honours_tls_and_the_token(wire_server: Any, model_repo: Path,
                                              tmp_path: Path) -> None:
    write_test_model(model_repo, "linear", 1)
    cert, key, ca = make_server_certificate(tmp_path)
    settings = Settings(host="127.0.0.1", token="s3cret", tls_cert=cert, tls_key=key)
    server = await wire_server(model_repo, settings)
    http = await start_rest(server, settings)
    try:
        base = f"https://127.0.0.1:{http.port}/v2"
        tls = ("--cacert", str(ca))
        assert await curl(f"{base}/health/ready", *tls) == (200, {"ready": True})
        status, answer = await curl(f"{base}/models/linear", *tls)
        assert status == 401 and "bearer token" in answer["error"]
        status, _ = await curl(f"{base}/models/linear", *tls, "-H",
                               "Authorization: Bearer wrong")
        assert status == 401
        status, meta = await curl(f"{base}/models/linear", *tls, "-H",
                                  "Authorization: Bearer s3cret")
        assert status == 200 and meta["name"] == "linear"
        status, _ = await curl(f"http://127.0.0.1:{http.port}/v2/health/live")
        assert status == 0  # plaintext is not served on the TLS port
    finally:
        await http.stop()


async def test_rest_requests_batch_together_and_are_counted(wire_server: Any,
                                                             model_repo: Path) -> None:
    """Four concurrent REST requests go out as one batch (preferred size 4, with a queue
    delay far longer than it takes them to arrive), and REST failures count in the metrics
    like gRPC ones."""
    write_test_model(model_repo, "linear", 1, policy=ModelPolicy(dynamic_batching=DynamicBatching(
        max_queue_delay_microseconds=10_000_000, preferred_batch_size=(4,))))
    server = await wire_server(model_repo)
    http = await start_rest(server, Settings(host="127.0.0.1"))
    try:
        url = f"http://127.0.0.1:{http.port}/v2/models/linear/infer"
        x = random_images(4, seed=2)
        bodies = [json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 4, 4],
                                          "datatype": "FP32", "data": x[i].tolist()}]})
                  for i in range(4)]
        answers = await asyncio.gather(*(curl(url, data=b.encode()) for b in bodies))
        bad = json.dumps({"inputs": [{"name": "input", "shape": [1, 4, 4], "datatype": "FP32",
                                      "data": [0.0] * 16}]})
        assert (await curl(url, data=bad.encode()))[0] == 400
    finally:
        await http.stop()
    for i, (status, answer) in enumerate(answers):
        assert status == 200, answer
        np.testing.assert_allclose(np.reshape(answer["outputs"][0]["data"], (1, 3)),
                                   linear_expected(x[i:i + 1]), **ORT_TOLERANCE)
    (stats,) = server.engine.statistics("linear")
    assert [(b.batch_size, b.compute_infer_count) for b in stats.batch_stats] == [(4, 1)]
    assert server.metrics.registry.get_sample_value(
        "cnnserve_request_failures_total",
        {"model": "linear", "version": "1", "reason": "invalid_argument"}) == 1


async def test_a_body_over_max_message_bytes_is_refused(wire_server: Any,
                                                        model_repo: Path) -> None:
    write_test_model(model_repo, "linear", 1)
    server = await wire_server(model_repo)
    http = await start_rest(server, Settings(host="127.0.0.1", max_message_bytes=1000))
    try:
        status, answer = await curl(f"http://127.0.0.1:{http.port}/v2/models/linear/infer",
                                    data=b" " * 2000)
    finally:
        await http.stop()
    assert status == 413 and "exceeds 1000 bytes" in answer["error"]
