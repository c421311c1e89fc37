"""The cloud's batch path: POST /api/v1/infer/batch, bad batches as 4xx, and the cloud's micro-batcher."""

from __future__ import annotations

import io
import json
import threading

import numpy as np
import pytest
import torch
from safetensors.numpy import save as safetensors_save

from cloud_api import create_app
from popex.nets import EarlyExitNet, compute_model_id, weights_to_bytes, zoo_spec
from popex.wire import compress_payload, encode_offload

TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SPLIT = 1


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    spec = zoo_spec("b-lenet")
    net = EarlyExitNet(spec).eval()
    weights_bytes = weights_to_bytes(net)
    return {"net": net, "spec_bytes": json.dumps(spec).encode(), "weights_bytes": weights_bytes,
            "model_id": compute_model_id(spec, weights_bytes)}


def _app(state_dir, model, **changes):
    app = create_app({"token": TOKEN, "state_dir": str(state_dir), "max_payload_batch_size": 4, **changes})
    client = app.test_client()
    files = {"spec": (io.BytesIO(model["spec_bytes"]), "spec.json"),
             "weights": (io.BytesIO(model["weights_bytes"]), "weights.safetensors")}
    response = client.put(f"/api/v1/models/{model['model_id']}", headers=AUTH, data=files)
    assert response.status_code in (200, 201), response.get_json()
    return app, client


@pytest.fixture(scope="module")
def cloud(tmp_path_factory, model):
    return _app(tmp_path_factory.mktemp("cloud"), model)[1]


def _features(model, n, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(n, *model["net"].input_shape)
    with torch.inference_mode():
        return model["net"].run_stages(x, stop=SPLIT).numpy()


def _single(client, model, h, request_id):
    payload = encode_offload(h[None], model_id=model["model_id"], split=SPLIT, request_id=request_id)
    response = client.post("/api/v1/infer", headers=AUTH, data=payload)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def _error(response, status):
    assert response.status_code == status, response.get_data(as_text=True)
    assert set(response.get_json()) == {"error"} and response.get_json()["error"]["message"]


def test_a_batch_answers_each_sample_as_its_own_offload_in_batch_order(cloud, model):
    h = _features(model, 4)
    ids = [f"req-{k}" for k in range(4)]
    payload = encode_offload(h, model_id=model["model_id"], split=SPLIT, request_id="batch", request_ids=ids,
                             budgets_ms=[500.0, 400.0, 300.0, 200.0])
    for body, headers in ((payload, AUTH), (compress_payload(payload), {**AUTH, "Content-Encoding": "deflate"})):
        response = cloud.post("/api/v1/infer/batch", headers=headers, data=body)
        assert response.status_code == 200, response.get_json()
        results = response.get_json()["results"]
        assert [result["request_id"] for result in results] == ids
        for k, result in enumerate(results):
            alone = _single(cloud, model, h[k], f"alone-{k}")
            assert (result["label"], result["class_name"]) == (alone["label"], alone["class_name"])
            assert result["confidence"] == pytest.approx(alone["confidence"], abs=1e-5)


def _raw_payload(model, tensor, **metadata):
    """A payload written by hand, to say what encode_offload would refuse to."""
    base = {"popex_wire": "1", "model_id": model["model_id"], "split": str(SPLIT), "wire_dtype": "float32",
            "request_id": "batch"}
    return safetensors_save({"tensor": np.ascontiguousarray(tensor, np.float32)}, metadata={**base, **metadata})


@pytest.mark.parametrize("case,status", [
    ("more-ids-than-samples", 400), ("fewer-ids-than-samples", 400), ("budgets-disagree", 400),
    ("empty-batch", 400), ("no-ids", 400), ("over-the-limit", 413), ("bad-id", 400), ("nan-budget", 400),
    ("one-sample-shape-on-a-batch", 400), ("unknown-model", 409),
])
def test_bad_batches_are_4xx_and_the_cloud_keeps_answering(cloud, model, case, status):
    h = _features(model, 3)
    payloads = {
        "more-ids-than-samples": lambda: _raw_payload(model, h, request_ids="a,b,c,d"),
        "fewer-ids-than-samples": lambda: _raw_payload(model, h, request_ids="a,b"),
        "budgets-disagree": lambda: _raw_payload(model, h, request_ids="a,b,c", budgets_ms="1.0,2.0"),
        "empty-batch": lambda: _raw_payload(model, h[:0], request_ids=""),
        "no-ids": lambda: _raw_payload(model, h),
        "over-the-limit": lambda: _raw_payload(model, _features(model, 5), request_ids="a,b,c,d,e"),
        "bad-id": lambda: _raw_payload(model, h, request_ids="a,b c,d"),
        "nan-budget": lambda: _raw_payload(model, h, request_ids="a,b,c", budgets_ms="1.0,nan,2.0"),
        "one-sample-shape-on-a-batch": lambda: _raw_payload(model, h[:, :2], request_ids="a,b,c"),
        "unknown-model": lambda: encode_offload(h, model_id="f" * 64, split=SPLIT, request_id="b",
                                                request_ids=["a", "b", "c"]),
    }
    _error(cloud.post("/api/v1/infer/batch", headers=AUTH, data=payloads[case]()), status)
    good = encode_offload(h, model_id=model["model_id"], split=SPLIT, request_id="b", request_ids=["x", "y", "z"])
    response = cloud.post("/api/v1/infer/batch", headers=AUTH, data=good)
    assert response.status_code == 200 and len(response.get_json()["results"]) == 3


def test_a_batch_sent_to_the_one_sample_route_is_refused(cloud, model):
    payload = encode_offload(_features(model, 2), model_id=model["model_id"], split=SPLIT, request_id="b",
                             request_ids=["a", "b"])
    _error(cloud.post("/api/v1/infer", headers=AUTH, data=payload), 400)


def test_the_batch_route_needs_the_token(cloud, model):
    payload = encode_offload(_features(model, 2), model_id=model["model_id"], split=SPLIT, request_id="b",
                             request_ids=["a", "b"])
    _error(cloud.post("/api/v1/infer/batch", data=payload), 401)


@pytest.mark.slow
def test_the_cloud_batches_concurrent_offloads_and_a_bad_one_spoils_nothing(tmp_path, model):
    app, client = _app(tmp_path / "batched", model, max_batch_size=4, batch_max_wait_ms=5000.0)
    runner = app.extensions["popex_cloud_runner"]
    h = _features(model, 3, seed=7)
    expected = [_single(client, model, h[k], f"warm-{k}") for k in range(3)]  # one by one (batches of 1)
    n_batches = runner.batcher.n_batches
    bodies = [encode_offload(h[k][None], model_id=model["model_id"], split=SPLIT, request_id=f"r{k}",
                             budget_ms=60_000.0) for k in range(3)]
    bodies.append(_raw_payload(model, h[:1, :2]))  # a shape that fits nothing: refused before it joins
    bodies.append(encode_offload(h[0][None], model_id=model["model_id"], split=SPLIT, request_id="r3",
                                 budget_ms=60_000.0))
    responses = [None] * len(bodies)
    barrier = threading.Barrier(len(bodies))

    def one(k):
        barrier.wait()
        responses[k] = app.test_client().post("/api/v1/infer", headers=AUTH, data=bodies[k])

    threads = [threading.Thread(target=one, args=(k,)) for k in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert responses[3].status_code == 400
    for k, index in ((0, 0), (1, 1), (2, 2), (4, 0)):
        assert responses[k].status_code == 200, responses[k].get_json()
        assert responses[k].get_json()["label"] == expected[index]["label"]
        assert responses[k].get_json()["request_id"] == f"r{min(k, 3)}"
    assert runner.batcher.n_batches == n_batches + 1  # the four good ones filled one batch
