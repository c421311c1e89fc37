"""Serving throughput and tail latency: micro-batching vs one request at a time, real processes, same run.

Two closed loops, each with C = 1, 4, 16, 64 concurrent clients (a client
sends its next request when the last one is answered):

- **cloud alone**: one-sample offloads of the default model at cut 0 (its
  input, what a cloud-only strategy sends) to ``POST /api/v1/infer``;
- **edge end to end**: images to the edge's ``POST /api/v1/classify`` with
  ``policy=cloud-only`` (cut 0), the edge in front of its own cloud.

Each is run against a pair of deployments started side by side: *batched*
(edge and cloud ``max_batch_size`` 16, ``batch_max_wait_ms`` 2; the edge
sends its offloads of one batch as one payload) and *unbatched*
(``max_batch_size`` 1: one request at a time, as before batching). The
variants alternate per client count, so load on the machine favours
neither. Reported per variant: throughput (requests/s), p50 and p99 latency,
and the ratio batched / unbatched. Every image's answer (label) in the
batched runs must equal its answer unbatched, or the script fails. With
cloud-only cuts the model runs without exits on both variants (a cut at 0
leaves no branch on the edge), so "batched vs max_batch_size 1" is also the
comparison against the model without exits.

Also printed: the precision-aware policy's expected latency and accuracy
against the final exit alone (edge only, from the default model's profile and
calibration).

Run: ``.venv/bin/python benchmarks/serving.py [--n-requests 240]``.
"""

from __future__ import annotations

import argparse
import secrets
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import requests  # noqa: E402

from popex.data import default_test_set, encode_png  # noqa: E402
from popex.testbed.services import start_cloud, start_edge  # noqa: E402
from popex.wire import encode_offload  # noqa: E402

CLIENTS = (1, 4, 16, 64)
BATCHED = {"max_batch_size": 16, "batch_max_wait_ms": 2.0}
UNBATCHED = {"max_batch_size": 1, "batch_max_wait_ms": 0.0}
#: The model served: the default model (the testbed's own default is the lighter B-AlexNet).
MODEL_DIR = REPO / "models" / "default"
N_SERVER_THREADS = 96  # more request threads than clients, so requests meet in the batcher, not in gunicorn


def _closed_loop(send, n_clients: int, n_requests: int, n_items: int) -> dict:
    """``send(session, item) -> label`` from n_clients threads until n_requests are answered."""
    latencies_ms: list[float] = []
    labels: dict[int, int] = {}
    lock = threading.Lock()
    counter = iter(range(n_requests))
    errors: list[str] = []

    def client() -> None:
        with requests.Session() as session:
            while True:
                with lock:
                    index = next(counter, None)
                if index is None:
                    return
                item = index % n_items
                started = time.perf_counter()
                try:
                    label = send(session, item)
                except Exception as err:  # noqa: BLE001 - reported, fails the run
                    errors.append(f"{type(err).__name__}: {err}")
                    return
                elapsed_ms = (time.perf_counter() - started) * 1000.0
                with lock:
                    latencies_ms.append(elapsed_ms)
                    if labels.setdefault(item, label) != label:
                        errors.append(f"item {item} answered {label} and {labels[item]} in one run")

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(n_clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall_s = time.perf_counter() - started
    if errors:
        raise SystemExit(f"requests failed: {errors[:3]}")
    quantiles = np.percentile(latencies_ms, [50, 99])
    return {"rps": len(latencies_ms) / wall_s, "p50_ms": float(quantiles[0]), "p99_ms": float(quantiles[1]),
            "labels": labels}


def _start(root: Path, token: str, name: str, settings: dict, *, edge: bool):
    cloud = start_cloud(token=token, state_dir=root / f"{name}-cloud", log_path=root / f"{name}-cloud.log",
                        n_threads=N_SERVER_THREADS, config=settings)
    cloud.wait_ready()
    if not edge:
        return cloud, None
    edge_process = start_edge(token=token, cloud_url=cloud.url, state_dir=root / f"{name}-edge",
                              log_path=root / f"{name}-edge.log", n_threads=N_SERVER_THREADS,
                              config={**settings, "profile_n_repeats": 5, "default_model_dir": str(MODEL_DIR)})
    edge_process.wait_ready(timeout_s=180)
    deadline_s = time.monotonic() + 300
    while time.monotonic() < deadline_s:
        models = requests.get(edge_process.url + "/api/v1/models", timeout=30).json()["models"]
        if models and models[0]["state"] == "ready":
            return cloud, edge_process
        time.sleep(0.5)
    raise SystemExit(f"the {name} edge's default model was not ready in time")


def _precision_aware_figures() -> str:
    from popex.decision import load_calibration
    from popex.decision.precision_aware import precision_aware_thresholds
    from popex.runtime.profiler import load_profile

    model_dir = MODEL_DIR
    calibration = load_calibration(model_dir / "calibration.npz")
    profile = load_profile(model_dir / "profile.json")
    chosen = precision_aware_thresholds(calibration)
    stage_ms = np.asarray(profile.stage_edge_ms, dtype=np.float64)
    branch_ms = np.asarray(profile.branch_edge_ms, dtype=np.float64)
    reach = 1.0
    expected_ms = 0.0
    for stage in range(len(stage_ms)):
        expected_ms += reach * stage_ms[stage]
        for b, after in enumerate(profile.branch_after_stage):
            if after == stage + 1 and chosen.thresholds[b] is not None:
                expected_ms += reach * branch_ms[b]
                reach -= chosen.exit_fractions[b]
    final_ms = float(stage_ms.sum())
    return (f"precision-aware (edge only, calibration split): thresholds {chosen.thresholds}, "
            f"accuracy {100 * chosen.accuracy:.2f}% vs {100 * chosen.final_accuracy:.2f}% at the final exit "
            f"({100 * chosen.accuracy / chosen.final_accuracy:.2f}% of it), expected latency {expected_ms:.3f} ms "
            f"vs {final_ms:.3f} ms ({100 * (expected_ms / final_ms - 1):+.1f}%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-requests", type=int, default=240, help="requests per client count and variant")
    parser.add_argument("--clients", type=int, nargs="+", default=list(CLIENTS))
    args = parser.parse_args()
    print(_precision_aware_figures(), flush=True)
    pngs = [encode_png(image) for image in default_test_set().dataset.images[:64]]
    token = secrets.token_hex(16)
    started = []
    with tempfile.TemporaryDirectory(prefix="popex-serving-") as tmp:
        root = Path(tmp)
        try:
            deployments = {}
            for name, settings in (("batched", BATCHED), ("unbatched", UNBATCHED)):
                cloud, edge = _start(root, token, name, settings, edge=True)
                started += [cloud, edge]
                deployments[name] = (cloud, edge)
            model_id = requests.get(deployments["batched"][1].url + "/api/v1/models",
                                    timeout=30).json()["models"][0]["model_id"]
            from popex.runtime.model_files import load_model_dir

            shape = tuple(load_model_dir(MODEL_DIR).net.input_shape)
            rng = np.random.default_rng(0)
            payloads = [encode_offload(rng.standard_normal((1, *shape)).astype(np.float32), model_id=model_id,
                                       split=0, request_id=f"bench-{k}") for k in range(64)]
            auth = {"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"}

            def cloud_send(url):
                return lambda session, item: session.post(url + "/api/v1/infer", data=payloads[item], headers=auth,
                                                          timeout=120).json()["label"]

            def edge_send(url):
                def send(session, item):
                    response = session.post(url + "/api/v1/classify", data=pngs[item], timeout=120,
                                            params={"policy": "cloud-only", "deadline_ms": "60000"},
                                            headers={"Content-Type": "application/octet-stream"})
                    body = response.json()
                    if response.status_code != 200 or body["fallback"]:
                        raise RuntimeError(f"{response.status_code} {str(body)[:200]}")
                    return body["label"]
                return send

            rows = []
            for tier in ("cloud alone", "edge end to end"):
                for n_clients in args.clients:
                    results = {}
                    order = ("batched", "unbatched") if n_clients % 2 else ("unbatched", "batched")
                    for name in order:
                        cloud, edge = deployments[name]
                        send = cloud_send(cloud.url) if tier == "cloud alone" else edge_send(edge.url)
                        _closed_loop(send, min(n_clients, 4), 16, len(payloads))  # warm-up
                        results[name] = _closed_loop(send, n_clients, args.n_requests, len(payloads))
                    if results["batched"]["labels"] != results["unbatched"]["labels"]:
                        raise SystemExit(f"{tier}, C={n_clients}: batched answers differ from unbatched ones")
                    b, u = results["batched"], results["unbatched"]
                    rows.append((tier, n_clients, b, u))
                    print(f"{tier:16s} C={n_clients:3d}  batched {b['rps']:7.1f} req/s p50 {b['p50_ms']:7.1f} "
                          f"p99 {b['p99_ms']:7.1f} ms | unbatched {u['rps']:7.1f} req/s p50 {u['p50_ms']:7.1f} "
                          f"p99 {u['p99_ms']:7.1f} ms | throughput x{b['rps'] / u['rps']:.2f}, "
                          f"p99 x{b['p99_ms'] / u['p99_ms']:.2f}", flush=True)
            print("\n| tier | clients | batched req/s | unbatched req/s | ratio | batched p50 / p99 ms | "
                  "unbatched p50 / p99 ms |\n|---|---|---|---|---|---|---|")
            for tier, n_clients, b, u in rows:
                print(f"| {tier} | {n_clients} | {b['rps']:.0f} | {u['rps']:.0f} | {b['rps'] / u['rps']:.2f}x | "
                      f"{b['p50_ms']:.1f} / {b['p99_ms']:.1f} | {u['p50_ms']:.1f} / {u['p99_ms']:.1f} |")
            print("per-sample answers: batched == unbatched for every image, every run")
        finally:
            for process in reversed(started):
                if process is not None:
                    process.stop()


if __name__ == "__main__":
    main()
