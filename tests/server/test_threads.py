"""The default split of cores into execution workers x ONNX Runtime threads."""

from __future__ import annotations

import os

import pytest

from cnnserve.server.batching.threads import (
    ThreadSplit,
    default_split,
    detect_cores,
    quota_cores,
    resolve_split,
    usable_cores,
)


@pytest.mark.parametrize(("cores", "workers", "threads"), [
    (1, 1, 1), (2, 2, 1), (3, 3, 1), (4, 2, 2), (8, 4, 2), (16, 4, 4), (32, 8, 4), (64, 8, 8),
])
def test_default_split_never_runs_more_threads_than_cores(cores: int, workers: int,
                                                          threads: int) -> None:
    split = default_split(cores)
    assert split == ThreadSplit(workers, threads)
    assert split.workers * split.intra_op_threads <= cores


def test_configured_parts_are_kept_and_the_rest_fills_the_cores() -> None:
    assert resolve_split(16, workers=8) == ThreadSplit(8, 2)
    assert resolve_split(16, intra_op_threads=8) == ThreadSplit(2, 8)
    assert resolve_split(2, workers=1) == ThreadSplit(1, 2)  # e.g. a compute-heavy model
    assert resolve_split(4, workers=3, intra_op_threads=3) == ThreadSplit(3, 3)  # as told
    assert resolve_split(8, intra_op_threads=0) == ThreadSplit(1, 0)  # ORT's default: all


@pytest.mark.parametrize(("text", "cores"), [
    ("max 100000\n", None), ("200000 100000\n", 2.0), ("150000 100000", 1.5),
    ("50000 100000", 0.5), ("garbage", None), ("", None),
])
def test_cgroup_cpu_max_is_read_as_cores(text: str, cores: float | None) -> None:
    assert quota_cores(text) == cores


def test_a_cgroup_quota_caps_the_affinity_rounded_up() -> None:
    assert usable_cores(16, None) == 16
    assert usable_cores(16, 2.0) == 2  # a Kubernetes limit of 2 CPUs on a 16-core node
    assert usable_cores(16, 1.5) == 2
    assert usable_cores(16, 0.5) == 1
    assert usable_cores(2, 8.0) == 2  # a quota above the affinity changes nothing
    assert default_split(usable_cores(16, 4.0)) == ThreadSplit(2, 2)


def test_this_process_has_at_least_one_usable_core_and_no_more_than_its_affinity() -> None:
    assert 1 <= detect_cores() <= len(os.sched_getaffinity(0))
