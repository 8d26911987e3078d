"""Checking a decoded request against the model's signature before it reaches the engine.

Everything a client can get wrong (names, datatypes, shapes, rows) is caught here and answered
INVALID_ARGUMENT with a message naming the model, the tensor, what was expected and what
arrived, e.g. ``model 'fashion' input 'input' expects shape [-1,1,28,28], got [1,28,28]``.
The engine trusts names, datatypes and shapes; the batcher re-checks only the row limit,
the one invariant it cannot batch without, so a caller that skips this module (a test, a
future wire layer) gets INVALID_ARGUMENT rather than an oversized ONNX Runtime run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from cnnserve.common.repository import TensorSpec, VersionConfig
from cnnserve.proto import grpc_service_pb2 as pb
from cnnserve.server.errors import InvalidRequest
from cnnserve.server.grpc.codec import InputTensor, format_shape

CLASSIFICATION = "classification"


class RequestedOutput(NamedTuple):
    """An output the client asked for; ``class_count`` > 0 asks for top-k classification.

    A NamedTuple rather than a frozen dataclass: built per request on the hot path.
    """

    name: str
    class_count: int = 0


def validate_inputs(model: str, config: VersionConfig,
                    inputs: Sequence[InputTensor]) -> dict[str, np.ndarray[Any, Any]]:
    """Return the inputs by name once they match ``config``; raise InvalidRequest otherwise.

    Checks, in order: duplicate names, inputs the model lacks, inputs it needs but did not
    get, datatypes, rank and fixed dimensions, batch size (1..max_batch_size) and that every
    input has the same batch size (a model with max_batch_size 0 takes its exact shapes).
    """
    specs_in = config.inputs
    if len(inputs) == 1 and len(specs_in) == 1 and inputs[0].name == specs_in[0].name:
        # The common case (one input, named right) needs only the tensor checks below.
        _check_tensor(model, config, specs_in[0], inputs[0])
        return {specs_in[0].name: inputs[0].data}
    by_name: dict[str, InputTensor] = {}
    for tensor in inputs:
        if tensor.name in by_name:
            raise InvalidRequest(f"model '{model}': input '{tensor.name}' appears twice")
        by_name[tensor.name] = tensor
    specs = {spec.name: spec for spec in config.inputs}
    extra = [name for name in by_name if name not in specs]
    if extra:
        raise InvalidRequest(f"model '{model}' has no input '{extra[0]}'; its inputs are "
                             f"{_names(specs)}")
    missing = [name for name in specs if name not in by_name]
    if missing:
        spec = specs[missing[0]]
        raise InvalidRequest(f"model '{model}' input '{spec.name}' is missing (expects "
                             f"{spec.datatype} {format_shape(spec.shape)})")
    batch_sizes = {name: _check_tensor(model, config, specs[name], tensor)
                   for name, tensor in by_name.items()}
    if len(set(batch_sizes.values())) > 1:
        raise InvalidRequest(f"model '{model}': inputs must share one batch size, got "
                             f"{batch_sizes}")
    return {spec.name: by_name[spec.name].data for spec in config.inputs}


def check_declared(model: str, config: VersionConfig, name: str, datatype: str,
                   shape: tuple[int, ...]) -> None:
    """Check an input's declared name, datatype and shape before its data is decoded.

    The codec calls this (decode_inputs' ``check``) so that nothing of a request the model
    cannot take is decoded. Raises InvalidRequest like :func:`validate_inputs`.
    """
    for spec in config.inputs:
        if spec.name == name:
            _check_declared(model, config, spec, datatype, shape)
            return
    raise InvalidRequest(f"model '{model}' has no input '{name}'; its inputs are "
                         f"{_names(s.name for s in config.inputs)}")


def _check_tensor(model: str, config: VersionConfig, spec: TensorSpec,
                  tensor: InputTensor) -> int:
    """Check one input against its spec; return its batch size."""
    return _check_declared(model, config, spec, tensor.datatype, tensor.shape)


def _check_declared(model: str, config: VersionConfig, spec: TensorSpec, datatype: str,
                    shape: tuple[int, ...]) -> int:
    if datatype != spec.datatype:
        raise InvalidRequest(f"{_where(model, spec)} expects datatype {spec.datatype}, "
                             f"got {datatype}")
    want = spec.shape
    first = 1 if config.max_batch_size else 0  # a model that does not batch: every dim
    fits = len(shape) == len(want) and (shape[first:] == want[first:] or all(
        w in (-1, g) for w, g in zip(want[first:], shape[first:], strict=True)))
    if not fits:
        raise InvalidRequest(f"{_where(model, spec)} expects shape {format_shape(spec.shape)}, "
                             f"got {format_shape(shape)}")
    if not first:
        return 1
    batch = shape[0]
    if batch < 1:
        raise InvalidRequest(f"{_where(model, spec)}: batch size must be at least 1, got "
                             f"shape {format_shape(shape)}")
    if batch > config.max_batch_size:
        raise InvalidRequest(f"{_where(model, spec)}: batch size {batch} exceeds the model's "
                             f"max_batch_size {config.max_batch_size}")
    return batch


def _where(model: str, spec: TensorSpec) -> str:
    return f"model '{model}' input '{spec.name}'"


def validate_outputs(
        model: str, config: VersionConfig,
        requested: Sequence[pb.ModelInferRequest.InferRequestedOutputTensor],
) -> list[RequestedOutput]:
    """The outputs to answer, in answer order: every model output when none were requested.

    Raises InvalidRequest for an output the model lacks, one requested twice, or a
    ``classification`` parameter that is not a positive integer or targets a BYTES output.
    """
    specs = {spec.name: spec for spec in config.outputs}
    if not requested:
        return [RequestedOutput(spec.name) for spec in config.outputs]
    result: list[RequestedOutput] = []
    for output in requested:
        spec = specs.get(output.name)
        if spec is None:
            raise InvalidRequest(f"model '{model}' has no output '{output.name}'; its outputs "
                                 f"are {_names(specs)}")
        if any(r.name == output.name for r in result):
            raise InvalidRequest(f"model '{model}': output '{output.name}' is requested twice")
        count = _class_count(model, spec, output.parameters)
        result.append(RequestedOutput(output.name, count))
    return result


def _class_count(model: str, spec: TensorSpec, params: Mapping[str, pb.InferParameter]) -> int:
    if CLASSIFICATION not in params:
        return 0
    param = params[CLASSIFICATION]
    kind = param.WhichOneof("parameter_choice")
    value = param.int64_param if kind == "int64_param" else param.uint64_param
    where = f"model '{model}' output '{spec.name}'"
    if kind not in ("int64_param", "uint64_param") or value < 1:
        raise InvalidRequest(f"{where}: parameter 'classification' must be a positive integer "
                             "class count")
    if spec.datatype == "BYTES":
        raise InvalidRequest(f"{where}: classification needs a numeric output, not BYTES")
    return value


def _names(names: Any) -> str:
    return "[" + ", ".join(f"'{n}'" for n in names) + "]"
