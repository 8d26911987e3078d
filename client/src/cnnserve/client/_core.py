"""The client's protocol logic, written once for the sync and the asyncio client.

Every SDK call is a *flow*: a generator that yields the I/O it needs as plain steps
(:class:`Rpc`, :class:`Sleep`, :class:`Gather`) and receives their results, and finally
returns the call's value. Request building, validation against metadata, splitting into
max-batch-size requests, retries with backoff and decoding all live here; a client only
*drives* flows: :class:`~cnnserve.client.sync.InferenceClient` performs each step blocking,
:class:`~cnnserve.client.aio.AsyncInferenceClient` awaits it (and runs a :class:`Gather`
concurrently). A failed :class:`Rpc` is thrown back into the flow as
:class:`InferenceServerError`, so retry decisions are made here too.
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf.message import Message

from cnnserve.client import _infer
from cnnserve.client._channel import GRPC_ADDRESS_HINT
from cnnserve.client._model import (
    ModelInfo,
    ModelMetadata,
    RepositoryModel,
    ServerMetadata,
)
from cnnserve.client._retry import RetryPolicy
from cnnserve.client.errors import InferenceServerError
from cnnserve.proto import grpc_service_pb2 as pb
from cnnserve.proto import model_config_pb2 as mc

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Statuses after which a cached model description may be stale (model reloaded or changed).
_STALE_CODES = frozenset({grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT,
                          grpc.StatusCode.FAILED_PRECONDITION})
#: Requests of one split ``infer`` in flight at once (asyncio client).
SPLIT_CONCURRENCY = 4


@dataclass(frozen=True)
class Rpc:
    """Call ``method`` of GRPCInferenceService with ``request`` and a deadline in seconds."""

    method: str
    request: Message
    timeout: float


@dataclass(frozen=True)
class Sleep:
    """Wait ``seconds`` (a retry backoff)."""

    seconds: float


@dataclass(frozen=True)
class Gather:
    """Run sub-flows (concurrently where the driver can, at most ``limit`` at once).

    The result is the list of their values in order; the first failure is raised after all
    have finished.
    """

    flows: tuple[Generator[Step, Any, Any], ...]
    limit: int


Step = Rpc | Sleep | Gather
Flow = Generator[Step, Any, T]


def rpc_error(exc: grpc.RpcError, method: str, target: str) -> InferenceServerError:
    """Convert a grpcio failure (sync or aio) into the SDK's exception."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else "") or str(code.value[1])
    if code == grpc.StatusCode.UNAVAILABLE:
        details = _unavailable_details(details, target)
    return InferenceServerError(code, details, rpc=method)


#: Marks a server that answered but speaks no gRPC: retrying cannot help (see _retry).
NOT_GRPC = "not a gRPC server"


def _unavailable_details(details: str, target: str) -> str:
    """Say which address failed, and what a refused or non-gRPC port probably is."""
    lowered = details.lower()
    if "http/2" in lowered or "http1" in lowered or "http/1" in lowered:
        return (f"{target} is {NOT_GRPC}: it answered plain HTTP (the metrics port, 8002 by "
                f"default, or a REST endpoint?); {GRPC_ADDRESS_HINT} ({details})")
    if "connection refused" in lowered:
        return (f"connection refused by {target}: no server listens there; is `cnnserve "
                f"serve` running with this --grpc-port? ({details})")
    return details if target in details else f"{details} (server {target})"


class Core:
    """Sans-I/O implementation of every SDK call; owns the retry policy and metadata cache.

    ``timeout`` is the default deadline of one attempt of a call, in seconds.
    """

    def __init__(self, policy: RetryPolicy, timeout: float) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be positive seconds, got {timeout}")
        self.policy = policy
        self.timeout = timeout
        self._models: dict[tuple[str, str], ModelInfo] = {}

    # -- the retry loop every call goes through -------------------------------------------

    def call(self, method: str, request: Message, timeout: float | None = None) -> Flow[Any]:
        """One RPC with retries on retryable statuses; returns the response message."""
        attempt = 0
        while True:
            try:
                return (yield Rpc(method, request, timeout or self.timeout))
            except InferenceServerError as exc:
                if not self.policy.should_retry(exc.code, attempt, exc.message):
                    raise
                delay = self.policy.backoff(attempt)
                attempt += 1
                log.debug("%s failed with %s (%s); retry %d/%d in %.2f s", method,
                         exc.code.name, exc.message, attempt, self.policy.retries, delay)
                yield Sleep(delay)

    # -- health and metadata ----------------------------------------------------------------

    def live(self) -> Flow[bool]:
        response = yield from self.call("ServerLive", pb.ServerLiveRequest())
        return bool(response.live)

    def ready(self) -> Flow[bool]:
        response = yield from self.call("ServerReady", pb.ServerReadyRequest())
        return bool(response.ready)

    def model_ready(self, model: str, version: str | None) -> Flow[bool]:
        request = pb.ModelReadyRequest(name=model, version=version or "")
        response = yield from self.call("ModelReady", request)
        return bool(response.ready)

    def server_metadata(self) -> Flow[ServerMetadata]:
        r = yield from self.call("ServerMetadata", pb.ServerMetadataRequest())
        return ServerMetadata(r.name, r.version, tuple(r.extensions))

    def model_metadata(self, model: str, version: str | None) -> Flow[ModelMetadata]:
        request = pb.ModelMetadataRequest(name=model, version=version or "")
        response = yield from self.call("ModelMetadata", request)
        return ModelMetadata.from_proto(response)

    def model_config(self, model: str, version: str | None) -> Flow[mc.ModelConfig]:
        request = pb.ModelConfigRequest(name=model, version=version or "")
        response = yield from self.call("ModelConfig", request)
        config: mc.ModelConfig = response.config
        return config

    def model_info(self, model: str, version: str | None, *,
                   refresh: bool = False) -> Flow[ModelInfo]:
        """Metadata and configuration merged; cached per (model, version) until stale."""
        key = (model, version or "")
        if not refresh and key in self._models:
            return self._models[key]
        meta = yield from self.call("ModelMetadata",
                                    pb.ModelMetadataRequest(name=model, version=key[1]))
        config = yield from self.call("ModelConfig",
                                      pb.ModelConfigRequest(name=model, version=key[1]))
        info = ModelInfo.from_protos(meta, config.config)
        self._models[key] = info
        return info

    def forget(self, model: str) -> None:
        """Drop cached descriptions of ``model`` (after a load, unload or stale answer)."""
        for key in [k for k in self._models if k[0] == model]:
            del self._models[key]

    # -- inference --------------------------------------------------------------------------

    def infer(self, model: str, inputs: Mapping[str, Any], *, version: str | None,
              outputs: Sequence[str] | None, timeout: float | None,
              request_id: str = "") -> Flow[dict[str, np.ndarray]]:
        """Validate, split into max-batch-size requests, send, decode and re-join."""
        info = yield from self.model_info(model, version)
        arrays, batch = _infer.validate_inputs(info, inputs)
        wanted = _infer.validate_outputs(info, outputs)
        chunks = _infer.split_batch(arrays, batch, info.max_batch_size)
        flows = tuple(self._infer_one(info, version or "", c, wanted, timeout, request_id)
                      for c in chunks)
        try:
            if len(flows) == 1:
                return (yield from flows[0])
            parts = yield Gather(flows, SPLIT_CONCURRENCY)
        except InferenceServerError as exc:
            if exc.code in _STALE_CODES:
                self.forget(model)
            raise
        return _infer.concat_outputs(parts)

    def _infer_one(self, info: ModelInfo, version: str, arrays: _infer.Arrays,
                   outputs: Sequence[str], timeout: float | None,
                   request_id: str) -> Flow[dict[str, np.ndarray]]:
        request = _infer.build_request(info, version, arrays, outputs, request_id)
        response = yield from self.call("ModelInfer", request, timeout)
        return _infer.parse_response(response)

    def classify(self, model: str, images: Any, *, top_k: int, version: str | None,
                 timeout: float | None, scaling: _infer.PixelScaling | None = None,
                 ) -> Flow[list[list[_infer.Prediction]]]:
        """Top-k ``(label, probability)`` per image; images as in :func:`images.to_pixels`."""
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        info = yield from self.model_info(model, version)
        from cnnserve.client.images import to_pixels  # Pillow only when classifying

        pixels = to_pixels(images, info.image_shape)
        x = _infer.preprocess(info, pixels, scaling)
        name, wanted = info.image_input.name, _infer.classify_outputs(info)
        if info.max_batch_size > 0:
            outputs = yield from self.infer(model, {name: x}, version=version, outputs=wanted,
                                            timeout=timeout)
        else:  # a model that does not batch takes one image per request
            parts = yield Gather(tuple(
                self.infer(model, {name: x[i:i + 1]}, version=version, outputs=wanted,
                           timeout=timeout) for i in range(len(x))), SPLIT_CONCURRENCY)
            outputs = _infer.concat_outputs(parts)
        return _infer.predictions(info, outputs, top_k)

    # -- repository and statistics ----------------------------------------------------------

    def repository_index(self, ready: bool) -> Flow[list[RepositoryModel]]:
        response = yield from self.call("RepositoryIndex", pb.RepositoryIndexRequest(ready=ready))
        return [RepositoryModel(m.name, m.version, m.state, m.reason) for m in response.models]

    def load(self, model: str, timeout: float | None) -> Flow[None]:
        self.forget(model)
        request = pb.RepositoryModelLoadRequest(model_name=model)
        yield from self.call("RepositoryModelLoad", request, timeout)
        self.forget(model)

    def unload(self, model: str, timeout: float | None) -> Flow[None]:
        self.forget(model)
        request = pb.RepositoryModelUnloadRequest(model_name=model)
        yield from self.call("RepositoryModelUnload", request, timeout)

    def statistics(self, model: str | None,
                   version: str | None) -> Flow[pb.ModelStatisticsResponse]:
        request = pb.ModelStatisticsRequest(name=model or "", version=version or "")
        response: pb.ModelStatisticsResponse = yield from self.call("ModelStatistics", request)
        return response
