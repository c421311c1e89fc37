"""Properties of the token bucket and the MDP policy (issue 14's acceptance), checked with hypothesis."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from popex.ratelimit.bucket import TokenBucket, integerise
from popex.ratelimit.data import MetricData, synthetic_metric_data
from popex.ratelimit.mdp import solve_mdp
from popex.ratelimit.policies import make_policy
from popex.ratelimit.simulate import run_plan, simulate

rates = st.floats(min_value=0.01, max_value=3.0, allow_nan=False)
depths = st.floats(min_value=1.0, max_value=30.0, allow_nan=False)


@pytest.fixture(scope="module")
def synthetic() -> MetricData:
    return synthetic_metric_data(n_images=6000, seed=2)


@settings(max_examples=80, deadline=None)
@given(rate=rates, depth=depths, gaps=st.lists(st.integers(1, 6), min_size=1, max_size=300),
       wants=st.lists(st.booleans(), min_size=300, max_size=300))
def test_offloads_in_any_window_never_exceed_r_t_plus_b_and_the_level_stays_in_0_m(rate, depth, gaps, wants):
    params = integerise(rate, depth)
    bucket = TokenBucket(params)
    arrival_slot, offloaded, slot = [], [], 0
    for i, gap in enumerate(gaps):
        assert 0 <= bucket.level <= params.m
        arrival_slot.append(slot)
        offloaded.append(wants[i] and bucket.try_take())
        assert 0 <= bucket.level <= params.m
        bucket.advance(gap)
        slot += gap
    counts = np.concatenate([[0], np.cumsum(offloaded)])
    arrival_slot = np.array(arrival_slot)
    for i in range(len(gaps)):  # every window of arrivals i..j spans T = slot_j - slot_i slots
        n_in_window = counts[i + 1:] - counts[i]
        span_slots = arrival_slot[i:] - arrival_slot[i]
        # in integer units: p * offloads <= q * T + m, i.e. offloads <= r T + b exactly
        assert np.all(params.p * n_in_window <= params.q * span_slots + params.m)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rate=st.floats(0.02, 0.9), depth=st.floats(1.0, 12.0), seed=st.integers(0, 10_000),
       mmpp=st.booleans())
def test_mdp_thresholds_are_non_increasing_in_the_token_level(rate, depth, seed, mmpp):
    rng = np.random.default_rng(seed)
    metric = rng.normal(rng.normal(), rng.uniform(0.1, 3.0), 500) * rng.choice([1.0, 0.01])
    params = integerise(rate, depth)
    solution = solve_mdp(params, metric, interval_probs={1: 1 / 3, 3: 2 / 3} if mmpp else {1: 1.0})
    assert solution.converged
    finite = solution.thresholds[params.p:]
    assert np.all(np.isfinite(finite)) and np.all(np.isinf(solution.thresholds[:params.p]))
    assert np.all(np.diff(finite) <= 1e-9 * max(1.0, float(np.ptp(metric))))


def test_as_b_grows_the_mdp_loss_approaches_the_lower_bound(synthetic):
    gaps = []
    for depth in (1, 3, 10, 30):
        report = simulate(synthetic, rate=0.2, depth=depth, seq_len=200_000, seed=5,
                          policies=("lower-bound", "mdp"))
        gaps.append(report.policies["mdp"].loss - report.policies["lower-bound"].loss)
    assert gaps[0] > 0.0
    assert all(later <= earlier + 1e-4 for earlier, later in zip(gaps, gaps[1:])), gaps
    assert abs(gaps[-1]) < 0.25 * gaps[0], gaps


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rate=st.floats(1.0, 4.0), depth=st.floats(1.0, 10.0), seed=st.integers(0, 1000))
def test_with_r_at_least_1_on_periodic_arrivals_the_bucket_never_binds(synthetic, rate, depth, seed):
    report = simulate(synthetic, rate=rate, depth=depth, seq_len=3000, seed=seed,
                      policies=("strong", "baseline", "mdp"))
    assert report.policies["baseline"].loss == report.policies["strong"].loss
    params = integerise(rate, depth)
    mdp = make_policy("mdp", params=params, metric_tr=synthetic.metric_tr, interval_probs={1: 1.0})
    metric = np.random.default_rng(seed).choice(synthetic.metric_ts, 3000)
    offloaded = run_plan(mdp.plan(metric), metric, np.ones(3000, dtype=np.int64), params)
    assert np.array_equal(offloaded, metric > 0)
