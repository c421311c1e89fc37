"""The edge Flask app through its test client, with a fake cloud client injected."""

import io
import json
import pickle
import struct
import zlib

import numpy as np
import pytest
import torch

from edge_api import close_app, create_app, get_node
from edge_api.config import EdgeConfig, load_config
from popex.data import encode_png
from popex.errors import ConfigError
from popex.nets import EarlyExitNet, compute_model_id, weights_to_bytes, zoo_spec
from popex.edge.cloud_port import CloudTimeout
from popex.edge.fake_cloud import FakeCloud

CLASSIFY_KEYS = {"label", "class_name", "confidence", "exit", "where", "split", "thresholds", "fallback",
                 "latency_ms", "predicted_latency_ms", "model", "feasible"}


def _calibration_bytes(n_exits=2, n_samples=200, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n_samples)
    predicted = rng.integers(0, 10, (n_samples, n_exits))
    buffer = io.BytesIO()
    np.savez(buffer, confidence=rng.random((n_samples, n_exits)), predicted=predicted,
             correct=predicted == labels[:, None], labels=labels, temperature=np.ones(n_exits),
             confidence_method=np.array("max_softmax"))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def model_files():
    torch.manual_seed(0)
    spec = zoo_spec("b-lenet")
    weights_bytes = weights_to_bytes(EarlyExitNet(spec))
    return {"spec": json.dumps(spec).encode(), "weights": weights_bytes, "calibration": _calibration_bytes(),
            "model_id": compute_model_id(spec, weights_bytes)}


def _cloud():
    """Offloads answer label 4 in 1 + 3 ms; every model profiles at 0.05, 0.05, 0.02 ms on the cloud."""
    return FakeCloud(transfer_ms=3.0, stage_cloud_ms=(0.05, 0.05, 0.02))


@pytest.fixture
def fake_cloud():
    return _cloud()


@pytest.fixture
def cloud(fake_cloud):
    return fake_cloud


@pytest.fixture
def config(config):
    return {**config, "default_model_dir": None, "max_image_bytes": 64 * 1024}


def _post_model(model_actions, files, **changes):
    files = {**files, **changes}
    return model_actions.register({name: files.get(name) for name in ("spec", "weights", "calibration")})


@pytest.fixture
def registered(model_actions, model_files):
    response = _post_model(model_actions, model_files)
    assert response.status_code == 202, response.json
    model_actions.wait_ready(model_files["model_id"])
    return model_files["model_id"]


@pytest.fixture(scope="module")
def shared(tmp_path_factory, make_config, open_edge, edge_internals, model_files):
    """One app with the model ready, for tests that only read (saves a registration each)."""
    config = make_config(tmp_path_factory.mktemp("shared") / "edge", default_model_dir=None,
                         max_image_bytes=64 * 1024)
    with open_edge(config, _cloud()) as app:
        client = app.test_client()
        data = {name: (io.BytesIO(model_files[name]), name) for name in ("spec", "weights", "calibration")}
        assert client.post("/api/v1/models", data=data, content_type="multipart/form-data").status_code == 202
        assert edge_internals(app)[0].wait_idle(60.0)
        yield {"client": client, "model_id": model_files["model_id"]}


def _png(height=28, width=28, seed=1):
    return encode_png(np.random.default_rng(seed).integers(0, 256, (height, width), dtype=np.uint8))


def _huge_png_header():
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk


def _error(response, status):
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"} and body["error"]["message"]
    return body["error"]


# -- config --------------------------------------------------------------------------------


def test_the_edge_refuses_to_start_without_a_token(tmp_path):
    with pytest.raises(ConfigError, match="token"):
        load_config({"state_dir": str(tmp_path)}, environ={})
    with pytest.raises(ConfigError, match="token"):
        create_app({"token": "", "state_dir": str(tmp_path)})


def test_config_layers_and_checks(tmp_path, token):
    path = tmp_path / "edge.yaml"
    path.write_text("objective: tail\ndefault_deadline_ms: 80\nemulate_link:\n")
    config = load_config({"default_deadline_ms": 50.0}, environ={
        "POPEX_EDGE_CONFIG": str(path), "POPEX_TOKEN": token, "POPEX_EMULATE_LINK": "5.85,50",
        "POPEX_CLOUD_URL": "http://cloud:8001/"})
    assert (config.objective, config.default_deadline_ms, config.emulate_link) == ("tail", 50.0, "5.85,50")
    assert config.cloud_url == "http://cloud:8001" and token not in repr(config)
    for bad in ({"emulate_link": "fast"}, {"objective": "median"}, {"probe_interval_s": 0},
                {"max_image_bytes": True}, {"unknown_key": 1}, {"cloud_url": "ftp://x"},
                {"plan_headroom_fraction": 0.6}, {"plan_headroom_fraction": -0.1}):
        with pytest.raises(ConfigError):
            load_config({"token": token, **bad}, environ={})
    assert isinstance(load_config({"token": token}, environ={}), EdgeConfig)


# -- models ------------------------------------------------------------------------------


def test_register_prepares_in_the_background(model_actions, client, cloud, registered, model_files):
    assert registered in cloud.models  # pushed to the cloud
    listing = client.get("/api/v1/models").json["models"]
    assert listing == [{"model_id": registered, "name": "b-lenet", "state": "ready"}]
    info = client.get(f"/api/v1/models/{registered}").json
    assert info["state"] == "ready" and info["cloud_profile"] == "measured" and info["error"] is None
    assert info["class_names"][:2] == ["class0", "class1"]
    assert [stage["cloud_ms"] for stage in info["profile"]["stages"]] == [0.05, 0.05, 0.02]
    assert {"split", "thresholds", "predicted_latency_ms", "feasible"} <= set(info["strategy"])
    again = _post_model(model_actions, model_files)
    assert again.status_code == 200 and again.json == {"model_id": registered, "state": "ready"}


def test_an_unreachable_cloud_means_assumed_cloud_times(model_actions, cloud, model_files):
    cloud.down = True
    assert _post_model(model_actions, model_files).status_code == 202
    info = model_actions.wait_ready(model_files["model_id"])
    assert info["cloud_profile"] == "assumed"
    edge_ms = [stage["edge_ms"] for stage in info["profile"]["stages"]]
    assert [stage["cloud_ms"] for stage in info["profile"]["stages"]] == pytest.approx(edge_ms)  # speedup 1


def test_a_model_is_classifiable_before_it_is_ready(model_actions, client, cloud, model_files):
    cloud.gate.clear()  # hold the preparation at its first cloud call
    try:
        assert _post_model(model_actions, model_files).status_code == 202
        state = client.get(f"/api/v1/models/{model_files['model_id']}").json["state"]
        assert state in ("registered", "profiling")
        response = client.post("/api/v1/classify", data=_png(), content_type="image/png")
        assert response.status_code == 200, response.json
    finally:
        cloud.gate.set()
    assert model_actions.wait_idle(60.0)


@pytest.mark.parametrize("change, pattern", [
    ({"spec": None}, "spec.json is missing"),
    ({"calibration": None}, "no calibration.npz"),
    ({"weights": pickle.dumps({"a": 1})}, "pickle"),
    ({"spec": b"[1, 2"}, "JSON"),
    ({"calibration": _calibration_bytes(n_exits=3)}, "exits"),
])
def test_bad_model_uploads_are_400(client, model_actions, model_files, change, pattern):
    error = _error(_post_model(model_actions, model_files, **change), 400)
    assert pattern in error["message"]
    assert client.get("/api/v1/models").json["models"] == []


def test_strategies_as_json_and_csv(shared):
    client, registered = shared["client"], shared["model_id"]
    body = client.get(f"/api/v1/models/{registered}/strategies?deadline_ms=5&objective=tail").json
    assert body["n_rows"] == len(body["rows"]) > 1
    assert body["chosen"]["objective"] == "tail" and body["chosen"]["deadline_ms"] == 5.0
    assert body["rows"][body["chosen"]["row"]]["split"] == body["chosen"]["split"]
    response = client.get(f"/api/v1/models/{registered}/strategies?format=csv")
    assert response.mimetype == "text/csv"
    assert len(response.get_data(as_text=True).strip().splitlines()) == body["n_rows"] + 1
    _error(client.get(f"/api/v1/models/{registered}/strategies?format=xml"), 400)
    _error(client.get(f"/api/v1/models/{registered}/strategies?objective=median"), 400)
    _error(client.get("/api/v1/models/nope/strategies"), 404)
    _error(client.get("/api/v1/models/nope"), 404)


def test_models_survive_a_restart(make_app, config, registered, model_files):
    client = make_app(config, cloud=_cloud()).test_client()
    assert client.get(f"/api/v1/models/{registered}").json["state"] == "ready"
    assert client.post("/api/v1/classify", data=_png(), content_type="image/png").status_code == 200


def test_a_restart_with_another_emulated_slowdown_profiles_again(make_app, config, registered, model_actions):
    before = [stage["edge_ms"] for stage in model_actions.wait_ready(registered)["profile"]["stages"]]
    restarted = make_app({**config, "emulate_edge_slowdown": 50.0}, cloud=_cloud())
    restarted_actions = type(model_actions)(restarted, restarted.test_client(), model_actions._monkeypatch)
    after = restarted_actions.wait_ready(registered)
    # the old device's profile is not kept: every stage is measured again under the 50x device
    assert sum(stage["edge_ms"] for stage in after["profile"]["stages"]) > 10 * sum(before)
    status = restarted.test_client().get("/api/v1/status").json
    assert status["emulated_edge_slowdown"] == 50.0


def test_the_default_model_dir_is_registered_at_start(tmp_path, make_app, config, model_files):
    directory = tmp_path / "default"
    directory.mkdir()
    for name, key in (("spec.json", "spec"), ("weights.safetensors", "weights"), ("calibration.npz", "calibration")):
        (directory / name).write_bytes(model_files[key])
    app = make_app({**config, "default_model_dir": str(directory)}, cloud=_cloud())
    response = app.test_client().post("/api/v1/classify", data=_png(), content_type="image/png")
    assert response.status_code == 200 and response.json["model"] == model_files["model_id"]


# -- classify ------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["multipart", "raw", "octet-stream"])
def test_classify_answers_every_field(shared, how):
    client, registered = shared["client"], shared["model_id"]
    if how == "multipart":
        response = client.post("/api/v1/classify", data={"image": (io.BytesIO(_png()), "x.png"),
                                                         "deadline_ms": "250", "model": registered},
                               content_type="multipart/form-data")
    else:
        content_type = "image/png" if how == "raw" else "application/octet-stream"
        response = client.post(f"/api/v1/classify?deadline_ms=250&model={registered}", data=_png(),
                               content_type=content_type)
    assert response.status_code == 200, response.json
    body = response.json
    assert CLASSIFY_KEYS <= set(body)
    assert set(body["latency_ms"]) == {"edge", "transfer", "cloud", "total"}
    assert body["model"] == registered and body["where"] in ("edge", "cloud")
    assert body["exit"] == "final" or isinstance(body["exit"], int)
    assert len(body["thresholds"]) == 1 and isinstance(body["feasible"], bool)
    assert body["deadline_ms"] == 250.0


def test_a_failing_cloud_gives_a_marked_fallback(model_actions, client, cloud, registered):
    model_actions.force(registered, split=1)
    response = client.post("/api/v1/classify", data=_png(), content_type="image/png")
    assert response.status_code == 200 and response.json["where"] == "cloud"
    cloud.fail("infer", CloudTimeout("late"))
    body = client.post("/api/v1/classify", data=_png(), content_type="image/png").json
    assert body["fallback"] is True and body["where"] == "edge" and body["exit"] == "final"
    counts = client.get("/api/v1/status").json["requests"]
    assert counts["n_requests"] == 2 and counts["n_cloud"] == 1 and counts["n_fallback"] == 1


@pytest.mark.parametrize("body, content_type, query, status", [
    (b"hello, not an image", "application/octet-stream", "", 400),
    (_png()[:-30], "image/png", "", 400),
    (b"", "image/png", "", 400),
    (_huge_png_header(), "image/png", "", 400),
    (b'{"image": "abc"}', "application/json", "", 415),
    (_png(), "image/png", "?model=nope", 404),
    (_png(), "image/png", "?deadline_ms=-1", 400),
    (_png(), "image/png", "?deadline_ms=abc", 400),
    (_png(), "image/png", "?deadline_ms=nan", 400),
    (_png(), "image/png", "?deadline_ms=inf", 400),
    (bytes(100 * 1024), "image/png", "", 413),
])
def test_bad_requests_are_json_4xx(shared, body, content_type, query, status):
    _error(shared["client"].post(f"/api/v1/classify{query}", data=body, content_type=content_type), status)


def test_a_truncated_jpeg_and_a_missing_multipart_field_are_400(shared):
    import cv2

    client = shared["client"]
    ok, jpeg = cv2.imencode(".jpg", np.full((28, 28), 128, np.uint8))
    _error(client.post("/api/v1/classify", data=jpeg.tobytes()[:-10], content_type="image/jpeg"), 400)
    _error(client.post("/api/v1/classify", data={"deadline_ms": "10"}, content_type="multipart/form-data"), 400)


def test_classify_without_models_is_404(client):
    _error(client.post("/api/v1/classify", data=_png(), content_type="image/png"), 404)


def test_unknown_routes_and_methods_are_json(shared):
    client = shared["client"]
    assert _error(client.get("/api/v1/nothing"), 404)["code"] == "not_found"
    assert _error(client.get("/api/v1/classify"), 405)["code"] == "method_not_allowed"


def test_an_unexpected_error_is_a_json_500(app, edge_internals, client, registered, monkeypatch):
    runner = edge_internals(app)[1]
    monkeypatch.setattr(runner, "classify", lambda *a, **k: 1 / 0)
    assert _error(client.post("/api/v1/classify", data=_png(), content_type="image/png"), 500)["code"] == \
        "internal_error"


# -- status --------------------------------------------------------------------------------


def test_status_reports_uplink_cloud_and_models(client, cloud, registered):
    body = client.get("/api/v1/status").json
    assert {"uplink_mbps", "rtt_ms", "source", "n_samples", "history"} <= set(body["uplink"])
    assert body["cloud"] == {"url": "http://127.0.0.1:9", "healthy": True, "breaker": {
        "state": "closed", "n_consecutive_failures": 0, "n_opened": 0, "n_skipped": 0}}
    assert body["emulated_link"] is None
    assert body["plan_headroom_fraction"] == 0.05  # configs/edge.yaml's default, used by the plans
    (model,) = body["models"]
    assert model["model_id"] == registered and model["state"] == "ready" and "split" in model["strategy"]
    cloud.down = True
    assert client.get("/api/v1/status").json["cloud"]["healthy"] is False
    assert client.get("/healthz").json == {"status": "ok", "n_models": 1}


def test_status_shows_each_models_fixed_cost_and_prediction_error(app, client, registered):
    assert client.get("/api/v1/status").json["models"][0]["prediction_error"]["n_requests"] == 0
    for seed in range(4):
        response = client.post(f"/api/v1/classify?model={registered}&deadline_ms=1000", data=_png(seed=seed),
                               content_type="image/png")
        assert response.status_code == 200, response.json
    node = get_node(app)
    assert node.planner.drain()
    (model,) = client.get("/api/v1/status").json["models"]
    error = model["prediction_error"]
    assert error["n_requests"] == 4 and error["mean_measured_ms"] > 0 and error["mean_predicted_ms"] > 0
    assert error["mean_error_fraction"] == pytest.approx(error["mean_measured_ms"] / error["mean_predicted_ms"] - 1)
    # the fixed cost (decode, preprocessing) is this model's own, measured, and in its plan's predictions
    assert model["edge_fixed_ms"] > 0 and node.planner.edge_fixed_by_model[registered].n_samples == 4
    assert node.plans.get(registered).profile.edge_fixed_ms == model["edge_fixed_ms"] or \
        abs(node.plans.get(registered).profile.edge_fixed_ms - model["edge_fixed_ms"]) <= 0.5  # inside the band


@pytest.mark.parametrize("policy, split", [("edge-only", 3), ("cloud-only", 0)])
def test_baseline_policies_share_the_runtime(shared, policy, split):
    response = shared["client"].post(f"/api/v1/classify?policy={policy}&deadline_ms=1000", data=_png(),
                                     content_type="image/png")
    assert response.status_code == 200, response.json
    body = response.json
    assert (body["policy"], body["split"]) == (policy, split)
    assert body["where"] == ("cloud" if split == 0 else "edge")
    assert body["thresholds"] == [None]


def test_unknown_policy_is_400(shared):
    error = _error(shared["client"].post("/api/v1/classify?policy=magic", data=_png(), content_type="image/png"),
                   400)
    assert "policy" in error["message"]
    assert shared["client"].post("/api/v1/classify", data=_png(), content_type="image/png").status_code == 200


# -- the node --------------------------------------------------------------------------------


def test_the_node_is_built_without_starting_a_thread_and_closes(config, cloud):
    from popex.decision.latency import Link
    from popex.edge.node import EdgeNode

    node = EdgeNode.from_config(EdgeConfig.from_mapping(config), cloud_client=cloud)
    try:
        assert not node.planner.running and not node.monitor.running
        assert node.runner.plans is node.plans and node.preparation.plans is node.plans
        assert node.runner.planner is node.planner and node.views.runner is node.runner
        node.monitor.on_change(Link(uplink_mbps=2.0, rtt_ms=70.0))  # the monitor only queues the re-plan
        assert node.plans.link.rtt_ms == 20.0
        assert node.planner.drain() and node.plans.link == Link(uplink_mbps=2.0, rtt_ms=70.0)
        node.start()
        assert node.planner.running and node.monitor.running
    finally:
        node.close()
    assert not node.planner.running and not node.monitor.running


def test_a_test_config_replaces_the_yaml_and_the_environment(tmp_path, config, cloud, token, monkeypatch):
    path = tmp_path / "developer.yaml"
    path.write_text("plan_headroom_fraction: 0.1\ndefault_deadline_ms: 33\n")
    monkeypatch.setenv("POPEX_EDGE_CONFIG", str(path))
    monkeypatch.setenv("POPEX_TOKEN", "developer-token-0000")
    app = create_app(config, cloud_client=cloud)  # the mapping itself, as a test hands it over
    try:
        node = get_node(app)
        assert node.config.token == token and node.runner.default_deadline_ms == 100.0
        assert app.test_client().get("/api/v1/status").json["plan_headroom_fraction"] == 0.05
    finally:
        close_app(app)
