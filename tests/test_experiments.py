"""The experiment suite: every quick version end to end, its files, and the consistency of its numbers.

The quick runs start real services (netns + tbf as root, else the edge's
link emulation); each is bounded by its own timeouts. Nothing here asserts
on a latency value: only on files, row counts, and relations that hold by
construction (e.g. POPEX's predicted accuracy against the baselines that
meet the requirement).
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from popex.decision import Link
from popex.decision.policies import POLICIES
from popex.errors import ConfigError
from experiments import adaptation, deadline_accuracy, latency_uplink, prediction_error, threshold_sweep
from popex.testbed.measure import summarise
from popex.testbed.netns import HarnessUnavailable, shaped_link
from experiments.planning import Predictor
from experiments.policy_runs import (PolicyRow, budget_ms, dominance_problems, dominance_ties,
                                           stratified_latency_ms)
from experiments.report import read_csv, replace_docs_section, write_csv
from popex.testbed.services import REPO_ROOT
from popex.testbed.harness import Testbed, TestbedConfig, load_images, strategy_text

pytestmark = pytest.mark.slow  # real processes; the fast lane is -m "not slow"

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_outputs(tmp_path, name, info, docs):
    assert info.name == name and info.run_time_s > 0
    for path in info.files:
        assert path.is_file() and path.stat().st_size > 0, path
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == PNG_MAGIC
    text = docs.read_text()
    assert f"## {name}\n" in text and f"popex experiment {name} --quick" in text
    assert "## Distortion\n\nkept as it was.\n" in text  # another experiment's section is left alone


@pytest.fixture
def docs(tmp_path):
    path = tmp_path / "results.md"
    path.write_text("# POPEX results\n\n## Distortion\n\nkept as it was.\n")
    return path


def _float(row, key):
    return float(row[key])


def test_latency_vs_uplink_quick(tmp_path, docs):
    config = latency_uplink.LatencyUplinkConfig.quick_config()
    rows, info = latency_uplink.run_latency_vs_uplink(config, out_root=tmp_path, docs_path=docs, progress=False)
    _check_outputs(tmp_path, "latency-vs-uplink", info, docs)
    table = read_csv(tmp_path / "latency-vs-uplink" / "latency_vs_uplink.csv")
    assert len(table) == len(config.uplink_grid_mbps) * len(POLICIES)
    for rate in config.uplink_grid_mbps:
        at = {r["policy"]: r for r in table if _float(r, "uplink_mbps") == rate}
        assert set(at) == set(POLICIES)
        popex = at["adaptive"]
        for policy, row in at.items():
            assert int(row["n_requests"]) == config.n_images
            assert 0 <= _float(row, "measured_fallback_share") <= 1
            assert math.isfinite(_float(row, "measured_mean_latency_ms"))
            if row["predicted_feasible"] == "True":  # POPEX is never less accurate than a baseline that meets D
                assert popex["predicted_feasible"] == "True"
                assert _float(popex, "predicted_accuracy") >= _float(row, "predicted_accuracy")
        assert at["cloud-only"]["predicted_strategy"].startswith("s=0 ")
        assert at["edge-only"]["measured_strategy"] == "s=6 θ=[off,off]"
    assert dominance_problems(rows, basis="predicted") == []
    assert all(0.0 < row.test_accuracy <= 1.0 for row in rows)
    requests = read_csv(tmp_path / "latency-vs-uplink" / "requests.csv")
    assert len(requests) == len(config.uplink_grid_mbps) * len(POLICIES) * config.n_images


def test_accuracy_vs_deadline_quick(tmp_path, docs):
    config = deadline_accuracy.DeadlineAccuracyConfig.quick_config()
    rows, info = deadline_accuracy.run_accuracy_vs_deadline(config, out_root=tmp_path, docs_path=docs,
                                                            progress=False)
    _check_outputs(tmp_path, "accuracy-vs-deadline", info, docs)
    out = tmp_path / "accuracy-vs-deadline"
    measured = read_csv(out / "accuracy_vs_deadline.csv")
    assert len(measured) == len(config.profiles) * len(config.measured_deadlines_ms) * len(POLICIES)
    assert {r["profile"] for r in measured} == set(config.profiles)
    predicted = read_csv(out / "predicted.csv")
    assert len(predicted) == len(config.profiles) * config.n_predicted * len(POLICIES)
    groups = {}
    for r in predicted:
        groups.setdefault((r["profile"], r["deadline_ms"]), {})[r["policy"]] = r
    for at in groups.values():
        popex = at["adaptive"]
        for row in at.values():
            if row["feasible"] == "True":
                assert popex["feasible"] == "True" and _float(popex, "accuracy") >= _float(row, "accuracy")
    # More time never lowers POPEX's predicted accuracy.
    for profile in config.profiles:
        curve = [_float(r, "accuracy") for r in predicted if r["profile"] == profile and r["policy"] == "adaptive"
                 and r["feasible"] == "True"]
        assert curve == sorted(curve)
    assert dominance_problems(rows, basis="predicted") == []


def test_threshold_sweep_quick(tmp_path, docs):
    config = threshold_sweep.ThresholdSweepConfig.quick_config()
    points, info = threshold_sweep.run_threshold_sweep(config, out_root=tmp_path, docs_path=docs, progress=False)
    _check_outputs(tmp_path, "threshold-sweep", info, docs)
    calibration = read_csv(tmp_path / "threshold-sweep" / "calibration.csv")
    offload = [_float(r, "offload_prob") for r in calibration]
    assert offload == sorted(offload)  # a higher threshold lets fewer samples exit
    assert len(points) == len(config.measured_thresholds)
    for point in points:
        assert point.n_images == config.n_images
        assert sum(point.exit_share_per_branch) + point.offload_share == pytest.approx(1.0)
        assert 0 <= point.accuracy <= 1
    assert [p.offload_share for p in points] == sorted(p.offload_share for p in points)


def test_prediction_error_quick(tmp_path, docs):
    config = prediction_error.PredictionErrorConfig.quick_config()
    errors, info = prediction_error.run_prediction_error(config, out_root=tmp_path, docs_path=docs, progress=False)
    _check_outputs(tmp_path, "prediction-error", info, docs)
    table = read_csv(tmp_path / "prediction-error" / "prediction_error.csv")
    assert len(table) == len(errors) >= 3  # at least edge-only and cloud-only differ, and the mean pass adds one
    assert {e.objective for e in errors} == {"tail", "mean"}
    requests = read_csv(tmp_path / "prediction-error" / "requests.csv")
    assert sum(e.n_requests for e in errors) == len(requests)
    for e in errors:
        assert e.error_fraction == pytest.approx(abs(e.measured_mean_latency_ms - e.predicted_mean_latency_ms)
                                                 / e.measured_mean_latency_ms)
    assert "Median |measured − predicted| / measured" in docs.read_text()


def test_adaptation_quick(tmp_path, docs):
    config = adaptation.AdaptationConfig.quick_config()
    result, info = adaptation.run_adaptation(config, out_root=tmp_path, docs_path=docs, progress=False)
    _check_outputs(tmp_path, "adaptation", info, docs)
    steps, duration_s = adaptation.build_trace(config.segments)
    assert result.n_requests == int(duration_s * config.image_rate_hz)
    requests = read_csv(tmp_path / "adaptation" / "requests.csv")
    assert len(requests) == result.n_requests
    within = np.mean([_float(r, "latency_ms") <= config.deadline_ms for r in requests])
    assert result.within_share == pytest.approx(within)
    status = read_csv(tmp_path / "adaptation" / "status.csv")
    assert len(status) >= duration_s / config.status_interval_s / 4  # polled throughout (loosely: a busy machine)
    rates = {_float(r, "true_uplink_mbps") for r in status}
    assert {s.uplink_mbps for s in steps if s.kind == "step"} <= rates


# -- the pieces ----------------------------------------------------------------------------------------------


def test_the_docs_section_is_replaced_and_the_others_kept(tmp_path):
    path = tmp_path / "docs" / "results.md"
    replace_docs_section(path, "## alpha", "first")
    assert path.read_text().startswith("# POPEX results")
    path.write_text(path.read_text() + "\n## Distortion\n\nmine\n\n### sub\n\nstill mine\n")
    replace_docs_section(path, "## alpha", "second")
    replace_docs_section(path, "## beta", "b")
    text = path.read_text()
    assert "first" not in text and "## alpha\n\nsecond\n" in text
    assert "## Distortion\n\nmine\n\n### sub\n\nstill mine\n" in text and text.rstrip().endswith("## beta\n\nb")
    replace_docs_section(path, "## alpha", "third")
    assert text.replace("second", "third") == path.read_text()


def test_write_csv_takes_every_key(tmp_path):
    path = write_csv(tmp_path / "x.csv", [{"a": 1.5, "b": (0.5, None)}, {"a": 2, "c": "z"}])
    assert read_csv(path) == [{"a": "1.5", "b": "0.5;off", "c": ""}, {"a": "2", "b": "", "c": "z"}]


def test_trace_building():
    steps, duration_s = adaptation.build_trace((("hold", 3, 20, 20), ("ramp", 2, 2, 6), ("hold", 1, 1, 1)),
                                               ramp_step_s=1.0)
    assert [(s.start_s, s.uplink_mbps) for s in steps] == [(0, 20), (3, 2), (4, 4), (5, 1)]
    steps, _ = adaptation.build_trace((("hold", 3, 2, 2), ("ramp", 2, 2, 6), ("hold", 1, 6, 6)))
    assert [(s.start_s, s.uplink_mbps, s.kind) for s in steps] == [(0, 2, "step"), (4, 4, "ramp"), (5, 6, "step")]
    assert duration_s == 6
    with pytest.raises(ConfigError):
        adaptation.build_trace((("jump", 1, 1, 1),))
    with pytest.raises(ConfigError):
        adaptation.build_trace((("hold", 0, 1, 1),))


def test_predictor_answers_the_policies_rows_and_any_strategy():
    from popex.runtime.profiler import load_profile

    profile = load_profile(REPO_ROOT / "models" / "b-alexnet" / "profile.json")
    predictor = Predictor.from_model_dir(REPO_ROOT / "models" / "b-alexnet", profile)
    link = Link(uplink_mbps=5.0, rtt_ms=20.0)
    for policy in POLICIES:
        chosen = predictor.policy(policy, link=link, deadline_ms=3.0)
        again = predictor.strategy(chosen.split, chosen.thresholds, link=link)
        assert (again.row, again.expected_latency_ms, again.accuracy) == (chosen.row, chosen.expected_latency_ms,
                                                                          chosen.accuracy)
    assert predictor.policy("cloud-only", link=link, deadline_ms=3.0).split == 0
    with pytest.raises(ConfigError, match="not in the table"):
        predictor.strategy(2, (0.123, None), link=link)
    with pytest.raises(ConfigError, match="policy"):
        predictor.policy("oracle", link=link, deadline_ms=3.0)
    assert strategy_text(2, [0.8, float("nan")]) == "s=2 θ=[0.80,off]"


def test_summaries_budgets_and_dominance():
    records = [{"latency_ms": v, "correct": c, "where": w, "fallback": f, "strategy": s, "edge_predicted_ms": 1.0}
               for v, c, w, f, s in [(10, True, "edge", False, "a"), (30, False, "cloud", True, "b"),
                                     (20, True, "cloud", False, "a")]]
    measured = summarise(records, deadline_ms=25.0)
    assert measured.within_share == pytest.approx(2 / 3) and measured.fallback_share == pytest.approx(1 / 3)
    assert measured.strategy == "a (mostly)" and measured.n_strategies == 2
    with pytest.raises(ConfigError):
        summarise([], deadline_ms=1.0)
    assert budget_ms("adaptive", 40.0) == 40.0 and budget_ms("edgent", 40.0) == 40.0
    assert budget_ms("cloud-only", 40.0) > 1000.0
    base = dict(profile="", uplink_mbps=1.0, rtt_ms=1.0, deadline_ms=10.0, objective="mean", predicted_strategy="",
                predicted_latency_ms=1.0, budget_ms=10.0, measured_strategy="", n_requests=1,
                measured_mean_latency_ms=5.0, measured_p95_latency_ms=5.0, measured_within_share=1.0,
                measured_offload_share=0.0, measured_fallback_share=0.0, edge_planned_uplink_mbps=1.0,
                edge_planned_rtt_ms=1.0, edge_offload_overhead_ms=1.0, edge_predicted_ms=1.0, load_1min=0.5,
                test_mean_latency_ms=math.nan)
    popex = PolicyRow(policy="adaptive", predicted_accuracy=0.9, predicted_feasible=True, measured_accuracy=0.8,
                      measured_meets=True, test_accuracy=0.9, **base)
    better = PolicyRow(policy="cloud-only", predicted_accuracy=0.95, predicted_feasible=False, measured_accuracy=0.85,
                       measured_meets=True, test_accuracy=0.89, **base)
    assert dominance_problems([popex, better], basis="predicted") == []
    assert len(dominance_problems([popex, better], basis="measured")) == 1
    assert dominance_problems([popex, better], basis="test") == []
    assert dominance_problems([popex, dataclasses.replace(better, measured_meets=False)], basis="measured") == []
    # a baseline that meets the requirement beats a POPEX that does not, whatever the accuracies
    late = dataclasses.replace(popex, measured_meets=False, measured_mean_latency_ms=12.0, measured_strategy="s=2")
    worse = dataclasses.replace(better, test_accuracy=0.5, measured_strategy="s=0")
    (problem,) = dominance_problems([late, worse], basis="test")
    assert "POPEX does not (12.0 ms)" in problem
    # the same strategy measured twice, once on each side of the requirement: a tie, not a violation
    same = dataclasses.replace(worse, measured_strategy="s=0 θ=[off]")
    twin = dataclasses.replace(late, measured_strategy="s=0 θ=[off] (mostly)")
    assert dominance_problems([twin, same], basis="test") == []
    (tie,) = dominance_ties([twin, same], basis="test")
    assert "both ran s=0 θ=[off], measured 5.0 and 12.0 ms" in tie
    # the test view judges the test-split mean: a stream that exited less often than the test split does
    unlucky = dataclasses.replace(late, test_mean_latency_ms=9.5)
    assert dominance_problems([unlucky, worse], basis="test") == []
    assert len(dominance_problems([unlucky, worse], basis="measured")) == 1
    with pytest.raises(ConfigError, match="basis"):
        dominance_problems([popex], basis="vibes")


class _TestSplit:
    """A stand-in for a test-split Predictor: only the exit shares of the strategy asked for."""

    def __init__(self, exit_probs):
        self.exit_probs = exit_probs

    def strategy(self, split, thresholds, *, link):
        return types.SimpleNamespace(exit_probs=self.exit_probs)


def test_stratified_latency_weights_each_path_by_its_test_share():
    def record(exit_, latency_ms, strategy="s=2 θ=[off,0.70]"):
        return {"exit": exit_, "latency_ms": latency_ms, "strategy": strategy, "split": 2, "thresholds": (None, 0.7)}

    # the stream took the branch 6 times in 10 (mean 22 ms); the test split takes it 90% of the time
    records = [record(1, 10.0)] * 6 + [record("final", 40.0)] * 4
    link = Link(uplink_mbps=1.0, rtt_ms=1.0)
    assert stratified_latency_ms(_TestSplit((0.0, 0.9)), records, link) == pytest.approx(0.9 * 10 + 0.1 * 40)
    # a plan change mid-stream: only the most used strategy counts
    mixed = records + [record("final", 500.0, strategy="s=0 θ=[off,off]")] * 3
    assert stratified_latency_ms(_TestSplit((0.0, 0.9)), mixed, link) == pytest.approx(13.0)
    # a path the test split takes >= 1% of the time was never measured: no estimate
    assert math.isnan(stratified_latency_ms(_TestSplit((0.05, 0.9)), records, link))
    # a rarer one is left out and the rest re-weighted
    assert stratified_latency_ms(_TestSplit((0.005, 0.895)), records, link) == \
        pytest.approx((0.895 * 10 + 0.1 * 40) / 0.995)
    assert math.isnan(stratified_latency_ms(None, records, link))


def test_set_rate_changes_the_tbf_in_place():
    try:
        context = shaped_link(uplink_mbps=20.0, rtt_ms=0.0, name_prefix="pxrate")
        link = context.__enter__()
    except HarnessUnavailable as err:
        pytest.skip(f"network-namespace harness unavailable: {err}")
    try:
        shaping = link.set_rate(2.0)
        shown = subprocess.run(["tc", "qdisc", "show", "dev", link.edge_iface], capture_output=True, text=True,
                               timeout=10).stdout
        assert "tbf" in shown and "rate 2Mbit" in shown
        assert link.uplink_mbps == 2.0 and link.burst_bytes == 1600 and link.shaping[0] is shaping
        with pytest.raises(ConfigError):
            link.set_rate(0.0)
        assert link.uplink_mbps == 2.0
    finally:
        context.__exit__(None, None, None)


def test_emulation_testbed_changes_the_link_through_the_admin_endpoint(tmp_path):
    """The no-root path: rate and RTT emulated by the edge, changed with PUT /api/v1/admin/link."""
    config = TestbedConfig(mode="emulation", edge_slowdown=1.0, probe_interval_s=60.0)
    images = load_images(3, seed=5)
    with Testbed(config, tmp_path / "tb") as testbed:
        assert testbed.mode == "emulation"
        testbed.set_link(uplink_mbps=3.0, rtt_ms=7.0)
        status = testbed.status()
        assert status["emulated_link"] == {"uplink_mbps": 3.0, "rtt_ms": 7.0}
        records = testbed.stream(images, policy="cloud-only", deadline_ms=10_000.0, desc="", progress=False)
        assert [r["split"] for r in records] == [0, 0, 0] and all(r["where"] == "cloud" for r in records)


def test_the_cli_lists_every_experiment():
    result = subprocess.run([sys.executable, "-m", "popex.cli", "experiment", "--help"], capture_output=True,
                            text=True, timeout=120, cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 0, result.stderr
    for name in ("latency-vs-uplink", "accuracy-vs-deadline", "threshold-sweep", "prediction-error", "adaptation"):
        assert name in result.stdout
