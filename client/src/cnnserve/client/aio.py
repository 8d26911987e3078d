"""The asyncio client: :class:`AsyncInferenceClient`, the twin of the blocking client.

It runs the same flows (:mod:`cnnserve.client._core`) as
:class:`~cnnserve.client.sync.InferenceClient` and only differs in how a step is performed:
awaited on a ``grpc.aio`` channel, and the requests of a split batch sent concurrently.
Each method below is a one-line delegation, documented on the blocking client.

Example::

    async with AsyncInferenceClient("localhost:8001") as client:
        out = await client.infer("fashion", {"input": batch})
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import grpc
import grpc.aio
import numpy as np

from cnnserve.client._channel import TlsConfig, channel_spec
from cnnserve.client._core import Core, Flow, Gather, Rpc, Sleep, T, rpc_error
from cnnserve.client._infer import PixelScaling, Prediction
from cnnserve.client._model import ModelInfo, ModelMetadata, RepositoryModel, ServerMetadata
from cnnserve.client._retry import RetryPolicy, as_policy
from cnnserve.client._tracing import rpc_span
from cnnserve.client.errors import InferenceServerError
from cnnserve.client.sync import DEFAULT_TIMEOUT, InferenceClient
from cnnserve.proto import grpc_service_pb2 as pb
from cnnserve.proto import grpc_service_pb2_grpc as pb_grpc
from cnnserve.proto import model_config_pb2 as mc


class AsyncInferenceClient:
    """Asyncio client; arguments as :class:`~cnnserve.client.sync.InferenceClient`.

    Create it inside a running event loop and close it with ``await client.close()`` or
    ``async with``. A ``timeout=`` argument is the call's gRPC deadline, which the server
    sees and honours, not a local ``asyncio.timeout``.
    """

    def __init__(self, url: str = "localhost:8001", *, timeout: float = DEFAULT_TIMEOUT,
                 tls: bool | TlsConfig = False, token: str | None = None,
                 retries: int | RetryPolicy = 5) -> None:
        spec = channel_spec(url, tls, token)
        self.url = url
        self._core = Core(as_policy(retries), timeout)
        self._target = spec.target
        self._metadata = spec.metadata
        if spec.credentials is None:
            self._channel = grpc.aio.insecure_channel(spec.target, options=spec.options)
        else:
            self._channel = grpc.aio.secure_channel(spec.target, spec.credentials,
                                                    options=spec.options)
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._closed = False

    async def _run(self, flow: Flow[T]) -> T:
        """Perform each step of ``flow``, awaiting I/O; return its value."""
        if self._closed:
            flow.close()
            raise InferenceServerError(grpc.StatusCode.CANCELLED,
                                       f"the client of {self.url} is closed")
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                step = flow.send(value) if error is None else flow.throw(error)
            except StopIteration as stop:
                result: T = stop.value
                return result
            value, error = None, None
            try:
                value = await self._step(step)
            except InferenceServerError as exc:
                error = exc

    async def _step(self, step: Rpc | Sleep | Gather) -> Any:
        if isinstance(step, Rpc):
            method = getattr(self._stub, step.method)
            with rpc_span(step.method, self._target) as context:
                try:
                    return await method(step.request, timeout=step.timeout,
                                        metadata=self._metadata + context)
                except grpc.RpcError as exc:
                    raise rpc_error(exc, step.method, self._target) from None
        if isinstance(step, Sleep):
            await asyncio.sleep(step.seconds)
            return None
        gate = asyncio.Semaphore(max(1, step.limit))

        async def limited(flow: Flow[Any]) -> Any:
            async with gate:
                return await self._run(flow)

        results = await asyncio.gather(*(limited(f) for f in step.flows), return_exceptions=True)
        for item in results:
            if isinstance(item, BaseException):
                raise item
        return results

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._closed = True
        await self._channel.close(None)

    async def __aenter__(self) -> AsyncInferenceClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def live(self) -> bool:
        return await self._run(self._core.live())

    async def ready(self) -> bool:
        return await self._run(self._core.ready())

    async def model_ready(self, model: str, version: str | None = None) -> bool:
        return await self._run(self._core.model_ready(model, version))

    async def server_metadata(self) -> ServerMetadata:
        return await self._run(self._core.server_metadata())

    async def model_metadata(self, model: str, version: str | None = None) -> ModelMetadata:
        return await self._run(self._core.model_metadata(model, version))

    async def model_config(self, model: str, version: str | None = None) -> mc.ModelConfig:
        return await self._run(self._core.model_config(model, version))

    async def model_info(self, model: str, version: str | None = None) -> ModelInfo:
        return await self._run(self._core.model_info(model, version))

    async def infer(self, model: str, inputs: Mapping[str, np.ndarray], *,
                    version: str | None = None, outputs: Sequence[str] | None = None,
                    timeout: float | None = None,  # noqa: ASYNC109 (gRPC deadline)
                    request_id: str = "") -> dict[str, np.ndarray]:
        return await self._run(self._core.infer(model, inputs, version=version, outputs=outputs,
                                                timeout=timeout, request_id=request_id))

    async def classify(self, model: str, images: Any, *, top_k: int = 1,
                       version: str | None = None,
                       timeout: float | None = None,  # noqa: ASYNC109 (gRPC deadline)
                       scaling: PixelScaling | None = None) -> list[list[Prediction]]:
        return await self._run(self._core.classify(model, images, top_k=top_k, version=version,
                                                   timeout=timeout, scaling=scaling))

    async def repository_index(self, *, ready: bool = False) -> list[RepositoryModel]:
        return await self._run(self._core.repository_index(ready))

    async def load(self, model: str, *,
                   timeout: float | None = None) -> None:  # noqa: ASYNC109 (gRPC deadline)
        await self._run(self._core.load(model, timeout))

    async def unload(self, model: str, *,
                     timeout: float | None = None) -> None:  # noqa: ASYNC109 (gRPC deadline)
        await self._run(self._core.unload(model, timeout))

    async def statistics(self, model: str | None = None,
                         version: str | None = None) -> pb.ModelStatisticsResponse:
        return await self._run(self._core.statistics(model, version))


# The twin's methods carry the blocking client's documentation.
for _name, _method in vars(AsyncInferenceClient).items():
    if not _name.startswith("_") and callable(_method) and _method.__doc__ is None:
        _method.__doc__ = getattr(InferenceClient, _name).__doc__
