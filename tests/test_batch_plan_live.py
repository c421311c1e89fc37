"""The live batched path uses the batch-aware plan (config ``batch_plan``), and the status shows it.

A real model (an untrained b-lenet: 3 stages, one branch after stage 1) on
an edge over a FakeCloud that runs the cloud's half for real. The strategy
is forced; the plan is made in the background from the model's measured
stage times per batch size and its calibration, so the first batch of a
strategy runs it as it is and a later one runs the planned exits.
"""

from __future__ import annotations

import io
import threading

import cv2
import numpy as np
import pytest

from conftest import force_strategy
from popex.edge.fake_cloud import FakeCloud

pytestmark = pytest.mark.slow  # a real model is converted, prepared and its batch times measured


def _png(seed: int) -> bytes:
    image = np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)
    ok, encoded = cv2.imencode(".png", image)
    assert ok
    return encoded.tobytes()


def _batch(client, images):
    data = {"images": [(io.BytesIO(image), f"{i}.png") for i, image in enumerate(images)]}
    response = client.post("/api/v1/classify/batch", data=data, content_type="multipart/form-data")
    assert response.status_code == 200, response.get_json()
    return response.get_json()["results"]


@pytest.fixture(scope="module")
def edge(open_edge, make_config, lenet_files, tmp_path_factory, edge_internals):
    cloud = FakeCloud(state_dir=tmp_path_factory.mktemp("cloud"))
    config = make_config(tmp_path_factory.mktemp("edge"), default_model_dir=None, max_batch_images=8,
                         max_batch_size=4, batch_plan=True)
    with open_edge(config, cloud) as app:
        client = app.test_client()
        fields = {name: (io.BytesIO(content), f"{name}.bin") for name, content in lenet_files["files"].items()}
        response = client.post("/api/v1/models", data=fields, content_type="multipart/form-data")
        assert response.status_code in (200, 202), response.get_json()
        preparation, runner = edge_internals(app)
        assert preparation.wait_idle(120.0)
        yield {"client": client, "runner": runner, "model_id": lenet_files["model_id"]}


def _run_forced(edge, monkeypatch, threshold, images):
    """Two batches under one forced strategy: before its plan is made, and after; branch runs of each."""
    runner = edge["runner"]
    model = runner.registry.get(edge["model_id"])
    net = model.loaded.net
    force_strategy(monkeypatch, runner.plans.get(edge["model_id"]), net.branch_after_stage, split=net.n_stages,
                   thresholds=(threshold,))
    calls = []
    run_branch = net.run_branch

    def counted(*args, **kwargs):
        if threading.current_thread() is threading.main_thread():  # the request's, not the planner's timing runs
            calls.append(1)
        return run_branch(*args, **kwargs)

    monkeypatch.setattr(net, "run_branch", counted)
    first = _batch(edge["client"], images)
    n_first = len(calls)
    assert runner.batch_exits.wait_idle(120.0)
    second = _batch(edge["client"], images)
    return first, n_first, second, len(calls) - n_first


def test_a_branch_nobody_leaves_at_is_not_run_once_the_batch_is_planned(edge):
    images = [_png(seed) for seed in range(4)]
    with pytest.MonkeyPatch.context() as monkeypatch:
        first, n_first, second, n_second = _run_forced(edge, monkeypatch, 1.5, images)  # confidences <= 1
        status = edge["client"].get("/api/v1/status").get_json()
    assert n_first == 1 and all(result["thresholds"] == [1.5] for result in first)  # not planned yet: as it is
    assert n_second == 0 and all(result["thresholds"] == [None] for result in second)  # planned: the branch is off
    assert [r["label"] for r in first] == [r["label"] for r in second]  # nobody exited either way
    assert all(result["exit"] == "final" for result in first + second)
    plan = status["batch_plan"]
    assert plan["enabled"] and plan["max_batch_size"] == 4 and plan["arrival_rate_per_s"] >= 0.0
    (entry,) = [p for p in plan["plans"] if p["thresholds"] == [1.5] and p["model_id"] == edge["model_id"]]
    assert [size["n_samples"] for size in entry["by_batch_size"]] == list(range(1, 9))
    for size in entry["by_batch_size"]:
        assert size["exits"] == []
        assert size["per_sample_ms"] == size["no_exits_per_sample_ms"] < size["all_exits_per_sample_ms"]
    assert set(entry["expected_per_query_ms"]) == {"chosen", "all", "none"}
    assert all(np.isfinite(value) for value in entry["expected_per_query_ms"].values())


def test_a_branch_everybody_leaves_at_keeps_running(edge):
    images = [_png(seed) for seed in range(10, 15)]
    with pytest.MonkeyPatch.context() as monkeypatch:
        first, n_first, second, n_second = _run_forced(edge, monkeypatch, 0.0, images)
    assert n_first == n_second == 1
    assert all(result["exit"] == 0 and result["thresholds"] == [0.0] for result in first + second)
