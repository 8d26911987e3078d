"""The GRPCInferenceService servicer: a thin layer between the protocol and the engine.

Every RPC reads the request, asks the engine, and shapes the answer (messages.py). ModelInfer
is decode -> validate -> ``LoadedModel.infer`` -> encode (inference.py, shared with the stream
and REST), with the request's deadline (the gRPC deadline or the ``timeout`` parameter,
whichever is sooner) passed down as a monotonic time; ModelStreamInfer runs each request of
its stream the same way (streaming.py). Errors are raised as ServingError subclasses and
turned into statuses by the interceptor (interceptors.py); nothing here catches them except
to count them in metrics.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from cnnserve.common import __version__
from cnnserve.proto import grpc_service_pb2 as pb
from cnnserve.proto import grpc_service_pb2_grpc as pb_grpc
from cnnserve.server.errors import Unsupported
from cnnserve.server.grpc import messages
from cnnserve.server.grpc.inference import Inference
from cnnserve.server.grpc.streaming import answer_stream
from cnnserve.server.telemetry.metrics import Metrics

if TYPE_CHECKING:
    import grpc

    from cnnserve.server.engine.core import Engine

    Context = grpc.aio.ServicerContext[Any, Any]

SERVER_NAME = "cnnserve"
#: Protocol extensions this server implements, as ServerMetadata lists them.
EXTENSIONS = ("classification", "model_configuration", "model_repository", "statistics",
              "binary_tensor_data")
#: Repository parameters accepted and ignored: cnnserve models have no dependents.
_IGNORED_UNLOAD_PARAMETERS = frozenset({"unload_dependents"})


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Serves the protocol from ``engine``; ``on_models_changed`` runs after load/unload."""

    def __init__(self, engine: Engine, metrics: Metrics,
                 on_models_changed: Callable[[], Awaitable[None]] | None = None) -> None:
        self._engine = engine
        self._metrics = metrics
        self._on_models_changed = on_models_changed
        self._inference = Inference(engine, metrics)

    @property
    def inference(self) -> Inference:
        """The shared inference path (the REST front end serves its requests with it)."""
        return self._inference

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
        return await self._inference.infer(request, context.time_remaining())

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[pb.ModelInferRequest],
                               context: Context) -> AsyncIterator[pb.ModelStreamInferResponse]:
        # An async generator itself: grpc.aio tells streaming handlers apart by their kind.
        async for response in answer_stream(self._inference, request_iterator):
            yield response

    async def _models_changed(self) -> None:
        if self._on_models_changed is not None:
            await self._on_models_changed()

