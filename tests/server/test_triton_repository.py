"""Triton model repositories: config.pbtxt is honoured field by field, or refused by name.

Each test writes a Triton-style model folder (config.pbtxt + <version>/model.onnx, with no
cnnserve file) and checks behaviour over the wire: batching limits, queue size, version
policy, instance count, labels, reshape; and the load errors for fields cnnserve cannot
honour and for configs that disagree with the graph. The last test checks the precedence
of config.pbtxt, model.json and config.json.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from cnnserve.client.aio import AsyncInferenceClient
from cnnserve.common.repository import ModelPolicy
from cnnserve.proto import model_config_pb2 as mc
from cnnserve.server.engine.model_source import load_version, read_model_policy
from cnnserve.server.errors import QueueFull
from cnnserve.server.runtime.ort import RuntimeOptions
from tests.support.models import ORT_TOLERANCE, build_onnx, linear_expected, write_test_model
from tests.support.third_party import (
    CLASSIFIER_LABELS,
    classifier,
    fixed_shape,
    ort_run,
    write_classifier_repo,
    write_pbtxt,
    write_version,
)
from tests.support.wire import eventually, infer_request, output_array, stub


async def test_every_supported_field_is_honoured_and_reported(wire_server: Any,
                                                              model_repo: Path) -> None:
    write_classifier_repo(model_repo)
    server = await wire_server(model_repo)
    assert [(e.version, e.state) for e in server.engine.index()] == [("1", "READY"),
                                                                     ("3", "READY")]
    model = server.engine.get("cls")
    assert model.version == 3 and model.instance_count == 3
    async with AsyncInferenceClient(server.address) as client:
        config = await client.model_config("cls")
        info = await client.model_info("cls")
    assert config.max_batch_size == 4
    assert config.version_policy.specific.versions == [1, 3]
    assert config.default_model_filename == "net.onnx"
    assert list(config.dynamic_batching.preferred_batch_size) == [2, 4]
    assert config.dynamic_batching.max_queue_delay_microseconds == 250
    assert config.dynamic_batching.default_queue_policy.max_queue_size == 3
    assert [(g.count, g.kind) for g in config.instance_group] == [
        (3, mc.ModelInstanceGroup.KIND_CPU)]
    assert config.input[0].format == mc.ModelInput.FORMAT_NCHW
    assert config.parameters["config_source"].string_value == "config.pbtxt"
    assert info.labels == ("cat", "dog", "", "fox", "owl")
    assert info.mean == (0.5, 0.5, 0.5) and info.std == (0.25, 0.25, 0.25)

    x = np.random.default_rng(4).normal(size=(5, 3, 4, 4)).astype(np.float32)
    async with server.channel() as channel:
        too_many = infer_request("cls", x, "image")
        with pytest.raises(grpc.aio.AioRpcError, match="exceeds the model's max_batch_size 4"):
            await stub(channel).ModelInfer(too_many)
        request = infer_request("cls", x[:3], "image", outputs=["scores"], class_count=2)
        classes = output_array(await stub(channel).ModelInfer(request), "scores")
    scores = ort_run(classifier(), {"image": x[:3]})["scores"]
    labels = CLASSIFIER_LABELS.splitlines()
    for row, items in enumerate(classes):
        best = np.argsort(-scores[row], kind="stable")[:2]
        assert [i.decode().split(":", 1)[1] for i in items] == [f"{b}:{labels[b]}" for b in best]


async def test_the_queue_size_of_config_pbtxt_rejects_at_once(wire_server: Any,
                                                              model_repo: Path) -> None:
    folder = model_repo / "slow" / "1"
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(build_onnx("slow", slow_iterations=20000))
    write_pbtxt(model_repo, "slow", """
        backend: "onnxruntime"
        max_batch_size: 8
        dynamic_batching { default_queue_policy { max_queue_size: 1 } }
        instance_group [ { count: 1 kind: KIND_CPU } ]
    """)
    server = await wire_server(model_repo)
    model = server.engine.get("slow")
    x = np.ones((1, 4), np.float32)
    running = asyncio.ensure_future(model.infer({"x": x}))
    queued = asyncio.ensure_future(model.infer({"x": x}))
    await asyncio.sleep(0)  # the first runs (about 0.1 s), the second waits behind it
    with pytest.raises(QueueFull, match="max_queue_size 1"):
        await model.infer({"x": x})
    for result in await asyncio.gather(running, queued):
        np.testing.assert_array_equal(result["y"], x)


@pytest.mark.parametrize(("policy", "served"), [
    ("", ["3"]),
    ("version_policy: { latest: { num_versions: 2 } }", ["2", "3"]),
    ("version_policy: { all: {} }", ["1", "2", "3"]),
    ("version_policy: { specific: { versions: [ 2 ] } }", ["2"]),
])
async def test_version_policy(wire_server: Any, model_repo: Path, policy: str,
                              served: list[str]) -> None:
    for version in (1, 2, 3):
        write_version(model_repo, "fixed", fixed_shape(), version)
    write_pbtxt(model_repo, "fixed", policy)
    server = await wire_server(model_repo)
    assert [e.version for e in server.engine.index(ready_only=True)] == served


async def test_reshape_maps_client_shapes_to_the_graphs(wire_server: Any,
                                                        model_repo: Path) -> None:
    folder = model_repo / "flat" / "1"
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(build_onnx("linear"))
    write_pbtxt(model_repo, "flat", """
        max_batch_size: 8
        input [ { name: "input" data_type: TYPE_FP32 dims: [ 16 ]
                  reshape: { shape: [ 1, 4, 4 ] } } ]
        output [ { name: "output" data_type: TYPE_FP32 dims: [ 3, 1 ] reshape: { shape: [ 3 ] } } ]
    """)
    server = await wire_server(model_repo)
    x = np.random.default_rng(5).normal(size=(2, 16)).astype(np.float32)
    async with AsyncInferenceClient(server.address) as client:
        meta = await client.model_metadata("flat")
        assert [t.shape for t in (*meta.inputs, *meta.outputs)] == [(-1, 16), (-1, 3, 1)]
        out = await client.infer("flat", {"input": x})
    np.testing.assert_allclose(out["output"], linear_expected(x.reshape(2, 1, 4, 4))[..., None],
                               **ORT_TOLERANCE)


@pytest.mark.parametrize(("text", "message"), [
    ("sequence_batching { }", "field 'sequence_batching' is not supported"),
    ("ensemble_scheduling { }", "field 'ensemble_scheduling' is not supported"),
    ("optimization { execution_accelerators { } }", "field 'optimization' is not supported"),
    ("model_warmup [ { name: \"w\" } ]", "field 'model_warmup' is not supported"),
    ("input [ { name: \"x\" optional: true } ]", "field 'optional' is not supported"),
    ("instance_group [ { kind: KIND_MODEL } ]", "instance_group kind KIND_MODEL"),
    ("instance_group [ { kind: KIND_GPU gpus: [ 1 ] } ]", "instance_group.gpus"),
    ("dynamic_batching { default_queue_policy { timeout_action: DELAY } }",
     "only max_queue_size is supported"),
    ("dynamic_batching { preserve_ordering: true }", "preserve_ordering is not supported"),
    ("parameters { key: \"execution_mode\" value: { string_value: \"1\" } }",
     "parameters ['execution_mode']"),
    ("platform: \"tensorrt_plan\"", "platform 'tensorrt_plan'"),
    ("name: \"other\"", "name 'other' differs from the model folder's name 'fixed'"),
    ("input [ { name: \"x\" data_type: TYPE_INT32 dims: [ 3, 5 ] } ]",
     "config.pbtxt and the graph disagree on input 'x': config.pbtxt has dims [3, 5], the "
     "graph has shape [3, 4]"),
    ("input [ { name: \"x\" data_type: TYPE_FP32 dims: [ 3, 4 ] } ]",
     "config.pbtxt and the graph disagree on input 'x': config.pbtxt has data_type FP32, "
     "the graph has INT32"),
    ("output [ { name: \"nope\" dims: [ 4 ] } ]", "config.pbtxt lists outputs ['nope'] that "
     "the graph does not have; the graph's outputs are ['total', 'scaled']"),
    ("max_batch_size: 4", "config.pbtxt sets max_batch_size 4 but the graph cannot batch: its "
     "input 'x' has a fixed first dimension (3); set max_batch_size: 0"),
    ("output [ { name: \"total\" label_filename: \"missing.txt\" } ]",
     "label_filename"),
])
async def test_unsupported_fields_and_disagreements_fail_the_load_by_name(
        wire_server: Any, model_repo: Path, text: str, message: str) -> None:
    write_version(model_repo, "fixed", fixed_shape())
    write_pbtxt(model_repo, "fixed", text)
    server = await wire_server(model_repo)
    (entry,) = server.engine.index()
    assert entry.state == "UNAVAILABLE"
    assert "config.pbtxt" in entry.reason
    assert message in entry.reason


async def test_kind_gpu_asks_for_cuda(wire_server: Any, model_repo: Path) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this test needs a machine without CUDA")
    write_version(model_repo, "fixed", fixed_shape())
    write_pbtxt(model_repo, "fixed", "instance_group [ { kind: KIND_GPU } ]")
    server = await wire_server(model_repo)
    (entry,) = server.engine.index()
    assert entry.state == "UNAVAILABLE" and "device 'cuda' was requested" in entry.reason


async def test_config_pbtxt_beats_model_json_and_config_json_beats_both_for_the_signature(
        wire_server: Any, model_repo: Path) -> None:
    write_test_model(model_repo, "m", 1, max_batch_size=64,
                     policy=ModelPolicy(instance_count=5, version_policy={"latest": 1}))
    write_test_model(model_repo, "m", 2, max_batch_size=64)
    write_pbtxt(model_repo, "m", """
        max_batch_size: 2
        instance_group [ { count: 2 } ]
        version_policy: { all: {} }
        input [ { name: "input" dims: [ 1, 4, 4 ] } ]
    """)
    server = await wire_server(model_repo)
    assert [e.version for e in server.engine.index(ready_only=True)] == ["1", "2"]
    model = server.engine.get("m")
    assert model.source.origin == "config.json"  # labels and tensors from export's file
    assert model.config.labels == ("zero", "one", "two")
    assert model.config.max_batch_size == 2  # config.pbtxt caps it
    assert model.instance_count == 2  # config.pbtxt's, not model.json's 5
    async with server.channel() as channel:
        with pytest.raises(grpc.aio.AioRpcError, match="max_batch_size 2"):
            await stub(channel).ModelInfer(infer_request("m", np.zeros((3, 1, 4, 4),
                                                                       np.float32)))



async def test_poll_mode_reloads_when_config_pbtxt_changes(wire_server: Any,
                                                           model_repo: Path) -> None:
    write_version(model_repo, "cls", classifier())
    write_pbtxt(model_repo, "cls", "max_batch_size: 4")
    server = await wire_server(model_repo, control_mode="poll", poll_interval_s=0.05)
    assert server.engine.get("cls").config.max_batch_size == 4
    write_pbtxt(model_repo, "cls", "max_batch_size: 2\ninstance_group [ { count: 1 } ]")
    await eventually(lambda: server.engine.get("cls").config.max_batch_size == 2,
                     what="the new config.pbtxt to be served")
    assert server.engine.get("cls").instance_count == 1


def test_thread_parameters_set_the_session_threads(model_repo: Path) -> None:
    write_version(model_repo, "fixed", fixed_shape())
    write_pbtxt(model_repo, "fixed", """
        parameters { key: "intra_op_thread_count" value: { string_value: "3" } }
        parameters { key: "inter_op_thread_count" value: { string_value: "2" } }
        parameters { key: "team" value: { string_value: "vision" } }
    """)
    folder = model_repo / "fixed"
    source, runtime = load_version("fixed", folder / "1", read_model_policy(folder),
                                   RuntimeOptions(), "model 'fixed' version 1")
    options = runtime._session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (3, 2)
    assert source.parameters["team"] == "vision"  # passed through to ModelConfig
