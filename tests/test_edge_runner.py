"""The edge runner (exit rule, offload, fallback, bookkeeping) and the plan state it reads."""

import io
import json
import math
import threading
import time

import numpy as np
import pytest
import torch

from popex.data import Preprocessing, decode_image, encode_png, preprocess
from popex.decision import DecisionIndex, Link, Profile
from popex.errors import ConfigError, DataError
from popex.nets import EarlyExitNet, weights_to_bytes, zoo_spec
from popex.runtime.exits import exit_confidence
from popex.edge.cloud_port import CloudRejected, CloudTimeout, CloudUnavailable
from popex.edge.compute import EdgeCompute
from popex.edge.fake_cloud import FakeCloud
from popex.edge.pipeline import EdgeRunner
from popex.edge.planner import BackgroundPlanner
from popex.edge.plans import PlanBook
from popex.edge.store import ModelRegistry, UnknownModelError

TEMPERATURES = [1.7, 0.8]


class FakeMonitor:
    def __init__(self, link):
        self._link = link
        self.samples = []

    def link(self):
        return self._link

    def add_passive_sample(self, n_bytes, transfer_ms):
        self.samples.append((n_bytes, transfer_ms))


def _calibration_bytes(n_samples=300, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n_samples)
    predicted = np.where(rng.random((n_samples, 2)) < [0.6, 0.9], labels[:, None], (labels[:, None] + 1) % 10)
    buffer = io.BytesIO()
    np.savez(buffer, confidence=rng.random((n_samples, 2)), predicted=predicted,
             correct=predicted == labels[:, None], labels=labels, temperature=np.array(TEMPERATURES),
             confidence_method=np.array("max_softmax"))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return EarlyExitNet(zoo_spec("b-lenet")).eval()


def _profile(net, *, stage_edge_ms=(1.0, 1.0, 1.0), branch_edge_ms=(0.5,)):
    return Profile(stage_names=net.stage_names, stage_edge_ms=list(stage_edge_ms), stage_cloud_ms=[0.1] * 3,
                   branch_after_stage=net.branch_after_stage, branch_edge_ms=list(branch_edge_ms),
                   split_bytes=[3416, 4984, 1872, 0], offload_overhead_ms=1.0)


@pytest.fixture
def setup(tmp_path, net):
    registry = ModelRegistry(tmp_path)
    model_id = registry.register(json.dumps(net.spec).encode(), weights_to_bytes(net), _calibration_bytes(),
                                 trusted=True)  # as the admin route registers: the name resolves
    plans = PlanBook(link=Link(uplink_mbps=10.0, rtt_ms=20.0), headroom_fraction=0.0)
    plans.install(model_id, registry.get(model_id).calibration, _profile(net))
    cloud = FakeCloud(state_dir=tmp_path / "cloud", cloud_ms=2.0, transfer_ms=28.0)
    cloud.put_model(model_id, {"spec.json": json.dumps(net.spec).encode(),
                              "weights.safetensors": weights_to_bytes(net)}, timeout_s=30.0)
    monitor = FakeMonitor(Link(uplink_mbps=10.0, rtt_ms=20.0))
    planner = BackgroundPlanner(plans=plans, monitor=monitor, initial_offload_overhead_ms=1.0,
                                replan_hysteresis_fraction=0.2)
    runner = _runner(registry, plans, cloud, planner)
    yield {"runner": runner, "cloud": cloud, "monitor": monitor, "model_id": model_id, "plans": plans,
           "registry": registry, "planner": planner}
    planner.close()


def _runner(registry, plans, cloud, planner, **changes):
    values = dict(registry=registry, plans=plans, client=cloud, planner=planner,
                  compute=EdgeCompute(edge_slowdown=1.0), objective="mean", default_deadline_ms=1000.0,
                  max_image_pixels=4096 * 4096, wire_dtype="float32", wire_compression="deflate",
                  distortion_aware_default=True)
    return EdgeRunner(**{**values, **changes})


def _image(seed=1):
    return encode_png(np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8))


def _force(force_plan, setup, *, split, thresholds, profile=None):
    """Make the model's plan answer one strategy, whatever the deadline."""
    net = setup["registry"].get(setup["model_id"]).loaded.net
    return force_plan(setup["plans"].get(setup["model_id"]), net.branch_after_stage, split=split,
                      thresholds=tuple(thresholds), latency_ms=12.5, worst_latency_ms=20.0, accuracy=0.9,
                      offload_prob=0.5, profile=profile)


def _served(setup):
    """The edge's executor of the registered model (ONNX Runtime), whose numbers a request sees."""
    return setup["registry"].get(setup["model_id"]).loaded.net


def _reference(net, image_bytes):
    """Branch-0 confidence/label and final label/confidence, computed directly on ``net`` (the served one)."""
    x = preprocess(decode_image(image_bytes), Preprocessing.from_spec_dict(net.spec))
    h1 = net.run_stages(x, stop=1)
    branch_conf, branch_label = exit_confidence(net.run_branch(0, h1), temperature=TEMPERATURES[0])
    final_conf, final_label = exit_confidence(net(x)[-1], temperature=TEMPERATURES[1])
    return {"branch": (float(branch_conf[0]), int(branch_label[0])), "final": (float(final_conf[0]),
                                                                                int(final_label[0])),
            "h1": h1}


# -- plans -------------------------------------------------------------------------------


def test_strategy_matches_the_decision_index_and_is_cached(setup):
    plan = setup["plans"].get(setup["model_id"])
    first = plan.strategy(50.0, "mean")
    assert plan.strategy(50.0, "mean") is first  # O(1) dict hit
    decision = DecisionIndex(plan.table, objective="mean").lookup(50.0)
    row = plan.table.row(decision.row)
    assert (first.split, list(first.thresholds), first.feasible) == (row["split"], row["thresholds"],
                                                                     decision.feasible)
    assert first.latency_ms == row["expected_latency_ms"] and first.accuracy == row["accuracy"]
    assert all(t is not None and plan.profile.branch_after_stage[b] <= first.split
               for b, t in enumerate(first.thresholds) if b in first.active_branches)


def test_a_new_link_swaps_the_plan_and_invalidates_the_cache(setup):
    plans, plan = setup["plans"], setup["plans"].get(setup["model_id"])
    before = plan.strategy(30.0, "tail")
    table_before = plan.table
    plans.set_link(Link(uplink_mbps=0.01, rtt_ms=500.0))
    assert plan.table is not table_before and plan.link.rtt_ms == 500.0
    after = plan.strategy(30.0, "tail")
    assert after is not before and after.split == 3  # offloading is hopeless on this link
    plans.update_profile(offload_overhead_ms=7.0)
    assert plan.profile.offload_overhead_ms == 7.0


def test_plans_keep_the_configured_headroom_below_the_requirement(setup, net):
    """Every model plan (experts too) holds its rows to D · (1 - headroom); the strategy keeps D itself."""
    model = setup["registry"].get(setup["model_id"])
    roomy = PlanBook(link=Link(uplink_mbps=10.0, rtt_ms=20.0), headroom_fraction=0.3)
    roomy.install(setup["model_id"], model.calibration, _profile(net))
    plain = setup["plans"]
    table = plain.get(setup["model_id"]).table
    # a requirement that the fastest row meets with 0.2 to spare: no room for 0.3
    deadline_ms = float(table.latency_ms("mean").min()) / 0.8
    strategy = roomy.strategy(setup["model_id"], deadline_ms, "mean")
    assert not strategy.feasible and strategy.deadline_ms == deadline_ms
    assert plain.strategy(setup["model_id"], deadline_ms, "mean").feasible
    generous = roomy.strategy(setup["model_id"], 10 * deadline_ms, "mean")
    assert generous.feasible and generous.latency_ms <= 10 * deadline_ms * 0.7
    with pytest.raises(ConfigError, match="headroom"):
        PlanBook(link=Link(uplink_mbps=10.0, rtt_ms=20.0), headroom_fraction=0.9)


@pytest.mark.parametrize("deadline_ms, objective", [(-1.0, "mean"), (math.nan, "mean"), (math.inf, "mean"),
                                                     ("abc", "mean"), (10.0, "median")])
def test_bad_decision_arguments_are_refused(setup, deadline_ms, objective):
    with pytest.raises(ConfigError):
        setup["plans"].strategy(setup["model_id"], deadline_ms, objective)


def test_strategies_csv_has_one_line_per_row(setup):
    plan = setup["plans"].get(setup["model_id"])
    lines = plan.table_csv().strip().splitlines()
    assert lines[0].startswith("threshold_0,split,accuracy") and len(lines) == len(plan.table) + 1


# -- exits on the edge ---------------------------------------------------------------------


def test_edge_only_answers_with_the_final_exit(force_plan, setup, net):
    _force(force_plan, setup, split=3, thresholds=[None])
    reference = _reference(_served(setup), _image())
    result = setup["runner"].classify(_image(), deadline_ms=100.0)
    assert (result.where, result.exit, result.fallback, result.split) == ("edge", "final", False, 3)
    assert (result.confidence, result.label) == pytest.approx(reference["final"])
    assert result.class_name == net.class_names[result.label]
    assert result.predicted_latency_ms == 12.5 and result.latency.transfer_ms == 0.0
    assert setup["cloud"].offloads == []


def test_exit_rule_compares_in_float64_with_the_exits_temperature(force_plan, setup, net):
    confidence, label = _reference(_served(setup), _image())["branch"]
    _force(force_plan, setup, split=3, thresholds=[confidence])  # exactly the confidence: exits
    result = setup["runner"].classify(_image())
    assert (result.exit, result.label, result.confidence) == (0, label, confidence)
    _force(force_plan, setup, split=3, thresholds=[float(np.nextafter(confidence, 2.0))])  # just above: passes
    assert setup["runner"].classify(_image()).exit == "final"


def test_an_inactive_branch_is_not_evaluated(monkeypatch, force_plan, setup, net):
    calls = []
    served = _served(setup)
    original = served.run_branch
    monkeypatch.setattr(served, "run_branch", lambda b, h, **kw: calls.append(b) or original(b, h, **kw))
    _force(force_plan, setup, split=3, thresholds=[None])
    setup["runner"].classify(_image())
    assert calls == []


# -- offloading ------------------------------------------------------------------------------


def test_offload_sends_the_split_tensor_within_the_budget(force_plan, setup, net):
    _force(force_plan, setup, split=1, thresholds=[None])
    reference = _reference(_served(setup), _image())
    result = setup["runner"].classify(_image(), deadline_ms=500.0)
    assert (result.where, result.exit, result.fallback) == ("cloud", "final", False)
    assert result.label == reference["final"][1] and result.class_name == net.class_names[result.label]
    (call,) = setup["cloud"].offloads
    request = call.request
    assert request.split == 1 and request.model_id == setup["model_id"]
    assert np.array_equal(request.tensor, reference["h1"])
    assert 0 < call.timeout_s <= 0.5
    assert result.latency.cloud_ms == 2.0 and result.latency.transfer_ms == 28.0
    assert result.latency.total_ms >= result.latency.edge_ms >= 0
    # one passive sample (bytes, round trip minus cloud time) and one overhead measurement
    # (the bytes that went on the wire: deflated, smaller than the payload)
    assert call.content_encoding == "deflate" and call.n_bytes < request.n_bytes
    planner = setup["planner"]
    assert setup["monitor"].samples == [] and planner.overhead.n_samples == 0  # queued, not yet planned
    assert planner.drain()
    assert setup["monitor"].samples == [(call.n_bytes, 28.0)]
    assert planner.overhead.n_samples == 1
    assert planner.wire_ratio.current_ms == pytest.approx(call.n_bytes / request.n_bytes)


def test_without_compression_the_payload_travels_as_is(force_plan, setup):
    _force(force_plan, setup, split=1, thresholds=[None])
    setup["runner"].wire_compression = "none"
    setup["runner"].classify(_image(), deadline_ms=500.0)
    (call,) = setup["cloud"].offloads
    assert call.content_encoding is None and call.n_bytes == call.request.n_bytes
    assert setup["planner"].drain() and setup["planner"].wire_ratio.current_ms == 1.0


def test_a_measured_compression_ratio_replans_the_transfer(monkeypatch, setup):
    planner, plan = setup["planner"], setup["plans"].get(setup["model_id"])
    assert plan.profile.wire_ratio == 1.0
    planner.submit_offload(1000, encode_ms=0.1, round_trip_ms=40.0, cloud_ms=2.0, payload_n_bytes=2000)
    assert planner.drain()
    assert plan.profile.wire_ratio == pytest.approx(0.5)
    assert plan.profile.wire_bytes[1] == pytest.approx(0.5 * plan.profile.split_bytes[1])
    # a synthetic offload (no payload size) does not count
    planner.submit_offload(10, encode_ms=0.1, round_trip_ms=40.0, cloud_ms=2.0)
    assert planner.drain() and planner.wire_ratio.n_samples == 1


def test_overhead_is_measured_against_the_link_part(setup):
    planner = setup["planner"]
    # estimated link part: 8*10_000/(1000*10) + 20 = 28 ms
    overhead_ms = planner.overhead_ms(10_000, encode_ms=0.5, round_trip_ms=40.0, cloud_ms=2.0)
    assert overhead_ms == pytest.approx(0.5 + 40.0 - 2.0 - 28.0)


def test_a_moving_overhead_replans(setup):
    planner, plan = setup["planner"], setup["plans"].get(setup["model_id"])
    for _ in range(5):
        planner.submit_offload(0, encode_ms=0.0, round_trip_ms=45.0, cloud_ms=0.0)
    assert planner.drain()
    assert planner.overhead.current_ms == pytest.approx(25.0)
    assert plan.profile.offload_overhead_ms == pytest.approx(25.0)


# -- fallback --------------------------------------------------------------------------------


@pytest.mark.parametrize("error", [CloudTimeout("late"), CloudUnavailable("down"),
                                   CloudRejected(404, "unknown_model", "no such model")])
def test_fallback_uses_the_most_confident_evaluated_branch(force_plan, setup, net, error):
    _force(force_plan, setup, split=2, thresholds=[1.0])  # evaluated, never confident enough
    setup["cloud"].fail("infer", error)
    rejected = []
    setup["runner"].on_cloud_rejected = rejected.append
    result = setup["runner"].classify(_image())
    assert (result.where, result.exit, result.fallback) == ("edge", 0, True)
    assert (result.confidence, result.label) == pytest.approx(_reference(_served(setup), _image())["branch"])
    assert type(error).__name__ in result.fallback_reason
    assert rejected == ([setup["model_id"]] if isinstance(error, CloudRejected) else [])
    assert setup["planner"].drain()
    assert setup["monitor"].samples == [] and setup["planner"].overhead.n_samples == 0


def test_fallback_runs_the_rest_of_the_network_when_the_budget_allows(force_plan, setup, net):
    _force(force_plan, setup, split=1, thresholds=[None])
    setup["cloud"].fail("infer", CloudUnavailable("connection refused"))
    result = setup["runner"].classify(_image(), deadline_ms=1000.0)
    assert (result.where, result.exit, result.fallback) == ("edge", "final", True)
    assert result.label == _reference(_served(setup), _image())["final"][1]


def test_fallback_takes_the_cheapest_branch_when_the_rest_does_not_fit(force_plan, setup, net):
    slow = _profile(net, stage_edge_ms=(1.0, 1e6, 1e6))
    _force(force_plan, setup, split=1, thresholds=[None], profile=slow)  # branch 0 is off, yet used
    setup["cloud"].fail("infer", CloudTimeout("late"))
    result = setup["runner"].classify(_image(), deadline_ms=1000.0)
    assert (result.exit, result.fallback) == (0, True)
    assert result.label == _reference(_served(setup), _image())["branch"][1]


def test_fallback_before_any_branch_runs_the_whole_network(force_plan, setup, net):
    slow = _profile(net, stage_edge_ms=(1e6, 1e6, 1e6))
    _force(force_plan, setup, split=0, thresholds=[None], profile=slow)
    setup["cloud"].fail("infer", CloudTimeout("late"))
    result = setup["runner"].classify(_image(), deadline_ms=1000.0)
    assert (result.exit, result.fallback) == ("final", True)
    assert result.label == _reference(_served(setup), _image())["final"][1]


def test_no_budget_left_means_no_cloud_call(force_plan, setup):
    _force(force_plan, setup, split=1, thresholds=[None])
    result = setup["runner"].classify(_image(), deadline_ms=0.0, objective="tail")
    assert result.fallback and "budget" in result.fallback_reason
    assert setup["cloud"].offloads == []


def test_a_mean_requirement_lets_planned_offloads_finish(force_plan, setup):
    """Under "mean" the offloaded path may exceed the requirement (the plan counts it in the average):
    the cloud gets the strategy's worst-case path with slack, not the requirement."""
    strategy = _force(force_plan, setup, split=1, thresholds=[None])  # worst-case path 20 ms
    result = setup["runner"].classify(_image(), deadline_ms=5.0, objective="mean")
    assert (result.where, result.fallback, result.deadline_ms) == ("cloud", False, 5.0)
    (call,) = setup["cloud"].offloads
    assert 0.005 < call.timeout_s <= 1.25 * strategy.worst_latency_ms / 1000.0


# -- bookkeeping and input ---------------------------------------------------------------------


def test_each_request_is_counted_once(force_plan, setup):
    runner = setup["runner"]
    _force(force_plan, setup, split=1, thresholds=[None])
    runner.classify(_image())  # cloud
    setup["cloud"].fail("infer", CloudUnavailable("down"))
    runner.classify(_image())  # fallback
    _force(force_plan, setup, split=3, thresholds=[0.0])
    runner.classify(_image())  # branch exit
    with pytest.raises(DataError):
        runner.classify(b"not an image")
    assert runner.counts() == {"n_requests": 4, "n_edge_branch": 1, "n_edge_final": 0, "n_cloud": 1,
                               "n_fallback": 1, "n_rejected": 1, "n_rate_limited": 0}


def test_models_are_resolved_by_id_name_or_default(setup):
    runner, model_id = setup["runner"], setup["model_id"]
    assert runner.resolve_model(None).model_id == model_id  # the only one
    assert runner.resolve_model("b-lenet").model_id == model_id
    with pytest.raises(UnknownModelError):
        runner.resolve_model("nope")
    with pytest.raises(ConfigError):
        runner.classify(_image(), deadline_ms=-5.0)


def test_edge_slowdown_emulates_a_device_with_the_scaled_profile_times(setup):
    """An emulated slow edge takes at least each piece's (scaled) profile time, and no more than needed."""
    from popex.runtime.profiler import time_stages

    runner = setup["runner"]
    net = runner.registry.get(setup["model_id"]).loaded.net
    x = np.zeros((1, *net.input_shape), np.float32)
    waits = []
    import popex.edge.compute as module

    real_sleep = module.time.sleep
    module.time.sleep = waits.append
    slow = EdgeCompute(edge_slowdown=4.0)
    try:
        slow.on_edge(net.run_stages, x, start=0, stop=1, emulated_ms=50.0)
        slow.on_edge(net.run_stages, x, start=0, stop=1, emulated_ms=0.0)  # compute already took longer
    finally:
        module.time.sleep = real_sleep
    assert len(waits) == 1 and 0.0 < waits[0] <= 0.050
    runner.compute.on_edge(net.run_stages, x, start=0, stop=1, emulated_ms=1e6)  # emulation off: no wait at all
    timings = time_stages(net, n_warmup=0, n_repeats=2)
    assert np.allclose(timings.scaled(4.0).stage_ms, 4.0 * timings.stage_ms)
    with pytest.raises(ConfigError):
        EdgeCompute(edge_slowdown=0.5)


def test_fixed_edge_time_is_measured_and_enters_the_plan(setup):
    """Reading, decoding and preprocessing cost every request the same: measured, then planned with."""
    runner, planner, plan = setup["runner"], setup["planner"], setup["plans"].get(setup["model_id"])
    assert plan.profile.edge_fixed_ms == 0.0
    runner.classify(_image(), deadline_ms=1000.0, arrival_s=time.perf_counter() - 0.050)  # arrived 50 ms ago
    assert planner.drain()
    assert planner.edge_fixed.n_samples == 1 and planner.edge_fixed.current_ms >= 50.0
    assert plan.profile.edge_fixed_ms == planner.edge_fixed.current_ms  # beyond the hysteresis: re-planned
    strategy = plan.strategy(1000.0, "mean")
    assert strategy.latency_ms >= 50.0 and strategy.worst_latency_ms >= 50.0


# -- the request path only reads -------------------------------------------------------------------


def test_a_request_completes_while_the_planner_is_blocked(force_plan, setup):
    """An offloading request only queues its measurements: with the planner thread held inside a job,
    the request still answers and the plan is untouched; released, the planner swaps the re-planned table in."""
    planner, plan = setup["planner"], setup["plans"].get(setup["model_id"])
    _force(force_plan, setup, split=1, thresholds=[None])
    planner.start()
    entered, release = threading.Event(), threading.Event()
    planner.submit(lambda: (entered.set(), release.wait()))
    assert entered.wait(10.0)  # the planner thread is now inside the job, waiting
    table_before = plan.table
    try:
        result = setup["runner"].classify(_image(), deadline_ms=500.0)
        assert (result.where, result.fallback) == ("cloud", False)
        assert planner.overhead.n_samples == 0 and setup["monitor"].samples == []
        assert plan.table is table_before and plan.profile.offload_overhead_ms == 1.0
    finally:
        release.set()
    assert planner.drain(10.0)
    assert planner.overhead.n_samples == 1 and len(setup["monitor"].samples) == 1
    assert plan.table is not table_before
    assert plan.profile.offload_overhead_ms == pytest.approx(planner.overhead.current_ms)


def test_uplink_changes_replan_on_the_planner_not_the_caller(setup):
    planner, plan = setup["planner"], setup["plans"].get(setup["model_id"])
    planner.submit_link(Link(uplink_mbps=0.5, rtt_ms=80.0))
    assert plan.link.rtt_ms == 20.0  # only queued
    assert planner.drain()
    assert plan.link.rtt_ms == 80.0 and setup["plans"].link.uplink_mbps == 0.5


def test_a_closed_planner_takes_nothing(setup):
    planner = setup["planner"]
    planner.close()
    planner.submit_offload(100, encode_ms=0.0, round_trip_ms=40.0, cloud_ms=2.0)
    assert not planner.drain() and planner.overhead.n_samples == 0
    with pytest.raises(RuntimeError):
        planner.start()


@pytest.mark.parametrize("deadline_ms", [math.inf, math.nan, -1.0, 3.6e6 + 1, True])
def test_the_runner_refuses_a_bad_deadline_before_any_work(setup, deadline_ms):
    with pytest.raises(ConfigError, match="deadline_ms"):
        setup["runner"].classify(_image(), deadline_ms=deadline_ms)
    assert setup["runner"].counts()["n_rejected"] == 1
