"""Encoded images: a model whose model.json sets ``encoded_images`` also takes PNG/JPEG files
as a BYTES input, decoded by the server (converted, resized BILINEAR, size-limited)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from cnnserve.common.images import MAX_IMAGE_PIXELS
from cnnserve.common.repository import ModelPolicy
from cnnserve.proto import grpc_service_pb2 as pb
from cnnserve.server.process.settings import Settings
from tests.support.models import ORT_TOLERANCE, pixels_expected, write_test_model
from tests.support.rest import curl, start_rest
from tests.support.wire import call_error, output_array, stub


def _png(pixels: np.ndarray[Any, Any], mode: str = "L") -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels, mode=mode).save(out, format="PNG")
    return out.getvalue()


def _files_request(model: str, files: list[bytes]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="input", datatype="BYTES", shape=[len(files)])
    request.raw_input_contents.append(b"".join(len(f).to_bytes(4, "little") + f for f in files))
    return request


@pytest.fixture
async def server(wire_server: Any, model_repo: Path) -> Any:
    write_test_model(model_repo, "pixels", 1, kind="pixels",
                     policy=ModelPolicy(encoded_images=True))
    write_test_model(model_repo, "plain", 1, kind="pixels")
    return await wire_server(model_repo)


async def test_png_files_give_the_answer_of_their_pixels(server: Any) -> None:
    pixels = np.random.default_rng(1).integers(0, 256, (3, 1, 4, 4), dtype=np.uint8)
    big = np.kron(pixels[2, 0], np.ones((2, 2), np.uint8))  # 8x8: resized to 4x4
    rgb = np.stack([pixels[1, 0]] * 3, axis=-1)  # RGB: converted to grayscale
    files = [_png(pixels[0, 0]), _png(rgb, "RGB"), _png(big)]
    async with server.channel() as channel:
        answer = await stub(channel).ModelInfer(_files_request("pixels", files))
    resized = np.asarray(Image.fromarray(big).resize((4, 4), Image.Resampling.BILINEAR))
    want = np.stack([pixels[0], pixels[1], resized[None]])
    np.testing.assert_allclose(output_array(answer, "output"), pixels_expected(want),
                               **ORT_TOLERANCE)


async def test_a_jpeg_file_is_decoded(server: Any) -> None:
    out = io.BytesIO()
    Image.new("L", (4, 4), 200).save(out, format="JPEG", quality=100)
    async with server.channel() as channel:
        answer = await stub(channel).ModelInfer(_files_request("pixels", [out.getvalue()]))
    np.testing.assert_allclose(output_array(answer, "output"),
                               pixels_expected(np.full((1, 1, 4, 4), 200, np.uint8)),
                               atol=0.5)  # JPEG is lossy, even at quality 100


@pytest.mark.parametrize(("files", "message"), [
    ([b"not an image at all"], "element 0: not a readable PNG or JPEG image"),
    ([_png(np.zeros((4, 4), np.uint8)), _png(np.zeros((4, 4), np.uint8))[:40]],
     "element 1: not a readable PNG or JPEG image"),
])
async def test_a_file_that_is_not_an_image_is_invalid(server: Any, files: list[bytes],
                                                      message: str) -> None:
    async with server.channel() as channel:
        error = await call_error(stub(channel).ModelInfer(_files_request("pixels", files)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.details()


async def test_a_decompression_bomb_is_refused_before_decoding(server: Any) -> None:
    side = int(MAX_IMAGE_PIXELS ** 0.5) + 1
    out = io.BytesIO()
    Image.new("1", (side, side)).save(out, format="PNG")  # a few kB, 16.8 M pixels
    assert len(out.getvalue()) < 100_000
    async with server.channel() as channel:
        error = await call_error(stub(channel).ModelInfer(
            _files_request("pixels", [out.getvalue()])))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"at most {MAX_IMAGE_PIXELS} are decoded" in error.details()


async def test_models_without_the_setting_refuse_bytes_and_say_so(server: Any) -> None:
    async with server.channel() as channel:
        rpc = stub(channel)
        error = await call_error(rpc.ModelInfer(
            _files_request("plain", [_png(np.zeros((4, 4), np.uint8))])))
        assert "expects datatype UINT8, got BYTES" in error.details()
        config = (await rpc.ModelConfig(pb.ModelConfigRequest(name="pixels"))).config
        assert config.parameters["encoded_images"].string_value == "PNG,JPEG"
        plain = (await rpc.ModelConfig(pb.ModelConfigRequest(name="plain"))).config
        assert "encoded_images" not in plain.parameters


async def test_rest_binary_data_carries_image_files(server: Any) -> None:
    pixels = np.arange(16, dtype=np.uint8).reshape(4, 4) * 15
    data = _png(pixels)
    raw = len(data).to_bytes(4, "little") + data
    header = json.dumps({"inputs": [{"name": "input", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": len(raw)}}]}).encode()
    http = await start_rest(server, Settings(host="127.0.0.1"))
    try:
        status, answer = await curl(
            f"http://127.0.0.1:{http.port}/v2/models/pixels/infer", "-H",
            f"Inference-Header-Content-Length: {len(header)}", data=header + raw)
    finally:
        await http.stop()
    assert status == 200, answer
    np.testing.assert_allclose(np.reshape(answer["outputs"][0]["data"], (1, 3)),
                               pixels_expected(pixels[None, None]), **ORT_TOLERANCE)
