"""Auto-complete rules on graph signatures alone (no files, no sessions): when a model
batches, with which max_batch_size, and what config.pbtxt's listed tensors change."""

from __future__ import annotations

import pytest

from cnnserve.common.repository import ConfigError, ModelPolicy
from cnnserve.server.engine.autocomplete import DEFAULT_MAX_BATCH_SIZE, complete
from cnnserve.server.engine.triton_config import TritonModel, TritonTensor
from cnnserve.server.runtime.signature import GraphSignature, GraphTensor


def _tensor(name: str, *shape: int, datatype: str = "FP32") -> GraphTensor:
    names = tuple("N" if d == -1 else "" for d in shape)
    onnx_type = {"FP32": "tensor(float)", "INT64": "tensor(int64)"}[datatype]
    return GraphTensor(name, datatype, shape, names, onnx_type)


BATCHED = GraphSignature(inputs=(_tensor("image", -1, 3, 8, 8),),
                         outputs=(_tensor("scores", -1, 10),), graph_name="net")
FIXED = GraphSignature(inputs=(_tensor("image", 1, 3, 8, 8),),
                       outputs=(_tensor("scores", 1, 10),))


def _triton(*tensors: TritonTensor, outputs: tuple[TritonTensor, ...] = (),
            max_batch_size: int = 0) -> TritonModel:
    return TritonModel("m", max_batch_size, tensors, outputs, ModelPolicy())


def test_a_symbolic_first_dimension_batches_with_the_default_or_model_json() -> None:
    done = complete("m", BATCHED)
    assert done.config.max_batch_size == DEFAULT_MAX_BATCH_SIZE
    assert done.config.inputs[0].shape == (-1, 3, 8, 8) and done.config == done.graph
    assert "symbolic first dimension 'N'" in done.notes[0]
    assert complete("m", BATCHED, policy_max_batch_size=8).config.max_batch_size == 8


def test_a_fixed_first_dimension_does_not_batch() -> None:
    done = complete("m", FIXED, policy_max_batch_size=8)
    assert done.config.max_batch_size == 0
    assert done.config.inputs[0].shape == (1, 3, 8, 8)
    assert "model.json's max_batch_size 8 is not used" in done.notes[1]


def test_dims_that_leave_out_the_first_dimension_mean_batching() -> None:
    hint = _triton(TritonTensor("image", "FP32", (3, 8, 8)))
    assert complete("m", BATCHED, hint).config.max_batch_size == DEFAULT_MAX_BATCH_SIZE
    full = _triton(TritonTensor("image", "FP32", (-1, 3, 8, 8)))
    done = complete("m", BATCHED, full)
    assert done.config.max_batch_size == 0 and done.config.inputs[0].shape == (-1, 3, 8, 8)


def test_labels_alone_say_nothing_about_batching_and_stay_with_their_output() -> None:
    labelled = _triton(outputs=(TritonTensor("scores", None, None, labels=("a", "b")),))
    done = complete("m", BATCHED, labelled)
    assert done.config.max_batch_size == DEFAULT_MAX_BATCH_SIZE
    assert done.output_labels == {"scores": ("a", "b")} and done.config.labels == ("a", "b")


def test_config_max_batch_size_on_a_fixed_graph_is_refused() -> None:
    with pytest.raises(ConfigError, match="cannot batch: its input 'image' has a fixed first "
                                          r"dimension \(1\); set max_batch_size: 0"):
        complete("m", FIXED, _triton(max_batch_size=4))


def test_reshape_separates_the_served_and_the_graph_shapes() -> None:
    flat = _triton(TritonTensor("image", None, (192,), reshape=(3, 8, 8)), max_batch_size=4)
    done = complete("m", BATCHED, flat)
    assert done.config.inputs[0].shape == (-1, 192)
    assert done.graph.inputs[0].shape == (-1, 3, 8, 8)
