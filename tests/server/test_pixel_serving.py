"""An exported pixel-input model answers every protocol exactly as ``cnnserve evaluate`` does.

The Fashion-MNIST test images go, as their raw UINT8 bytes, through tritonclient.grpc,
tritonclient.http with JSON and with binary tensor data, and a raw-protobuf gRPC call; each
path's argmax must equal :func:`evaluate_onnx`'s prediction for every image. The fast test
serves a model trained for a moment on the synthetic dataset (same 1x28x28 shape) and sends
1,000 images; the slow one trains on Fashion-MNIST itself and sends all 10,000.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cnnserve.common.data.datasets import DatasetError, load_split
from cnnserve.proto import grpc_service_pb2 as pb
from cnnserve.server.process.settings import Settings
from tests.support.rest import run_python, start_rest
from tests.support.wire import output_array, stub


def _fashion_missing() -> str | None:
    try:
        load_split("fashion-mnist", "test")
    except DatasetError as exc:
        return str(exc)
    return None


_MISSING = _fashion_missing()
pytestmark = [
    pytest.mark.skipif(_MISSING is not None, reason=f"Fashion-MNIST missing: {_MISSING}"),
    pytest.mark.skipif(importlib.util.find_spec("geventhttpclient") is None,
                       reason="tritonclient[http] is not installed"),
]
BATCH = 100
SMALL_SPEC = "conv(8, 5, pad=2) -> relu -> maxpool(4) -> fc(10)"

_CLIENTS = r"""
import json, sys
import numpy as np
import tritonclient.grpc as g
import tritonclient.http as h

grpc_url, http_url, path, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
images = np.load(path)
out = {"grpc": [], "http_binary": [], "http_json": []}
grpc_client, http_client = g.InferenceServerClient(grpc_url), h.InferenceServerClient(http_url)
for start in range(0, len(images), batch):
    chunk = images[start:start + batch]
    given = g.InferInput("input", list(chunk.shape), "UINT8")
    given.set_data_from_numpy(chunk)
    result = grpc_client.infer("fashion", [given], outputs=[g.InferRequestedOutput("logits")])
    out["grpc"] += result.as_numpy("logits").argmax(1).tolist()
    for kind, binary in (("http_binary", True), ("http_json", False)):
        given = h.InferInput("input", list(chunk.shape), "UINT8")
        given.set_data_from_numpy(chunk, binary_data=binary)
        result = http_client.infer("fashion", [given], outputs=[
            h.InferRequestedOutput("logits", binary_data=binary)])
        out[kind] += result.as_numpy("logits").argmax(1).tolist()
print(json.dumps(out))
"""


def _export(tmp: Path, dataset: str, epochs: int) -> Path:
    from cnnserve.training.export.exporter import ExportOptions, export_checkpoint
    from tests.support.export import make_checkpoint

    ckpt = make_checkpoint(tmp / "model.pt", dataset=dataset, epochs=epochs, spec=SMALL_SPEC)
    repo = tmp / "models"
    result = export_checkpoint(ckpt, repo, "fashion", max_batch_size=BATCH,
                               options=ExportOptions(verify_images=64))
    assert result.config.inputs[0].datatype == "UINT8"
    return repo


async def _check_every_path(wire_server: Any, repo: Path, images: np.ndarray[Any, Any],
                            tmp: Path) -> None:
    from cnnserve.training.train.evaluate import evaluate_onnx

    expected = evaluate_onnx(repo / "fashion" / "1", images).tolist()
    assert len(set(expected)) > 1  # a model that always answers one class proves nothing
    server = await wire_server(repo)
    http = await start_rest(server, Settings(host="127.0.0.1"))
    try:
        np.save(tmp / "images.npy", images)
        out = await run_python(_CLIENTS, server.address, f"127.0.0.1:{http.port}",
                               str(tmp / "images.npy"), str(BATCH), timeout_s=600)
        raw = []
        async with server.channel() as channel:
            rpc = stub(channel)
            for start in range(0, len(images), BATCH):
                chunk = np.ascontiguousarray(images[start:start + BATCH])
                request = pb.ModelInferRequest(model_name="fashion")
                request.inputs.add(name="input", datatype="UINT8", shape=chunk.shape)
                request.raw_input_contents.append(chunk.tobytes())
                request.outputs.add(name="logits")
                answer = await rpc.ModelInfer(request)
                raw += output_array(answer, "logits").argmax(1).tolist()
    finally:
        await http.stop()
    for kind in ("grpc", "http_binary", "http_json"):
        assert out[kind] == expected, kind
    assert raw == expected


async def test_1000_fashion_images_as_pixels_match_evaluate(wire_server: Any,
                                                            tmp_path: Path) -> None:
    repo = _export(tmp_path, "synthetic", epochs=1)
    images = load_split("fashion-mnist", "test").images[:1000]
    await _check_every_path(wire_server, repo, images, tmp_path)


@pytest.mark.slow
async def test_all_fashion_test_images_as_pixels_match_evaluate(wire_server: Any,
                                                                tmp_path: Path) -> None:
    repo = _export(tmp_path, "fashion-mnist", epochs=1)
    images = load_split("fashion-mnist", "test").images
    await _check_every_path(wire_server, repo, images, tmp_path)
