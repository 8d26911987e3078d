"""How many batches run at once and with how many ONNX Runtime threads each.

The rule: intra-op threads x concurrent batches never exceeds the usable cores. The
default split gives each batch ``t`` threads, the largest power of two not above the square
root of the cores, and runs ``cores // t`` batches at once: 1 core 1x1, 2 cores 2x1, 4
cores 2x2, 8 cores 4x2, 16 cores 4x4. One thread per batch costs the least CPU per image
(the fashion-cnn model on the shared 2-core host: 72 us of CPU per image at batch 16 and 77
at batch 64 with 1 thread, 78 and 93 with 2; a smaller LeNet: 11 against 18 us), so small
hosts run more batches rather than wider ones; on larger hosts
wider batches keep a lone compute-heavy request's latency down while enough batches run
side by side to keep every core busy under load. On 2 cores, 2 workers x 1 thread also
serves compute-heavy models well: the batcher starts a second batch beside a running one
as soon as the waiting work is worth a core (see dispatch.py), so both cores run ONNX
Runtime at concurrency 2 and up.

The usable cores are the process's CPU affinity, capped by the cgroup CPU quota
(``/sys/fs/cgroup/cpu.max``, or cgroup v1's ``cpu.cfs_quota_us``): a Kubernetes CPU limit
sets it, and ``os.cpu_count()`` would report the whole node.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

CGROUP_V2_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")


@dataclass(frozen=True)
class ThreadSplit:
    """``workers`` batches run at once, each on ``intra_op_threads`` ONNX Runtime threads."""

    workers: int
    intra_op_threads: int


def default_split(cores: int) -> ThreadSplit:
    """The split for ``cores`` usable cores (at least 1) when nothing is configured."""
    cores = max(1, cores)
    threads = 1 << int(math.log2(math.isqrt(cores)))
    return ThreadSplit(cores // threads, threads)


def resolve_split(cores: int, workers: int | None = None,
                  intra_op_threads: int | None = None) -> ThreadSplit:
    """The split with the configured parts kept and the others filled in from ``cores``.

    ``intra_op_threads`` 0 means ONNX Runtime's own default (a thread per core); it is kept
    as 0 and counted as ``cores`` when sizing the workers.
    """
    cores = max(1, cores)
    if workers is None and intra_op_threads is None:
        return default_split(cores)
    if workers is None:
        width = intra_op_threads or cores
        return ThreadSplit(max(1, cores // width), intra_op_threads or 0)
    if intra_op_threads is None:
        return ThreadSplit(workers, max(1, cores // workers))
    return ThreadSplit(workers, intra_op_threads)


def quota_cores(cpu_max: str) -> float | None:
    """Cores allowed by a cgroup v2 ``cpu.max`` text ("200000 100000" is 2.0); None: no
    limit ("max ...") or unreadable text."""
    parts = cpu_max.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def usable_cores(affinity: int, quota: float | None) -> int:
    """Cores this process may use: its affinity, capped by the quota rounded up."""
    cores = max(1, affinity)
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return cores


def detect_cores() -> int:
    """Usable cores of this process, from its affinity and its cgroup's CPU quota."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        affinity = os.cpu_count() or 1
    return usable_cores(affinity, _read_quota())


def _read_quota() -> float | None:
    try:
        return quota_cores(CGROUP_V2_CPU_MAX.read_text())
    except OSError:
        pass
    try:
        quota = int(CGROUP_V1_QUOTA.read_text())
        period = int(CGROUP_V1_PERIOD.read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None
