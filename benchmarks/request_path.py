"""What re-planning costs a request: on the request thread (before) vs on the background planner (now).

Before the restructure a request that moved the uplink, O or wire-ratio
estimate past the hysteresis band re-planned every model on its own thread
before answering. Now it only queues the measurement; the planner thread
rebuilds the tables and swaps them in. This script runs the default model's
edge in-process over the scripted FakeCloud, every request offloading after
stage 1, and times ``EdgeRunner.classify`` in two interleaved variants in the
same process:

- ``inline``: each request is followed, inside its timed span, by a re-plan
  for a new link estimate (what a request that moved the estimate paid);
- ``background``: the same re-plan is handed to the running planner thread
  and the request's own span ends with its answer.

Every request moves the estimate, the worst case for the old design; the
ratio is per-request latency background / inline. Run:
``.venv/bin/python benchmarks/request_path.py [--n-requests 300]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from edge_api.config import EdgeConfig  # noqa: E402
from popex.data import default_test_set, encode_png  # noqa: E402
from popex.decision.latency import Link  # noqa: E402
from popex.edge.fake_cloud import FakeCloud  # noqa: E402
from popex.edge.node import EdgeNode  # noqa: E402
from popex.edge.strategy import Strategy  # noqa: E402


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-requests", type=int, default=300, help="requests per variant (default 300)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    images = [encode_png(image) for image in default_test_set().dataset.images[:50]]
    with tempfile.TemporaryDirectory() as state_dir:
        config = EdgeConfig.from_mapping({"token": "benchmark-token-123", "state_dir": state_dir,
                                          "start_background": False, "profile_n_repeats": 5,
                                          "default_model_dir": str(REPO / "models" / "b-alexnet")})
        node = EdgeNode.from_config(config, cloud_client=FakeCloud())
        try:
            assert node.preparation.wait_idle(120.0), "the default model was not prepared in 120 s"
            runner = node.runner
            model_id = runner.default_model_id
            plan = node.plans.get(model_id)
            offload = Strategy(split=1, thresholds=(None, None), active_branches=(), latency_ms=5.0,
                               worst_latency_ms=5.0, accuracy=0.9, offload_prob=1.0, feasible=True, row=0,
                               objective="mean", deadline_ms=0.0)
            plan.strategy = lambda *a, **k: offload  # every request offloads after stage 1
            links = [Link(uplink_mbps=10.0, rtt_ms=20.0), Link(uplink_mbps=14.0, rtt_ms=26.0)]
            node.planner.start()
            spans_ms: dict[str, list[float]] = {"inline": [], "background": []}
            replan_ms: list[float] = []
            for i in range(2 * args.n_requests):
                variant = ("inline", "background")[i % 2]
                image, link = images[i % len(images)], links[(i // 2) % 2]
                assert node.planner.drain(), "the planner did not keep up"  # start both variants alike
                start_s = time.perf_counter()
                runner.classify(image, model_id=model_id, deadline_ms=1000.0)
                if variant == "inline":
                    replan_start_s = time.perf_counter()
                    node.plans.set_link(link)
                    replan_ms.append((time.perf_counter() - replan_start_s) * 1000.0)
                else:
                    node.planner.submit_link(link)
                spans_ms[variant].append((time.perf_counter() - start_s) * 1000.0)
        finally:
            node.close()
    print(f"{args.n_requests} requests per variant, interleaved; default model, offload after stage 1, "
          f"scripted cloud; one re-plan of {len(node.plans.model_ids())}"
          f" model per request, {statistics.median(replan_ms):.2f} ms median")
    print("| variant | p50 ms | p95 ms | mean ms |")
    print("|---|---|---|---|")
    for variant, spans in spans_ms.items():
        print(f"| {variant} | {statistics.median(spans):.2f} | {_percentile(spans, 0.95):.2f} | "
              f"{statistics.fmean(spans):.2f} |")
    ratio = statistics.median(spans_ms["background"]) / statistics.median(spans_ms["inline"])
    print(f"background / inline p50 ratio: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
