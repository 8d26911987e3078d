"""Stock tritonclient (gRPC) reads the metadata and config of, and infers on, a Triton
config.pbtxt model and a bare ONNX model; values equal ONNX Runtime in this process.

tritonclient's messages share the ``inference`` proto package with ours, so it runs in a
child process; the server runs in this test's event loop meanwhile.
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

from cnnserve.server.engine.autocomplete import DEFAULT_MAX_BATCH_SIZE
from tests.support.models import ORT_TOLERANCE
from tests.support.third_party import (
    classifier,
    multi_io,
    ort_run,
    write_classifier_repo,
    write_version,
)

_TRITONCLIENT = r"""
import json, sys
import numpy as np
import tritonclient.grpc as g

address, data = sys.argv[1], json.loads(sys.argv[2])
client = g.InferenceServerClient(address)
out = {}
for model, feeds in data.items():
    out[model] = {"metadata": client.get_model_metadata(model, as_json=True),
                  "config": client.get_model_config(model, as_json=True)["config"]}
    inputs = []
    for name, (datatype, values) in feeds.items():
        array = np.array(values, dtype=g.triton_to_np_dtype(datatype))
        given = g.InferInput(name, list(array.shape), datatype)
        given.set_data_from_numpy(array)
        inputs.append(given)
    result = client.infer(model, inputs)
    out[model]["outputs"] = {o["name"]: result.as_numpy(o["name"]).tolist()
                             for o in out[model]["metadata"]["outputs"]}
print(json.dumps(out))
"""


@pytest.mark.skipif(importlib.util.find_spec("tritonclient") is None,
                    reason="tritonclient is not installed")
async def test_stock_tritonclient_reads_and_infers_triton_and_bare_models(
        wire_server: Any, model_repo: Path) -> None:
    write_classifier_repo(model_repo)
    write_version(model_repo, "multi", multi_io())
    server = await wire_server(model_repo)
    rng = np.random.default_rng(6)
    image = rng.normal(size=(2, 3, 4, 4)).astype(np.float32)
    a = rng.normal(size=(2, 3)).astype(np.float32)
    ids = np.array([[-3, 2**40], [0, 7]], np.int64)
    data = {"cls": {"image": ("FP32", image.tolist())},
            "multi": {"a": ("FP32", a.tolist()), "ids": ("INT64", ids.tolist())}}
    # tritonclient's messages share the "inference" package with ours: another process.
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _TRITONCLIENT, server.address, json.dumps(data),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(child.communicate(), 120)
    assert child.returncode == 0, stderr.decode()
    out = json.loads(stdout)

    cls = out["cls"]
    assert cls["config"]["max_batch_size"] == 4
    assert cls["config"]["instance_group"][0]["count"] == 3
    assert cls["config"]["input"][0]["dims"] == ["3", "4", "4"]
    assert cls["metadata"]["inputs"][0]["shape"] == ["-1", "3", "4", "4"]
    np.testing.assert_allclose(cls["outputs"]["scores"],
                               ort_run(classifier(), {"image": image})["scores"],
                               **ORT_TOLERANCE)
    multi = out["multi"]
    assert multi["config"]["max_batch_size"] == DEFAULT_MAX_BATCH_SIZE
    assert [o["datatype"] for o in multi["metadata"]["outputs"]] == ["FP32", "INT64", "BOOL"]
    expected = ort_run(multi_io(), {"a": a, "ids": ids})
    assert multi["outputs"]["twice"] == expected["twice"].tolist()
    assert multi["outputs"]["positive"] == expected["positive"].tolist()
    np.testing.assert_allclose(multi["outputs"]["sum"], expected["sum"], **ORT_TOLERANCE)
