"""A plan a user can trust (issue 15, item 8): the answer when nothing fits, and hysteresis on re-plans."""

import numpy as np
import pytest

from popex.decision.calibration import Calibration
from popex.decision.decide import decide
from popex.decision.latency import Link, Profile
from popex.edge.plans import ModelPlan


def _calibration_and_profile(seed=0):
    rng = np.random.default_rng(seed)
    n_samples = 400
    labels = rng.integers(0, 10, n_samples)
    # a weak first exit (30 %), a good final one (85 %)
    right = rng.random((n_samples, 3)) < np.array([0.3, 0.6, 0.85])
    predicted = np.where(right, labels[:, None], (labels[:, None] + 1) % 10)
    confidence = np.clip(rng.normal(0.7, 0.2, (n_samples, 3)), 0, 1)
    calibration = Calibration(confidence=confidence, predicted=predicted, correct=predicted == labels[:, None],
                              labels=labels, temperature=np.ones(3))
    profile = Profile(stage_names=tuple("abcd"), stage_edge_ms=np.array([1.0, 4.0, 4.0, 4.0]),
                      stage_cloud_ms=np.array([0.1, 0.4, 0.4, 0.4]), branch_after_stage=(1, 2),
                      branch_edge_ms=np.array([0.2, 0.2]), split_bytes=[60_000, 20_000, 40_000, 40_000, 40],
                      offload_overhead_ms=1.0)
    return calibration, profile


def test_an_impossible_requirement_gets_a_fast_accurate_strategy_marked_infeasible():
    calibration, profile = _calibration_and_profile()
    plan = ModelPlan(calibration, profile=profile, link=Link(uplink_mbps=20.0, rtt_ms=5.0))
    table = plan.table
    strategy = plan.strategy(0.5)
    assert not strategy.feasible
    assert strategy.accuracy >= table.accuracy.max() - 0.05 - 1e-12
    assert strategy.fastest_latency_ms == pytest.approx(table.expected_latency_ms.min())
    assert strategy.to_dict()["fastest_latency_ms"] == strategy.fastest_latency_ms
    fastest_row = int(np.argmin(table.expected_latency_ms))
    assert table.accuracy[fastest_row] < table.accuracy.max() - 0.05  # what was served before: the weak exit
    assert strategy.row != fastest_row


def _first_flip(plan, deadline_ms, links):
    """The first link whose fresh decision differs from the current one, or None."""
    before = plan.strategy(deadline_ms)
    for link in links:
        fresh = decide(ModelPlan(*_calibration_and_profile()[:1], profile=plan.profile, link=link).table,
                       deadline_ms=deadline_ms)
        if fresh.row != before.row and fresh.feasible:
            return link, fresh
    return None


@pytest.mark.parametrize("deadline_ms", [12.0, 15.0, 20.0])
def test_a_replan_keeps_the_strategy_unless_the_new_one_is_better_by_the_margin(deadline_ms):
    calibration, profile = _calibration_and_profile()
    start = Link(uplink_mbps=20.0, rtt_ms=5.0)
    sticky = ModelPlan(calibration, profile=profile, link=start, strategy_hysteresis_accuracy=1.0)
    plain = ModelPlan(calibration, profile=profile, link=start)
    before = sticky.strategy(deadline_ms)
    assert plain.strategy(deadline_ms).row == before.row
    links = [Link(uplink_mbps=20.0 * factor, rtt_ms=5.0) for factor in (1.05, 1.1, 1.2, 1.5, 2.0, 3.0)]
    flip = _first_flip(plain, deadline_ms, links)
    if flip is None:
        pytest.skip("no link in the list changes this requirement's decision")
    link, fresh = flip
    sticky.set_link(link)
    plain.set_link(link)
    assert plain.strategy(deadline_ms).row == fresh.row  # no hysteresis: the new decision
    kept = sticky.strategy(deadline_ms)
    assert kept.row == before.row and kept.feasible  # still fits, and no gain beats a margin of 1.0
    assert kept.latency_ms == pytest.approx(float(sticky.table.expected_latency_ms[before.row]))
    # a link so slow that the old strategy no longer fits: the new decision, whatever the margin
    sticky.set_link(Link(uplink_mbps=0.05, rtt_ms=200.0))
    fits = float(sticky.table.expected_latency_ms[before.row]) <= deadline_ms
    assert (sticky.strategy(deadline_ms).row == before.row) == fits
