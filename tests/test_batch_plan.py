"""The batch-aware plan: the inference time matrix, the batching pattern matrix, the prediction and the optimiser.

The pattern matrix and the prediction are checked against brute force: every
batch of n samples of a small calibration split run through the compacted
schedule (each sample pays every piece that runs while it is in the batch),
and the optimiser's choice against the best subset found that way. The
arrival model is checked against the real :class:`BatchQueue` on a fake clock.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from popex.decision.batch_arrivals import arrival_model
from popex.decision.batch_pattern import batching_pattern, continuing_counts, hypergeometric_pmf
from popex.decision.batch_plan import BatchCosts, plan_batch_exits, predict_batch
from popex.decision.calibration import Calibration
from popex.decision.latency import Link, Profile
from popex.errors import ConfigError, ProfileError
from popex.runtime.batch_profile import BatchTimings, batch_sizes_up_to, load_batch_timings, time_batches
from popex.runtime.batcher import BatchQueue
from popex.runtime.profiler import save_profile

REPO = Path(__file__).resolve().parents[1]


def _calibration(n_samples: int, n_branches: int, seed: int) -> Calibration:
    rng = np.random.default_rng(seed)
    n_exits = n_branches + 1
    labels = rng.integers(0, 3, n_samples)
    predicted = np.where(rng.random((n_samples, n_exits)) < 0.8, labels[:, None], (labels[:, None] + 1) % 3)
    return Calibration(confidence=rng.random((n_samples, n_exits)).round(2), predicted=predicted,
                       correct=predicted == labels[:, None], labels=labels, temperature=np.ones(n_exits))


def _costs(n_stages: int, branch_after_stage: tuple[int, ...], split: int, max_n: int, seed: int) -> BatchCosts:
    """Arbitrary whole-batch times, growing with n but not linearly (what batching buys)."""
    rng = np.random.default_rng(seed)

    def grow(n_rows: int) -> np.ndarray:
        base = rng.uniform(0.5, 3.0, (n_rows, 1))
        n = np.arange(max_n + 1)[None, :]
        return base * n ** rng.uniform(0.3, 1.0, (n_rows, 1))  # 0 at n = 0

    offload = 5.0 + 2.0 * np.arange(max_n + 1) ** 0.7 if split < n_stages else np.zeros(max_n + 1)
    offload[0] = 0.0
    return BatchCosts(stage_ms=grow(n_stages), branch_ms=grow(len(branch_after_stage)), offload_ms=offload,
                      split=split, branch_after_stage=branch_after_stage, edge_fixed_ms=0.25)


def _brute_force(costs: BatchCosts, calibration: Calibration, thresholds, exits, n: int) -> tuple[float, float]:
    """Mean per-sample latency and completion time over every batch of n samples, by running the schedule."""
    per_sample, completion = [], []
    for batch in itertools.combinations(range(calibration.n_samples), n):
        running = list(batch)
        finish = dict.fromkeys(batch, 0.0)
        clock = 0.0
        for stage in range(1, costs.split + 1):
            if running:
                clock += costs.stage_ms[stage - 1][len(running)]
            for b, after in enumerate(costs.branch_after_stage):
                if after != stage or b not in exits or not running:
                    continue
                clock += costs.branch_ms[b][len(running)]
                leaving = [j for j in running if float(calibration.confidence[j, b]) >= thresholds[b]]
                for j in leaving:
                    finish[j] = clock
                running = [j for j in running if j not in leaving]
        if running:
            clock += costs.offload_ms[len(running)]
        for j in running:
            finish[j] = clock
        per_sample.append(np.mean(list(finish.values())) + costs.edge_fixed_ms)
        completion.append(clock)
    return float(np.mean(per_sample)), float(np.mean(completion))


# -- the batching pattern matrix ----------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(3))
def test_the_pattern_matrix_is_the_distribution_over_every_batch_of_the_split(seed):
    calibration = _calibration(9, 2, seed)
    thresholds = (0.5, 0.3)
    running = np.ones(9, bool)
    continuing = []
    for b, t in enumerate(thresholds):
        running &= ~(calibration.confidence[:, b].astype(np.float64) >= t)
        continuing.append(running.copy())
    sizes = [1, 3, 4]
    pattern = batching_pattern(calibration, thresholds, sizes)
    assert pattern.shape == (2, 3, 5)
    for j, n in enumerate(sizes):
        batches = list(itertools.combinations(range(9), n))
        for b in range(2):
            counted = np.bincount([int(continuing[b][list(batch)].sum()) for batch in batches], minlength=n + 1)
            np.testing.assert_allclose(pattern[b, j, :n + 1], counted / len(batches), atol=1e-12)
            assert pattern[b, j, n + 1:].sum() == 0.0


def test_a_branch_turned_off_lets_nobody_go_and_later_branches_see_everyone_who_continued():
    calibration = _calibration(50, 3, 7)
    counts_on = continuing_counts(calibration, (0.5, 0.5, 0.5))
    counts_off = continuing_counts(calibration, (None, 0.5, 0.5))
    assert counts_off[0] == 50 and counts_on[0] < 50
    assert np.all(np.diff(counts_on) <= 0) and counts_off[1] >= counts_on[1]
    assert hypergeometric_pmf(10, 0, 4).tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]
    with pytest.raises(ConfigError):
        continuing_counts(calibration, (0.5,))


# -- prediction and optimiser against brute force ----------------------------------------------------------------

@pytest.mark.parametrize("seed,split", [(0, 4), (1, 4), (2, 2), (3, 3)])
def test_prediction_equals_running_every_batch_of_the_split(seed, split):
    calibration = _calibration(8, 2, seed)
    costs = _costs(4, (1, 2), split, 4, seed)
    thresholds = (0.6, 0.4)
    for exits in [(), (0,), (1,), (0, 1)]:
        subset = tuple(t if b in exits else None for b, t in enumerate(thresholds))
        for n in range(1, 5):
            per_sample, completion = predict_batch(costs, calibration, subset, n)
            expected = _brute_force(costs, calibration, thresholds, exits, n)
            assert (per_sample, completion) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("seed", range(6))
def test_the_optimiser_picks_the_brute_force_best_subset_within_the_completion_bound(seed):
    calibration = _calibration(8, 3, seed)
    split = 5 if seed % 2 == 0 else 4
    costs = _costs(5, (1, 2, 4), split, 4, seed)
    rng = np.random.default_rng(seed)
    thresholds = tuple(float(t) for t in rng.choice([0.2, 0.5, 0.8, 0.95], 3))
    plan = plan_batch_exits(costs, calibration, thresholds)
    assert [size.n_samples for size in plan.sizes] == [1, 2, 3, 4]
    candidates = [b for b in range(3) if costs.branch_after_stage[b] <= split]
    subsets = [c for r in range(len(candidates) + 1) for c in itertools.combinations(candidates, r)]
    for size in plan.sizes:
        brute = {subset: _brute_force(costs, calibration, thresholds, subset, size.n_samples) for subset in subsets}
        bound = brute[()][1]
        feasible = {subset: value for subset, value in brute.items() if value[1] <= bound * (1 + 1e-9)}
        best_ms = min(value[0] for value in feasible.values())
        assert size.exits in feasible
        assert size.per_sample_ms == pytest.approx(best_ms, rel=1e-9)
        assert size.completion_ms <= bound * (1 + 1e-9)
        assert size.no_exits_per_sample_ms == pytest.approx(brute[()][0], rel=1e-9)
        assert size.all_exits_per_sample_ms == pytest.approx(brute[tuple(candidates)][0], rel=1e-9)
        expected_thresholds = tuple(t if b in size.exits else None for b, t in enumerate(thresholds))
        assert plan.thresholds_for(size.n_samples) == expected_thresholds


def test_a_branch_nobody_leaves_at_is_never_run_and_one_everybody_leaves_at_always_is():
    calibration = _calibration(40, 2, 3)
    costs = _costs(3, (1, 2), 3, 8, 3)
    never = plan_batch_exits(costs, calibration, (1.5, None))  # confidences are <= 1: nobody exits
    assert all(size.exits == () for size in never.sizes)
    always = plan_batch_exits(costs, calibration, (0.0, None))  # everybody exits after stage 1
    assert all(size.exits == (0,) for size in always.sizes)
    assert all(size.completion_ms < size.no_exits_completion_ms for size in always.sizes)


# -- costs from the inference time matrix -------------------------------------------------------------------------

def _profile(split_bytes=(4000, 2000, 1000, 40)) -> Profile:
    return Profile(stage_names=("a", "b", "c"), stage_edge_ms=np.array([2.0, 4.0, 6.0]),
                   stage_cloud_ms=np.array([1.0, 1.0, 1.0]), branch_after_stage=(1,),
                   branch_edge_ms=np.array([0.5]), split_bytes=np.array(split_bytes), offload_overhead_ms=3.0)


def test_costs_keep_the_profile_at_batch_1_and_the_measured_growth_beyond():
    timings = BatchTimings(batch_sizes=(1, 2, 4), stage_ms=np.array([[1.0, 1.5, 2.0]] * 3),
                           branch_ms=np.array([[0.1, 0.1, 0.3]]), n_repeats=1)
    link = Link(uplink_mbps=8.0, rtt_ms=10.0)
    costs = BatchCosts.build(_profile(), timings, link=link, split=1, max_n=8)
    np.testing.assert_allclose(costs.stage_ms[:, 1], [2.0, 4.0, 6.0])  # the profile's batch-1 times
    np.testing.assert_allclose(costs.stage_ms[0, [0, 2, 3, 4, 8]], [0.0, 3.0, 3.5, 4.0, 8.0])  # interp, per sample
    np.testing.assert_allclose(costs.branch_ms[0, [1, 2, 4]], [0.5, 0.5, 1.5])
    # one offload of n at split 1: O + R + n x 2000 bytes at 8 Mbit/s + the cloud's stages 2, 3 grown alike
    assert costs.offload_ms[0] == 0.0
    assert costs.offload_ms[1] == pytest.approx(3.0 + 10.0 + 2.0 + 2.0)
    assert costs.offload_ms[4] == pytest.approx(3.0 + 10.0 + 8.0 + 2 * 2.0)
    assert not BatchCosts.build(_profile(), timings, link=link, split=3, max_n=8).offload_ms.any()
    with pytest.raises(ProfileError, match="stages"):
        BatchCosts.build(_profile(), BatchTimings(batch_sizes=(1,), stage_ms=np.ones((2, 1)),
                                                  branch_ms=np.ones((1, 1)), n_repeats=1), link=link, split=1, max_n=4)


def test_the_inference_time_matrix_is_measured_per_batch_size_and_stored_with_the_profile(tmp_path):
    from popex.runtime.model_files import load_model_dir

    net = load_model_dir(REPO / "models" / "default", n_threads=1).net
    sizes = batch_sizes_up_to(6)
    assert sizes == (1, 2, 4, 6)
    timings = time_batches(net, batch_sizes=sizes, n_warmup=1, n_repeats=2)
    assert timings.stage_ms.shape == (net.n_stages, 4) and timings.branch_ms.shape == (net.n_branches, 4)
    assert np.all(timings.stage_ms > 0) and np.all(timings.branch_ms > 0)
    save_profile(_profile(), tmp_path, batch_timings=timings)
    again = load_batch_timings(tmp_path / "profile.json")
    assert again.batch_sizes == sizes
    np.testing.assert_array_equal(again.stage_ms, timings.stage_ms)
    save_profile(_profile(), tmp_path / "plain")
    with pytest.raises(ProfileError, match="no batch timings"):
        load_batch_timings(tmp_path / "plain" / "profile.json")
    for bad in ({"batch_sizes": [2, 4], "stage_ms": [[1, 1]], "branch_ms": []},
                {"batch_sizes": [1, 2], "stage_ms": [[1, float("nan")]], "branch_ms": []},
                {"batch_sizes": [1, 2], "stage_ms": [[1, 2, 3]], "branch_ms": []}, {"stage_ms": []}):
        with pytest.raises(ProfileError):
            BatchTimings.from_dict(bad)
    with pytest.raises(ConfigError):
        time_batches(net, batch_sizes=(2, 4))


# -- the arrival model against the real batcher -------------------------------------------------------------------

@pytest.mark.parametrize("rate_per_s", [300.0, 3000.0, 20000.0])
def test_the_arrival_model_matches_the_batcher_on_a_fake_clock(rate_per_s):
    max_batch, wait_ms = 8, 2.0
    queue = BatchQueue(max_batch_size=max_batch, batch_max_wait_ms=wait_ms, predict_batch_ms=lambda n: 0.0)
    rng = np.random.default_rng(0)
    now_s, sizes, waits = 0.0, [], []
    started: dict[int, float] = {}

    def collect(batches, at_s):
        for batch in batches:
            sizes.append(len(batch.members))
            waits.extend(at_s - member.arrival_s for member in batch.members)

    for i in range(20000):
        arrival_s = now_s + rng.exponential(1.0 / rate_per_s)
        while queue.due_s() <= arrival_s:  # batches whose window ended before this arrival
            due_s = queue.due_s()
            collect(queue.take_due(due_s), due_s)
        now_s = arrival_s
        started[i] = now_s
        queue.add("k", i, budget_ms=1e9, now_s=now_s)
        collect(queue.take_due(now_s), now_s)
    model = arrival_model(rate_per_s, max_batch_size=max_batch, batch_max_wait_ms=wait_ms)
    observed = np.bincount(sizes, minlength=max_batch + 1) / len(sizes)
    np.testing.assert_allclose(observed, model.p_batch, atol=0.02)
    predicted_wait_ms = float(model.p_query @ model.mean_wait_ms)
    assert np.mean(waits) * 1000.0 == pytest.approx(predicted_wait_ms, rel=0.05)


def test_the_arrival_model_without_batching_or_arrivals():
    alone = arrival_model(500.0, max_batch_size=1, batch_max_wait_ms=2.0)
    assert alone.p_batch.tolist() == [0.0, 1.0] and alone.mean_wait_ms.tolist() == [0.0, 0.0]
    quiet = arrival_model(0.0, max_batch_size=4, batch_max_wait_ms=3.0)
    assert float(quiet.p_query @ quiet.mean_wait_ms) == 3.0
    with pytest.raises(ConfigError):
        arrival_model(float("nan"), max_batch_size=4, batch_max_wait_ms=3.0)


def test_expected_per_query_latency_adds_the_wait_to_the_per_sample_time():
    calibration = _calibration(40, 2, 5)
    plan = plan_batch_exits(_costs(3, (1, 2), 3, 4, 5), calibration, (0.5, 0.5))
    quiet = arrival_model(0.0, max_batch_size=4, batch_max_wait_ms=2.0)
    assert plan.expected_per_query_ms(quiet) == pytest.approx(2.0 + plan.sizes[0].per_sample_ms)
    busy = arrival_model(5000.0, max_batch_size=4, batch_max_wait_ms=2.0)
    values = {which: plan.expected_per_query_ms(busy, exits=which) for which in ("chosen", "all", "none")}
    assert values["chosen"] <= values["none"] + 1e-9  # no exits always meets the completion bound
    if all(size.all_exits_completion_ms <= size.no_exits_completion_ms for size in plan.sizes):
        assert values["chosen"] <= values["all"] + 1e-9
    else:  # every exit would delay some batch past the model without exits: the plan gives up latency for it
        assert any(size.exits != (0, 1) for size in plan.sizes)
    with pytest.raises(ConfigError):
        plan.expected_per_query_ms(arrival_model(1.0, max_batch_size=8, batch_max_wait_ms=2.0))


def test_popex_batch_plan_prints_the_exits_per_batch_size_as_json(tmp_path):
    result = subprocess.run([sys.executable, "-m", "popex.cli", "batch-plan", "--model", str(REPO / "models" / "default"),
                             "--max-batch-size", "4", "--arrival-rate-per-s", "1000", "--json"],
                            capture_output=True, text=True, cwd=REPO, timeout=120,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    sizes = out["plan"]["by_batch_size"]
    assert [size["n_samples"] for size in sizes] == [1, 2, 3, 4]
    for size in sizes:
        assert set(size["exits"]) <= {b for b, t in enumerate(out["plan"]["thresholds"]) if t is not None}
        assert size["completion_ms"] <= size["no_exits_completion_ms"] * (1 + 1e-9)
        assert size["per_sample_ms"] <= size["no_exits_per_sample_ms"] + 1e-9
        if size["all_exits_completion_ms"] <= size["no_exits_completion_ms"]:
            assert size["per_sample_ms"] <= size["all_exits_per_sample_ms"] + 1e-9
    assert out["expected_per_query_ms"]["chosen"] <= out["expected_per_query_ms"]["none"] + 1e-9
