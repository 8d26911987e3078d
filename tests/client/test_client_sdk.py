"""The SDK against a real cnnserve server on 127.0.0.1 (and a flaky fake for retries)."""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from cnnserve.client import (
    AsyncInferenceClient,
    InferenceClient,
    InferenceServerError,
    InvalidInputError,
    ModelInfo,
    RetryPolicy,
    TlsConfig,
)
from cnnserve.client._infer import softmax
from tests.support.client import FlakyServicer, ServerThread, start_fake
from tests.support.models import ORT_TOLERANCE, double_expected, linear_expected, write_test_model

FAST = RetryPolicy(retries=5, initial_backoff=0.01, max_backoff=0.05)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("models")
    write_test_model(repo, "linear", 1, max_batch_size=8)
    write_test_model(repo, "double", 1, kind="double")
    write_test_model(repo, "slow", 1, kind="slow", slow_iterations=100_000)
    return repo


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[ServerThread]:
    with ServerThread(repo, control_mode="explicit", models=("linear", "double", "slow")) as s:
        yield s


@pytest.fixture
def client(server: ServerThread) -> Iterator[InferenceClient]:
    with InferenceClient(server.url, timeout=10, retries=FAST) as c:
        yield c


def _pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 1, 4, 4), dtype=np.uint8)


# -- each call ------------------------------------------------------------------------------

def test_health_and_metadata_calls(client: InferenceClient) -> None:
    assert client.live() and client.ready()
    assert client.model_ready("linear") and client.model_ready("linear", "1")
    assert not client.model_ready("nope")
    meta = client.server_metadata()
    assert meta.name == "cnnserve"
    assert {"model_repository", "statistics", "model_configuration"} <= set(meta.extensions)
    linear = client.model_metadata("linear")
    assert (linear.versions, linear.platform) == (("1",), "onnxruntime_onnx")
    assert [(t.name, t.datatype, t.shape) for t in linear.inputs] == [
        ("input", "FP32", (-1, 1, 4, 4))]
    config = client.model_config("linear")
    assert (config.name, config.max_batch_size, list(config.input[0].dims)) == (
        "linear", 8, [1, 4, 4])


def test_infer_returns_numpy_arrays_by_tensor_name(client: InferenceClient) -> None:
    x = np.random.default_rng(1).standard_normal((5, 1, 4, 4)).astype(np.float32)
    out = client.infer("linear", {"input": x})
    assert list(out) == ["output"] and out["output"].dtype == np.float32
    np.testing.assert_allclose(out["output"], linear_expected(x), **ORT_TOLERANCE)
    d = np.arange(6, dtype=np.float32).reshape(3, 2)
    both = client.infer("double", {"x": d}, version="1")
    for name, expected in double_expected(d).items():
        np.testing.assert_array_equal(both[name], expected)
    assert list(client.infer("double", {"x": d}, outputs=["z"])) == ["z"]


def test_a_batch_larger_than_max_batch_size_is_split_and_rejoined(
        client: InferenceClient) -> None:
    before = client.statistics("linear").model_stats[0].inference_count
    x = np.random.default_rng(2).standard_normal((45, 1, 4, 4)).astype(np.float32)
    out = client.infer("linear", {"input": x})  # max_batch_size is 8: six requests
    np.testing.assert_allclose(out["output"], linear_expected(x), **ORT_TOLERANCE)
    stats = client.statistics("linear").model_stats[0]
    assert stats.inference_count - before == 45
    assert max(b.batch_size for b in stats.batch_stats) <= 8


def test_classify_uses_the_models_labels(client: InferenceClient, tmp_path: Path) -> None:
    pixels = _pixels(6)
    result = client.classify("linear", pixels, top_k=2)
    # the linear test model publishes labels but no normalisation: inputs are pixel / 255
    probs = softmax(linear_expected(pixels.astype(np.float32) / np.float32(255)))
    for row, p in zip(result, probs, strict=True):
        order = np.argsort(-p, kind="stable")[:2]
        assert [r.label for r in row] == [("zero", "one", "two")[i] for i in order]
        np.testing.assert_allclose([r.probability for r in row], p[order], **ORT_TOLERANCE)
    Image.fromarray(pixels[0, 0]).save(tmp_path / "photo.png")
    assert client.classify("linear", tmp_path / "photo.png", top_k=2) == result[:1]


def test_repository_index_load_and_unload(client: InferenceClient) -> None:
    index = {(m.name, m.version): m.state for m in client.repository_index()}
    assert index[("double", "1")] == "READY"
    client.unload("double")
    assert not client.model_ready("double")
    with pytest.raises(InferenceServerError) as err:
        client.infer("double", {"x": np.ones((1, 2), np.float32)})
    assert err.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND)
    assert ("double", "1") not in {(m.name, m.version) for m in client.repository_index(ready=True)}
    client.load("double")
    assert client.model_ready("double")
    np.testing.assert_array_equal(client.infer("double", {"x": np.ones((1, 2), np.float32)})["y"],
                                  [[2.0, 2.0]])


# -- validation and error mapping -----------------------------------------------------------

@pytest.mark.parametrize(("inputs", "message"), [
    ({"input": np.zeros((2, 1, 4, 4), np.float64)}, "expects FP32.*got numpy float64"),
    ({"input": np.zeros((1, 4, 4), np.float32)}, r"got shape \[1, 4, 4\].*batch dimension"),
    ({"input": np.zeros((2, 1, 4, 5), np.float32)}, r"shape \[-1, 1, 4, 4\], got shape"),
    ({"inputs": np.zeros((2, 1, 4, 4), np.float32)}, r"missing \['input'\]"),
    ({"input": np.zeros((0, 1, 4, 4), np.float32)}, "batch is empty"),
])
def test_inputs_are_checked_against_metadata_before_sending(
        client: InferenceClient, inputs: dict[str, np.ndarray], message: str) -> None:
    with pytest.raises(InvalidInputError, match=message) as err:
        client.infer("linear", inputs)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(InvalidInputError, match=r"unknown requested outputs \['nope'\]"):
        client.infer("linear", {"input": np.zeros((1, 1, 4, 4), np.float32)}, outputs=["nope"])


def test_server_errors_carry_the_status_and_message(client: InferenceClient) -> None:
    with pytest.raises(InferenceServerError) as err:
        client.model_metadata("nope")
    assert err.value.code == grpc.StatusCode.NOT_FOUND and "nope" in err.value.message
    with pytest.raises(InferenceServerError) as err:
        client.infer("linear", {"input": np.zeros((1, 1, 4, 4), np.float32)}, version="7")
    assert err.value.code == grpc.StatusCode.NOT_FOUND and err.value.rpc == "ModelMetadata"
    # A stale cached signature lets a bad request through: the server's INVALID_ARGUMENT
    # arrives as is (never retried) and the stale cache entry is dropped.
    real = client.model_info("linear")
    fake_input = type(real.metadata.inputs[0])("input", "FP32", (-1, 1, 4, 5))
    client._core._models[("linear", "")] = ModelInfo(
        metadata=type(real.metadata)(real.name, real.metadata.versions, real.metadata.platform,
                                     (fake_input,), real.metadata.outputs),
        max_batch_size=8)
    with pytest.raises(InferenceServerError) as err:
        client.infer("linear", {"input": np.zeros((1, 1, 4, 5), np.float32)})
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.rpc == "ModelInfer" and "input" in err.value.message
    assert client.model_info("linear") == real


def test_a_closed_client_refuses_calls(server: ServerThread) -> None:
    with InferenceClient(server.url) as c:
        assert c.live()
    with pytest.raises(InferenceServerError, match="closed") as err:
        c.live()
    assert err.value.code == grpc.StatusCode.CANCELLED


def test_unreachable_server_is_unavailable_after_retries() -> None:
    policy = RetryPolicy(retries=2, initial_backoff=0.01, max_backoff=0.01)
    with InferenceClient("127.0.0.1:1", timeout=5, retries=policy) as c, \
            pytest.raises(InferenceServerError) as err:
        c.live()
    assert err.value.code == grpc.StatusCode.UNAVAILABLE and "127.0.0.1:1" in str(err.value)


# -- deadlines ------------------------------------------------------------------------------

def test_every_call_carries_a_deadline_and_expiry_is_not_retried(server: ServerThread) -> None:
    x = np.ones((1, 4), np.float32)
    with InferenceClient(server.url, timeout=10, retries=FAST) as c:
        c.model_info("slow")
        started = time.monotonic()
        with pytest.raises(InferenceServerError) as err:
            c.infer("slow", {"x": x}, timeout=0.05)  # the slow model computes for ~1 s
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 0.9


async def test_the_server_sees_the_clients_deadline() -> None:
    fake = FlakyServicer(hang=True)
    server, url = await start_fake(fake)
    try:
        async with AsyncInferenceClient(url, timeout=0.3, retries=FAST) as c:
            with pytest.raises(InferenceServerError) as err:
                await c.live()
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert fake.attempts == {"ServerLive": 1}
        assert 0 < fake.time_remaining[0] <= 0.3
    finally:
        fake.release.set()
        await server.stop(None)


# -- retries --------------------------------------------------------------------------------

@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE,
                                  grpc.StatusCode.RESOURCE_EXHAUSTED])
async def test_retryable_rejections_are_retried_until_the_answer(code: grpc.StatusCode) -> None:
    fake = FlakyServicer(failures=3, code=code)
    server, url = await start_fake(fake)
    try:
        async with AsyncInferenceClient(url, retries=FAST, token="s3cret") as c:
            assert await c.live()
    finally:
        await server.stop(None)
    assert fake.attempts == {"ServerLive": 4}
    assert all(m["authorization"] == "Bearer s3cret" for m in fake.metadata)


async def test_invalid_argument_is_never_retried_and_retries_run_out() -> None:
    fake = FlakyServicer(failures=100, code=grpc.StatusCode.INVALID_ARGUMENT)
    server, url = await start_fake(fake)
    try:
        async with AsyncInferenceClient(url, retries=FAST) as c:
            with pytest.raises(InferenceServerError, match="refused on purpose") as err:
                await c.live()
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert fake.attempts == {"ServerLive": 1}
            fake.code, fake.attempts = grpc.StatusCode.UNAVAILABLE, {}
            with pytest.raises(InferenceServerError) as err:
                await c.live()
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
            assert fake.attempts == {"ServerLive": 1 + FAST.retries}
    finally:
        await server.stop(None)


def test_backoff_grows_exponentially_with_full_jitter() -> None:
    import random

    policy = RetryPolicy(retries=6, initial_backoff=0.1, max_backoff=1.0, rng=random.Random(7))
    for attempt, ceiling in enumerate([0.1, 0.2, 0.4, 0.8, 1.0, 1.0]):
        waits = [policy.backoff(attempt) for _ in range(200)]
        assert min(waits) >= 0 and max(waits) <= ceiling
        assert max(waits) > 0.8 * ceiling and min(waits) < 0.2 * ceiling  # jittered
    assert policy.should_retry(grpc.StatusCode.UNAVAILABLE, 5)
    assert not policy.should_retry(grpc.StatusCode.UNAVAILABLE, 6)
    assert not policy.should_retry(grpc.StatusCode.INVALID_ARGUMENT, 0)
    assert not policy.should_retry(grpc.StatusCode.RESOURCE_EXHAUSTED, 0,
                                   "Received message larger than max (9 vs. 4)")


@dataclass(frozen=True)
class SignallingPolicy(RetryPolicy):
    """A retry policy that tells the test when the first attempt has failed."""

    failed: threading.Event = field(default_factory=threading.Event)

    def backoff(self, attempt: int) -> float:
        self.failed.set()
        return super().backoff(attempt)


def test_a_server_that_is_down_and_then_comes_up(repo: Path) -> None:
    server = ServerThread(repo, models=("linear",)).start()
    server.stop()  # the port is known and nothing listens there now
    policy = SignallingPolicy(retries=30, initial_backoff=0.05, max_backoff=0.2)
    x = np.ones((3, 1, 4, 4), np.float32)
    result: dict[str, Any] = {}

    def call() -> None:
        with InferenceClient(server.url, timeout=5, retries=policy) as c:
            result["out"] = c.infer("linear", {"input": x})

    caller = threading.Thread(target=call)
    caller.start()
    try:
        assert policy.failed.wait(10), "the first attempt never failed"
        server.start()  # same port
        caller.join(30)
    finally:
        server.close()
    np.testing.assert_allclose(result["out"]["output"], linear_expected(x), **ORT_TOLERANCE)


# -- the asyncio client ---------------------------------------------------------------------

async def test_async_client_makes_the_same_calls(server: ServerThread) -> None:
    async with AsyncInferenceClient(server.url, timeout=10, retries=FAST) as c:
        assert await c.live() and await c.ready() and await c.model_ready("linear")
        assert (await c.server_metadata()).name == "cnnserve"
        assert (await c.model_metadata("double")).outputs[1].name == "z"
        assert (await c.model_config("linear")).max_batch_size == 8
        x = np.random.default_rng(3).standard_normal((30, 1, 4, 4)).astype(np.float32)
        outs = await asyncio.gather(*(c.infer("linear", {"input": x[i:]}) for i in range(3)))
        for i, out in enumerate(outs):
            np.testing.assert_allclose(out["output"], linear_expected(x[i:]), **ORT_TOLERANCE)
        top = await c.classify("linear", _pixels(2), top_k=3)
        assert [len(r) for r in top] == [3, 3]
        assert {r.label for r in top[0]} == {"zero", "one", "two"}
        assert {(m.name, m.state) for m in await c.repository_index()} >= {("linear", "READY")}
        assert (await c.statistics("linear")).model_stats[0].inference_count >= 30
        with pytest.raises(InferenceServerError) as err:
            await c.model_metadata("nope")
        assert err.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(InvalidInputError):
            await c.infer("linear", {"input": x.astype(np.float16)})


# -- security -------------------------------------------------------------------------------

def test_bearer_token_is_sent_and_checked(repo: Path) -> None:
    with ServerThread(repo, models=("double",), token="s3cret") as server:
        with InferenceClient(server.url, retries=0) as anonymous, \
                pytest.raises(InferenceServerError) as err:
            anonymous.server_metadata()
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        with InferenceClient(server.url, token="s3cret", retries=0) as c:
            assert c.infer("double", {"x": np.ones((1, 2), np.float32)})["z"].tolist() == [[2, 2]]


def test_tls_with_a_ca_certificate(repo: Path, tmp_path: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=cnnserve.test", "-addext", "subjectAltName=DNS:cnnserve.test",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    with ServerThread(repo, models=("double",), tls_cert=cert, tls_key=key) as server:
        tls = TlsConfig(ca_cert=cert, server_name="cnnserve.test")
        with InferenceClient(server.url, tls=tls, retries=0) as c:
            assert c.live()
        with InferenceClient(server.url, retries=0, timeout=2) as plaintext, \
                pytest.raises(InferenceServerError) as err:
            plaintext.live()
        assert err.value.code == grpc.StatusCode.UNAVAILABLE


# -- the wire encoding ----------------------------------------------------------------------

def test_tensor_encoding_round_trips_raw_bytes_and_typed_contents() -> None:
    from cnnserve.client._codec import decode_output, encode_input
    from cnnserve.proto import grpc_service_pb2 as pb

    words = np.array([["a", "bé"], ["", "xyz"]], dtype=object)
    tensor, raw = encode_input("w", words)
    assert tensor.datatype == "BYTES" and list(tensor.shape) == [2, 2]
    assert raw == b"\x01\x00\x00\x00a\x03\x00\x00\x00b\xc3\xa9\x00\x00\x00\x00\x03\x00\x00\x00xyz"
    out = pb.ModelInferResponse.InferOutputTensor(name="w", datatype="BYTES", shape=[2, 2])
    assert decode_output(out, raw).tolist() == [[b"a", "bé".encode()], [b"", b"xyz"]]
    for dtype in (np.float32, np.float16, np.int64, np.uint8, np.bool_):
        x = (np.arange(6) % 2 if dtype is np.bool_ else np.arange(6)).astype(dtype).reshape(2, 3)
        tensor, raw = encode_input("x", x)
        answer = pb.ModelInferResponse.InferOutputTensor(name="x", datatype=tensor.datatype,
                                                         shape=[2, 3])
        np.testing.assert_array_equal(decode_output(answer, raw), x)
    typed = pb.ModelInferResponse.InferOutputTensor(name="t", datatype="INT32", shape=[3])
    typed.contents.int_contents.extend([1, -2, 3])
    assert decode_output(typed, None).tolist() == [1, -2, 3]
    with pytest.raises(ValueError, match="do not hold"):
        decode_output(answer, raw[:-1])


async def test_retries_are_logged_at_debug_only(caplog: pytest.LogCaptureFixture) -> None:
    fake = FlakyServicer(failures=2, code=grpc.StatusCode.UNAVAILABLE)
    server, url = await start_fake(fake)
    try:
        with caplog.at_level(logging.DEBUG, logger="cnnserve.client"):
            async with AsyncInferenceClient(url, retries=FAST) as c:
                assert await c.live()
    finally:
        await server.stop(None)
    retries = [r for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == 2 and {r.levelno for r in retries} == {logging.DEBUG}
