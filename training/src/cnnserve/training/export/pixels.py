"""Build the image preprocessing into an exported graph, so clients send raw pixels.

:func:`add_pixel_input` rewrites a model whose ``input`` is float32 ``[batch, C, H, W]``
(normalised) into one whose ``input`` is UINT8 ``[batch, C, H, W]`` (pixel values 0..255, as
the datasets store images and image files decode), followed inside the graph by exactly
:func:`cnnserve.common.preprocess.normalize`: cast to float32, divide by 255, subtract the
channel mean, divide by the channel std. The same float32 operations in the same order, so
the graph sees bit-for-bit the input training and ``cnnserve evaluate`` give the network, and
a client that sends an image's bytes cannot get the normalisation wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from cnnserve.common.names import INPUT
from cnnserve.training.export.graph import GraphError, save

#: The float32 tensor the network reads once the preprocessing ran.
NORMALIZED = "cnnserve_normalized_input"
_PREFIX = "cnnserve_preprocess_"


def add_pixel_input(path: Path, mean: Sequence[float], std: Sequence[float]) -> None:
    """Replace the float ``input`` of the model at ``path`` with a UINT8 pixel input.

    Raises :class:`GraphError` if the model has no 4-D float32 input named ``input``, the
    normalisation does not have one mean and std per channel, or the result fails the check.
    """
    model = onnx.load(str(path))
    graph = model.graph
    inputs = [value for value in graph.input if value.name == INPUT]
    if len(inputs) != 1 or inputs[0].type.tensor_type.elem_type != TensorProto.FLOAT:
        raise GraphError(f"the graph has no float32 input '{INPUT}' to take pixels instead")
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) != 4 or len(mean) != dims[1].dim_value or len(std) != dims[1].dim_value:
        raise GraphError(f"pixel input needs a [batch, C, H, W] input and one mean and std per "
                         f"channel; got {len(dims)} dimensions, {len(mean)} means, "
                         f"{len(std)} stds")
    for node in graph.node:
        node.input[:] = [NORMALIZED if name == INPUT else name for name in node.input]
    channels = len(mean)
    graph.initializer.extend([
        numpy_helper.from_array(np.array(255, np.float32), _PREFIX + "255"),
        numpy_helper.from_array(np.asarray(mean, np.float32).reshape(1, channels, 1, 1),
                                _PREFIX + "mean"),
        numpy_helper.from_array(np.asarray(std, np.float32).reshape(1, channels, 1, 1),
                                _PREFIX + "std"),
    ])
    steps = [
        helper.make_node("Cast", [INPUT], [_PREFIX + "float"], name=_PREFIX + "cast",
                         to=TensorProto.FLOAT),
        helper.make_node("Div", [_PREFIX + "float", _PREFIX + "255"], [_PREFIX + "unit"],
                         name=_PREFIX + "scale"),
        helper.make_node("Sub", [_PREFIX + "unit", _PREFIX + "mean"], [_PREFIX + "centred"],
                         name=_PREFIX + "centre"),
        helper.make_node("Div", [_PREFIX + "centred", _PREFIX + "std"], [NORMALIZED],
                         name=_PREFIX + "standardise"),
    ]
    nodes = [*steps, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    pixels = helper.make_tensor_value_info(INPUT, TensorProto.UINT8, [
        d.dim_param or d.dim_value for d in dims])
    position = list(graph.input).index(inputs[0])
    graph.input.remove(inputs[0])
    graph.input.insert(position, pixels)
    save(model, path)


def input_datatype(path: Path) -> str:
    """``"UINT8"`` or ``"FP32"``: the protocol datatype of the model's ``input``."""
    for value in onnx.load(str(path)).graph.input:
        if value.name == INPUT:
            return "UINT8" if value.type.tensor_type.elem_type == TensorProto.UINT8 else "FP32"
    raise GraphError(f"the graph has no input '{INPUT}'")
