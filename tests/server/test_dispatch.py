"""Where a batch runs (inline, hand-off, pass-through, wait) and the run-time estimate."""

from __future__ import annotations

import math

import pytest

from cnnserve.server.batching.dispatch import CostEstimate, Dispatch, DispatchPolicy, decide

POLICY = DispatchPolicy(max_running=2, max_batch_size=64, inline_max_us=500, split_min_us=1000)
INLINE, HANDOFF, PASS_THROUGH, WAIT = (Dispatch.INLINE, Dispatch.HANDOFF, Dispatch.PASS_THROUGH,
                                       Dispatch.WAIT)


@pytest.mark.parametrize(("rows", "requests", "running", "contended", "cost_us", "expected"), [
    # idle: cheap and alone runs inline; costly, unknown or with company goes to a worker
    (1, 1, 0, False, 60.0, INLINE),
    (8, 1, 0, False, 500.0, INLINE),
    (9, 1, 0, False, 501.0, HANDOFF),
    (1, 1, 0, False, math.inf, HANDOFF),
    (3, 3, 0, True, 60.0, HANDOFF),
    (1, 1, 0, True, 60.0, HANDOFF),
    # beside a running batch: a request worth a core by itself passes through alone
    (16, 1, 1, True, 1000.0, PASS_THROUGH),
    (1, 1, 1, True, math.inf, PASS_THROUGH),
    # ...a merged batch starts if full or worth a core, else waits to merge further
    (12, 4, 1, True, 1200.0, HANDOFF),
    (64, 64, 1, True, 100.0, HANDOFF),
    (10, 10, 1, True, 600.0, WAIT),
    (1, 1, 1, True, 60.0, WAIT),
    # every instance busy: nothing starts, however large
    (64, 1, 2, True, math.inf, WAIT),
])
def test_decide(rows: int, requests: int, running: int, contended: bool, cost_us: float,
                expected: Dispatch) -> None:
    assert decide(rows, requests, running, contended, cost_us, POLICY) is expected


def test_a_preferred_size_counts_as_full_and_passes_a_request_of_that_size_through() -> None:
    policy = DispatchPolicy(max_running=2, max_batch_size=64, preferred=frozenset({8, 16}))
    assert decide(8, 1, 1, True, 10.0, policy) is PASS_THROUGH  # alone, at a preferred size
    assert decide(20, 1, 1, True, 10.0, policy) is PASS_THROUGH  # above the smallest one
    assert decide(16, 4, 1, True, 10.0, policy) is HANDOFF  # merged to a preferred size
    assert decide(6, 3, 1, True, 10.0, policy) is WAIT


def test_inline_can_be_switched_off() -> None:
    policy = DispatchPolicy(max_running=1, max_batch_size=8, inline_max_us=0)
    assert decide(1, 1, 0, False, 1.0, policy) is HANDOFF


def test_cost_is_unknown_until_a_batch_ran_then_separates_fixed_and_per_row_time() -> None:
    cost = CostEstimate()
    assert cost.cost_us(4) == math.inf
    for rows in (1, 4, 2, 8, 1, 16) * 20:
        cost.observe(rows, 30_000 + 8_000 * rows)  # 30 us per run + 8 us per row
    fixed, per_row = cost.fit()
    assert fixed == pytest.approx(30_000, rel=1e-6) and per_row == pytest.approx(8_000, rel=1e-6)
    assert cost.cost_us(10) == pytest.approx(110.0)


def test_cost_of_one_batch_size_scales_in_proportion_and_follows_changes() -> None:
    cost = CostEstimate()
    cost.observe(4, 400_000)
    assert cost.cost_us(8) == pytest.approx(800.0)
    for _ in range(100):  # the machine got twice as slow
        cost.observe(4, 800_000)
    assert cost.cost_us(8) == pytest.approx(1600.0, rel=1e-3)
