"""When and how long the client waits before retrying a failed call.

Only statuses that say "try again later" are retried: ``UNAVAILABLE`` (server down,
restarting, draining, or its queue full) and ``RESOURCE_EXHAUSTED`` (overloaded). Everything
else (``INVALID_ARGUMENT``, ``NOT_FOUND``, ``DEADLINE_EXCEEDED``, ...) would fail the same way
again, or the caller's deadline is spent, so it is raised at once.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import grpc

RETRYABLE_CODES: frozenset[grpc.StatusCode] = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter.

    Attempt ``n`` (0-based) that fails with a retryable status waits a uniformly random time in
    ``[0, min(max_backoff, initial_backoff * multiplier**n)]`` seconds, then tries again, up to
    ``retries`` extra attempts. ``retries=0`` disables retrying. Full jitter spreads the
    retries of many clients hit by the same restart, so they do not return in lockstep.
    """

    #: Extra attempts after the first one.
    retries: int = 5
    #: Upper bound of the first wait, seconds.
    initial_backoff: float = 0.1
    #: Upper bound of any wait, seconds.
    max_backoff: float = 5.0
    multiplier: float = 2.0
    codes: frozenset[grpc.StatusCode] = RETRYABLE_CODES
    #: Source of the jitter; seed it for reproducible tests.
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.retries < 0 or self.initial_backoff < 0 or self.max_backoff < 0 \
                or self.multiplier < 1:
            raise ValueError("retry policy needs retries >= 0, backoffs >= 0, multiplier >= 1")

    def should_retry(self, code: grpc.StatusCode, attempt: int, message: str = "") -> bool:
        """Whether attempt ``attempt`` (0-based) that failed with ``code`` is tried again.

        A message over the size limit also reads RESOURCE_EXHAUSTED, but would be refused
        again however long the client waits, so it is not retried; nor is an address that
        answers plain HTTP (UNAVAILABLE, "not a gRPC server").
        """
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in message:
            return False
        if code == grpc.StatusCode.UNAVAILABLE and "not a gRPC server" in message:
            return False  # an HTTP port answers the same way however long we wait
        return code in self.codes and attempt < self.retries

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after failed attempt ``attempt`` (0-based), jittered."""
        ceiling = min(self.max_backoff, self.initial_backoff * self.multiplier ** attempt)
        return self.rng.uniform(0.0, ceiling)


def as_policy(retries: int | RetryPolicy) -> RetryPolicy:
    """Accept a retry count or a full policy (the clients' ``retries=`` argument)."""
    if isinstance(retries, RetryPolicy):
        return retries
    return RetryPolicy(retries=retries)
