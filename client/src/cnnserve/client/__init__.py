"""cnnserve.client: the Python SDK for cnnserve's gRPC server, and the batch-inference job.

Needs only grpcio, protobuf and numpy (Pillow for images, tqdm for the batch job's progress
bar); never torch or onnxruntime::

    from cnnserve.client import InferenceClient

    with InferenceClient("localhost:8001") as client:
        client.classify("fashion", "shoe.jpg", top_k=3)

Every failed call raises :class:`InferenceServerError` carrying the gRPC status ``code``.
"""

from __future__ import annotations

from cnnserve.client._channel import TlsConfig
from cnnserve.client._infer import PixelScaling, Prediction
from cnnserve.client._model import (
    ModelInfo,
    ModelMetadata,
    RepositoryModel,
    ServerMetadata,
    TensorMetadata,
)
from cnnserve.client._retry import RETRYABLE_CODES, RetryPolicy
from cnnserve.client.aio import AsyncInferenceClient
from cnnserve.client.errors import ImageError, InferenceServerError, InvalidInputError
from cnnserve.client.sync import InferenceClient

__all__ = [
    "RETRYABLE_CODES",
    "AsyncInferenceClient",
    "ImageError",
    "InferenceClient",
    "InferenceServerError",
    "InvalidInputError",
    "ModelInfo",
    "ModelMetadata",
    "PixelScaling",
    "Prediction",
    "RepositoryModel",
    "RetryPolicy",
    "ServerMetadata",
    "TensorMetadata",
    "TlsConfig",
]
