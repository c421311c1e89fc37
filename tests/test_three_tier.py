"""The three-tier latency model against a per-sample simulation of the calibration set."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popex.decision import Calibration, Link, sweep_exit_stats
from popex.decision.three_tier import Hop, ThreeTierProfile, enumerate_tier_cuts, three_tier_table
from popex.errors import ProfileError


def _simulate(calibration, thresholds, positions, profile, hops, x, y):
    """Mean and max latency, and accuracy, of one (θ, x, y), one sample at a time."""
    n = profile.n_stages
    tier_of = lambda stage: 0 if stage <= x else (1 if stage <= y else 2)  # noqa: E731
    latencies, n_correct = [], 0
    for s in range(calibration.n_samples):
        exit_stage, exit_index = n, len(positions)
        for b, (k, t) in enumerate(zip(positions, thresholds)):
            if not np.isnan(t) and float(calibration.confidence[s, b]) >= t:
                exit_stage, exit_index = k, b
                break
        n_correct += bool(calibration.correct[s, exit_index])
        total = sum(profile.stage_ms[tier_of(i), i - 1] for i in range(1, exit_stage + 1))
        total += sum(profile.branch_ms[tier_of(k), b] for b, (k, t) in enumerate(zip(positions, thresholds))
                     if not np.isnan(t) and k <= exit_stage)
        if exit_stage > x:  # it leaves the device
            total += hops["de" if x < y else "dc"].cost_ms(profile.split_bytes[x])
            if x < y and exit_stage > y:
                total += hops["ec"].cost_ms(profile.split_bytes[y])
        latencies.append(total)
    return float(np.mean(latencies)), float(np.max(latencies)), n_correct / calibration.n_samples


@st.composite
def _cases(draw):
    n_stages = draw(st.integers(1, 5))
    n_branches = draw(st.integers(0, min(2, n_stages - 1)))
    positions = sorted(draw(st.lists(st.integers(1, n_stages - 1), min_size=n_branches, max_size=n_branches,
                                     unique=True))) if n_branches else []
    n_samples = draw(st.integers(1, 30))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    confidence = rng.random((n_samples, n_branches + 1)).astype(np.float32)
    labels = rng.integers(0, 3, n_samples)
    predicted = rng.integers(0, 3, (n_samples, n_branches + 1))
    calibration = Calibration(confidence=confidence, predicted=predicted, correct=predicted == labels[:, None],
                              labels=labels, temperature=np.ones(n_branches + 1, dtype=np.float32))
    times = st.floats(0, 50)
    profile = ThreeTierProfile(
        stage_ms=np.array([[draw(times) for _ in range(n_stages)] for _ in range(3)]),
        branch_ms=np.array([[draw(times) for _ in range(n_branches)] for _ in range(3)]).reshape(3, n_branches),
        branch_after_stage=tuple(positions),
        split_bytes=np.array([draw(st.integers(0, 10**6)) for _ in range(n_stages + 1)]))
    hops = {name: Hop(Link(uplink_mbps=draw(st.floats(0.1, 100)), rtt_ms=draw(st.floats(0, 100))),
                      overhead_ms=draw(st.floats(0, 5))) for name in ("de", "ec", "dc")}
    grid = [sorted(set(draw(st.lists(st.floats(0, 1), min_size=1, max_size=3)))) for _ in range(n_branches)]
    return calibration, positions, profile, hops, grid


def _table(case):
    calibration, positions, profile, hops, grid = case
    stats = sweep_exit_stats(calibration, branch_after_stage=positions, thresholds=grid)
    return three_tier_table(stats, profile, device_edge=hops["de"], edge_cloud=hops["ec"], device_cloud=hops["dc"])


@settings(max_examples=60, deadline=None)
@given(_cases())
def test_every_row_equals_a_per_sample_simulation(case):
    calibration, positions, profile, hops, grid = case
    table = _table(case)
    assert len(table.x) == (profile.n_stages + 1) * (profile.n_stages + 2) // 2
    for config in range(len(table.accuracy)):
        for cut, (x, y) in enumerate(zip(table.x.tolist(), table.y.tolist())):
            mean_ms, max_ms, accuracy = _simulate(calibration, table.thresholds[config], positions, profile, hops, x, y)
            assert table.expected_ms[config, cut] == pytest.approx(mean_ms, rel=1e-9, abs=1e-9)
            assert table.worst_ms[config, cut] >= max_ms - 1e-9  # no sample is slower than the worst case
            assert table.accuracy[config] == pytest.approx(accuracy)


def test_cuts_and_bad_profiles():
    assert list(zip(*[a.tolist() for a in enumerate_tier_cuts(2)])) == [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2)]
    with pytest.raises(ProfileError, match="branches after stages"):
        ThreeTierProfile(stage_ms=np.ones((3, 2)), branch_ms=np.ones((3, 1)), branch_after_stage=(2,),
                         split_bytes=np.ones(3))
    with pytest.raises(ProfileError, match="finite and >= 0"):
        ThreeTierProfile(stage_ms=-np.ones((3, 2)), branch_ms=np.ones((3, 0)), branch_after_stage=(),
                         split_bytes=np.ones(3))


@settings(max_examples=60, deadline=None)
@given(_cases())
def test_the_three_lane_graph_and_dijkstra_agree_with_brute_force_over_all_cuts(case):
    from popex.decision.three_tier_graph import build_three_tier_graph, shortest_cuts

    calibration, positions, profile, hops, grid = case
    table = _table(case)
    for config in range(len(table.accuracy)):
        graph = build_three_tier_graph(profile, device_edge=hops["de"], edge_cloud=hops["ec"], device_cloud=hops["dc"],
                                       exit_probs=table.exit_probs[config],
                                       active=~np.isnan(table.thresholds[config]))
        best = shortest_cuts(graph, n_stages=profile.n_stages)
        brute = table.expected_ms[config]
        assert best.expected_latency_ms == pytest.approx(brute.min(), rel=1e-9, abs=1e-9)
        cut = int(np.flatnonzero((table.x == best.x) & (table.y == best.y))[0])
        assert brute[cut] == pytest.approx(best.expected_latency_ms, rel=1e-9, abs=1e-9)
        # every input -> output path is one cut: as many paths as cuts
        import networkx as nx
        assert sum(1 for _ in nx.all_simple_paths(graph, "input", "output")) == len(table.x)


@settings(max_examples=40, deadline=None)
@given(_cases(), st.floats(0, 400), st.sampled_from(["mean", "tail"]))
def test_policies_use_only_their_cuts_and_adaptive_is_at_least_as_accurate(case, deadline_ms, objective):
    from popex.decision.three_tier_policies import THREE_TIER_POLICIES, choose_three_tier

    calibration, positions, profile, hops, grid = case
    table = _table(case)
    n = profile.n_stages
    rules = {"device-only": lambda x, y: x == y == n, "edge-only": lambda x, y: x == 0 and y == n,
             "cloud-only": lambda x, y: x == y == 0, "device-cloud": lambda x, y: x == y,
             "edge-cloud": lambda x, y: x == 0, "three-tier": lambda x, y: True}
    assert set(rules) == set(THREE_TIER_POLICIES)
    latency = table.latency_ms(objective)
    choices = {}
    for policy, rule in rules.items():
        choice = choose_three_tier(table, policy=policy, deadline_ms=deadline_ms, objective=objective)
        choices[policy] = choice
        assert rule(choice.x, choice.y)
        pairs = [(c, k) for c in range(len(table.accuracy)) for k, (x, y) in enumerate(zip(table.x, table.y))
                 if rule(int(x), int(y))]
        feasible = [(c, k) for c, k in pairs if latency[c, k] <= deadline_ms]
        if feasible:  # brute force: the most accurate feasible row
            assert choice.feasible and choice.accuracy == max(table.accuracy[c] for c, _ in feasible)
        else:
            assert not choice.feasible
            assert latency[choice.config, choice.cut] == pytest.approx(min(latency[c, k] for c, k in pairs))
    for policy, choice in choices.items():
        if choice.feasible:
            assert choices["three-tier"].feasible and choices["three-tier"].accuracy >= choice.accuracy


def test_an_unknown_policy_is_named():
    from popex.decision.three_tier_policies import policy_cuts
    from popex.errors import ConfigError

    calibration = Calibration(confidence=np.ones((2, 1), dtype=np.float32), predicted=np.zeros((2, 1), dtype=int),
                              correct=np.ones((2, 1), dtype=bool), labels=np.zeros(2, dtype=int),
                              temperature=np.ones(1, dtype=np.float32))
    profile = ThreeTierProfile(stage_ms=np.ones((3, 1)), branch_ms=np.ones((3, 0)), branch_after_stage=(),
                               split_bytes=np.ones(2))
    hop = Hop(Link(uplink_mbps=1.0, rtt_ms=1.0))
    table = three_tier_table(sweep_exit_stats(calibration, branch_after_stage=[]), profile, device_edge=hop,
                             edge_cloud=hop, device_cloud=hop)
    with pytest.raises(ConfigError, match="unknown three-tier policy 'fog'; one of device-only"):
        policy_cuts(table, "fog")
