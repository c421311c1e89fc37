"""The device's checks on the edge's plan and its own link meter (no services)."""

from __future__ import annotations

import math

import pytest

from popex.device.plan import LinkMeter, parse_plan
from popex.errors import DataError

GOOD = {"model_id": "m", "x": 1, "y": 3, "thresholds": [0.9, None], "accuracy": 0.8, "expected_latency_ms": 12.0,
        "feasible": True, "policy": "three-tier", "objective": "mean", "deadline_ms": 50}


def test_a_good_plan_parses():
    plan = parse_plan(GOOD, model_id="m", n_stages=3, n_branches=2)
    assert (plan.x, plan.y, plan.thresholds, plan.feasible) == (1, 3, (0.9, None), True)


@pytest.mark.parametrize("change", [
    {"model_id": "other"}, {"x": 2, "y": 1}, {"y": 4}, {"x": -1}, {"x": True}, {"thresholds": [0.9]},
    {"thresholds": [1.5, None]}, {"thresholds": ["0.5", None]}, {"expected_latency_ms": float("nan")},
    {"accuracy": None}])
def test_a_bad_plan_is_refused(change):
    with pytest.raises(DataError):
        parse_plan({**GOOD, **change}, model_id="m", n_stages=3, n_branches=2)
    with pytest.raises(DataError):
        parse_plan(["not", "a", "plan"], model_id="m", n_stages=3, n_branches=2)


def test_the_link_meter_rates_uploads_against_the_base_round_trip():
    meter = LinkMeter(window_n=3)
    assert math.isnan(meter.uplink_mbps()) and meter.base_ms() == 0.0
    meter.add_base(5.0)
    meter.add_upload(125_000, 105.0)  # 1 Mbit in 100 ms beyond the base
    meter.add_upload(1_000, 5.01)  # within the timer's noise: no rate
    assert meter.uplink_mbps() == pytest.approx(10.0)
    report = meter.take_report()
    assert report["base_ms"] == [5.0] and len(report["uploads"]) == 2
    assert meter.take_report()["uploads"] == []  # reported once
