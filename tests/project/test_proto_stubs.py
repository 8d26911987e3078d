"""The committed protocol stubs are current, and the protocol matches the published spec.

Wire compatibility is what the .proto files are for, so besides the drift check this pins
field numbers from the KServe v2 / Triton spec and compares every kept message, enum and RPC
with the ones tritonclient was generated from (in a separate process: its messages share the
``inference`` package with ours and cannot live in one descriptor pool).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cnnserve.proto import grpc_service_pb2 as pb
from cnnserve.proto import model_config_pb2 as mc
from tests.support.proto_shapes import walk

ROOT = Path(__file__).resolve().parents[2]
PROTO = ROOT / "proto" / "src" / "cnnserve" / "proto"
GENERATED = sorted(p.name for p in PROTO.iterdir() if "_pb2" in p.name)


def test_committed_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out",
                    str(tmp_path)], check=True, capture_output=True, text=True)
    fresh = sorted(p.name for p in tmp_path.iterdir())
    assert fresh == GENERATED, "run scripts/gen_protos.py and commit its outputs"
    stale = [name for name in fresh
             if (tmp_path / name).read_bytes() != (PROTO / name).read_bytes()]
    assert not stale, f"stale generated files {stale}: run scripts/gen_protos.py"


def test_generated_code_imports_through_the_package() -> None:
    text = (PROTO / "grpc_service_pb2.py").read_text(encoding="utf-8")
    assert "from cnnserve.proto import model_config_pb2" in text


@pytest.mark.parametrize(("message", "field", "number"), [
    (pb.InferParameter, "bool_param", 1),
    (pb.InferParameter, "int64_param", 2),
    (pb.InferParameter, "string_param", 3),
    (pb.InferParameter, "double_param", 4),
    (pb.InferParameter, "uint64_param", 5),
    (pb.ModelInferRequest, "id", 3),
    (pb.ModelInferRequest, "parameters", 4),
    (pb.ModelInferRequest, "raw_input_contents", 7),
    (pb.ModelInferResponse, "raw_output_contents", 6),
    (pb.ModelInferRequest.InferInputTensor, "contents", 5),
    (pb.InferTensorContents, "fp32_contents", 6),
    (pb.InferTensorContents, "bytes_contents", 8),
    (pb.ModelStatistics, "batch_stats", 7),
    (pb.StatisticDuration, "ns", 2),
    (pb.ModelStreamInferResponse, "error_message", 1),
    (pb.ModelStreamInferResponse, "infer_response", 2),
    (mc.ModelConfig, "max_batch_size", 4),
    (mc.ModelConfig, "dynamic_batching", 11),
    (mc.ModelInput, "dims", 4),
    (mc.ModelOutput, "dims", 3),
    (mc.ModelDynamicBatching, "max_queue_delay_microseconds", 2),
])
def test_field_numbers_follow_the_spec(message: Any, field: str, number: int) -> None:
    assert message.DESCRIPTOR.fields_by_name[field].number == number


def test_datatype_enum_follows_the_spec() -> None:
    assert (mc.TYPE_BOOL, mc.TYPE_FP32, mc.TYPE_STRING, mc.TYPE_BF16) == (1, 11, 13, 14)


def test_service_has_the_protocol_rpcs() -> None:
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    assert set(service.methods_by_name) == {
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
        "ModelInfer", "ModelStreamInfer", "ModelConfig", "ModelStatistics", "RepositoryIndex",
        "RepositoryModelLoad", "RepositoryModelUnload"}
    stream = service.methods_by_name["ModelStreamInfer"]
    assert stream.client_streaming and stream.server_streaming
    assert stream.output_type.full_name == "inference.ModelStreamInferResponse"


_TRITON_DUMP = """
import json, sys
from tritonclient.grpc import model_config_pb2, service_pb2
sys.path.insert(0, sys.argv[1])
from tests.support.proto_shapes import walk
print(json.dumps({**walk(model_config_pb2.DESCRIPTOR), **walk(service_pb2.DESCRIPTOR)}))
"""


def test_every_kept_element_matches_tritons_proto() -> None:
    if importlib.util.find_spec("tritonclient") is None:  # never import it here: see above
        pytest.skip("tritonclient is not installed")
    done = subprocess.run([sys.executable, "-c", _TRITON_DUMP, str(Path(__file__).parent)],
                          check=True, capture_output=True, text=True)
    triton = json.loads(done.stdout)
    ours = {**walk(mc.DESCRIPTOR), **walk(pb.DESCRIPTOR)}
    missing = sorted(name for name in ours if name not in triton)
    assert not missing, f"not in Triton's protocol: {missing}"
    for name, shape in ours.items():
        theirs = triton[name]
        if isinstance(shape, dict) and "fields" in shape:
            for field, spec in shape["fields"].items():
                assert theirs["fields"].get(field) == spec, f"{name}.{field}"
            for oneof, members in shape["oneofs"].items():
                assert set(members) <= set(theirs["oneofs"][oneof]), f"{name} oneof {oneof}"
        elif isinstance(shape, dict):
            assert shape.items() <= theirs.items(), f"enum {name}"
        else:
            assert shape == theirs, f"rpc {name}"
