"""Baseline policies pick the rows their definitions name, on random tables."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popex.decision.decide import decide
from popex.decision.policies import EDGENT_THRESHOLD, POLICIES, PolicyBook, edge_threshold_grids
from popex.decision.precision_aware import precision_aware_thresholds
from popex.errors import ConfigError
from tests.test_sweep_table import _table, instances


def _edgent_by_brute_force(table, positions, latency, deadline_ms):
    """Edgent's definition, row by row: exit points deepest first, each at its fastest split."""
    n_branches = len(positions)
    exit_points = [None, *range(n_branches - 1, -1, -1)]  # None = the final exit
    best = []
    for exit_point in exit_points:
        rows = []
        for i in range(len(table)):
            thresholds = table.thresholds[i]
            if exit_point is None:
                matches = np.isnan(thresholds).all()
            else:
                matches = thresholds[exit_point] == EDGENT_THRESHOLD and all(
                    np.isnan(thresholds[b]) for b in range(n_branches) if b != exit_point)
                matches = matches and table.split[i] >= positions[exit_point]
            if matches:
                rows.append(i)
        if rows:
            best.append(min(rows, key=lambda i: (latency[i], i)))
    for row in best:
        if latency[row] <= deadline_ms:
            return row, True
    return min(best, key=lambda i: (latency[i], i)), False


@settings(max_examples=60, deadline=None)
@given(instances(), st.booleans())
def test_policies_against_their_definitions(instance, with_edgent_rows) -> None:
    profile, link, calibration, grids = instance
    if with_edgent_rows:  # as the edge plans: 0.0 in every grid
        grids = [[*grid, EDGENT_THRESHOLD] for grid in grids]
    _, table = _table(profile, link, calibration, grids)
    book = PolicyBook.build(table)
    n_stages = profile.n_stages
    no_exit = [i for i in range(len(table)) if np.isnan(table.thresholds[i]).all()]
    for objective in ("mean", "tail"):
        latency = table.latency_ms(objective)
        for deadline_ms in (0.0, float(np.median(latency)), float(latency.max()) + 1.0):
            adaptive = book.decide("adaptive", deadline_ms=deadline_ms, objective=objective)
            assert adaptive == decide(table, deadline_ms=deadline_ms, objective=objective)
            edge = book.decide("edge-only", deadline_ms=deadline_ms, objective=objective)
            assert table.split[edge.row] == n_stages and edge.row in no_exit
            assert edge.feasible == (latency[edge.row] <= deadline_ms)
            cloud = book.decide("cloud-only", deadline_ms=deadline_ms, objective=objective)
            assert table.split[cloud.row] == 0
            neuro = book.decide("neurosurgeon", deadline_ms=deadline_ms, objective=objective)
            assert neuro.row in no_exit and latency[neuro.row] == min(latency[i] for i in no_exit)
            edgent = book.decide("edgent", deadline_ms=deadline_ms, objective=objective)
            row, feasible = _edgent_by_brute_force(table, profile.branch_after_stage, latency, deadline_ms)
            assert latency[edgent.row] == latency[row] and edgent.feasible == feasible
            assert table.n_correct[edgent.row] == table.n_correct[row]
            if not with_edgent_rows and EDGENT_THRESHOLD not in [t for grid in grids for t in grid]:
                assert edgent.row == neuro.row  # only the final exit: Edgent is Neurosurgeon
            # POPEX is never less accurate than a baseline that meets the requirement
            for baseline in (edge, cloud, neuro, edgent):
                if baseline.feasible:
                    assert adaptive.feasible and table.n_correct[adaptive.row] >= table.n_correct[baseline.row]


@pytest.mark.parametrize("policy", ["edgent2", "", None, "ADAPTIVE"])
def test_unknown_policy_is_a_config_error_naming_the_choices(policy) -> None:
    from tests.test_decide import _planner_table

    book = PolicyBook.build(_planner_table(0))
    with pytest.raises(ConfigError, match="policy must be one of"):
        book.decide(policy, deadline_ms=10.0)
    assert set(POLICIES) >= {"adaptive", "edge-only", "cloud-only"}


def test_edge_grid_holds_the_edgent_threshold_and_the_default_grid() -> None:
    from popex.decision.sweep import DEFAULT_THRESHOLDS

    grids = edge_threshold_grids(3)
    assert len(grids) == 3 and all(grid == [0.0, *DEFAULT_THRESHOLDS] for grid in grids)
    assert edge_threshold_grids(0) == []
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ConfigError, match="n_branches"):
            edge_threshold_grids(bad)


@settings(max_examples=40, deadline=None)
@given(instances(), st.floats(min_value=0.01, max_value=0.5), st.sampled_from(["mean", "tail"]))
def test_headroom_holds_every_policy_to_the_reduced_requirement(instance, headroom, objective) -> None:
    profile, link, calibration, grids = instance
    grids = [[*grid, EDGENT_THRESHOLD] for grid in grids]
    _, table = _table(profile, link, calibration, grids)
    precision = (precision_aware_thresholds(calibration, grids=grids).thresholds, profile.branch_after_stage)
    plain = PolicyBook.build(table, precision_aware=precision)
    roomy = PolicyBook.build(table, headroom_fraction=headroom, precision_aware=precision)
    latency = table.latency_ms(objective)
    # a requirement just above a row's latency: met without headroom, not with it
    deadline_ms = float(np.median(latency)) / (1.0 - headroom / 2.0)
    for policy in POLICIES:
        decision = roomy.decide(policy, deadline_ms=deadline_ms, objective=objective)
        same = plain.decide(policy, deadline_ms=deadline_ms * (1.0 - headroom), objective=objective)
        assert (decision.row, decision.feasible) == (same.row, same.feasible)
        assert decision.feasible == bool(latency[decision.row] <= deadline_ms * (1.0 - headroom))
    adaptive = roomy.decide("adaptive", deadline_ms=deadline_ms, objective=objective)
    loose = plain.decide("adaptive", deadline_ms=deadline_ms, objective=objective)
    assert table.n_correct[adaptive.row] <= table.n_correct[loose.row]  # room costs accuracy, never adds it


@pytest.mark.parametrize("headroom", [-0.01, 0.51, float("nan"), True, "0.1", None])
def test_a_bad_headroom_is_a_config_error(headroom) -> None:
    from tests.test_decide import _planner_table

    with pytest.raises(ConfigError, match="headroom_fraction must be"):
        PolicyBook.build(_planner_table(0), headroom_fraction=headroom)
