"""The edge's batched path (popex.edge.batch_run) through the app: /api/v1/classify/batch and the micro-batcher.

A real model (an untrained b-lenet) on an edge over a FakeCloud that runs the
cloud's half for real, so offloaded answers are the model's own. Batched
answers are compared with the same images sent one at a time.
"""

from __future__ import annotations

import io
import threading

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import force_strategy
from popex.cloud.runner import CloudRunner
from popex.edge.fake_cloud import FakeCloud

pytestmark = pytest.mark.slow  # a real model is converted and prepared per module

_COMPARED = ("label", "class_name", "exit", "where", "split", "fallback", "model")


def _png(seed: int) -> bytes:
    image = np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)
    ok, encoded = cv2.imencode(".png", image)
    assert ok
    return encoded.tobytes()


def _batch(client, images, **fields):
    data = {"images": [(io.BytesIO(image), f"{i}.png") for i, image in enumerate(images)], **fields}
    return client.post("/api/v1/classify/batch", data=data, content_type="multipart/form-data")


def _one(client, image, **fields):
    response = client.post("/api/v1/classify", data={"image": (io.BytesIO(image), "x.png"), **fields},
                           content_type="multipart/form-data")
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def _same(batched, alone):
    assert {key: batched[key] for key in _COMPARED} == {key: alone[key] for key in _COMPARED}
    assert batched["confidence"] == pytest.approx(alone["confidence"], abs=1e-5)


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    return FakeCloud(state_dir=tmp_path_factory.mktemp("cloud"))  # the cloud's half for real


def _edge(open_edge, make_config, cloud, lenet_files, state_dir, edge_internals, **changes):
    context = open_edge(make_config(state_dir, default_model_dir=None, **changes), cloud)
    app = context.__enter__()
    client = app.test_client()
    fields = {name: (io.BytesIO(content), f"{name}.bin") for name, content in lenet_files["files"].items()}
    response = client.post("/api/v1/models", data=fields, content_type="multipart/form-data")
    assert response.status_code in (200, 202), response.get_json()
    preparation, runner = edge_internals(app)
    assert preparation.wait_idle(120.0)
    return context, app, client, runner


@pytest.fixture(scope="module")
def edge(open_edge, make_config, cloud, lenet_files, tmp_path_factory, edge_internals):
    context, app, client, runner = _edge(open_edge, make_config, cloud, lenet_files,
                                         tmp_path_factory.mktemp("edge"), edge_internals, max_batch_images=8)
    yield {"app": app, "client": client, "runner": runner, "model_id": lenet_files["model_id"]}
    context.__exit__(None, None, None)


def _force(edge, monkeypatch, *, split, threshold):
    runner = edge["runner"]
    net = runner.registry.get(edge["model_id"]).loaded.net
    force_strategy(monkeypatch, runner.plans.get(edge["model_id"]), net.branch_after_stage, split=split,
                   thresholds=(threshold,), latency_ms=5.0)


def _confidence_at_branch(edge, image):
    runner = edge["runner"]
    model = runner.registry.get(edge["model_id"])
    prepared = runner.prepare(image, model_id=edge["model_id"], arrival_s=0.0)
    h = model.loaded.net.run_stages(prepared.run.features[0], start=0, stop=1)
    confidence, _ = runner.compute.evaluate_branch(model, prepared.plan, 0, h)
    return confidence


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seeds=st.lists(st.integers(0, 10**6), min_size=2, max_size=8, unique=True), split=st.integers(1, 3),
       cut=st.integers(0, 8), branch_on=st.booleans())
def test_batched_answers_equal_the_unbatched_ones_for_random_exit_patterns(edge, seeds, split, cut, branch_on):
    images = [_png(seed) for seed in seeds]
    confidences = sorted(_confidence_at_branch(edge, image) for image in images)
    # a threshold between two samples' confidences (or below/above all): a random exit pattern, never a tie
    bounds = [0.0, *confidences, 1.0]
    k = min(cut, len(bounds) - 2)
    threshold = (bounds[k] + bounds[k + 1]) / 2 if branch_on else None
    with pytest.MonkeyPatch.context() as monkeypatch:
        _force(edge, monkeypatch, split=split, threshold=threshold)
        response = _batch(edge["client"], images)
        assert response.status_code == 200, response.get_json()
        results = response.get_json()["results"]
        alone = [_one(edge["client"], image) for image in images]
    assert len(results) == len(images)
    for batched, single in zip(results, alone):
        _same(batched, single)
        assert not batched["fallback"]
        assert batched["latency_ms"]["total"] >= 0


def test_a_batch_in_which_every_sample_exits_sends_nothing_upstream(edge, cloud):
    images = [_png(seed) for seed in range(5)]
    with pytest.MonkeyPatch.context() as monkeypatch:
        _force(edge, monkeypatch, split=2, threshold=0.0)
        before = list(cloud.calls)
        response = _batch(edge["client"], images)
        after = list(cloud.calls)
    assert response.status_code == 200
    assert all(result["exit"] == 0 and result["where"] == "edge" for result in response.get_json()["results"])
    assert [call for call in after[len(before):] if call.startswith("infer")] == []


def test_the_continuing_samples_go_up_as_one_batched_payload(edge, cloud):
    images = [_png(seed) for seed in range(100, 106)]
    with pytest.MonkeyPatch.context() as monkeypatch:
        _force(edge, monkeypatch, split=2, threshold=None)
        n_offloads = len(cloud.offloads)
        response = _batch(edge["client"], images)
    assert response.status_code == 200
    (offload,) = cloud.offloads[n_offloads:]
    assert offload.request.tensor.shape[0] == len(images)
    ids = [result["request_id"] for result in response.get_json()["results"]]
    assert list(offload.request.request_ids) == ids  # upload order, each with its own id
    assert all(result["where"] == "cloud" for result in response.get_json()["results"])


def test_a_failed_batched_offload_falls_back_per_sample(edge, cloud):
    from popex.edge.cloud_types import CloudUnavailable

    images = [_png(seed) for seed in range(200, 204)]
    with pytest.MonkeyPatch.context() as monkeypatch:
        _force(edge, monkeypatch, split=1, threshold=None)
        cloud.fail("infer_batch", CloudUnavailable("gone"))
        try:
            response = _batch(edge["client"], images)
        finally:
            cloud.recover("infer_batch")
    assert response.status_code == 200
    results = response.get_json()["results"]
    assert all(result["fallback"] and result["where"] == "edge" for result in results)
    assert all("CloudUnavailable" in result["fallback_reason"] for result in results)


@pytest.mark.parametrize("case", ["none", "empty-image", "too-many", "mixed-models", "not-an-image", "json"])
def test_bad_batches_are_4xx_and_the_endpoint_keeps_working(edge, case):
    client = edge["client"]
    if case == "none":
        response = client.post("/api/v1/classify/batch", data={"deadline_ms": "100"},
                               content_type="multipart/form-data")
        expected = 400
    elif case == "empty-image":
        response, expected = _batch(client, [_png(1), b""]), 400
    elif case == "too-many":
        response, expected = _batch(client, [_png(i) for i in range(9)]), 413
    elif case == "mixed-models":
        response = _batch(client, [_png(1)], model=[edge["model_id"], "another-model"])
        expected = 400
    elif case == "not-an-image":
        response, expected = _batch(client, [_png(1), b"GIF89a not really"]), 400
    else:
        response = client.post("/api/v1/classify/batch", json={"images": []})
        expected = 415
    assert response.status_code == expected, response.get_data(as_text=True)
    assert set(response.get_json()) == {"error"}
    good = _batch(client, [_png(1), _png(2)])
    assert good.status_code == 200 and len(good.get_json()["results"]) == 2


def test_concurrent_requests_run_as_micro_batches_and_answer_as_alone(open_edge, make_config, cloud, lenet_files,
                                                                      tmp_path, edge_internals, edge):
    context, app, client, runner = _edge(open_edge, make_config, cloud, lenet_files, tmp_path / "batched",
                                         edge_internals, max_batch_size=4, batch_max_wait_ms=5000.0)
    try:
        images = [_png(seed) for seed in range(300, 308)]
        with pytest.MonkeyPatch.context() as monkeypatch:
            _force({"runner": runner, "model_id": lenet_files["model_id"]}, monkeypatch, split=2, threshold=None)
            _force(edge, monkeypatch, split=2, threshold=None)
            answers = [None] * len(images)
            barrier = threading.Barrier(len(images))

            def one(index):
                barrier.wait()
                answers[index] = _one(app.test_client(), images[index], deadline_ms="10000")

            threads = [threading.Thread(target=one, args=(i,)) for i in range(len(images))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=60)
            alone = [_one(edge["client"], image, deadline_ms="10000") for image in images]
        assert runner.batcher.n_batches == 2  # 8 requests, batches of 4 (full batches start at once)
        for batched, single in zip(answers, alone):
            _same(batched, single)
    finally:
        context.__exit__(None, None, None)


def test_a_replica_without_the_model_gets_it_pushed_and_the_request_retried(edge, cloud, tmp_path):
    images = [_png(seed) for seed in range(400, 403)]
    with pytest.MonkeyPatch.context() as monkeypatch:
        _force(edge, monkeypatch, split=1, threshold=None)
        monkeypatch.setattr(cloud, "runner", CloudRunner(tmp_path / "fresh-replica"))  # never saw the model
        n_pushes = edge["runner"].pusher.n_pushes
        # the push converts the spec on the "replica": a budget that leaves time for it
        single = _one(edge["client"], images[0], deadline_ms="60000")
        assert single["where"] == "cloud" and not single["fallback"]
        assert edge["runner"].pusher.n_pushes == n_pushes + 1
        monkeypatch.setattr(cloud, "runner", CloudRunner(tmp_path / "another-fresh-replica"))
        response = _batch(edge["client"], images, deadline_ms="60000")
    results = response.get_json()["results"]
    assert all(result["where"] == "cloud" and not result["fallback"] for result in results)
    assert edge["runner"].pusher.n_pushes == n_pushes + 2


def test_a_batch_spends_no_more_tokens_than_the_bucket_holds(open_edge, make_config, cloud, lenet_files, tmp_path,
                                                             edge_internals, monkeypatch):
    context, _, client, runner = _edge(open_edge, make_config, cloud, lenet_files, tmp_path, edge_internals,
                                       max_batch_images=8, offload_rate_per_s=1e-6, offload_bucket_depth=1.0,
                                       offload_policy="baseline")
    try:
        edge = {"runner": runner, "model_id": lenet_files["model_id"]}
        _force(edge, monkeypatch, split=2, threshold=None)  # every sample would offload
        n_offloaded = len(cloud.offloads)
        response = _batch(client, [_png(seed) for seed in range(300, 306)])
        assert response.status_code == 200, response.get_json()
        results = response.get_json()["results"]
        sent = sum(offload.request.tensor.shape[0] for offload in cloud.offloads[n_offloaded:])
    finally:
        context.__exit__(None, None, None)
    assert len(results) == 6
    assert sent <= 1 and sum(result["where"] == "cloud" for result in results) == sent  # r*T + b with T ~ 0
    limited = [result for result in results if result.get("rate_limited")]
    assert len(limited) == 6 - sent
    assert all(result["where"] == "edge" and not result["fallback"] for result in limited)


def test_the_circuit_breaker_stops_batched_offloads_to_a_failing_cloud(open_edge, make_config, cloud, lenet_files,
                                                                       tmp_path, edge_internals, monkeypatch):
    from popex.edge.cloud_types import CloudUnavailable

    context, _, client, runner = _edge(open_edge, make_config, cloud, lenet_files, tmp_path, edge_internals,
                                       max_batch_images=8, breaker_n_failures=2, breaker_open_s=600.0)
    images = [_png(seed) for seed in range(400, 404)]
    try:
        _force({"runner": runner, "model_id": lenet_files["model_id"]}, monkeypatch, split=2, threshold=None)
        cloud.fail("infer_batch", CloudUnavailable("gone"))
        try:
            for _ in range(2):  # two failed batched offloads open the breaker
                assert _batch(client, images).status_code == 200
            n_calls = len(cloud.calls)
            response = _batch(client, images)
            new_calls = [call for call in cloud.calls[n_calls:] if call.startswith("infer")]
        finally:
            cloud.recover("infer_batch")
    finally:
        context.__exit__(None, None, None)
    results = response.get_json()["results"]
    assert new_calls == []
    assert all(result["fallback"] and "circuit breaker" in result["fallback_reason"] for result in results)
