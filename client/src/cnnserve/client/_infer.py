"""Inference requests and answers: validation, batching, encoding, ranking.

Pure functions of numpy arrays and :class:`ModelInfo`, shared by both clients and the batch
job. Inputs are checked against the model's metadata before anything is sent, so a wrong
dtype or shape fails locally with a message naming the model, the tensor, what was expected
and what was given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import grpc
import numpy as np

from cnnserve.client._codec import decode_output, encode_input, numpy_dtype
from cnnserve.client._model import ModelInfo, TensorMetadata
from cnnserve.client.errors import InferenceServerError, InvalidInputError
from cnnserve.common.preprocess import normalize
from cnnserve.proto import grpc_service_pb2 as pb

Arrays = dict[str, np.ndarray]


class Prediction(NamedTuple):
    """One class of a classification: its label and softmax probability (0..1)."""

    label: str
    probability: float


def _expects(info: ModelInfo, spec: TensorMetadata) -> str:
    return f"model '{info.name}' input '{spec.name}' expects {spec.datatype} shape " \
           f"{list(spec.shape)}"


def _check_dtype(info: ModelInfo, spec: TensorMetadata, array: np.ndarray) -> None:
    if spec.datatype == "BYTES":
        if array.dtype.kind not in "OSU":
            raise InvalidInputError(f"{_expects(info, spec)}, got numpy {array.dtype}; pass "
                                    "str or bytes elements")
        return
    want = numpy_dtype(spec.datatype)
    if array.dtype.newbyteorder("<") != want:
        raise InvalidInputError(f"{_expects(info, spec)}, got numpy {array.dtype}; convert "
                                f"with .astype(numpy.{want.name})")


def _check_shape(info: ModelInfo, spec: TensorMetadata, array: np.ndarray) -> None:
    got = list(array.shape)
    ok = len(got) == len(spec.shape) and all(
        e in (-1, g) for e, g in zip(spec.shape, got, strict=True))
    if not ok:
        hint = ""
        if info.max_batch_size > 0 and len(got) == len(spec.shape) - 1:
            hint = " (add the batch dimension first: array[None])"
        raise InvalidInputError(f"{_expects(info, spec)}, got shape {got}{hint}")


def validate_inputs(info: ModelInfo, inputs: Mapping[str, Any]) -> tuple[Arrays, int]:
    """Check ``inputs`` against the model's metadata; return them as arrays and the batch size.

    The batch size is the shared first dimension (0 when the model does not batch). Raises
    :class:`InvalidInputError` for a missing or unknown input, a wrong dtype or shape, inputs
    with different batch sizes, or an empty batch.
    """
    specs = {t.name: t for t in info.metadata.inputs}
    missing = sorted(set(specs) - set(inputs))
    unknown = sorted(set(inputs) - set(specs))
    if missing or unknown:
        raise InvalidInputError(f"model '{info.name}' takes inputs {sorted(specs)}; missing "
                                f"{missing}, unknown {unknown}")
    arrays = {name: np.asarray(value) for name, value in inputs.items()}
    for name, array in arrays.items():
        _check_dtype(info, specs[name], array)
        _check_shape(info, specs[name], array)
    if info.max_batch_size <= 0:
        return arrays, 0
    sizes = {name: int(a.shape[0]) for name, a in arrays.items()}
    if len(set(sizes.values())) != 1:
        raise InvalidInputError(f"model '{info.name}': inputs must share the batch size (first "
                                f"dimension), got {sizes}")
    batch = next(iter(sizes.values()))
    if batch == 0:
        raise InvalidInputError(f"model '{info.name}': the batch is empty (first dimension 0)")
    return arrays, batch


def validate_outputs(info: ModelInfo, outputs: Sequence[str] | None) -> list[str]:
    """Return the requested output names (empty: all); raises for an unknown name."""
    if outputs is None:
        return []
    known = [t.name for t in info.metadata.outputs]
    unknown = [o for o in outputs if o not in known]
    if unknown:
        raise InvalidInputError(f"model '{info.name}' has outputs {known}; unknown requested "
                                f"outputs {unknown}")
    return list(outputs)


def split_batch(arrays: Arrays, batch: int, max_batch_size: int) -> list[Arrays]:
    """Cut inputs of ``batch`` items into consecutive chunks of at most ``max_batch_size``."""
    if max_batch_size <= 0 or batch <= max_batch_size:
        return [arrays]
    return [{name: a[start:start + max_batch_size] for name, a in arrays.items()}
            for start in range(0, batch, max_batch_size)]


def concat_outputs(parts: Sequence[Arrays]) -> Arrays:
    """Join the answers of consecutive chunks along the batch dimension."""
    if len(parts) == 1:
        return parts[0]
    return {name: np.concatenate([p[name] for p in parts], axis=0) for name in parts[0]}


def build_request(info: ModelInfo, version: str, arrays: Arrays, outputs: Sequence[str],
                  request_id: str = "") -> pb.ModelInferRequest:
    """Return a ModelInfer request carrying ``arrays`` as raw contents."""
    specs = {t.name: t for t in info.metadata.inputs}
    request = pb.ModelInferRequest(model_name=info.name, model_version=version, id=request_id)
    for name, array in arrays.items():
        tensor, raw = encode_input(name, array, specs[name].datatype)
        request.inputs.append(tensor)
        request.raw_input_contents.append(raw)
    for name in outputs:
        request.outputs.add(name=name)
    return request


def parse_response(response: pb.ModelInferResponse) -> Arrays:
    """Return the answer's outputs by name; a malformed answer raises ``INTERNAL``."""
    raws = list(response.raw_output_contents)
    if raws and len(raws) != len(response.outputs):
        raise InferenceServerError(
            grpc.StatusCode.INTERNAL, f"malformed response: {len(response.outputs)} outputs but "
            f"{len(raws)} raw_output_contents", rpc="ModelInfer")
    try:
        return {t.name: decode_output(t, raws[i] if raws else None)
                for i, t in enumerate(response.outputs)}
    except ValueError as exc:
        raise InferenceServerError(grpc.StatusCode.INTERNAL, f"malformed response: {exc}",
                                   rpc="ModelInfer") from exc


class PixelScaling(NamedTuple):
    """How to turn uint8 pixels into model input, for models that do not publish it:
    ``(pixel * scale - mean[c]) / std[c]``. None fields fall back to the model's published
    normalisation, then to ``scale`` 1/255, ``mean`` 0 and ``std`` 1."""

    scale: float | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


def preprocess(info: ModelInfo, pixels: np.ndarray,
               scaling: PixelScaling | None = None) -> np.ndarray:
    """The model input for uint8 ``[N, C, H, W]`` pixels.

    A model whose image input is UINT8 (what ``cnnserve export`` writes by default) normalises
    inside its graph: it gets the pixels unchanged. A float model (``--input float`` exports,
    third-party models) gets them normalised with the model's own statistics by
    :func:`cnnserve.common.preprocess.normalize` (the one canonical preprocessing, also used by
    training and ``cnnserve evaluate``) so the server sees bit-identical inputs; without
    published statistics the pixels are only scaled to 0..1. ``scaling`` overrides both (a
    third-party model trained on other pixel ranges).
    """
    if info.image_input.datatype == "UINT8":
        return np.ascontiguousarray(pixels, dtype=np.uint8)
    channels = info.image_shape[0]
    scaling = scaling or PixelScaling()
    mean = scaling.mean or (info.mean if info.mean is not None else (0.0,) * channels)
    std = scaling.std or (info.std if info.std is not None else (1.0,) * channels)
    if scaling.scale is None or scaling.scale == 1 / 255:
        out = normalize(pixels, mean, std)
    else:  # the same float32 steps as normalize(), with another scale than 1/255
        out = _scaled(pixels, scaling.scale, mean, std)
    want = numpy_dtype(info.image_input.datatype)
    return out if out.dtype == want else out.astype(want)


def _scaled(pixels: np.ndarray, scale: float, mean: Sequence[float],
            std: Sequence[float]) -> np.ndarray:
    channels = pixels.shape[1]
    if len(mean) != channels or len(std) != channels or min(std) <= 0:
        raise InvalidInputError(f"--mean/--std need {channels} values (std > 0), got "
                                f"{list(mean)} and {list(std)}")
    shape = (1, channels, 1, 1)
    x = pixels.astype(np.float32) * np.float32(scale)
    out: np.ndarray = (x - np.asarray(mean, np.float32).reshape(shape)) / \
        np.asarray(std, np.float32).reshape(shape)
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of ``[N, K]`` logits, computed in float64."""
    x = logits.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=1, keepdims=True)
    return x


def rank(info: ModelInfo, outputs: Arrays, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the ``top_k`` class indices ``[N, k]`` and their probabilities ``[N, k]``.

    Ordered by the logits, ties broken by the lower index, so column 0 is exactly
    ``argmax(logits)`` (what ``cnnserve evaluate`` predicts). Probabilities come from the
    model's softmax output when it has one, else from a softmax of the logits.
    """
    logits = outputs[info.logits_output].reshape(len(outputs[info.logits_output]), -1)
    probs_name = info.probabilities_output
    probs = (outputs[probs_name].reshape(logits.shape).astype(np.float64)
             if probs_name in outputs and probs_name is not None else softmax(logits))
    k = max(1, min(top_k, logits.shape[1]))
    order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(probs, order, axis=1)


def predictions(info: ModelInfo, outputs: Arrays, top_k: int) -> list[list[Prediction]]:
    """Top-k ``(label, probability)`` per item, best first."""
    order, probs = rank(info, outputs, top_k)
    return [[Prediction(info.label(int(i)), float(p)) for i, p in zip(row, prow, strict=True)]
            for row, prow in zip(order, probs, strict=True)]


def classify_outputs(info: ModelInfo) -> list[str]:
    """The outputs classification needs: the logits and, if the model has it, the softmax."""
    names = [info.logits_output]
    if info.probabilities_output is not None:
        names.append(info.probabilities_output)
    return names
