"""One inference request, protocol message in, protocol message out: the shared request path.

:class:`Inference` is decode -> validate -> ``LoadedModel.infer`` -> encode with metrics, used
by unary ModelInfer, by every request of a ModelStreamInfer stream (streaming.py) and by the
REST endpoint (``cnnserve.server.http``), which turns its JSON/binary body into the same
ModelInferRequest. So all three validate, batch, count and fail identically. Errors are
raised as ServingError subclasses; each front end maps them to its own status.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from cnnserve.proto import grpc_service_pb2 as pb
from cnnserve.server.errors import InvalidRequest, ModelNotReady, ServingError
from cnnserve.server.grpc.classification import classify
from cnnserve.server.grpc.codec import OutputTensor, decode_inputs, encode_outputs
from cnnserve.server.grpc.encoded import decode_images, is_encoded
from cnnserve.server.grpc.validation import (
    RequestedOutput,
    check_declared,
    validate_inputs,
    validate_outputs,
)
from cnnserve.server.telemetry.metrics import UNKNOWN_MODEL, Metrics

if TYPE_CHECKING:
    from cnnserve.server.engine.core import Engine, LoadedModel

TIMEOUT_PARAMETER = "timeout"  # microseconds, as Triton's schedule policy reads it


class Inference:
    """Runs ModelInferRequests on ``engine``, recording each in ``metrics``."""

    def __init__(self, engine: Engine, metrics: Metrics) -> None:
        self._engine = engine
        self._metrics = metrics

    async def infer(self, request: pb.ModelInferRequest,
                    remaining: float | None) -> pb.ModelInferResponse:
        """Answer ``request``; ``remaining`` is the transport's deadline in seconds (or None).

        Raises ServingError (InvalidRequest, ModelNotFound, QueueFull, DeadlineExceeded...)
        with a message for the client.
        """
        started = time.monotonic()
        try:
            model = self._engine.get(request.model_name, request.model_version)
        except ServingError as exc:
            # Only models of the repository (found, not ready) get their own label value;
            # every other name shares one, so clients cannot grow the label set.
            name = request.model_name if isinstance(exc, ModelNotReady) else UNKNOWN_MODEL
            self._metrics.request_started(name, "")
            self._metrics.request_finished(name, "", time.monotonic() - started, exc.reason)
            raise
        name, version = model.name, model.version_label
        self._metrics.request_started(name, version)
        reason: str | None = "internal"
        try:
            # One coroutine for the whole request (no awaited helper): each extra coroutine
            # frame is measurable at thousands of requests per second.
            parameters = request.parameters
            if parameters:
                deadline = request_deadline(parameters, remaining, started)
            else:
                deadline = None if remaining is None else started + remaining
            # Each input's name, datatype and shape are checked before its data is decoded
            # (an encoded-image model takes BYTES for its pixel input: checked after).
            check = (None if model.policy.encoded_images
                     else functools.partial(check_declared, name, model.config))
            if model.bytes_inputs or model.policy.encoded_images:
                # BYTES elements are split one by one in Python: off the event loop, so a
                # large body cannot stall every other client.
                decoded = await asyncio.to_thread(decode_inputs, request, check)
            else:
                decoded = decode_inputs(request, check)
            if decoded and decoded[0].datatype == "BYTES" and is_encoded(model, decoded):
                decoded = await decode_images(model, decoded)  # PNG/JPEG files
            inputs = validate_inputs(name, model.config, decoded)
            requested = validate_outputs(name, model.config, request.outputs)
            results = await model.infer(inputs, [r.name for r in requested] if request.outputs
                                        else (), deadline=deadline)
            response = pb.ModelInferResponse(model_name=name, model_version=version,
                                             id=request.id)
            encode_outputs(response, [_output(model, r, results[r.name]) for r in requested])
            reason = None
            return response
        except ServingError as exc:
            reason = exc.reason
            raise
        except asyncio.CancelledError:
            reason = "cancelled"  # the client went away or its deadline passed
            raise
        finally:
            self._metrics.request_finished(name, version, time.monotonic() - started, reason)


def _output(model: LoadedModel, requested: RequestedOutput,
            data: np.ndarray[Any, Any]) -> OutputTensor:
    if requested.class_count:
        labels = model.labels_for(requested.name)
        if model.config.max_batch_size:
            return OutputTensor(requested.name, "BYTES",
                                classify(data, requested.class_count, labels))
        # A model that does not batch: the whole tensor is one item (Triton answers [k]).
        return OutputTensor(requested.name, "BYTES",
                            classify(data[None], requested.class_count, labels)[0])
    return OutputTensor(requested.name, model.output_datatypes[requested.name], data)


def request_deadline(parameters: Mapping[str, pb.InferParameter], grpc_remaining: float | None,
                     now: float) -> float | None:
    """The sooner of the transport deadline and the ``timeout`` parameter, monotonic seconds.

    ``timeout`` is in microseconds (int64 or uint64), as Triton reads it; 0 means none.
    Returns None when neither is set. Raises InvalidRequest for a malformed timeout.
    """
    deadlines = []
    if grpc_remaining is not None:
        deadlines.append(now + grpc_remaining)
    if TIMEOUT_PARAMETER in parameters:
        param = parameters[TIMEOUT_PARAMETER]
        kind = param.WhichOneof("parameter_choice")
        if kind not in ("int64_param", "uint64_param"):
            raise InvalidRequest("parameter 'timeout' must be an integer number of microseconds")
        micros = param.int64_param if kind == "int64_param" else param.uint64_param
        if micros < 0:
            raise InvalidRequest(f"parameter 'timeout' must be >= 0 microseconds, got {micros}")
        if micros:
            deadlines.append(now + micros / 1e6)
    return min(deadlines) if deadlines else None
