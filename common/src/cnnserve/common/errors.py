"""The error type every part of cnnserve raises for a problem the user can fix."""

from __future__ import annotations


class CnnserveError(Exception):
    """A failure with a message that says what was wrong and what was expected.

    The ``cnnserve`` command prints the message (no traceback) and exits with status 1.
    """


class UsageError(CnnserveError):
    """The command line itself was wrong: an unknown dataset, a value not among the choices,
    an address that is no gRPC address.

    The ``cnnserve`` command prints the message and exits with status 2, like argparse does
    for the usage errors it finds itself.
    """
