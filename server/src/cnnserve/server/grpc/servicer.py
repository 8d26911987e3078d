"""The GRPCInferenceService servicer: a thin layer between the protocol and the engine.

Every RPC reads the request, asks the engine, and shapes the answer (messages.py). ModelInfer
is decode -> validate -> ``LoadedModel.infer`` -> encode, with the request's deadline (the
gRPC deadline or the ``timeout`` parameter, whichever is sooner) passed down as a monotonic
time. Errors are raised as ServingError subclasses and turned into statuses by the
interceptor (interceptors.py); nothing here catches them except to count them in metrics.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from cnnserve.common import __version__
from cnnserve.proto import grpc_service_pb2 as pb
from cnnserve.proto import grpc_service_pb2_grpc as pb_grpc
from cnnserve.server.errors import InvalidRequest, ModelNotReady, ServingError, Unsupported
from cnnserve.server.grpc import messages
from cnnserve.server.grpc.classification import classify
from cnnserve.server.grpc.codec import OutputTensor, decode_inputs, encode_outputs
from cnnserve.server.grpc.validation import (
    RequestedOutput,
    check_declared,
    validate_inputs,
    validate_outputs,
)
from cnnserve.server.telemetry.metrics import UNKNOWN_MODEL, Metrics

if TYPE_CHECKING:
    import grpc

    from cnnserve.server.engine.core import Engine, LoadedModel

    Context = grpc.aio.ServicerContext[Any, Any]

SERVER_NAME = "cnnserve"
#: Protocol extensions this server implements, as ServerMetadata lists them.
EXTENSIONS = ("classification", "model_configuration", "model_repository", "statistics")
TIMEOUT_PARAMETER = "timeout"  # microseconds, as Triton's schedule policy reads it
#: Repository parameters accepted and ignored: cnnserve models have no dependents.
_IGNORED_UNLOAD_PARAMETERS = frozenset({"unload_dependents"})


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Serves the protocol from ``engine``; ``on_models_changed`` runs after load/unload."""

    def __init__(self, engine: Engine, metrics: Metrics,
                 on_models_changed: Callable[[], Awaitable[None]] | None = None) -> None:
        self._engine = engine
        self._metrics = metrics
        self._on_models_changed = on_models_changed

    async def ServerLive(self, request: pb.ServerLiveRequest,
                         context: Context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest,
                          context: Context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._engine.ready)

    async def ModelReady(self, request: pb.ModelReadyRequest,
                         context: Context) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self._engine.is_ready(request.name, request.version))

    async def ServerMetadata(self, request: pb.ServerMetadataRequest,
                             context: Context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__,
                                         extensions=EXTENSIONS)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest,
                            context: Context) -> pb.ModelMetadataResponse:
        model = self._engine.get(request.name, request.version)
        versions = sorted((e.version for e in self._engine.index(ready_only=True)
                           if e.name == model.name), key=int)
        return messages.model_metadata(model, versions)

    async def ModelConfig(self, request: pb.ModelConfigRequest,
                          context: Context) -> pb.ModelConfigResponse:
        model = self._engine.get(request.name, request.version)
        return pb.ModelConfigResponse(config=messages.model_config(model))

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest,
                              context: Context) -> pb.ModelStatisticsResponse:
        return messages.statistics(self._engine.statistics(request.name, request.version))

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest,
                              context: Context) -> pb.RepositoryIndexResponse:
        return messages.repository_index(self._engine.index(ready_only=request.ready))

    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest,
                                  context: Context) -> pb.RepositoryModelLoadResponse:
        if request.parameters:
            raise Unsupported(f"RepositoryModelLoad parameters {sorted(request.parameters)} "
                              "are not supported: put the model's files in the repository")
        try:
            await self._engine.load(request.model_name)
        finally:
            await self._models_changed()
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest,
                                    context: Context) -> pb.RepositoryModelUnloadResponse:
        unknown = sorted(set(request.parameters) - _IGNORED_UNLOAD_PARAMETERS)
        if unknown:
            raise Unsupported(f"RepositoryModelUnload parameters {unknown} are not supported")
        try:
            await self._engine.unload(request.model_name)
        finally:
            await self._models_changed()
        return pb.RepositoryModelUnloadResponse()

    async def ModelInfer(self, request: pb.ModelInferRequest,
                         context: Context) -> pb.ModelInferResponse:
        started = time.monotonic()
        remaining = context.time_remaining()
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
            check = functools.partial(check_declared, name, model.config)
            if model.bytes_inputs:
                # BYTES elements are split one by one in Python: off the event loop, so a
                # large body cannot stall every other client.
                tensors = await asyncio.to_thread(decode_inputs, request, check)
            else:
                tensors = decode_inputs(request, check)
            inputs = validate_inputs(name, model.config, tensors)
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
            reason = "cancelled"  # the client went away or its gRPC deadline passed
            raise
        finally:
            self._metrics.request_finished(name, version, time.monotonic() - started, reason)

    async def _models_changed(self) -> None:
        if self._on_models_changed is not None:
            await self._on_models_changed()


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
    """The sooner of the gRPC deadline and the ``timeout`` parameter, in monotonic seconds.

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
