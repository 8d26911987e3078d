"""tritonclient (gRPC) works against cnnserve unchanged: health, metadata, config, inference,
classification, statistics and the repository index.

tritonclient's generated messages share the ``inference`` proto package with ours, so it runs
in a child process (a small script); the server runs in this test's event loop meanwhile.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.support.models import ORT_TOLERANCE, linear_expected, write_test_model
from tests.support.wire import random_images

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tritonclient") is None,
                                reason="tritonclient is not installed")

_SCRIPT = r"""
import json, sys
import numpy as np
import tritonclient.grpc as g
from tritonclient.utils import InferenceServerException

address, data = sys.argv[1], json.loads(sys.argv[2])
x = np.array(data, dtype=np.float32)
client = g.InferenceServerClient(address)
out = {"live": client.is_server_live(), "ready": client.is_server_ready(),
       "model_ready": client.is_model_ready("linear"),
       "server_metadata": client.get_server_metadata(as_json=True),
       "model_metadata": client.get_model_metadata("linear", as_json=True),
       "model_config": client.get_model_config("linear", as_json=True)}
given = g.InferInput("input", list(x.shape), "FP32")
given.set_data_from_numpy(x)
result = client.infer("linear", [given], request_id="req-1",
                      outputs=[g.InferRequestedOutput("output")])
out["output"] = result.as_numpy("output").tolist()
out["id"] = result.get_response().id
result = client.infer("linear", [given], outputs=[g.InferRequestedOutput("output", class_count=2)])
out["classes"] = [[item.decode() for item in row] for row in result.as_numpy("output")]
bad = g.InferInput("input", [1, 4, 4], "FP32")
bad.set_data_from_numpy(np.zeros((1, 4, 4), np.float32))
try:
    client.infer("linear", [bad])
except InferenceServerException as exc:
    out["error"] = [exc.status(), exc.message()]
out["stats"] = client.get_inference_statistics("linear", as_json=True)
out["index"] = client.get_model_repository_index(as_json=True)
print(json.dumps(out))
"""


async def _run_tritonclient(address: str, x: np.ndarray[Any, Any]) -> dict[str, Any]:
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _SCRIPT, address, json.dumps(x.tolist()),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(child.communicate(), 120)
    assert child.returncode == 0, stderr.decode()
    return dict(json.loads(stdout))


async def test_tritonclient_speaks_to_cnnserve(wire_server: Any, model_repo: Path) -> None:
    write_test_model(model_repo, "linear", 1)
    server = await wire_server(model_repo)
    x = random_images(2, seed=11)
    out = await _run_tritonclient(server.address, x)

    assert out["live"] and out["ready"] and out["model_ready"]
    assert out["server_metadata"]["name"] == "cnnserve"
    assert "statistics" in out["server_metadata"]["extensions"]
    meta = out["model_metadata"]
    assert meta["versions"] == ["1"] and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32",
                               "shape": ["-1", "1", "4", "4"]}]
    config = out["model_config"]["config"]
    assert config["max_batch_size"] == 64
    assert config["input"][0]["dims"] == ["1", "4", "4"]
    assert config["input"][0]["data_type"] == "TYPE_FP32"
    assert "dynamic_batching" in config

    np.testing.assert_allclose(out["output"], linear_expected(x), **ORT_TOLERANCE)
    assert out["id"] == "req-1"
    scores = linear_expected(x)
    labels = ("zero", "one", "two")
    for row, classes in enumerate(out["classes"]):
        best = np.argsort(-scores[row], kind="stable")[:2]
        assert [c.split(":", 2)[1:] for c in classes] == [[str(i), labels[i]] for i in best]
    assert out["error"] == ["StatusCode.INVALID_ARGUMENT",
                            "model 'linear' input 'input' expects shape [-1,1,4,4], got [1,4,4]"]

    (stats,) = out["stats"]["model_stats"]
    assert (stats["name"], stats["version"]) == ("linear", "1")
    assert stats["inference_count"] == "4" and stats["inference_stats"]["success"]["count"] == "2"
    assert out["index"]["models"] == [{"name": "linear", "version": "1", "state": "READY"}]
