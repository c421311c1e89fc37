"""The rate-limited edge as real processes: two clouds, an MDP edge and a baseline edge, one stream (slow).

Each edge has its own cloud, so the cloud's offload counter counts that
edge's offloads alone. Two threads send the same images to both edges on
the same schedule (image i at start + i / RATE), about 3x the token rate,
for 20 s: the same stream, run once per policy.

Every request asks for the cloud-only strategy, so each one consults the
bucket: on this machine the shipped models' plans never offload otherwise
(their early features are larger than the 3,136-byte input, so no split
after a branch beats sending the input; the adaptive plan keeps them on the
edge). A refused cloud-only request runs the rest of the network on the
edge: the final exit, as the cloud's. So here the two policies' answers
agree image by image and "accuracy >= baseline" holds with equality; the
policies' choice among images is compared where a refused request is
answered at a branch (tests/test_ratelimit_edge.py, and docs/ratelimit.md
for why a stream of this length cannot separate them).
"""

from __future__ import annotations

import secrets
import threading
import time
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from popex.data import encode_png, load_fashion_mnist
from popex.data.subset import SHIPPED_SUBSET_ROOT
from popex.testbed.services import start_cloud, start_edge

pytestmark = pytest.mark.slow
HTTP_TIMEOUT_S = 30.0
RATE_PER_S, DEPTH = 4.0, 2.0
STREAM_S = 20.0
REQUESTS_PER_S = 12.0  # to each edge: 3x the token rate
MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "b-alexnet"
EDGE = {"default_model_dir": str(MODEL_DIR), "default_deadline_ms": 200.0, "profile_n_repeats": 5,
        "offload_rate_per_s": RATE_PER_S, "offload_bucket_depth": DEPTH}


def _ready(url: str, timeout_s: float = 180.0) -> str:
    deadline_s = time.monotonic() + timeout_s
    while time.monotonic() < deadline_s:
        models = requests.get(url + "/api/v1/models", timeout=HTTP_TIMEOUT_S).json()["models"]
        if models and all(m["state"] == "ready" for m in models):
            return models[0]["model_id"]
        time.sleep(0.5)
    raise AssertionError(f"{url}: the default model is not ready after {timeout_s} s")


def _cloud_offloads(url: str) -> float:
    """The cloud's answered offloads (``popex_cloud_offloads_total``, status 200)."""
    text = requests.get(url + "/metrics", timeout=HTTP_TIMEOUT_S).text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == "popex_cloud_offloads_total" and sample.labels.get("status") == "200")


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    root: Path = tmp_path_factory.mktemp("ratelimit-live")
    token = secrets.token_hex(16)
    started = []
    try:
        urls = {}
        for policy in ("mdp", "baseline"):
            cloud = start_cloud(token=token, state_dir=root / f"cloud-{policy}", log_path=root / f"cloud-{policy}.log")
            started.append(cloud)
            cloud.wait_ready()
            edge = start_edge(token=token, cloud_url=cloud.url, state_dir=root / f"edge-{policy}",
                              log_path=root / f"edge-{policy}.log", config={**EDGE, "offload_policy": policy})
            started.append(edge)
            edge.wait_ready()
            urls[policy] = (edge.url, cloud.url)
        for edge_url, _ in urls.values():
            _ready(edge_url)
        yield urls
    finally:
        for process in reversed(started):
            process.stop()


def _stream(url: str, pngs: list[bytes], start_s: float, answers: list) -> None:
    session = requests.Session()
    for i, png in enumerate(pngs):
        wait_s = start_s + i / REQUESTS_PER_S - time.monotonic()
        if wait_s > 0:
            time.sleep(wait_s)
        response = session.post(url + "/api/v1/classify", data=png, headers={"Content-Type": "image/png"},
                                params={"policy": "cloud-only"}, timeout=HTTP_TIMEOUT_S)
        answers.append((response.status_code, response.json()))


def test_a_stream_at_3x_the_token_rate_stays_within_the_bucket_and_every_request_is_answered(services):
    dataset = load_fashion_mnist(SHIPPED_SUBSET_ROOT, split="test")
    n_images = int(STREAM_S * REQUESTS_PER_S)
    pngs = [encode_png(dataset.images[i % len(dataset)]) for i in range(n_images)]
    labels = [int(dataset.labels[i % len(dataset)]) for i in range(n_images)]
    before = {policy: _cloud_offloads(cloud_url) for policy, (_, cloud_url) in services.items()}
    answers: dict[str, list] = {policy: [] for policy in services}
    start_s = time.monotonic() + 0.5
    threads = [threading.Thread(target=_stream, args=(edge_url, pngs, start_s, answers[policy]))
               for policy, (edge_url, _) in services.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=STREAM_S * 5)
    elapsed_s = time.monotonic() - start_s  # T: the buckets were full when the stream began
    accuracy, report = {}, {}
    for policy, (edge_url, cloud_url) in services.items():
        assert len(answers[policy]) == n_images
        assert all(code == 200 for code, _ in answers[policy]), [a for c, a in answers[policy] if c != 200][:3]
        results = [a for _, a in answers[policy]]
        status = requests.get(edge_url + "/api/v1/status", timeout=HTTP_TIMEOUT_S).json()["rate_limit"]
        n_at_cloud = _cloud_offloads(cloud_url) - before[policy]
        n_cloud = sum(a["where"] == "cloud" for a in results)
        # counted at the cloud, at the edge and in the answers: never more than r T + b
        assert n_at_cloud == n_cloud == status["n_granted"] <= RATE_PER_S * elapsed_s + DEPTH, (
            policy, n_at_cloud, n_cloud, status["n_granted"], elapsed_s)
        assert status["n_granted"] + status["n_refused"] == n_images  # every request consulted once
        assert sum(a["rate_limited"] for a in results) == status["n_refused"] >= n_images / 2
        assert n_images >= 2.5 * RATE_PER_S * elapsed_s * 0.9  # the stream ran at about 3x the token rate
        assert all(a["where"] == "edge" and not a["fallback"] and a["exit"] == "final"
                   for a in results if a["rate_limited"])
        # the prediction in the status accounts for the refusals: the refused run on the edge (here faster)
        (expected,) = status["expected"]
        corrected = expected["strategy"]
        assert 0.5 < expected["expected_refused_fraction"] < 0.85
        assert abs(expected["expected_refused_fraction"] - status["n_refused"] / n_images) < 0.15
        assert corrected["offload_prob"] == pytest.approx(1.0 - expected["expected_refused_fraction"])
        assert corrected["latency_ms"] != corrected["latency_ms_without_bucket"]
        accuracy[policy] = sum(a["label"] == y for a, y in zip(results, labels)) / n_images
        report[policy] = {"offloads": n_cloud, "refused": status["n_refused"], "accuracy": accuracy[policy],
                          "latency_ms": corrected["latency_ms"],
                          "latency_ms_without_bucket": corrected["latency_ms_without_bucket"]}
    print(f"{n_images} images in {elapsed_s:.1f} s, r T + b = {RATE_PER_S * elapsed_s + DEPTH:.1f}: {report}")
    assert accuracy["mdp"] >= accuracy["baseline"], accuracy
    agree = sum(a["label"] == b["label"] for (_, a), (_, b) in zip(answers["mdp"], answers["baseline"]))
    assert agree == n_images  # cloud-only: the final exit on either side, whichever the bucket chose
