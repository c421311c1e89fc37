"""Benchmark ``popex predict`` against a naive enumeration, on every model of Scission's data.

For each model of ``../shared/scission`` (or ``--bench-dir``): the median
time of :func:`popex.tiers.predict.predict` for the unconstrained top-5
query (every system triple, every cut), and, in the same run, a naive
enumeration as Scission does it: one Python object per (triple, cut), the
block times summed in a loop, every configuration filtered and then sorted.
Both answers are compared (the same top-5 latencies) before any time is
reported.

Usage::

    .venv/bin/python benchmarks/predict.py [--bench-dir ../shared/scission] [--repeats 20] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from popex.tiers.benchmark_file import BenchmarkSet, load_benchmark_dir  # noqa: E402
from popex.tiers.network import Network, load_network_csv  # noqa: E402
from popex.tiers.predict import predict  # noqa: E402
from popex.tiers.query import Query  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BENCH_DIR = Path(os.environ.get("POPEX_SCISSION_DIR") or REPO.parent / "shared" / "scission")
TARGET_MS = 50.0
N_RESULTS = 5


def naive_top(bench: BenchmarkSet, network: Network, model: str, n_results: int, input_bytes: float) -> list[float]:
    """Scission's way: a scenario per (triple, cut), block times summed per scenario, all sorted at the end."""
    devices = [s for s in bench.tier("device") if model in s.models]
    edges = [s for s in bench.tier("edge") if model in s.models] or [None]
    clouds = [s for s in bench.tier("cloud") if model in s.models] or [None]
    n = len(devices[0].models[model].blocks)
    scenarios = {}
    for d in devices:
        for e in edges:
            for c in clouds:
                for x in range(-1, n):
                    for y in [-1] + list(range(x + 1, n)):
                        z_used = x != n - 1 and y != n - 1
                        if (y >= 0 and e is None) or (z_used and c is None):
                            continue
                        dev = d.models[model].blocks[:x + 1]
                        edg = e.models[model].blocks[x + 1:y + 1] if y >= 0 else []
                        cld = c.models[model].blocks[max(x, y) + 1:] if z_used else []
                        compute_s = (sum(b.time_ms / 1000 for b in dev) + sum(b.time_ms / 1000 for b in edg)
                                     + sum(b.time_ms / 1000 for b in cld))
                        sent_dev = (dev[-1].output_bytes if dev else input_bytes) if (edg or cld) else 0
                        transfer_s = 0.0
                        if edg:
                            transfer_s += network.hop(d.system, e.system).transfer_s(sent_dev)
                            if cld:
                                transfer_s += network.hop(e.system, c.system).transfer_s(edg[-1].output_bytes)
                        elif cld:
                            transfer_s += network.hop(d.system, c.system).transfer_s(sent_dev)
                        config = (d.system, e.system if edg else None, c.system if cld else None, x, y)
                        scenarios[config] = compute_s + transfer_s
    return sorted(scenarios.values())[:n_results]


def _median_s(function, n_repeats: int) -> float:
    samples = []
    for _ in range(n_repeats):
        start = time.perf_counter()
        function()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def run(bench_dir: Path, *, n_repeats: int) -> dict:
    start = time.perf_counter()
    bench = load_benchmark_dir(bench_dir)
    network = load_network_csv(bench_dir / "network_stats.csv")
    load_s = time.perf_counter() - start
    rows = []
    for model in bench.model_names():
        query = Query(model=model, n_results=N_RESULTS)
        fast = [c.latency_s for c in predict(bench, network, query)]
        slow = naive_top(bench, network, model, N_RESULTS, 150_000.0)
        if any(abs(a - b) > 1e-9 * max(1.0, b) for a, b in zip(fast, slow)) or len(fast) != len(slow):
            raise SystemExit(f"{model}: predict {fast} != naive {slow}")
        n_blocks = len(bench.tier("device")[0].models[model].blocks)
        n_triples = (len(bench.tier("device")) * max(1, len(bench.tier("edge"))) * max(1, len(bench.tier("cloud"))))
        fast_ms = _median_s(lambda: predict(bench, network, query), n_repeats) * 1000
        naive_ms = _median_s(lambda: naive_top(bench, network, model, N_RESULTS, 150_000.0), max(1, n_repeats // 10)) * 1000
        rows.append({"model": model, "n_blocks": n_blocks, "n_triples": n_triples,
                     "n_cuts_per_triple": (n_blocks + 1) + n_blocks * (n_blocks + 1) // 2,
                     "predict_ms": fast_ms, "naive_ms": naive_ms, "ratio": naive_ms / fast_ms})
    largest = max(rows, key=lambda r: r["n_blocks"])
    return {"load_s": load_s, "target_ms": TARGET_MS, "largest": largest["model"],
            "largest_meets_target": largest["predict_ms"] < TARGET_MS, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench-dir", type=Path, default=DEFAULT_BENCH_DIR)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = run(args.bench_dir, n_repeats=args.repeats)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"loaded {args.bench_dir} in {result['load_s'] * 1000:.0f} ms")
    print("| model | blocks | cuts per triple | triples | popex predict | naive (same run) | ratio |")
    print("|---|---|---|---|---|---|---|")
    for row in sorted(result["rows"], key=lambda r: r["n_blocks"]):
        print(f"| {row['model']} | {row['n_blocks']} | {row['n_cuts_per_triple']:,} | {row['n_triples']} | "
              f"{row['predict_ms']:.2f} ms | {row['naive_ms']:,.1f} ms | {row['ratio']:,.0f}x |")
    verdict = "meets" if result["largest_meets_target"] else "MISSES"
    print(f"largest model ({result['largest']}): {verdict} the {TARGET_MS:g} ms target")
    return 0


if __name__ == "__main__":
    sys.exit(main())
