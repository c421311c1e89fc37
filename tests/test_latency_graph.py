"""Profile/Link validation, the §3 formulas, and the §4 shortest-path graph."""

import itertools
import dataclasses
import json
import math

import networkx as nx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popex.decision.graph import build_graph, shortest_split
from popex.decision.calibration import Calibration
from popex.decision.formulas import expected_latency_ms, worst_latency_ms
from popex.decision.latency import Link, Profile
from popex.decision.sweep import sweep_exit_stats
from popex.errors import ConfigError, ProfileError

LEVELS = (0.0, 0.1, 0.25, 0.5, 0.7, 0.75, 1.0)


def _close(a, b):
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


@st.composite
def profiles(draw):
    n_stages = draw(st.integers(2, 7))
    n_branches = draw(st.integers(0, min(3, n_stages - 1)))
    positions = sorted(
        draw(
            st.lists(
                st.integers(1, n_stages - 1),
                min_size=n_branches,
                max_size=n_branches,
                unique=True,
            )
        )
    )
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))

    def times(n):
        values = rng.uniform(0.0, 50.0, n)
        values[rng.random(n) < 0.25] = 0.0
        return values

    split_bytes = rng.integers(0, 2_000_000, n_stages + 1)
    split_bytes[rng.random(n_stages + 1) < 0.15] = 0
    return Profile(
        stage_names=tuple(f"stage{i}" for i in range(n_stages)),
        stage_edge_ms=times(n_stages),
        stage_cloud_ms=times(n_stages),
        branch_after_stage=tuple(positions),
        branch_edge_ms=times(n_branches),
        split_bytes=split_bytes,
        offload_overhead_ms=float(times(1)[0]),
        edge_fixed_ms=float(times(1)[0]),
        wire_ratio=float(rng.choice([1.0, rng.uniform(0.05, 2.0)])),
    )


links = st.builds(
    Link,
    uplink_mbps=st.floats(0.05, 1000.0),
    rtt_ms=st.one_of(st.just(0.0), st.floats(0.0, 300.0)),
)


@st.composite
def exit_configs(draw, profile):
    """Random q_b (summing to <= 1 over active branches) and active flags."""
    n_branches = profile.n_branches
    active = np.array(draw(st.lists(st.booleans(), min_size=n_branches, max_size=n_branches)), dtype=bool)
    weights = np.array(
        draw(st.lists(st.floats(0.0, 1.0), min_size=n_branches + 1, max_size=n_branches + 1))
    )
    probs = np.zeros(n_branches)
    if weights.sum() > 0:
        probs = weights[:n_branches] / weights.sum()
    return probs, active


def _calibration(rng, n_samples, n_exits):
    confidence = rng.random((n_samples, n_exits))
    discrete = rng.random((n_samples, n_exits)) < 0.5
    confidence[discrete] = rng.choice(LEVELS, int(discrete.sum()))
    labels = rng.integers(0, 3, n_samples)
    predicted = np.where(rng.random((n_samples, n_exits)) < 0.6, labels[:, None],
                         rng.integers(0, 3, (n_samples, n_exits)))
    return Calibration(confidence=confidence, predicted=predicted,
                       correct=predicted == labels[:, None], labels=labels,
                       temperature=np.ones(n_exits))


def _hand_profile():
    return Profile(
        stage_names=("conv", "block", "head"),
        stage_edge_ms=[2.0, 4.0, 6.0],
        stage_cloud_ms=[0.5, 1.0, 1.5],
        branch_after_stage=(1, 2),
        branch_edge_ms=[0.25, 0.75],
        split_bytes=[4000, 2000, 1000, 40],
        offload_overhead_ms=3.0,
    )


# --- Profile and Link -------------------------------------------------------


def test_to_dict_shape():
    assert _hand_profile().to_dict() == {
        "input_bytes": 4000,
        "offload_overhead_ms": 3.0,
        "edge_fixed_ms": 0.0,
        "wire_ratio": 1.0,
        "stages": [
            {"name": "conv", "edge_ms": 2.0, "cloud_ms": 0.5, "out_bytes": 2000},
            {"name": "block", "edge_ms": 4.0, "cloud_ms": 1.0, "out_bytes": 1000},
            {"name": "head", "edge_ms": 6.0, "cloud_ms": 1.5, "out_bytes": 40},
        ],
        "branches": [{"after_stage": 1, "edge_ms": 0.25}, {"after_stage": 2, "edge_ms": 0.75}],
    }


@settings(max_examples=30, deadline=None)
@given(profile=profiles())
def test_profile_dict_round_trip(profile):
    data = json.loads(json.dumps(profile.to_dict()))
    restored = Profile.from_dict(data)
    assert restored.to_dict() == profile.to_dict()
    np.testing.assert_array_equal(restored.split_bytes, profile.split_bytes)
    assert restored.split_bytes.dtype == np.int64
    np.testing.assert_array_equal(restored.stage_edge_ms, profile.stage_edge_ms)


def _profile_kwargs(**change):
    kwargs = dict(
        stage_names=("a", "b", "c"),
        stage_edge_ms=[1.0, 2.0, 3.0],
        stage_cloud_ms=[0.1, 0.2, 0.3],
        branch_after_stage=(1, 2),
        branch_edge_ms=[0.5, 0.5],
        split_bytes=[10, 20, 30, 4],
        offload_overhead_ms=1.0,
    )
    kwargs.update(change)
    return kwargs


@pytest.mark.parametrize(
    "change, pattern",
    [
        ({"branch_after_stage": (2, 1)}, "strictly increasing"),
        ({"branch_after_stage": (1, 1)}, "strictly increasing"),
        ({"branch_after_stage": (0, 2)}, "outside"),
        ({"branch_after_stage": (1, 3)}, "outside"),
        ({"branch_after_stage": (1.0, 2)}, "integers"),
        ({"stage_edge_ms": [1.0, -2.0, 3.0]}, "stage_edge_ms"),
        ({"stage_cloud_ms": [1.0, math.nan, 3.0]}, "stage_cloud_ms"),
        ({"stage_edge_ms": [1.0, 2.0]}, "length 3"),
        ({"branch_edge_ms": [0.5]}, "branch_edge_ms"),
        ({"split_bytes": [10, 20, 30]}, "split_bytes"),
        ({"split_bytes": [10, 20.5, 30, 4]}, "whole numbers"),
        ({"split_bytes": [10, -1, 30, 4]}, "whole numbers"),
        ({"offload_overhead_ms": -1.0}, "offload_overhead_ms"),
        ({"offload_overhead_ms": math.inf}, "offload_overhead_ms"),
        ({"wire_ratio": 0.0}, "wire_ratio"),
        ({"wire_ratio": math.nan}, "wire_ratio"),
        ({"wire_ratio": "0.5"}, "wire_ratio"),
        ({"stage_names": ()}, "stage_names"),
        ({"stage_names": "abc"}, "stage_names"),
    ],
)
def test_profile_rejects(change, pattern):
    with pytest.raises(ProfileError, match=pattern):
        Profile(**_profile_kwargs(**change))


@pytest.mark.parametrize("path", [("input_bytes",), ("stages", 1, "cloud_ms"), ("branches", 0, "after_stage")])
def test_from_dict_missing_key(path):
    data = _hand_profile().to_dict()
    target = data
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    with pytest.raises(ProfileError, match=path[-1]):
        Profile.from_dict(data)


@pytest.mark.parametrize("data", [None, [], {"stages": 3, "branches": [], "input_bytes": 1,
                                              "offload_overhead_ms": 0.0}])
def test_from_dict_malformed(data):
    with pytest.raises(ProfileError):
        Profile.from_dict(data)


@pytest.mark.parametrize(
    "uplink_mbps, rtt_ms", [(0.0, 1.0), (-1.0, 1.0), (math.nan, 1.0), (math.inf, 1.0), (1.0, -1.0), (1.0, math.nan)]
)
def test_link_rejects(uplink_mbps, rtt_ms):
    with pytest.raises(ConfigError):
        Link(uplink_mbps=uplink_mbps, rtt_ms=rtt_ms)


# --- formulas ----------------------------------------------------------------


def test_expected_latency_by_hand():
    profile, link = _hand_profile(), Link(uplink_mbps=8.0, rtt_ms=10.0)
    # Branches after stages 1 and 2, both on, q = (0.2, 0.3).
    q, on = [0.2, 0.3], [True, True]
    # s = 0: nothing on the edge, everything offloaded: O + 4000 B at 8 Mbit/s + R + cloud.
    assert expected_latency_ms(profile, link, q, on, 0) == pytest.approx(3 + 4 + 10 + 3)
    # s = 1: stage 1 (r=1), branch 0 (r=1), p_off = 0.8 of (3 + 2 + 10 + 2.5).
    assert expected_latency_ms(profile, link, q, on, 1) == pytest.approx(2 + 0.25 + 0.8 * 17.5)
    # s = 2: stage 2 and branch 1 reached by 0.8; p_off = 0.5 of (3 + 1 + 10 + 1.5).
    assert expected_latency_ms(profile, link, q, on, 2) == pytest.approx(
        2 + 0.8 * 4 + 0.25 + 0.8 * 0.75 + 0.5 * 15.5
    )
    # s = 3: edge only; stage 3 reached by 0.5.
    assert expected_latency_ms(profile, link, q, on, 3) == pytest.approx(
        2 + 0.8 * 4 + 0.5 * 6 + 0.25 + 0.8 * 0.75
    )
    # Payloads deflated to half their size: s = 0 sends 2000 B (2 ms instead of 4).
    half = dataclasses.replace(profile, wire_ratio=0.5)
    assert expected_latency_ms(half, link, q, on, 0) == pytest.approx(3 + 2 + 10 + 3)
    # Branch 0 off: the reach of stage 2 is 1 and branch 1 alone exits.
    assert expected_latency_ms(profile, link, q, [False, True], 3) == pytest.approx(
        2 + 4 + 0.7 * 6 + 0.75
    )
    assert worst_latency_ms(profile, link, on, 1) == pytest.approx(2 + 0.25 + 17.5)
    assert worst_latency_ms(profile, link, on, 3) == pytest.approx(12 + 1.0)


def test_branch_past_split_is_ignored():
    profile, link = _hand_profile(), Link(uplink_mbps=8.0, rtt_ms=10.0)
    assert expected_latency_ms(profile, link, [0.2, 0.3], [True, True], 1) == pytest.approx(
        expected_latency_ms(profile, link, [0.2, 0.0], [True, False], 1)
    )
    assert worst_latency_ms(profile, link, [True, True], 1) == worst_latency_ms(
        profile, link, [True, False], 1
    )


@pytest.mark.parametrize(
    "q, active, split",
    [
        ([0.2], [True, True], 1),
        ([0.2, 0.3], [1, 1], 1),
        ([0.7, 0.7], [True, True], 2),
        ([-0.1, 0.3], [True, True], 2),
        ([0.2, 0.3], [True, True], 4),
        ([0.2, 0.3], [True, True], -1),
        ([0.2, 0.3], [True, True], 1.0),
    ],
)
def test_formula_rejects(q, active, split):
    with pytest.raises(ConfigError):
        expected_latency_ms(_hand_profile(), Link(uplink_mbps=1.0, rtt_ms=0.0), q, active, split)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), profile=profiles(), link=links)
def test_expected_never_exceeds_worst(data, profile, link):
    q, active = data.draw(exit_configs(profile))
    for split in range(profile.n_stages + 1):
        expected = expected_latency_ms(profile, link, q, active, split)
        worst = worst_latency_ms(profile, link, active, split)
        assert expected <= worst * (1 + 1e-12) + 1e-12
        if not active.any():
            assert _close(expected, worst)


# --- graph ---------------------------------------------------------------------


def _check_against_brute_force(profile, link, q, active):
    graph = build_graph(profile, link, q, active)
    assert nx.is_directed_acyclic_graph(graph)
    for u, v, data in graph.edges(data=True):
        assert isinstance(data["latency_ms"], float) and data["latency_ms"] >= 0, (u, v)
    cut_splits = sorted(d["split"] for _, _, d in graph.in_edges("output", data=True))
    assert cut_splits == list(range(profile.n_stages + 1))
    branch_vertices = sorted(n for n in graph if n.startswith("branch_"))
    assert branch_vertices == sorted(f"branch_{b}" for b in np.flatnonzero(active))

    best = shortest_split(graph)
    by_split = [expected_latency_ms(profile, link, q, active, s) for s in range(profile.n_stages + 1)]
    minimum = min(by_split)
    assert _close(best.expected_latency_ms, minimum)
    assert _close(by_split[best.split], best.expected_latency_ms)
    path_ms = sum(graph.edges[u, v]["latency_ms"] for u, v in itertools.pairwise(best.path))
    assert _close(path_ms, best.expected_latency_ms)
    assert best.path[0] == "input" and best.path[-1] == "output"
    # Every split's own path has that split's E[T] (not only the best one).
    for split in range(profile.n_stages + 1):
        point = next(u for u, _, d in graph.in_edges("output", data=True) if d["split"] == split)
        to_point = nx.shortest_path_length(graph, "input", point, weight="latency_ms")
        total = to_point + graph.edges[point, "output"]["latency_ms"]
        assert _close(total, by_split[split])
    ordered = sorted(by_split)
    if len(ordered) == 1 or ordered[1] - ordered[0] > 1e-9 * max(1.0, abs(ordered[0])):
        assert best.split == int(np.argmin(by_split))


@settings(max_examples=60, deadline=None)
@given(data=st.data(), profile=profiles(), link=links)
def test_dijkstra_matches_brute_force_random_probs(data, profile, link):
    q, active = data.draw(exit_configs(profile))
    _check_against_brute_force(profile, link, q, active)


@settings(max_examples=25, deadline=None)
@given(
    profile=profiles(),
    link=links,
    n_samples=st.integers(1, 200),
    seed=st.integers(0, 2**32 - 1),
    grid=st.lists(st.sampled_from(LEVELS), min_size=0, max_size=2),
)
def test_dijkstra_matches_brute_force_every_configuration(profile, link, n_samples, seed, grid):
    calibration = _calibration(np.random.default_rng(seed), n_samples, profile.n_branches + 1)
    stats = sweep_exit_stats(
        calibration,
        branch_after_stage=profile.branch_after_stage,
        thresholds=[grid] * profile.n_branches,
    )
    level = stats.levels[profile.n_branches]
    for q, thresholds in zip(level.exit_probs, level.thresholds):
        _check_against_brute_force(profile, link, q, ~np.isnan(thresholds))


def test_graph_layout_by_hand():
    profile, link = _hand_profile(), Link(uplink_mbps=8.0, rtt_ms=10.0)
    graph = build_graph(profile, link, [0.2, 0.3], [False, True])
    assert list(nx.topological_sort(graph)) == [
        "input", "stage_1", "stage_2", "branch_1", "stage_3", "output"
    ]
    assert graph.edges["branch_1", "stage_3"]["latency_ms"] == pytest.approx(0.7 * 6.0)
    assert graph.edges["branch_1", "output"]["split"] == 2
    assert graph.edges["branch_1", "output"]["latency_ms"] == pytest.approx(0.7 * (3 + 1 + 10 + 1.5))
    assert graph.edges["stage_3", "output"]["latency_ms"] == 0.0


def test_missing_weight_is_an_error():
    graph = build_graph(_hand_profile(), Link(uplink_mbps=8.0, rtt_ms=10.0), [0.2, 0.3], [True, True])
    del graph.edges["stage_1", "branch_0"]["latency_ms"]
    with pytest.raises(ConfigError, match="latency_ms"):
        shortest_split(graph)


def test_build_graph_rejects_bad_probs():
    with pytest.raises(ConfigError):
        build_graph(_hand_profile(), Link(uplink_mbps=8.0, rtt_ms=10.0), [0.8, 0.3], [True, True])


def test_probabilities_summing_to_one_with_rounding():
    profile = Profile(stage_names=("a", "b", "c", "d"), stage_edge_ms=[1.0, 2.0, 3.0, 4.0],
                      stage_cloud_ms=[0.1, 0.2, 0.3, 0.4], branch_after_stage=(1, 2, 3),
                      branch_edge_ms=[0.5, 0.5, 0.5], split_bytes=[100, 80, 60, 40, 4],
                      offload_overhead_ms=1.0)
    q = [0.1, 0.2, 0.7]  # sums to 1.0000000000000002 in floating point
    graph = build_graph(profile, Link(uplink_mbps=1.0, rtt_ms=5.0), q, [True, True, True])
    assert all(d["latency_ms"] >= 0 for _, _, d in graph.edges(data=True))
    best = shortest_split(graph)
    # Everything exits by branch 2: offloading after it, or running stage 4, costs nothing.
    assert best.split in (3, 4)
    assert _close(best.expected_latency_ms, 1 + 0.5 + 0.9 * (2 + 0.5) + 0.7 * (3 + 0.5))
