"""Baseline policies pick the rows their definitions name, on random tables."""

import numpy as np
import pytest
from hypothesis import given, settings

from popex.decision.decide import decide
from popex.decision.policies import POLICIES, PolicyBook
from popex.errors import ConfigError
from tests.test_sweep_table import _table, instances


@settings(max_examples=60, deadline=None)
@given(instances())
def test_policies_against_their_definitions(instance) -> None:
    profile, link, calibration, grids = instance
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
            # POPEX is never less accurate than a baseline that meets the requirement
            for baseline in (edge, cloud, neuro):
                if baseline.feasible:
                    assert adaptive.feasible and table.n_correct[adaptive.row] >= table.n_correct[baseline.row]


@pytest.mark.parametrize("policy", ["edgent2", "", None, "ADAPTIVE"])
def test_unknown_policy_is_a_config_error_naming_the_choices(policy) -> None:
    from tests.test_decide import _planner_table

    book = PolicyBook.build(_planner_table(0))
    with pytest.raises(ConfigError, match="policy must be one of"):
        book.decide(policy, deadline_ms=10.0)
    assert set(POLICIES) >= {"adaptive", "edge-only", "cloud-only"}
