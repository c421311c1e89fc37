"""Emulated device profiles: the shipped factors are Scission's measurements, and bad files are refused."""

from __future__ import annotations

import json
import statistics
import subprocess
from pathlib import Path

import pytest

from popex.errors import ConfigError
from popex.runtime.devices import find_device, load_device_profiles

REPO = Path(__file__).resolve().parents[1]
SCISSION = REPO.parent / "shared" / "scission"


def _scission_ratio(system: str, reference: str = "vm2Core") -> float:
    """Median over the shared models of whole-model time (sum of block medians), system / reference."""
    data = {}
    for path in SCISSION.glob("*.json"):
        content = json.loads(path.read_text())
        data[content["system"]] = content["models"]
    models = sorted(set(data[system]) & set(data[reference]))
    return statistics.median(sum(b["time_ms"] for b in data[system][m]["blocks"])
                             / sum(b["time_ms"] for b in data[reference][m]["blocks"]) for m in models)


@pytest.mark.skipif(not SCISSION.is_dir(), reason=f"Scission's benchmark data is not at {SCISSION}")
@pytest.mark.parametrize("name, system", [("raspi4", "raspi4"), ("i5-2500", "2500"), ("i7-6700k", "6700k(NoGPU)"),
                                          ("i7-6700k-gpu", "6700k(GPU)")])
def test_each_shipped_factor_is_the_median_ratio_in_scissions_data(name, system):
    assert find_device(name).slowdown == pytest.approx(_scission_ratio(system), abs=0.01)


def test_every_shipped_profile_names_its_source_and_tier():
    profiles = load_device_profiles()
    assert {"raspi4", "vm2core"} <= set(profiles)
    assert all(p.source and p.tier in ("device", "edge", "cloud") for p in profiles.values())


@pytest.mark.parametrize("entry, pattern", [
    ({"tier": "device", "slowdown": 0, "source": "x"}, "slowdown"),
    ({"tier": "phone", "slowdown": 2, "source": "x"}, "tier"),
    ({"tier": "device", "slowdown": 2}, "exactly the keys"),
    ({"tier": "device", "slowdown": 2, "source": " "}, "source"),
])
def test_bad_profiles_are_refused_with_the_profile_named(tmp_path, entry, pattern):
    path = tmp_path / "devices.yaml"
    path.write_text(json.dumps({"profiles": {"pi": entry}}))
    with pytest.raises(ConfigError, match=pattern):
        load_device_profiles(path)


def test_run_edge_takes_a_device_name_or_a_factor_not_both():
    done = subprocess.run([str(REPO / "run_edge.sh"), "--cloud-url", "http://127.0.0.1:9",
                           "--emulate-edge-device", "raspi4", "--emulate-edge-slowdown", "3"],
                          env={"POPEX_TOKEN": "x" * 32, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert done.returncode == 2 and "not both" in done.stderr
    done = subprocess.run([str(REPO / "run_edge.sh"), "--cloud-url", "http://127.0.0.1:9",
                           "--emulate-edge-device", "nope"], env={"POPEX_TOKEN": "x" * 32, "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 2 and "unknown device profile 'nope'" in done.stderr
