"""Per request-stream buckets through the admin API: in-process edge over the FakeCloud."""

from __future__ import annotations

import io
import threading

import pytest

from conftest import ModelActions, anonymous_client
from edge_api import get_node
from popex.data.images import encode_png
from popex.data.subset import SHIPPED_SUBSET_ROOT, load_fashion_mnist
from popex.ratelimit.streams import StreamLimiters

URL = "/api/v1/admin/rate-limit"


@pytest.fixture(scope="module")
def pngs() -> list[bytes]:
    dataset = load_fashion_mnist(SHIPPED_SUBSET_ROOT, split="test")
    return [encode_png(dataset.images[i]) for i in range(12)]


@pytest.fixture
def auth(admin_token) -> dict[str, str]:
    return {"Authorization": f"Bearer {admin_token}"}


def test_a_stream_bucket_needs_the_admin_token(app):
    client = anonymous_client(app)
    body = {"stream": "cam-1", "offload_rate_per_s": 1.0}
    assert client.put(URL, json=body).status_code == 401
    assert client.put(URL, json=body, headers={"Authorization": "Bearer wrong"}).status_code in (401, 403)
    assert client.get(URL).status_code == 401 and client.delete(URL + "?stream=cam-1").status_code == 401


@pytest.mark.parametrize("body", [
    {"stream": "cam-1"}, {"stream": "cam-1", "offload_rate_per_s": 0.0}, {"stream": "cam-1", "offload_rate_per_s": -1},
    {"stream": "cam-1", "offload_rate_per_s": "fast"}, {"stream": "cam-1", "offload_rate_per_s": True},
    {"stream": "cam-1", "offload_rate_per_s": 1.0, "offload_bucket_depth": 0.5},
    {"stream": "cam-1", "offload_rate_per_s": 1.0, "offload_policy": "greedy"},
    {"stream": "a b", "offload_rate_per_s": 1.0}, {"stream": "x" * 65, "offload_rate_per_s": 1.0},
    {"stream": "cam-1", "offload_rate_per_s": 1.0, "colour": "red"}, [1, 2],
])
def test_bad_bucket_requests_are_a_clear_400(client, auth, body):
    response = client.put(URL, json=body, headers=auth)
    assert response.status_code == 400, response.get_json()
    limiter = get_node(client.application).runner.rate_limiter
    assert not isinstance(limiter, StreamLimiters) or not limiter.status()["streams"]


def test_a_streams_requests_consult_its_own_bucket_and_the_rest_are_unlimited(app, client, model_actions, auth,
                                                                              pngs):
    runner = get_node(app).runner
    model_actions.force(runner.default_model_id, split=2, thresholds=(1.01, 1.01))  # every request would offload
    response = client.put(URL, json={"stream": "cam-1", "offload_rate_per_s": 0.001, "offload_bucket_depth": 2},
                          headers=auth)
    assert response.status_code == 200 and response.get_json()["tokens"] == 2.0
    limited = [client.post("/api/v1/classify?stream=cam-1", data=png, content_type="image/png").get_json()
               for png in pngs[:6]]
    by_header = client.post("/api/v1/classify", data=pngs[6], content_type="image/png",
                            headers={"X-Popex-Stream": "cam-1"}).get_json()
    others = [client.post(f"/api/v1/classify{query}", data=png, content_type="image/png").get_json()
              for query, png in zip(["", "?stream=cam-2", "", "?stream=other"], pngs[7:11])]
    # 0.001 tokens/s: the bucket's two tokens, then every request of the stream is answered on the edge
    assert sum(a["where"] == "cloud" for a in limited) <= 2 and sum(a["rate_limited"] for a in limited) >= 4
    assert by_header["rate_limited"]
    assert all(a["where"] == "cloud" and not a["rate_limited"] for a in others)  # no edge bucket: unlimited
    status = client.get("/api/v1/status").get_json()["rate_limit"]
    stream = status["streams"]["cam-1"]
    assert stream["n_granted"] + stream["n_refused"] == 7 and stream["n_refused"] >= 5
    assert client.get(URL, headers=auth).get_json()["streams"]["cam-1"]["n_refused"] == stream["n_refused"]
    assert client.post("/api/v1/classify?stream=bad id", data=pngs[0], content_type="image/png").status_code == 400
    assert client.delete(URL + "?stream=cam-1", headers=auth).get_json() == {"stream": "cam-1", "deleted": True}
    assert client.delete(URL + "?stream=cam-1", headers=auth).status_code == 404
    after = client.post("/api/v1/classify?stream=cam-1", data=pngs[11], content_type="image/png").get_json()
    assert after["where"] == "cloud" and not after["rate_limited"]


def test_a_stream_bucket_sits_beside_the_edges_own(make_app, make_config, tmp_path, auth):
    app = make_app(make_config(tmp_path / "edge", offload_rate_per_s=5.0, offload_bucket_depth=3.0))
    client = app.test_client()
    assert client.put(URL, json={"stream": "cam-1", "offload_rate_per_s": 1.0, "offload_policy": "baseline"},
                      headers=auth).status_code == 200
    status = client.get("/api/v1/status").get_json()["rate_limit"]
    assert status["offload_rate_per_s"] == 5.0 and status["offload_bucket_depth"] == 3.0  # the edge's, as before
    assert status["streams"]["cam-1"]["policy"] == "baseline" and status["streams"]["cam-1"]["tokens"] == 10.0


def _batch(client, pngs, query=""):
    data = {"images": [(io.BytesIO(png), f"{i}.png") for i, png in enumerate(pngs)]}
    response = client.post(f"/api/v1/classify/batch{query}", data=data, content_type="multipart/form-data")
    assert response.status_code == 200, response.get_json()
    return response.get_json()["results"]


def test_an_uploaded_batch_of_a_stream_consults_that_streams_bucket(app, client, model_actions, auth, pngs):
    runner = get_node(app).runner
    model_actions.force(runner.default_model_id, split=2, thresholds=(1.01, 1.01))  # every sample would offload
    assert client.put(URL, json={"stream": "cam-1", "offload_rate_per_s": 0.001, "offload_bucket_depth": 2},
                      headers=auth).status_code == 200
    limited = _batch(client, pngs[:6], "?stream=cam-1")
    by_header = client.post("/api/v1/classify/batch", data={"images": [(io.BytesIO(pngs[6]), "6.png")]},
                            content_type="multipart/form-data", headers={"X-Popex-Stream": "cam-1"}).get_json()
    others = _batch(client, pngs[7:11])
    assert sum(a["where"] == "cloud" for a in limited) <= 2 and sum(a["rate_limited"] for a in limited) >= 4
    assert by_header["results"][0]["rate_limited"]
    assert all(a["where"] == "cloud" and not a["rate_limited"] for a in others)  # no edge bucket: unlimited
    stream = client.get(URL, headers=auth).get_json()["streams"]["cam-1"]
    assert stream["n_granted"] + stream["n_refused"] == 7 and stream["n_granted"] <= 2
    data = {"images": [(io.BytesIO(pngs[0]), "0.png")]}
    assert client.post("/api/v1/classify/batch?stream=bad id", data=data,
                       content_type="multipart/form-data").status_code == 400


@pytest.fixture
def batched_config(config):
    return {**config, "max_batch_size": 4, "batch_max_wait_ms": 5000.0}


def test_a_micro_batch_of_several_streams_charges_each_request_to_its_own_bucket(make_app, batched_config, auth,
                                                                                 monkeypatch, pngs):
    """Four concurrent requests run as one batch on its leader's thread: two of cam-1 (one token), two of none."""
    app = make_app(batched_config)
    client = app.test_client()
    ModelActions(app, client, monkeypatch).force(get_node(app).runner.default_model_id, split=2,
                                                 thresholds=(1.01, 1.01))
    assert client.put(URL, json={"stream": "cam-1", "offload_rate_per_s": 0.001, "offload_bucket_depth": 1},
                      headers=auth).status_code == 200
    streams = ["cam-1", None, "cam-1", None]
    answers: list[dict | None] = [None] * len(streams)
    barrier = threading.Barrier(len(streams))

    def one(index: int) -> None:
        headers = {} if streams[index] is None else {"X-Popex-Stream": streams[index]}
        barrier.wait()
        answers[index] = app.test_client().post("/api/v1/classify?deadline_ms=10000", data=pngs[index],
                                                content_type="image/png", headers=headers).get_json()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(streams))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert get_node(app).runner.batcher.n_batches == 1  # one batch, led by whichever thread came first
    stream = client.get(URL, headers=auth).get_json()["streams"]["cam-1"]
    assert stream["n_granted"] == 1 and stream["n_refused"] == 1  # cam-1's two, and only those
    assert [a["rate_limited"] for a in answers].count(True) == 1
    assert all(a["where"] == "cloud" and not a["rate_limited"] for a, s in zip(answers, streams) if s is None)
