"""Cost bounds before anything runs (popex.edge.admission, the store's caps): the 7-branch upload of the audit.

A 6.9 KB spec with 7 side branches asked the sweep for 12**7 configurations
and bricked the edge (a 500, the model stored anyway, every restart failing).
Now it is a 400 naming the count, nothing is stored, and an edge whose store
holds such a model (written by an older version) still starts.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import requests
import torch

from conftest import calibration_bytes
from popex.data import encode_png
from popex.edge.admission import n_plan_configurations
from popex.edge.store import ModelRegistry
from popex.errors import ConflictError
from popex.nets import EarlyExitNet, weights_to_bytes

IMAGE = encode_png(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8))


def _linear(n_in: int, n_out: int) -> dict:
    return {"type": "linear", "in_features": n_in, "out_features": n_out}


def many_branch_files(n_branches: int, name: str = "many-branches") -> dict[str, bytes]:
    """A tiny MLP with ``n_branches`` side branches, one after each of its first stages (spec-form fields)."""
    spec = {"format": "popex-spec/1", "name": name, "input_shape": [1, 28, 28], "mean": [0.5], "std": [0.25],
            "class_names": [f"c{i}" for i in range(10)],
            "stages": [{"layers": [{"type": "flatten"}, _linear(784, 8), {"type": "relu"}]}]
            + [{"layers": [_linear(8, 8), {"type": "relu"}]} for _ in range(n_branches - 1)]
            + [{"layers": [_linear(8, 10)]}],
            "branches": [{"after_stage": k, "layers": [_linear(8, 10)]} for k in range(1, n_branches + 1)]}
    torch.manual_seed(0)
    net = EarlyExitNet(spec)
    return {"spec": json.dumps(spec).encode(), "weights": weights_to_bytes(net),
            "calibration": calibration_bytes(n_exits=net.n_exits)}


@pytest.fixture
def config(config):
    return {**config, "default_model_dir": None}


def test_the_configuration_count_is_computed_from_the_branches():
    assert [n_plan_configurations(b) for b in (0, 1, 2, 7)] == [1, 12, 144, 12**7]
    assert n_plan_configurations(3, n_heads=3) == 3 * 12**3


def test_the_seven_branch_upload_is_a_400_naming_the_count_and_stores_nothing(client, model_actions, lenet_files):
    response = model_actions.register(many_branch_files(7))
    assert response.status_code == 400, response.json
    assert response.json["error"]["code"] == "too_costly"
    assert f"{12**7:,} threshold configurations" in response.json["error"]["message"]
    assert client.get("/api/v1/models").json["models"] == []
    model_id = model_actions.add(lenet_files["files"])  # the edge still takes and serves others
    assert client.post(f"/api/v1/classify?model={model_id}", data=IMAGE, content_type="image/png").status_code == 200


def test_a_stored_model_that_cannot_be_planned_is_skipped_at_start(make_app, config, tmp_path, lenet_files):
    registry = ModelRegistry(tmp_path / "edge")  # what an older edge stored without planning it
    bomb = registry.register(*(many_branch_files(5)[k] for k in ("spec", "weights", "calibration")))
    good = registry.register(*(lenet_files["files"][k] for k in ("spec", "weights", "calibration")))
    app = make_app(config)
    client = app.test_client()
    info = client.get(f"/api/v1/models/{bomb}").json
    assert info["state"] == "failed" and f"{12**5:,} threshold configurations" in info["error"]
    assert client.get(f"/api/v1/models/{good}").json["state"] in ("registered", "profiling", "ready")
    assert client.post(f"/api/v1/classify?model={good}", data=IMAGE, content_type="image/png").status_code == 200
    response = client.post(f"/api/v1/classify?model={bomb}", data=IMAGE, content_type="image/png")
    assert 400 <= response.status_code < 500


def test_the_store_caps_the_number_and_bytes_of_models(tmp_path, lenet_files):
    files = {"spec.json": lenet_files["files"]["spec"], "weights.safetensors": lenet_files["files"]["weights"],
             "calibration.npz": lenet_files["files"]["calibration"]}
    registry = ModelRegistry(tmp_path / "one", max_n_models=1)
    registry.add(files)
    other = many_branch_files(2)
    with pytest.raises(ConflictError, match="holds 1 models"):
        registry.add({"spec.json": other["spec"], "weights.safetensors": other["weights"],
                      "calibration.npz": other["calibration"]})
    small = ModelRegistry(tmp_path / "small", max_store_bytes=4096)
    with pytest.raises(ConflictError, match="max_store_bytes"):
        small.add(files)
    assert small.ids() == [] and not list((tmp_path / "small" / "models").iterdir())


@pytest.mark.slow
def test_over_http_the_seven_branch_upload_is_refused_and_the_edge_restarts(tmp_path, token):
    """Real processes: the upload is a 4xx with the count, and a restarted edge boots and serves."""
    from popex.testbed.services import start_cloud, start_edge
    with start_cloud(token=token, state_dir=tmp_path / "cloud", log_path=tmp_path / "cloud.log") as cloud:
        cloud.wait_ready()
        for attempt in range(2):
            with start_edge(token=token, cloud_url=cloud.url, state_dir=tmp_path / "edge",
                            log_path=tmp_path / f"edge-{attempt}.log") as edge:
                edge.wait_ready(timeout_s=180)
                files = many_branch_files(7)
                response = requests.post(edge.url + "/api/v1/models", headers=edge.admin_headers(), timeout=60,
                                         files={k: (k, v) for k, v in files.items()})
                assert response.status_code == 400, response.text
                assert f"{12**7:,}" in response.json()["error"]["message"]
                answer = requests.post(edge.url + "/api/v1/classify", data=IMAGE, timeout=60,
                                       headers={"Content-Type": "image/png"})
                assert answer.status_code == 200, answer.text
                models = requests.get(edge.url + "/api/v1/models", timeout=30).json()["models"]
                assert all(m["name"] != "many-branches" for m in models)


def test_a_new_calibration_for_a_known_model_is_a_409_not_silently_dropped(client, model_actions, lenet_files,
                                                                          make_calibration):
    model_id = model_actions.add(lenet_files["files"])
    assert model_actions.register(lenet_files["files"]).status_code == 200  # the same files: known
    response = model_actions.register({**lenet_files["files"], "calibration": make_calibration(seed=7)})
    assert response.status_code == 409 and "another calibration" in response.json["error"]["message"]
    assert client.get(f"/api/v1/models/{model_id}").json["state"] in ("ready", "registered", "profiling")


def test_the_cloud_cleans_what_a_crashed_put_left_at_start(tmp_path):
    import os
    from popex.cloud.store import ModelStore
    models = tmp_path / "models"
    stale, fresh = models / ".0123456789ab.crashed", models / ".0123456789ab.writing"
    for directory in (stale, fresh):
        directory.mkdir(parents=True)
        (directory / "spec.json").write_bytes(b"x" * 1000)
    os.utime(stale, (0, 0))  # left by a crash long ago
    ModelStore(tmp_path)
    assert not stale.exists() and fresh.exists()  # one another worker may be writing now is kept


def test_the_uplink_history_csv_is_rotated(tmp_path):
    from popex.edge.uplink_history import UplinkHistory
    from popex.edge.uplink_window import UplinkSample
    history = UplinkHistory(tmp_path / "uplink_history.csv", max_bytes=2000)
    for i in range(500):
        history.write([UplinkSample(time_s=float(i), source="probe", uplink_mbps=10.0, rtt_ms=20.0)])
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["uplink_history.csv", "uplink_history.csv.1"]
    assert all(p.stat().st_size < 2100 for p in tmp_path.iterdir())
    assert (tmp_path / "uplink_history.csv").read_text().startswith("time_s,source")


def test_strategies_are_paged(client, model_actions, lenet_files):
    model_id = model_actions.add(lenet_files["files"])
    whole = client.get(f"/api/v1/models/{model_id}/strategies?limit=10000").json
    page = client.get(f"/api/v1/models/{model_id}/strategies?offset=3&limit=5").json
    assert page["n_rows"] == whole["n_rows"] and len(page["rows"]) == 5
    assert page["rows"] == whole["rows"][3:8]
    assert len(client.get(f"/api/v1/models/{model_id}/strategies").json["rows"]) == min(1000, whole["n_rows"])
    for bad in ("limit=10001", "limit=-1", "offset=x"):
        assert client.get(f"/api/v1/models/{model_id}/strategies?{bad}").status_code == 400
