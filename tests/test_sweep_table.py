"""Exit-statistics sweep and strategy table, checked against per-sample loops."""

import csv
import itertools
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popex.decision.calibration import Calibration
from popex.decision.formulas import expected_latency_ms, worst_latency_ms
from popex.decision.latency import Link, Profile
from popex.decision.sweep import DEFAULT_THRESHOLDS, sweep_exit_stats
from popex.decision.table import Planner
from popex.errors import CalibrationError, ConfigError, ProfileError

LEVELS = (0.0, 0.1, 0.25, 0.5, 0.7, 0.75, 1.0)


def _close(a, b):
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


@st.composite
def instances(draw):
    """(profile, link, calibration, grids) with ties between confidences and thresholds."""
    n_stages = draw(st.integers(2, 7))
    n_branches = draw(st.integers(0, min(3, n_stages - 1)))
    positions = sorted(
        draw(st.lists(st.integers(1, n_stages - 1), min_size=n_branches, max_size=n_branches,
                      unique=True))
    )
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))

    def times(n):
        values = rng.uniform(0.0, 50.0, n)
        values[rng.random(n) < 0.25] = 0.0
        return values

    profile = Profile(
        stage_names=tuple(f"s{i}" for i in range(n_stages)),
        stage_edge_ms=times(n_stages),
        stage_cloud_ms=times(n_stages),
        branch_after_stage=tuple(positions),
        branch_edge_ms=times(n_branches),
        split_bytes=rng.integers(0, 2_000_000, n_stages + 1),
        offload_overhead_ms=float(times(1)[0]),
        edge_fixed_ms=float(times(1)[0]),
    )
    link = Link(uplink_mbps=draw(st.floats(0.05, 1000.0)), rtt_ms=draw(st.floats(0.0, 300.0)))
    n_samples = draw(st.integers(1, 200))
    n_exits = n_branches + 1
    confidence = rng.random((n_samples, n_exits))
    discrete = rng.random((n_samples, n_exits)) < 0.5
    confidence[discrete] = rng.choice(LEVELS, int(discrete.sum()))
    labels = rng.integers(0, 3, n_samples)
    predicted = np.where(rng.random((n_samples, n_exits)) < 0.6, labels[:, None],
                         rng.integers(0, 3, (n_samples, n_exits)))
    calibration = Calibration(confidence=confidence, predicted=predicted,
                              correct=predicted == labels[:, None], labels=labels,
                              temperature=np.ones(n_exits))
    grids = [draw(st.lists(st.sampled_from(LEVELS), max_size=2)) for _ in range(n_branches)]
    return profile, link, calibration, grids


def _table(profile, link, calibration, grids):
    stats = sweep_exit_stats(calibration, branch_after_stage=profile.branch_after_stage,
                             thresholds=grids)
    return stats, Planner(stats, profile).table(link)


def _simulate(calibration, profile, link, thresholds, split):
    """Walk each sample through (θ, s): exit index and latency of every sample."""
    positions = profile.branch_after_stage
    exits, latencies = [], []
    for n in range(calibration.n_samples):
        elapsed_ms, exit_at = float(profile.edge_fixed_ms), None
        for stage in range(1, split + 1):
            elapsed_ms += float(profile.stage_edge_ms[stage - 1])
            for b, k in enumerate(positions):
                if k == stage and thresholds[b] is not None:
                    elapsed_ms += float(profile.branch_edge_ms[b])
                    if float(calibration.confidence[n, b]) >= thresholds[b]:
                        exit_at = b
                        break
            if exit_at is not None:
                break
        if exit_at is None:
            exit_at = profile.n_branches
            if split < profile.n_stages:
                elapsed_ms += (
                    profile.offload_overhead_ms
                    + 8 * float(profile.split_bytes[split]) / (1000 * link.uplink_mbps)
                    + link.rtt_ms
                    + sum(float(t) for t in profile.stage_cloud_ms[split:])
                )
        exits.append(exit_at)
        latencies.append(elapsed_ms)
    return exits, latencies


@settings(max_examples=40, deadline=None)
@given(instance=instances())
def test_rows_are_every_distinct_strategy_once(instance):
    profile, link, calibration, grids = instance
    _, table = _table(profile, link, calibration, grids)
    expected_keys = set()
    for split in range(profile.n_stages + 1):
        options = [
            ([None] + sorted(set(grid))) if k <= split else [None]
            for grid, k in zip(grids, profile.branch_after_stage)
        ]
        expected_keys |= {(tuple(combo), split) for combo in itertools.product(*options)
                          # threshold 0 lets every sample leave: such a row offloads nothing and is
                          # listed once, at split N (where nothing is offloaded either)
                          if split == profile.n_stages or not any(t is not None and t <= 0 for t in combo)}
    keys = [(tuple(row["thresholds"]), row["split"]) for row in table.to_rows()]
    assert len(keys) == len(set(keys)) == len(table)
    assert set(keys) == expected_keys


@settings(max_examples=40, deadline=None)
@given(instance=instances())
def test_table_matches_per_sample_loop(instance):
    profile, link, calibration, grids = instance
    _, table = _table(profile, link, calibration, grids)
    n_samples, n_branches = calibration.n_samples, profile.n_branches
    for index in range(len(table)):
        row = table.row(index)
        thresholds, split = row["thresholds"], row["split"]
        exits, latencies = _simulate(calibration, profile, link, thresholds, split)
        n_exit = [exits.count(b) for b in range(n_branches)]
        n_correct = sum(bool(calibration.correct[n, e]) for n, e in enumerate(exits))
        # Counts are exact, so these divisions must agree bit for bit.
        assert row["exit_probs"] == [count / n_samples for count in n_exit]
        assert row["accuracy"] == n_correct / n_samples
        assert int(table.n_correct[index]) == n_correct
        offloaded = sum(e == n_branches for e in exits) if split < profile.n_stages else 0
        assert _close(row["offload_prob"], offloaded / n_samples)
        assert _close(row["bytes_sent"], offloaded / n_samples * float(profile.split_bytes[split]))
        # Mean of the simulated per-sample latencies is E[T] by definition.
        assert _close(row["expected_latency_ms"], sum(latencies) / n_samples)
        assert max(latencies) <= row["worst_latency_ms"] * (1 + 1e-12) + 1e-9


@settings(max_examples=40, deadline=None)
@given(instance=instances())
def test_latencies_match_reference_formulas(instance):
    profile, link, calibration, grids = instance
    _, table = _table(profile, link, calibration, grids)
    for index in range(len(table)):
        row = table.row(index)
        active = np.array([t is not None for t in row["thresholds"]], dtype=bool)
        split = row["split"]
        assert _close(row["expected_latency_ms"],
                      expected_latency_ms(profile, link, row["exit_probs"], active, split))
        assert _close(row["worst_latency_ms"], worst_latency_ms(profile, link, active, split,
                                                             thresholds=row["thresholds"]))


@settings(max_examples=30, deadline=None)
@given(instance=instances())
def test_pareto_front_brute_force(instance):
    profile, link, calibration, grids = instance
    _, table = _table(profile, link, calibration, grids)
    for objective, latency in (("mean", table.expected_latency_ms), ("tail", table.worst_latency_ms)):
        on_front = [
            i for i in range(len(table))
            if all(
                table.n_correct[j] < table.n_correct[i]
                for j in range(len(table))
                if latency[j] < latency[i] or (latency[j] == latency[i] and j < i)
            )
        ]
        front = table.pareto_front(objective).tolist()
        assert sorted(front) == on_front
        assert all(latency[a] <= latency[b] for a, b in itertools.pairwise(front))
        assert all(table.n_correct[a] < table.n_correct[b] for a, b in itertools.pairwise(front))


@settings(max_examples=20, deadline=None)
@given(instance=instances(), other=st.floats(0.05, 1000.0))
def test_new_link_changes_only_link_terms(instance, other):
    profile, link, calibration, grids = instance
    stats = sweep_exit_stats(calibration, branch_after_stage=profile.branch_after_stage,
                             thresholds=grids)
    planner = Planner(stats, profile)
    first = planner.table(link)
    second = planner.table(Link(uplink_mbps=other, rtt_ms=link.rtt_ms))
    again = planner.table(link)
    np.testing.assert_array_equal(first.expected_latency_ms, again.expected_latency_ms)
    np.testing.assert_array_equal(first.accuracy, second.accuracy)
    assert planner.n_rows == len(first) == len(second)
    edge_only = first.split == profile.n_stages
    np.testing.assert_array_equal(first.expected_latency_ms[edge_only],
                                  second.expected_latency_ms[edge_only])


def test_sweep_level_sizes_and_default_grid():
    assert len(DEFAULT_THRESHOLDS) == 10
    assert DEFAULT_THRESHOLDS[0] == 0.5 and math.isclose(DEFAULT_THRESHOLDS[-1], 0.95)
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 5, 300)
    predicted = rng.integers(0, 5, (300, 3))
    calibration = Calibration(confidence=rng.random((300, 3)), predicted=predicted,
                              correct=predicted == labels[:, None], labels=labels,
                              temperature=np.ones(3))
    stats = sweep_exit_stats(calibration, branch_after_stage=(1, 3))
    assert [level.n_configs for level in stats.levels] == [1, 11, 121]
    level = stats.levels[2]
    assert np.isnan(level.thresholds[0]).all()  # first configuration: everything off
    assert level.n_exit.dtype == np.int64 and level.n_correct.dtype == np.int64
    # No branch on: accuracy of the final exit.
    assert stats.levels[0].n_correct[0] == int(calibration.correct[:, 2].sum())
    # Grids are sorted and de-duplicated.
    stats = sweep_exit_stats(calibration, branch_after_stage=(1, 3),
                             thresholds=[[0.9, 0.5, 0.5], []])
    assert stats.threshold_grids[0].tolist() == [0.5, 0.9]
    assert [level.n_configs for level in stats.levels] == [1, 3, 3]


def test_row_dict_and_csv(tmp_path):
    profile = Profile(stage_names=("a", "b", "c"), stage_edge_ms=[1.0, 2.0, 3.0],
                      stage_cloud_ms=[0.1, 0.2, 0.3], branch_after_stage=(1, 2),
                      branch_edge_ms=[0.5, 0.5], split_bytes=[100, 80, 60, 4],
                      offload_overhead_ms=1.0)
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 50)
    predicted = rng.integers(0, 2, (50, 3))
    calibration = Calibration(confidence=rng.random((50, 3)), predicted=predicted,
                              correct=predicted == labels[:, None], labels=labels,
                              temperature=np.ones(3))
    _, table = _table(profile, Link(uplink_mbps=1.0, rtt_ms=2.0), calibration, [[0.5], [0.6, 0.8]])
    rows = table.to_rows()
    json.dumps(rows)
    assert set(rows[0]) == {"thresholds", "split", "accuracy", "exit_probs", "offload_prob",
                            "expected_latency_ms", "worst_latency_ms", "bytes_sent"}
    assert rows[0]["thresholds"] == [None, None] and rows[0]["split"] == 0
    assert type(rows[-1]["split"]) is int and type(rows[-1]["accuracy"]) is float
    assert rows[-1]["offload_prob"] == 0.0 and rows[-1]["bytes_sent"] == 0.0
    path = tmp_path / "table.csv"
    table.to_csv(path)
    with open(path, newline="") as handle:
        read = list(csv.DictReader(handle))
    assert len(read) == len(table)
    for row, line in zip(rows, read):
        assert [None if v == "" else float(v) for v in (line["threshold_0"], line["threshold_1"])] \
            == row["thresholds"]
        assert int(line["split"]) == row["split"]
        assert float(line["expected_latency_ms"]) == row["expected_latency_ms"]
    with pytest.raises(ConfigError):
        table.row(len(table))
    with pytest.raises(ConfigError, match="fastest"):
        table.pareto_front("fastest")


def test_sweep_and_planner_reject_mismatches():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 10)
    predicted = rng.integers(0, 2, (10, 2))
    calibration = Calibration(confidence=rng.random((10, 2)), predicted=predicted,
                              correct=predicted == labels[:, None], labels=labels,
                              temperature=np.ones(2))
    with pytest.raises(CalibrationError, match="1 branches"):
        sweep_exit_stats(calibration, branch_after_stage=(1, 2))
    with pytest.raises(ConfigError, match="1.5"):
        sweep_exit_stats(calibration, branch_after_stage=(1,), thresholds=[[0.5, 1.5]])
    with pytest.raises(ConfigError):
        sweep_exit_stats(calibration, branch_after_stage=(1,), thresholds=[[0.5], [0.5]])
    with pytest.raises(ConfigError):
        sweep_exit_stats(calibration, branch_after_stage=(1,), thresholds=[[math.nan]])
    stats = sweep_exit_stats(calibration, branch_after_stage=(1,))
    profile = Profile(stage_names=("a", "b", "c"), stage_edge_ms=[1.0, 2.0, 3.0],
                      stage_cloud_ms=[0.1, 0.2, 0.3], branch_after_stage=(2,),
                      branch_edge_ms=[0.5], split_bytes=[100, 80, 60, 4],
                      offload_overhead_ms=1.0)
    with pytest.raises(ProfileError, match=r"\(2,\)"):
        Planner(stats, profile)


def test_a_zero_threshold_branch_ends_the_worst_path():
    """Tail requirement below the full edge path: a branch every sample leaves at meets it (it did not before)."""
    from popex.decision import DecisionIndex

    calibration = Calibration(confidence=np.array([[0.9, 0.8, 1.0], [0.3, 0.6, 1.0]]),
                              predicted=np.array([[0, 0, 0], [1, 1, 1]]),
                              correct=np.ones((2, 3), dtype=bool), labels=np.array([0, 1]),
                              temperature=np.ones(3))
    profile = Profile(stage_names=("a", "b", "c"), stage_edge_ms=[10.0, 10.0, 30.0],
                      stage_cloud_ms=[1.0, 1.0, 1.0], branch_after_stage=(1, 2), branch_edge_ms=[2.0, 2.0],
                      split_bytes=[1000, 1000, 1000, 4], offload_overhead_ms=1.0)
    stats = sweep_exit_stats(calibration, branch_after_stage=(1, 2), thresholds=[[0.0, 0.5], [0.0, 0.5]])
    table = Planner(stats, profile).table(Link(uplink_mbps=0.01, rtt_ms=500.0))  # offloading never fits
    rows = {(tuple(r["thresholds"]), r["split"]): r for r in table.to_rows()}
    assert rows[((None, 0.0), 3)]["worst_latency_ms"] == pytest.approx(10 + 10 + 2)
    assert rows[((0.5, 0.0), 3)]["worst_latency_ms"] == pytest.approx(10 + 10 + 2 + 2)
    assert rows[((0.0, None), 3)]["worst_latency_ms"] == pytest.approx(10 + 2)
    assert rows[((0.5, None), 3)]["worst_latency_ms"] == pytest.approx(50 + 2)  # may still reach the end
    assert ((0.0, None), 1) not in rows and ((0.0, None), 2) not in rows  # the same strategy as at split 3
    decision = DecisionIndex(table, objective="tail").lookup(30.0)
    assert decision.feasible and table.row(decision.row)["worst_latency_ms"] <= 30.0
