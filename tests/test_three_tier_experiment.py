"""``popex experiment three-tier --quick`` end to end: its files, its rows and its docs section.

Real services (the device link shaped by tbf as root, else the loopback);
nothing asserts on a latency value, only on files, row counts and relations
that hold by construction.
"""

from __future__ import annotations

import pytest

from experiments import three_tier
from experiments.cli import EXPERIMENTS
from experiments.report import read_csv

pytestmark = pytest.mark.slow  # real processes


def test_three_tier_quick(tmp_path):
    docs = tmp_path / "results.md"
    docs.write_text("# POPEX results\n\n## Distortion\n\nkept as it was.\n")
    config = three_tier.ThreeTierConfig.quick_config()
    runs, info = three_tier.run_three_tier(config, out_root=tmp_path / "results", docs_path=docs, progress=False)
    assert "three-tier" in EXPERIMENTS
    n_plans = 6 + len(config.fixed_cuts)
    n_rates = len(config.device_links_mbps) if info.mode == "netns" else 1
    assert len(runs) == n_plans * n_rates
    assert len(read_csv(tmp_path / "results" / "three-tier" / "requests.csv")) == len(runs) * config.n_images
    for run in runs:
        assert 0 <= run.x <= run.y <= 6 and run.n_requests == config.n_images
        assert abs(run.where_device + run.where_edge + run.where_cloud - 1.0) < 1e-9
        if run.policy == "device-only":
            assert (run.x, run.y, run.where_device) == (6, 6, 1.0)
        if run.policy == "cloud-only":
            assert (run.x, run.y, run.where_device) == (0, 0, 0.0)
    assert all(path.is_file() and path.stat().st_size > 0 for path in info.files)
    text = docs.read_text()
    assert "## three-tier\n" in text and "popex experiment three-tier --quick" in text and "Median" in text
    assert "## Distortion\n\nkept as it was.\n" in text
