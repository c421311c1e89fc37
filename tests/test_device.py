"""The device tier against a real edge and cloud (run_edge.sh / run_cloud.sh on 127.0.0.1).

Three processes: the cloud, the edge (with the default model prepared) and
the device (``popex device classify`` as a subprocess, and the library in
this test process). Answers come from the edge or the cloud; the edge
killed mid-stream, every image is still answered, by the device, marked
``fallback``. Every wait is bounded; nothing asserts on latency.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time

import pytest
import requests

from popex.data import default_test_set, encode_png
from popex.device.client import DeviceClient, DeviceError
from popex.testbed.services import REPO_ROOT, start_cloud, start_edge

pytestmark = pytest.mark.slow  # real processes
MODEL_DIR = REPO_ROOT / "models" / "b-alexnet"  # the testbed edge's model (popex.testbed.services.TESTBED_MODEL_DIR)
READY_TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    directory = tmp_path_factory.mktemp("images")
    dataset = default_test_set().dataset
    paths = []
    for i in range(8):
        path = directory / f"{i}.png"
        path.write_bytes(encode_png(dataset.images[i]))
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    if not (MODEL_DIR / "calibration.npz").is_file():
        pytest.skip(f"the default model is missing in {MODEL_DIR}")
    root = tmp_path_factory.mktemp("services")
    token = secrets.token_hex(16)
    started = []
    try:
        cloud = start_cloud(token=token, state_dir=root / "cloud", log_path=root / "cloud.log")
        started.append(cloud)
        cloud.wait_ready()
        edge = start_edge(token=token, cloud_url=cloud.url, state_dir=root / "edge", log_path=root / "edge.log",
                          config={"profile_n_repeats": 5})
        started.append(edge)
        edge.wait_ready()
        deadline_s = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline_s:
            models = requests.get(edge.url + "/api/v1/models", timeout=30).json()["models"]
            if models and all(m["state"] == "ready" for m in models):
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"the default model was not ready after {READY_TIMEOUT_S:.0f} s")
        yield {"cloud": cloud, "edge": edge}
    finally:
        for process in reversed(started):
            process.stop()


def _device(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", "popex.cli", "device", "classify", *args], capture_output=True,
                          text=True, timeout=300, env=env, cwd=REPO_ROOT)


def test_answers_come_from_the_edge_and_cloud_then_from_the_device_when_the_edge_dies(services, images):
    edge = services["edge"]
    done = _device("--edge", edge.url, "--model", str(MODEL_DIR), "--deadline-ms", "5000", "--json",
                   *map(str, images))
    assert done.returncode == 0, done.stderr
    answers = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(answers) == len(images)
    assert all(a["fallback"] is False and a["where"] in ("edge", "cloud") for a in answers), answers
    assert all(set(a) >= {"label", "exit", "where", "cuts", "latency_ms", "fallback"} for a in answers)
    # A device with a token, at an edge without the three-tier routes (403): the two-tier way, the image sent.
    tokened = DeviceClient(edge_url=edge.url, model_dir=MODEL_DIR, device_token="a-token-this-edge-lacks")
    try:
        sent = tokened.classify(images[0].read_bytes(), deadline_ms=5000)
    finally:
        tokened.close()
    assert not sent.fallback and sent.where in ("edge", "cloud") and sent.cuts[0] == 0, sent
    # The same images through the library, the edge killed after the third: every image still answered.
    client = DeviceClient(edge_url=edge.url, model_dir=MODEL_DIR)
    streamed = []
    try:
        with pytest.raises(DeviceError, match="refused the request"):
            client.classify(b"not an image", deadline_ms=2000)  # the caller's error is not hidden
        for i, path in enumerate(images):
            if i == 3:
                edge.stop()
            streamed.append(client.classify(path.read_bytes(), deadline_ms=2000))
    finally:
        client.close()
    assert [a.fallback for a in streamed] == [False] * 3 + [True] * (len(images) - 3)
    assert all(a.where == "device" and a.cuts == (client.net.n_stages,) * 2 for a in streamed[3:])
    local = _device("--edge", edge.url, "--model", str(MODEL_DIR), "--json", *map(str, images))
    assert local.returncode == 0, local.stderr
    fallbacks = [json.loads(line) for line in local.stdout.splitlines()]
    assert all(a["fallback"] and a["where"] == "device" for a in fallbacks)
    # the device's own answers agree with the edge's where the edge answered at its final exit
    for edge_answer, device_answer in zip(answers, fallbacks):
        if edge_answer["exit"] == "final":
            assert edge_answer["label"] == device_answer["label"]
