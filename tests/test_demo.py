"""The demo (`./run_demo.sh`): its verdicts, and one short run against real services."""

from __future__ import annotations

import numpy as np
import pytest

from experiments.demo import DemoConfig, DemoRow, _meets, run_demo, verdicts


def _row(profile: str, policy: str, accuracy: float, meets: bool) -> DemoRow:
    return DemoRow(profile=profile, policy=policy, uplink_mbps=5.85, rtt_ms=50.0, strategy="split 1 θ=[off]",
                   n_requests=10, accuracy=accuracy, mean_latency_ms=20.0, p95_latency_ms=30.0, within_share=1.0,
                   meets_requirement=meets, offload_share=0.0, fallback_share=0.0, predicted_mean_ms=20.0)


def test_the_requirement_is_read_as_the_objective_says() -> None:
    latency_ms = np.array([10.0] * 19 + [40.0] * 2)  # mean 12.9, p95 40: the tail is read at the 95th percentile
    assert _meets(latency_ms, 13.0, "mean") and not _meets(latency_ms, 13.0, "tail")
    assert _meets(latency_ms, 40.0, "tail") and not _meets(latency_ms, 12.8, "mean")
    assert _meets(np.array([10.0] * 99 + [90.0]), 10.0, "tail")  # one image in a hundred does not decide it


def test_verdicts_compare_popex_with_the_baselines_that_meet_the_requirement_only() -> None:
    rows = [_row("lte", "adaptive", 0.88, True), _row("lte", "edge-only", 0.90, False),
            _row("lte", "cloud-only", 0.87, True), _row("wifi", "adaptive", 0.86, True),
            _row("wifi", "cloud-only", 0.90, True)]
    lte, wifi = verdicts(rows)
    assert "cloud-only 87.00%" in lte and "edge-only" not in lte  # the more accurate one missed: not a rival
    assert "<-" not in lte
    assert wifi.endswith("<- a baseline is more accurate")


@pytest.mark.slow  # real cloud and edge processes, the shipped default model
def test_a_short_demo_run_prints_the_partition_and_writes_its_files(tmp_path, capsys) -> None:
    """On LTE no offload fits the demo's requirement: the live plan stays on the edge with a branch that every
    image leaves at (the tail bound ends there), where the whole network on the edge does not fit."""
    config = DemoConfig(profiles=("lte",), policies=("adaptive", "edge-only"), n_images=12, out_dir=tmp_path)
    rows = run_demo(config)
    assert [r.policy for r in rows] == ["adaptive", "edge-only"]
    assert all(r.n_requests == 12 and 0.0 <= r.accuracy <= 1.0 for r in rows)
    adaptive, edge_only = rows
    assert "0.00" in adaptive.strategy and adaptive.offload_share == 0.0, adaptive
    assert adaptive.predicted_mean_ms <= config.deadline_ms < edge_only.predicted_mean_ms
    out = capsys.readouterr().out
    assert "POPEX's partition per link" in out and "[lte] POPEX" in out
    for name in ("requests.csv", "summary.csv", "demo.png", "config.json"):
        assert (tmp_path / name).stat().st_size > 0
