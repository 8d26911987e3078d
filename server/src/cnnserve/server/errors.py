"""Domain errors of the server, each carrying the gRPC status it is answered with.

Code anywhere on the request path raises one of these with a message a user can act on
(what was wrong, what was expected). They are turned into gRPC statuses in exactly one
place (the servicer's error mapping); anything else is logged with its traceback and
answered with a generic INTERNAL.
"""

from __future__ import annotations

import grpc

from cnnserve.common.errors import CnnserveError


class ServingError(CnnserveError):
    """Base class: ``code`` is the gRPC status; ``reason`` is a short metric label value."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "internal"


class InvalidRequest(ServingError):
    """The request does not match the model's signature or the protocol."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "invalid_argument"


class ModelNotFound(ServingError):
    """No such model, or no such version of it, in the repository."""

    code = grpc.StatusCode.NOT_FOUND
    reason = "not_found"


class ModelNotReady(ServingError):
    """The model exists but is loading, unloading or failed to load."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "not_ready"


class QueueFull(ServingError):
    """The model's request queue is at max_queue_size; the client should back off and retry."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "queue_full"


class ServerShuttingDown(ServingError):
    """The server is draining and takes no new requests."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "shutting_down"


class DeadlineExceeded(ServingError):
    """The request's deadline (gRPC deadline or ``timeout`` parameter) passed before compute."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "deadline_exceeded"


class ModelLoadError(ServingError):
    """A model version could not be loaded (corrupt file, bad config, missing provider)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "load_failed"


class InferenceFailed(ServingError):
    """ONNX Runtime failed while running a batch; only that batch's requests get this."""

    code = grpc.StatusCode.INTERNAL
    reason = "inference_failed"


class Unauthenticated(ServingError):
    """A missing or wrong bearer token."""

    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "unauthenticated"


class Unsupported(ServingError):
    """A valid request for something this server does not implement."""

    code = grpc.StatusCode.UNIMPLEMENTED
    reason = "unimplemented"
