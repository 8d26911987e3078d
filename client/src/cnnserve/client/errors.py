"""The one exception type of the client SDK, and the errors of its local helpers.

Every failed call raises :class:`InferenceServerError`, whether the server refused it
(``code`` is the status the server answered), the server could not be reached (``UNAVAILABLE``),
the deadline passed (``DEADLINE_EXCEEDED``) or the client refused to send an input that does
not match the model's metadata (:class:`InvalidInputError`, ``INVALID_ARGUMENT``, raised before
anything is sent). Callers catch one type and branch on ``code``.
"""

from __future__ import annotations

from typing import Any

import grpc

from cnnserve.common.errors import CnnserveError


class InferenceServerError(CnnserveError):
    """A call that failed, with the gRPC status ``code`` and the server's ``message``.

    ``rpc`` names the protocol method (``"ModelInfer"``) when the error came from a call.
    ``str(error)`` reads ``"ModelInfer: [INVALID_ARGUMENT] input 'input' expects ..."``.
    """

    def __init__(self, code: grpc.StatusCode, message: str, *, rpc: str = "") -> None:
        self.code = code
        self.message = message
        self.rpc = rpc
        prefix = f"{rpc}: " if rpc else ""
        super().__init__(f"{prefix}[{code.name}] {message}")

    def __reduce__(self) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
        # Pickling (errors crossing a process) must rebuild from the fields, not from args.
        return (_rebuild, (type(self), self.code, self.message), {"rpc": self.rpc})


class InvalidInputError(InferenceServerError):
    """The client refused to send inputs that do not match the model's metadata.

    Raised before any request leaves the process; ``code`` is ``INVALID_ARGUMENT``, the status
    the server would have answered.
    """

    def __init__(self, message: str) -> None:
        super().__init__(grpc.StatusCode.INVALID_ARGUMENT, message)


def _rebuild(cls: type[InferenceServerError], code: grpc.StatusCode,
             message: str) -> InferenceServerError:
    error = InferenceServerError.__new__(cls)
    InferenceServerError.__init__(error, code, message)
    return error


class ImageError(CnnserveError):
    """An image file that cannot be read or decoded (missing, truncated, not an image)."""
