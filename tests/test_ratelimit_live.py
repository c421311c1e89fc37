"""The rate-limited edge as real processes: a cloud, an MDP edge and a baseline edge, one stream (slow)."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import pytest
import requests

from popex.data import encode_png, load_fashion_mnist
from popex.data.subset import SHIPPED_SUBSET_ROOT
from popex.testbed.services import start_cloud, start_edge

pytestmark = pytest.mark.slow
HTTP_TIMEOUT_S = 30.0
RATE_PER_S, DEPTH = 4.0, 2.0
STREAM_S = 20.0
PAUSE_S = 0.06  # between images: ~12 images/s to each edge, about 3x the token rate
# Every request asks for the cloud-only strategy, so each one consults the bucket (on this machine the
# adaptive plan keeps the small default model on the edge, which would never offload).
EDGE = {"default_deadline_ms": 200.0, "profile_n_repeats": 5, "offload_rate_per_s": RATE_PER_S,
        "offload_bucket_depth": DEPTH}


def _ready(url: str, timeout_s: float = 180.0) -> str:
    deadline_s = time.monotonic() + timeout_s
    while time.monotonic() < deadline_s:
        models = requests.get(url + "/api/v1/models", timeout=HTTP_TIMEOUT_S).json()["models"]
        if models and all(m["state"] == "ready" for m in models):
            return models[0]["model_id"]
        time.sleep(0.5)
    raise AssertionError(f"{url}: the default model is not ready after {timeout_s} s")


@pytest.fixture(scope="module")
def edges(tmp_path_factory):
    root: Path = tmp_path_factory.mktemp("ratelimit-live")
    token = secrets.token_hex(16)
    started = []
    try:
        cloud = start_cloud(token=token, state_dir=root / "cloud", log_path=root / "cloud.log")
        started.append(cloud)
        cloud.wait_ready()
        urls = {}
        for policy in ("mdp", "baseline"):
            edge = start_edge(token=token, cloud_url=cloud.url, state_dir=root / f"edge-{policy}",
                              log_path=root / f"edge-{policy}.log", config={**EDGE, "offload_policy": policy})
            started.append(edge)
            edge.wait_ready()
            urls[policy] = edge.url
        for url in urls.values():
            _ready(url)
        yield urls
    finally:
        for process in reversed(started):
            process.stop()


def test_a_stream_at_3x_the_token_rate_stays_within_the_bucket_and_every_request_is_answered(edges):
    dataset = load_fashion_mnist(SHIPPED_SUBSET_ROOT, split="test")
    session = requests.Session()
    answers = {policy: [] for policy in edges}
    started_s = time.monotonic()
    i = 0
    while time.monotonic() - started_s < STREAM_S:
        png, label = encode_png(dataset.images[i % len(dataset)]), int(dataset.labels[i % len(dataset)])
        for policy, url in edges.items():  # the same image to both edges, one after the other
            response = session.post(url + "/api/v1/classify", data=png, headers={"Content-Type": "image/png"},
                                    params={"policy": "cloud-only"}, timeout=HTTP_TIMEOUT_S)
            assert response.status_code == 200, response.text
            answers[policy].append((response.json(), label))
        i += 1
        time.sleep(PAUSE_S)
    elapsed_s = time.monotonic() - started_s
    accuracy = {}
    for policy, url in edges.items():
        status = requests.get(url + "/api/v1/status", timeout=HTTP_TIMEOUT_S).json()["rate_limit"]
        n_cloud = sum(a["where"] == "cloud" for a, _ in answers[policy])
        n_limited = sum(a["rate_limited"] for a, _ in answers[policy])
        assert n_cloud <= status["n_granted"] <= RATE_PER_S * elapsed_s + DEPTH, (policy, n_cloud, status, elapsed_s)
        assert status["n_granted"] + status["n_refused"] == len(answers[policy])  # every request consulted once
        assert n_limited == status["n_refused"] > 0
        assert len(answers[policy]) >= 2.0 * RATE_PER_S * elapsed_s  # the stream ran well above the token rate
        assert all(a["where"] == "edge" and not a["fallback"] for a, _ in answers[policy] if a["rate_limited"])
        accuracy[policy] = sum(a["label"] == label for a, label in answers[policy]) / len(answers[policy])
    print(f"{i} images in {elapsed_s:.1f} s; accuracy {accuracy}")
    # a refused request runs the rest of the network on the edge: the same final exit as the cloud's
    assert accuracy["mdp"] >= accuracy["baseline"], accuracy
