"""CPU time and resident memory of a running process, read from Linux /proc."""

from __future__ import annotations

import os
from pathlib import Path


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds that process ``pid`` (all its threads) has used so far.

    Raises FileNotFoundError if the process is gone.
    """
    # The command name in field 2 may contain spaces and parentheses: split after the last ')'.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def memory_mib(pid: int, field: str = "VmRSS") -> float:
    """A memory line of /proc/PID/status in MiB: ``VmRSS`` (resident now) or ``VmHWM`` (peak).

    NaN if the field is missing; FileNotFoundError if the process is gone.
    """
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # the kernel reports kB
    return float("nan")
