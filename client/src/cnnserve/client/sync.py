"""The blocking client: :class:`InferenceClient`.

Example::

    from cnnserve.client import InferenceClient

    with InferenceClient("localhost:8001") as client:
        print(client.classify("fashion", "shoe.jpg", top_k=3)[0])
        out = client.infer("fashion", {"input": batch})  # float32 [N, 1, 28, 28]

Every method raises :class:`~cnnserve.client.errors.InferenceServerError` on failure, with the
gRPC status in ``code``; calls use a real gRPC deadline (``timeout`` seconds per attempt) and
retry only ``UNAVAILABLE`` / ``RESOURCE_EXHAUSTED`` with jittered exponential backoff.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import grpc
import numpy as np

from cnnserve.client._channel import TlsConfig, channel_spec
from cnnserve.client._core import Core, Flow, Gather, Rpc, Sleep, T, rpc_error
from cnnserve.client._infer import PixelScaling, Prediction
from cnnserve.client._model import ModelInfo, ModelMetadata, RepositoryModel, ServerMetadata
from cnnserve.client._retry import RetryPolicy, as_policy
from cnnserve.client._tracing import rpc_span
from cnnserve.client.errors import InferenceServerError
from cnnserve.proto import grpc_service_pb2 as pb
from cnnserve.proto import grpc_service_pb2_grpc as pb_grpc
from cnnserve.proto import model_config_pb2 as mc

DEFAULT_TIMEOUT = 30.0


class InferenceClient:
    """A connection to a cnnserve (or any KServe v2 / Triton) gRPC server.

    ``url``: ``host:port``, or ``grpcs://host:port`` for TLS. ``timeout``: default deadline of
    each attempt of a call, seconds. ``tls``: True for TLS with the system's roots, or a
    :class:`TlsConfig` (CA, client certificate for mutual TLS). ``token``: bearer token sent
    with every call. ``retries``: extra attempts on retryable statuses, or a
    :class:`RetryPolicy`. Use as a context manager (or call :meth:`close`).
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
            self._channel = grpc.insecure_channel(spec.target, options=spec.options)
        else:
            self._channel = grpc.secure_channel(spec.target, spec.credentials,
                                                options=spec.options)
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._closed = False

    # -- the driver -------------------------------------------------------------------------

    def _run(self, flow: Flow[T]) -> T:
        """Perform each step of ``flow`` blocking; return its value."""
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
                value = self._step(step)
            except InferenceServerError as exc:
                error = exc

    def _step(self, step: Rpc | Sleep | Gather) -> Any:
        if isinstance(step, Rpc):
            method = getattr(self._stub, step.method)
            with rpc_span(step.method, self._target) as context:
                try:
                    return method(step.request, timeout=step.timeout,
                                  metadata=self._metadata + context)
                except grpc.RpcError as exc:
                    raise rpc_error(exc, step.method, self._target) from None
        if isinstance(step, Sleep):
            time.sleep(step.seconds)
            return None
        return [self._run(flow) for flow in step.flows]

    # -- lifecycle --------------------------------------------------------------------------

    def close(self) -> None:
        """Close the channel; calls after this fail."""
        self._closed = True
        self._channel.close()

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- calls ------------------------------------------------------------------------------

    def live(self) -> bool:
        """Whether the server process is alive."""
        return self._run(self._core.live())

    def ready(self) -> bool:
        """Whether the server is ready for inference."""
        return self._run(self._core.ready())

    def model_ready(self, model: str, version: str | None = None) -> bool:
        """Whether ``model`` (its default version, or ``version``) is ready."""
        return self._run(self._core.model_ready(model, version))

    def server_metadata(self) -> ServerMetadata:
        """The server's name, version and protocol extensions."""
        return self._run(self._core.server_metadata())

    def model_metadata(self, model: str, version: str | None = None) -> ModelMetadata:
        """A model's versions, platform and input/output signature."""
        return self._run(self._core.model_metadata(model, version))

    def model_config(self, model: str, version: str | None = None) -> mc.ModelConfig:
        """A model's Triton-style configuration (max batch size, batching, parameters)."""
        return self._run(self._core.model_config(model, version))

    def model_info(self, model: str, version: str | None = None) -> ModelInfo:
        """Signature, max batch size, class labels and normalisation (cached)."""
        return self._run(self._core.model_info(model, version))

    def infer(self, model: str, inputs: Mapping[str, np.ndarray], *,
              version: str | None = None, outputs: Sequence[str] | None = None,
              timeout: float | None = None, request_id: str = "") -> dict[str, np.ndarray]:
        """Run ``model`` on ``inputs`` (numpy arrays by tensor name); return outputs by name.

        Inputs are checked against the model's metadata first (raises
        :class:`~cnnserve.client.errors.InvalidInputError`); a batch larger than the model's
        max batch size is sent as several requests and the outputs re-joined in order.
        ``outputs`` limits the answer to those names (default: all). ``timeout`` overrides the
        per-attempt deadline, seconds.
        """
        return self._run(self._core.infer(model, inputs, version=version, outputs=outputs,
                                          timeout=timeout, request_id=request_id))

    def classify(self, model: str, images: Any, *, top_k: int = 1,
                 version: str | None = None,
                 timeout: float | None = None,
                 scaling: PixelScaling | None = None) -> list[list[Prediction]]:
        """Top-``top_k`` ``(label, probability)`` per image, best first.

        ``images``: a path, bytes, PIL image or list of them (resized and converted to the
        model's input), or uint8 pixels ``[N, C, H, W]`` / ``[C, H, W]``. They are normalised
        with the model's own statistics, or with ``scaling`` where given (a model that
        publishes none). A model that does not batch gets one request per image. Raises
        :class:`~cnnserve.client.errors.ImageError` for an unreadable image.
        """
        return self._run(self._core.classify(model, images, top_k=top_k, version=version,
                                             timeout=timeout, scaling=scaling))

    def repository_index(self, *, ready: bool = False) -> list[RepositoryModel]:
        """Every model version in the repository with its state (only ready ones if asked)."""
        return self._run(self._core.repository_index(ready))

    def load(self, model: str, *, timeout: float | None = None) -> None:
        """Load or reload ``model`` from the repository."""
        self._run(self._core.load(model, timeout))

    def unload(self, model: str, *, timeout: float | None = None) -> None:
        """Unload ``model``; requests already running on it complete."""
        self._run(self._core.unload(model, timeout))

    def statistics(self, model: str | None = None,
                   version: str | None = None) -> pb.ModelStatisticsResponse:
        """Cumulative inference statistics (every model when ``model`` is None)."""
        return self._run(self._core.statistics(model, version))
