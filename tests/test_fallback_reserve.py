"""The time an offload's timeout leaves for the local fallback (popex/edge/fallback.py).

Regression: on a slow edge (the demo's, 40x) the reserve for the whole local
rest of the network was larger than the budget, so every offload timed out
at once and fell back (cloud-only on Wi-Fi: 100% fallbacks). The reserve is
now capped so that the offload keeps at least 1.5x its predicted time.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest

from popex.edge.budget import RequestRun
from popex.edge.fallback import fallback_reserve_ms


def _case(stage_edge_ms, branch_edge_ms, branch_after_stage):
    model = SimpleNamespace(loaded=SimpleNamespace(net=SimpleNamespace(branch_after_stage=list(branch_after_stage))))
    plan = SimpleNamespace(profile=SimpleNamespace(stage_edge_ms=np.asarray(stage_edge_ms, float),
                                                   branch_edge_ms=np.asarray(branch_edge_ms, float)))
    return model, plan


def _run(budget_ms: float, evaluated=()) -> RequestRun:
    return RequestRun(arrival_s=time.perf_counter(), deadline_ms=budget_ms, budget_ms=budget_ms,
                      features=[], evaluated=list(evaluated))


def test_slow_edge_leaves_the_offload_its_predicted_time_with_margin():
    # 6 stages of 20 ms each on the edge: the local rest (120 ms) is far beyond a 45 ms budget
    model, plan = _case([20.0] * 6, [30.0, 30.0, 30.0], [3, 4, 5])
    run = _run(45.0)
    offload_worst_ms = 20.0
    reserve_ms = fallback_reserve_ms(model, plan, 0, run, offload_worst_ms=offload_worst_ms)
    offload_timeout_ms = run.remaining_ms() - reserve_ms
    assert offload_timeout_ms >= 1.5 * offload_worst_ms - 1.0  # 1 ms for the clock moving in between
    assert reserve_ms < 120.0


def test_fast_edge_reserves_the_whole_local_rest():
    model, plan = _case([0.5] * 6, [0.2, 0.2, 0.2], [3, 4, 5])
    run = _run(100.0)
    assert fallback_reserve_ms(model, plan, 2, run, offload_worst_ms=10.0) == pytest.approx(2.0)


def test_cheapest_branch_at_or_before_the_split_counts_later_ones_do_not():
    model, plan = _case([5.0] * 6, [0.7, 0.1, 0.1], [3, 4, 5])
    run = _run(1000.0)
    # split 3: only branch 0 (after stage 3) is reachable; the rest of the network costs 15 ms
    assert fallback_reserve_ms(model, plan, 3, run, offload_worst_ms=10.0) == pytest.approx(0.7)
    # split 2: no branch reachable, the rest costs 20 ms
    assert fallback_reserve_ms(model, plan, 2, run, offload_worst_ms=10.0) == pytest.approx(20.0)


def test_an_evaluated_branch_needs_no_reserve():
    model, plan = _case([20.0] * 6, [30.0, 30.0, 30.0], [3, 4, 5])
    run = _run(45.0, evaluated=[(0, 0.4, 7)])
    assert fallback_reserve_ms(model, plan, 3, run, offload_worst_ms=20.0) == 0.0
