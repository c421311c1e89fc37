"""The edge's device routes in-process: a tensor at cut x runs x+1..y, the plan covers both hops, bad input is 4xx."""

from __future__ import annotations

import time

import numpy as np
import pytest

from popex.edge.fake_cloud import FakeCloud
from popex.runtime.model_files import load_model_dir
from popex.wire import encode_offload

DEVICE_TOKEN = "device-token-0123456789"
HEADERS = {"Authorization": f"Bearer {DEVICE_TOKEN}"}


@pytest.fixture
def fake_cloud(tmp_path):
    return FakeCloud(state_dir=tmp_path / "cloud")  # the cloud's half for real


@pytest.fixture
def config(config):
    return {**config, "device_token": DEVICE_TOKEN}


@pytest.fixture
def ready(client):
    deadline_s = time.monotonic() + 120
    while time.monotonic() < deadline_s:
        models = client.get("/api/v1/models").get_json()["models"]
        if models and models[0]["state"] == "ready":
            return models[0]["model_id"]
        time.sleep(0.2)
    raise AssertionError("model not ready")


def _tensor(model_id, x, directory):
    net = load_model_dir(directory).net
    h = np.random.default_rng(0).random((1, *net.input_shape)).astype(np.float32)
    h = net.run_stages(h, start=0, stop=x) if x else h
    return encode_offload(h, model_id=model_id, split=x, request_id="r1", budget_ms=5000.0)


def test_plan_tensor_and_report(client, ready, config):
    plan = client.get(f"/api/v1/plan?model={ready}&deadline_ms=50", headers=HEADERS)
    assert plan.status_code == 200, plan.get_json()
    body = plan.get_json()
    assert 0 <= body["x"] <= body["y"] <= body["n_stages"] and body["device_timings"] == "assumed"
    pinned = client.get(f"/api/v1/plan?model={ready}&deadline_ms=50&x=1&y=3", headers=HEADERS).get_json()
    assert (pinned["x"], pinned["y"]) == (1, 3)
    assert set(pinned["edge_branches"]) <= {1} and set(pinned["device_branches"]) <= {0}
    answer = client.post("/api/v1/classify/tensor?deadline_ms=50", data=_tensor(ready, 1, config["default_model_dir"]),
                         headers=HEADERS)
    assert answer.status_code == 200, answer.get_json()
    result = answer.get_json()
    assert result["cuts"][0] == 1 and result["where"] in ("edge", "cloud") and result["request_id"] == "r1"
    report = client.post("/api/v1/device/report", headers=HEADERS, json={
        "model": ready, "stage_ms": [50.0] * 6, "base_ms": [5.0, 5.0],
        "uploads": [{"n_bytes": 125_000, "transfer_ms": 105.0}]})
    assert report.status_code == 200 and report.get_json()["device_edge"] == {"uplink_mbps": 10.0, "rtt_ms": 5.0}
    replanned = client.get(f"/api/v1/plan?model={ready}&deadline_ms=50", headers=HEADERS).get_json()
    assert replanned["device_timings"] == "reported" and replanned["links"]["device_edge"]["rtt_ms"] == 5.0
    assert replanned["x"] < 6  # a 300 ms device cannot run everything within 50 ms


@pytest.mark.parametrize("body, status", [(b"junk", 400), (b"\x80\x04pickle", 400)])
def test_bad_payloads_are_4xx(client, ready, body, status):
    assert client.post("/api/v1/classify/tensor", data=body, headers=HEADERS).status_code == status


def test_wrong_shape_cut_and_token_are_refused(client, ready, config):
    payload = _tensor(ready, 1, config["default_model_dir"])
    assert client.post("/api/v1/classify/tensor", data=payload).status_code == 401
    net = load_model_dir(config["default_model_dir"]).net
    wrong = encode_offload(np.zeros((1, 3), np.float32), model_id=ready, split=1, request_id="r")
    assert client.post("/api/v1/classify/tensor", data=wrong, headers=HEADERS).status_code == 400
    full = encode_offload(np.zeros((1, 10), np.float32), model_id=ready, split=net.n_stages, request_id="r")
    assert client.post("/api/v1/classify/tensor", data=full, headers=HEADERS).status_code == 400
    assert client.get(f"/api/v1/plan?model={ready}&x=abc", headers=HEADERS).status_code == 400
    assert client.post("/api/v1/device/report", headers=HEADERS, json={"model": ready, "stage_ms": [1]}).status_code == 400


def test_routes_are_off_without_a_device_token(make_app, config):
    app = make_app({**config, "device_token": None})
    assert app.test_client().get("/api/v1/plan", headers=HEADERS).status_code == 403
