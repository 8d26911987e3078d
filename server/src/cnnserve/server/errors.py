"""Domain errors of the server, each carrying the protocol status it is answered with.

Code anywhere on the request path raises one of these with a message a user can act on
(what was wrong, what was expected). They are turned into gRPC statuses in exactly one place
(:class:`cnnserve.server.grpc.interceptors.ErrorMapping`); anything else is logged with its
traceback and answered with a generic INTERNAL. The status is this module's own
:class:`Status` (named as gRPC names them), so the engine and everything below it never
import grpc.
"""

from __future__ import annotations

import enum

from cnnserve.common.errors import CnnserveError


class Status(enum.Enum):
    """The gRPC status codes the server answers with (names as in ``grpc.StatusCode``)."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    UNAVAILABLE = "UNAVAILABLE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    INTERNAL = "INTERNAL"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    CANCELLED = "CANCELLED"


class ServingError(CnnserveError):
    """Base class: ``code`` is the status answered; ``reason`` is a short metric label value."""

    code: Status = Status.INTERNAL
    reason: str = "internal"


class InvalidRequest(ServingError):
    """The request does not match the model's signature or the protocol."""

    code = Status.INVALID_ARGUMENT
    reason = "invalid_argument"


class ModelNotFound(ServingError):
    """No such model, or no such version of it, in the repository."""

    code = Status.NOT_FOUND
    reason = "not_found"


class ModelNotReady(ServingError):
    """The model exists but is loading, unloading or failed to load."""

    code = Status.UNAVAILABLE
    reason = "not_ready"


class QueueFull(ServingError):
    """The model's request queue is at max_queue_size; the client should back off and retry."""

    code = Status.UNAVAILABLE
    reason = "queue_full"


class ServerShuttingDown(ServingError):
    """The server is draining and takes no new requests."""

    code = Status.UNAVAILABLE
    reason = "shutting_down"


class DeadlineExceeded(ServingError):
    """The request's deadline (gRPC deadline or ``timeout`` parameter) passed before compute."""

    code = Status.DEADLINE_EXCEEDED
    reason = "deadline_exceeded"


class ModelLoadError(ServingError):
    """A model version could not be loaded (corrupt file, bad config, missing provider)."""

    code = Status.FAILED_PRECONDITION
    reason = "load_failed"


class InferenceFailed(ServingError):
    """ONNX Runtime failed while running a batch; only that batch's requests get this."""

    code = Status.INTERNAL
    reason = "inference_failed"


class Unauthenticated(ServingError):
    """A missing or wrong bearer token."""

    code = Status.UNAUTHENTICATED
    reason = "unauthenticated"


class Unsupported(ServingError):
    """A valid request for something this server does not implement."""

    code = Status.UNIMPLEMENTED
    reason = "unimplemented"
