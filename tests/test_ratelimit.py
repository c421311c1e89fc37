"""The rate-limit study (popex.ratelimit): bucket, metric, sequences, MDP, policies, simulator, files, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from popex import cli
from popex.errors import ConfigError, DataError
from popex.ratelimit.bucket import TokenBucket, integerise
from popex.ratelimit.data import ARRAY_NAMES, MetricData, load_metric_data, synthetic_metric_data
from popex.ratelimit.mdp import solve_mdp, transition_matrix, value_iteration
from popex.ratelimit.metric import KernelTable, OffloadMetric, answer_cost, softmax_entropy, true_class_rank
from popex.ratelimit.policies import baseline_threshold, make_policy, parse_policies
from popex.ratelimit.sequences import LocationReset, Mmpp, image_sequences
from popex.ratelimit.simulate import simulate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synthetic() -> MetricData:
    return synthetic_metric_data(n_images=8000, seed=1)


@pytest.fixture()
def metric_file(tmp_path, synthetic) -> Path:
    return synthetic.save(tmp_path / "metric.npz")


def _popex(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "popex.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=240, env=env)


# -- bucket -------------------------------------------------------------------------------

@pytest.mark.parametrize("rate, depth, qpm", [(0.25, 2, (1, 4, 8)), (0.1, 5, (1, 10, 50)), (1.0, 1, (1, 1, 1)),
                                              (1.5, 3, (3, 2, 6)), (0.3, 2.5, (3, 10, 25)), (2 / 3, 2, (2, 3, 6))])
def test_integerise_takes_the_smallest_exact_denominator_reduced_by_the_gcd(rate, depth, qpm):
    params = integerise(rate, depth)
    assert (params.q, params.p, params.m) == qpm


def test_integerise_of_an_inexact_rate_minimises_the_rounding_error():
    params = integerise(1 / np.pi, 2)
    assert params.p <= 100
    error = abs(params.rate - 1 / np.pi) + abs(params.depth - 2)
    for p in range(1, 101):  # no denominator does better (the seed's criterion: summed error / p)
        assert error <= abs(round(p / np.pi) / p - 1 / np.pi) + 1e-12 or p > params.p


@pytest.mark.parametrize("rate, depth, words", [(0, 2, "rate"), (-1, 2, "rate"), (float("nan"), 2, "rate"),
                                                (0.5, 0.5, "depth"), (0.5, float("inf"), "depth")])
def test_bad_rate_or_depth_is_a_clear_error(rate, depth, words):
    with pytest.raises(ConfigError, match=words):
        integerise(rate, depth)


def test_the_bucket_starts_full_spends_p_units_and_refills_q_per_slot_up_to_m():
    bucket = TokenBucket(integerise(0.25, 2))  # q=1, p=4, m=8
    assert bucket.level == 8 and bucket.tokens == 2.0
    assert bucket.try_take() and bucket.try_take() and not bucket.try_take()
    bucket.advance(3)
    assert bucket.level == 3 and not bucket.can_take()
    bucket.advance(1)
    assert bucket.try_take() and bucket.level == 0
    bucket.advance(100)
    assert bucket.level == 8


# -- metric -------------------------------------------------------------------------------

def test_costs_follow_the_rank_of_the_true_class():
    logits = np.array([[5.0, 4, 3, 2, 1, 0, -1, -2, -3, -4, -5, -6]] * 3)
    rank = true_class_rank(logits, np.array([0, 5, 11]))
    assert rank.tolist() == [1, 6, 12]
    assert answer_cost(rank, "top1").tolist() == [0, 1, 1]
    assert answer_cost(rank, "top5").tolist() == [0, 1, 1]
    assert answer_cost(rank, "rank10").tolist() == [1, 6, 10]
    with pytest.raises(DataError, match="cost"):
        answer_cost(rank, "top3")


def test_the_kernel_table_recovers_a_smooth_regression_and_picks_a_bandwidth_from_the_grid():
    rng = np.random.default_rng(0)
    h = rng.random(20_000)
    reward = np.sin(3 * h) + rng.normal(0, 0.3, h.size)
    table = KernelTable.fit(h, reward)
    assert len(table.values) == 1000
    assert table.bandwidth in [f * (h.max() - h.min()) for f in (2.0 ** -k for k in (8, 7, 6, 5, 4))]
    grid = np.linspace(0.05, 0.95, 50)
    assert np.max(np.abs(table(grid) - np.sin(3 * grid))) < 0.1
    assert table(-5.0) == table.values[0] and table(5.0) == table.values[-1]  # clipped, not extrapolated


def test_the_offload_metric_calibrates_the_local_logits_and_rises_with_entropy():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 6000)
    hard = rng.random(6000)
    weak = 12.0 * np.eye(10)[labels] * (1 - hard)[:, None] + rng.normal(0, 2.0, (6000, 10))  # overconfident
    strong = 12.0 * np.eye(10)[labels] + rng.normal(0, 2.0, (6000, 10))
    reward = answer_cost(true_class_rank(weak, labels), "top1") - answer_cost(true_class_rank(strong, labels), "top1")
    metric = OffloadMetric.fit(weak, reward, labels)
    assert metric.inverse_temperature < 1.0  # overconfident logits are softened
    entropy = softmax_entropy(weak, metric.inverse_temperature)
    low, high = np.quantile(entropy, [0.1, 0.9])
    assert metric.table(high) > metric.table(low) + 0.2


# -- files --------------------------------------------------------------------------------

def test_a_metric_file_round_trips(tmp_path, synthetic):
    loaded = load_metric_data(synthetic.save(tmp_path / "m.npz"))
    for name in ARRAY_NAMES:
        assert np.array_equal(getattr(loaded, name), getattr(synthetic, name))


def test_a_file_without_an_array_is_refused_naming_it(tmp_path, synthetic):
    arrays = {name: getattr(synthetic, name) for name in ARRAY_NAMES if name != "scost_ts"}
    np.savez(tmp_path / "m.npz", **arrays)
    with pytest.raises(DataError, match="scost_ts"):
        load_metric_data(tmp_path / "m.npz")


@pytest.mark.parametrize("bad", [np.zeros((10, 2)), np.zeros(7), np.array([1.0, np.nan] * 10)])
def test_a_misshaped_or_non_finite_array_is_refused(tmp_path, synthetic, bad):
    arrays = {name: getattr(synthetic, name) for name in ARRAY_NAMES}
    arrays["wcost_ts"] = bad
    np.savez(tmp_path / "m.npz", **arrays)
    with pytest.raises(DataError, match="wcost_ts"):
        load_metric_data(tmp_path / "m.npz")


class _Trap:
    """Unpickling this creates a directory: proof that nothing was unpickled when it is absent."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_a_pickled_object_array_is_refused_without_unpickling_it(tmp_path, synthetic):
    trap = tmp_path / "unpickled"
    arrays = {name: getattr(synthetic, name) for name in ARRAY_NAMES}
    arrays["metric_tr"] = np.array([_Trap(str(trap))] * 3, dtype=object)
    np.savez(tmp_path / "m.npz", **arrays)  # numpy pickles object arrays when writing
    with pytest.raises(DataError, match="object"):
        load_metric_data(tmp_path / "m.npz")
    assert not trap.exists()


def test_a_file_that_is_not_an_npz_is_refused(tmp_path):
    (tmp_path / "m.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="npz"):
        load_metric_data(tmp_path / "m.npz")
    with pytest.raises(DataError, match="not found"):
        load_metric_data(tmp_path / "absent.npz")


# -- sequences ----------------------------------------------------------------------------

def test_location_reset_stays_within_the_spread_between_resets():
    metric = np.arange(1000.0)
    seq = image_sequences(metric, kind="locreset", n_seq=3, seq_len=2000, rng=np.random.default_rng(0),
                          location_reset=LocationReset(spread=0.05, reset_prob=0.0))
    for row in seq:  # sorted by metric: the position is the index; all within 50 of the start, modulo N
        offset = (row - row[0]) % 1000
        assert np.all((offset <= 50) | (offset >= 950))


def test_mmpp_arrivals_have_the_stationary_mix_of_intervals():
    arrivals = Mmpp()
    gaps = arrivals.sample(4, 200_000, np.random.default_rng(0))
    assert set(np.unique(gaps)) == {1, 3}
    assert abs(np.mean(gaps == 3) - arrivals.interval_probs()[3]) < 0.08
    assert arrivals.interval_probs() == pytest.approx({1: 1 / 3, 3: 2 / 3})


# -- MDP and policies ---------------------------------------------------------------------

def test_the_solver_agrees_with_plain_value_iteration(synthetic):
    for rate, depth, intervals in [(0.25, 2, {1: 1.0}), (0.1, 3, {1: 1.0}), (0.25, 2, {1: 1 / 3, 3: 2 / 3})]:
        params = integerise(rate, depth)
        fast = solve_mdp(params, synthetic.metric_tr, interval_probs=intervals)
        slow = value_iteration(params, synthetic.metric_tr, interval_probs=intervals, n_iterations=150_000)
        assert fast.converged
        assert np.allclose(fast.thresholds[params.p:], slow.thresholds[params.p:], atol=1e-7)


def test_the_transition_matrix_is_stochastic_and_caps_at_m():
    params = integerise(0.25, 2)
    matrix = transition_matrix(params, {1: 0.5, 3: 0.5})
    assert np.allclose(matrix.sum(axis=1), 1.0)
    assert matrix[8, 8] == 1.0 and matrix[0, 1] == 0.5 and matrix[0, 3] == 0.5


def test_the_baseline_offloads_the_top_r_tau_fraction_of_the_training_metrics(synthetic):
    threshold = baseline_threshold(synthetic.metric_tr, 0.2, 1.0)
    assert abs(np.mean(synthetic.metric_tr >= threshold) - 0.2) < 0.01
    assert baseline_threshold(synthetic.metric_tr, 0.5, 2.5) == -np.inf


def test_an_unknown_policy_is_a_clear_error(synthetic):
    with pytest.raises(ConfigError, match="unknown policy 'greedy'"):
        parse_policies("mdp,greedy")
    with pytest.raises(ConfigError, match="unknown policy"):
        simulate(synthetic, rate=0.25, depth=2, policies=("greedy",), seq_len=100)
    with pytest.raises(ConfigError, match="learned-weights"):
        make_policy("learned", params=integerise(0.25, 2), metric_tr=synthetic.metric_tr, interval_probs={1: 1.0})


@pytest.mark.parametrize("sequence", ["iid", "locreset"])
@pytest.mark.parametrize("arrivals", ["periodic", "mmpp"])
def test_the_seeds_ordering_holds_on_synthetic_data(synthetic, sequence, arrivals):
    report = simulate(synthetic, rate=0.25, depth=2, sequence=sequence, arrivals=arrivals, seq_len=50_000, seed=3)
    loss = {name: result.loss for name, result in report.policies.items()}
    assert loss["strong"] <= loss["lower-bound"] + 0.02  # strong ignores the bucket
    assert loss["lower-bound"] <= loss["mdp"] <= loss["baseline"] <= loss["weak"]
    for name in ("baseline", "mdp"):
        assert report.policies[name].max_excess <= 0.0


def test_the_json_report_has_the_documented_schema(synthetic):
    report = simulate(synthetic, rate=0.25, depth=2, seq_len=2000).to_dict()
    assert set(report) == {"bucket", "policies", "mdp_thresholds"}
    assert report["bucket"] == {"q": 1, "p": 4, "m": 8}
    assert set(report["policies"]["mdp"]) == {"loss", "offload_rate"}
    assert report["mdp_thresholds"][:4] == [None] * 4 and len(report["mdp_thresholds"]) == 9


# -- CLI ----------------------------------------------------------------------------------

def test_ratelimit_is_registered_with_the_tables_help():
    assert cli._SUBCOMMANDS["ratelimit"].register == "popex.ratelimit.cli:add_ratelimit_parser"
    from popex.ratelimit.cli import HELP

    assert cli._SUBCOMMANDS["ratelimit"].help == HELP


def test_simulate_json_in_a_real_process(metric_file):
    result = _popex("ratelimit", "simulate", "--data", str(metric_file), "--rate", "0.25", "--depth", "2",
                    "--sequence", "locreset", "--arrivals", "mmpp", "--seq-len", "5000", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["bucket"] == {"q": 1, "p": 4, "m": 8}
    assert set(report["policies"]) == {"weak", "strong", "baseline", "lower-bound", "mdp"}
    assert all(np.isfinite(v["loss"]) for v in report["policies"].values())


@pytest.mark.parametrize("args, words", [
    (["--rate", "0", "--depth", "2"], "rate r"),
    (["--rate", "0.25", "--depth", "0.5"], "depth b"),
    (["--rate", "0.25", "--depth", "2", "--policies", "mdp,magic"], "unknown policy 'magic'"),
])
def test_simulate_bad_arguments_are_one_line_errors(metric_file, args, words, capsys):
    code = cli.main(["ratelimit", "simulate", "--data", str(metric_file), *args, "--seq-len", "100"])
    err = capsys.readouterr().err
    assert code == 2 and words in err and "Traceback" not in err


def test_simulate_bad_arguments_print_the_reason(metric_file, capsys):
    assert cli.main(["ratelimit", "simulate", "--data", str(metric_file), "--rate", "-1", "--depth", "2"]) == 2
    err = capsys.readouterr().err
    assert "rate r" in err and "Traceback" not in err
