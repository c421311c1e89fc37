"""The three-tier runtime for real: a device (the client library here), an edge and a cloud as processes.

- Under a plan pinned to cut on the device (x = 3) and on the edge (y = 4),
  images chosen by their confidences at the device's and the edge's branch
  are answered where the plan says: on the device, the edge and the cloud.
- The edge killed mid-stream: every image is still answered, by the device,
  marked ``fallback``.
- The device -> edge link reshaped (tbf, the edge in a network namespace):
  the device measures it, reports it, and its re-planned cut x moves.

Every wait is bounded; nothing asserts on latency.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from popex.data import default_test_set, encode_png
from popex.device.client import DeviceClient
from popex.testbed.netns import HarnessUnavailable
from popex.testbed.services import REPO_ROOT
from popex.testbed.tiers import three_tier_services

pytestmark = pytest.mark.slow  # real processes
_MARGIN = 0.02  # confidences this close to a threshold could round either way on the two tiers


@pytest.fixture(scope="module")
def test_images():
    dataset = default_test_set().dataset
    return [encode_png(image) for image in dataset.images[:600]]


def _confidences(client: DeviceClient, image: bytes) -> tuple[float, float]:
    local = client.local
    h = local.stages(local.input_tensor(image), 0, 3)
    first = local.branch(0, h).confidence
    return first, local.branch(1, local.stages(h, 3, 4)).confidence


def test_answers_come_from_all_three_tiers_then_from_the_device_when_the_edge_dies(tmp_path, test_images):
    with three_tier_services(tmp_path) as services:
        client = DeviceClient(edge_url=services.edge.url, model_dir=services.model_dir,
                              device_token=services.device_token, pin_x=3, pin_y=4, objective="mean")
        try:
            plan = client.refresh_plan(deadline_ms=1000.0)
            assert plan is not None and (plan.x, plan.y) == (3, 4), plan
            t0, t1 = plan.thresholds[0], plan.thresholds[1]
            assert t0 is not None and t1 is not None, f"the plan takes no exit on the device or the edge: {plan}"
            expected: dict[str, list[bytes]] = {"device": [], "edge": [], "cloud": []}
            for image in test_images:
                c0, c1 = _confidences(client, image)
                if abs(c0 - t0) < _MARGIN or abs(c1 - t1) < _MARGIN:
                    continue
                where = "device" if c0 >= t0 else "edge" if c1 >= t1 else "cloud"
                if len(expected[where]) < 3:
                    expected[where].append(image)
            assert all(images for images in expected.values()), {k: len(v) for k, v in expected.items()}
            for where, images in expected.items():
                for image in images:
                    answer = client.classify(image, deadline_ms=1000.0)
                    assert (answer.where, answer.fallback, answer.cuts) == (where, False, (3, 4)), answer
                    assert answer.ran["device"][0] == 1 and set(answer.ran) == {
                        "device": {"device"}, "edge": {"device", "edge"}, "cloud": {"device", "edge", "cloud"}}[where]
            assert answer.ran == {"device": (1, 3), "edge": (4, 4), "cloud": (5, 6)}  # the last one: every tier
            # the CLI, a third process on the device side: the same plan, one JSON line per image
            paths = []
            for where in ("device", "cloud"):
                paths.append(tmp_path / f"{where}.png")
                paths[-1].write_bytes(expected[where][0])
            done = subprocess.run(
                [sys.executable, "-m", "popex.cli", "device", "classify", "--edge", services.edge.url, "--model",
                 str(services.model_dir), "--x", "3", "--y", "4", "--objective", "mean", "--deadline-ms", "1000",
                 "--json", *map(str, paths)], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
                env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "POPEX_DEVICE_TOKEN": services.device_token})
            assert done.returncode == 0, done.stderr
            lines = [json.loads(line) for line in done.stdout.splitlines()]
            assert [(a["where"], a["cuts"], a["fallback"]) for a in lines] == [
                ("device", [3, 4], False), ("cloud", [3, 4], False)], lines
            # the edge killed mid-stream: every image (all past the device's exit) still answered, by the device
            streamed = []
            for i, image in enumerate(((expected["edge"] + expected["cloud"]) * 8)[:8]):
                if i == 3:
                    services.edge.stop()
                streamed.append(client.classify(image, deadline_ms=1000.0))
        finally:
            client.close()
    assert all(not a.fallback for a in streamed[:3])
    assert all(a.fallback and a.where == "device" and a.ran == {"device": (1, 6)} for a in streamed[3:]), streamed[3:]


def test_reshaping_the_device_link_moves_the_device_cut(tmp_path):
    try:
        services_context = three_tier_services(tmp_path, device_link_mbps=100.0)
        services = services_context.__enter__()
    except HarnessUnavailable as err:
        pytest.skip(str(err))
    try:
        # A slow device: with a fast link it sends the input (x = 0); with a slow one it cuts at the bottleneck.
        client = DeviceClient(edge_url=services.edge.url, model_dir=services.model_dir,
                              device_token=services.device_token, slowdown=20.0, objective="mean")
        try:
            fast = client.refresh_plan(deadline_ms=1000.0)
            services.set_device_link_mbps(0.3)
            slow = client.refresh_plan(deadline_ms=1000.0)
            assert slow is not None, client.refresh_error
            rate_mbps = client.meter.uplink_mbps()
            services.set_device_link_mbps(100.0)
            back = client.refresh_plan(deadline_ms=1000.0)
        finally:
            client.close()
    finally:
        services_context.__exit__(None, None, None)
    assert fast is not None and slow is not None and back is not None
    assert 0.15 < rate_mbps < 0.45, rate_mbps  # the device measured the shaped link
    assert slow.x > fast.x and back.x == fast.x, (fast, slow, back)
    assert np.isfinite(slow.expected_latency_ms)
