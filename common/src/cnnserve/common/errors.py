"""The error type every part of cnnserve raises for a problem the user can fix."""

from __future__ import annotations


class CnnserveError(Exception):
    """A failure with a message that says what was wrong and what was expected.

    The ``cnnserve`` command prints the message (no traceback) and exits with status 1.
    """
