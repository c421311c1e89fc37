"""Benchmark the rate-limit study's hot paths against naive loops, in one run.

(a) the MDP thresholds for b = 20, r = 0.25 (m = 80 levels): :func:`solve_mdp`
    (policy iteration) vs plain value iteration written as a Python loop over
    the levels and the samples' array, until it has the same thresholds;
(b) one live decision (metric lookup, token update, threshold lookup):
    :meth:`RateLimiter.consult` vs a float bucket, the metric table read with
    numpy and the thresholds scanned from a dict per call;
(c) one forward pass of the learned policy (96 inputs -> Q for every level)
    vs the same MLP evaluated layer by layer with Python lists.

Usage::

    .venv/bin/python benchmarks/ratelimit.py [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from popex.ratelimit.bucket import integerise  # noqa: E402
from popex.ratelimit.data import synthetic_metric_data  # noqa: E402
from popex.ratelimit.live import RateLimiter  # noqa: E402
from popex.ratelimit.mdp import DISCOUNT, solve_mdp  # noqa: E402


def _median_s(function, n_repeats: int) -> float:
    times = []
    for _ in range(n_repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _naive_value_iteration(params, metric: np.ndarray, target: np.ndarray, max_sweeps: int) -> tuple[float, int]:
    """Plain VI, Python loop over levels, a numpy mean per level; stops when the thresholds match ``target``."""
    q, p, m = params.q, params.p, params.m
    values = [0.0] * (m + 1)
    started = time.perf_counter()
    for sweep in range(1, max_sweeps + 1):
        new = [0.0] * (m + 1)
        thresholds = [0.0] * (m + 1)
        for n in range(m + 1):
            keep = DISCOUNT * values[min(m, n + q)]
            if n < p:
                new[n] = keep
                continue
            spend = DISCOUNT * values[min(m, n - p + q)]
            thresholds[n] = keep - spend
            new[n] = keep + float(np.maximum(metric - thresholds[n], 0.0).mean())
        values = [v - new[m] for v in new]
        if np.max(np.abs(np.array(thresholds[p:]) - target[p:])) < 1e-6:
            break
    return time.perf_counter() - started, sweep


def _naive_decision(state: dict, thresholds: dict, metric: float, now_s: float, rate_per_s: float,
                    depth: float) -> bool:
    tokens = min(depth, state["tokens"] + (now_s - state["last_s"]) * rate_per_s)
    state["last_s"] = now_s
    level = None
    for key in sorted(thresholds):  # the threshold of the highest level <= tokens
        if key <= tokens:
            level = key
    if level is not None and metric > thresholds[level] and tokens >= 1.0:
        tokens -= 1.0
        state["tokens"] = tokens
        return True
    state["tokens"] = tokens
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    data = synthetic_metric_data(n_images=20_000)
    params = integerise(0.25, 20)
    results: dict[str, dict[str, float]] = {}

    solution = solve_mdp(params, data.metric_tr)
    fast_s = _median_s(lambda: solve_mdp(params, data.metric_tr), 5)
    naive_s, n_sweeps = _naive_value_iteration(params, data.metric_tr, solution.thresholds, max_sweeps=3000)
    results["mdp_solve"] = {"m_levels": params.m, "fast_s": fast_s, "naive_s": naive_s, "naive_sweeps": n_sweeps,
                            "speedup": naive_s / fast_s, "policy_iterations": solution.n_iterations}

    from popex.decision.calibration import load_calibration

    calibration = load_calibration(Path(__file__).resolve().parents[1] / "models/default/calibration.npz")
    clock = [0.0]
    limiter = RateLimiter(rate_per_s=25.0, depth=20.0, clock=lambda: clock[0])  # 100 arrivals/s: r = 0.25
    gate = ((0, 0.9),)
    for i in range(50):  # measure the arrival rate, then solve as the limiter's thread would
        clock[0] = i * 0.01
        limiter.consult("m", calibration, 0, 0.5, gate=gate)
    limiter.resolve()
    table = limiter._tables[("m", gate)].tables[0]
    confidences = np.asarray(calibration.confidence[:10_000, 0], dtype=np.float64).tolist()
    n_calls = len(confidences)

    def live() -> None:
        for i, c in enumerate(confidences):
            clock[0] = 0.5 + i * 0.01
            limiter.consult("m", calibration, 0, c, gate=gate)

    live_thresholds = limiter._thresholds[("m", gate)]
    token_thresholds = {n / live_thresholds.mdp_p: t for n, t in enumerate(live_thresholds.values)}
    state = {"tokens": 20.0, "last_s": 0.0}

    def naive_live() -> None:
        for i, c in enumerate(confidences):
            metric = float(table(c))  # the numpy lookup
            _naive_decision(state, token_thresholds, metric, 0.5 + i * 0.01, 25.0, 20.0)

    live_s = _median_s(live, 3) / n_calls
    naive_live_s = _median_s(naive_live, 3) / n_calls
    results["live_decision"] = {"fast_us": live_s * 1e6, "naive_us": naive_live_s * 1e6,
                                "speedup": naive_live_s / live_s}

    import torch

    from popex.ratelimit.learned import N_HISTORY, QNetwork

    torch.set_num_threads(1)
    network = QNetwork(params.m + 1).eval()
    window = torch.from_numpy(np.random.default_rng(0).normal(size=(1, N_HISTORY)).astype(np.float32))
    with torch.no_grad():
        for _ in range(20):
            network(window)
        forward_s = _median_s(lambda: network(window), 300)
    layers = [(m.weight.detach().numpy().tolist(), m.bias.detach().numpy().tolist())
              for m in network.modules() if isinstance(m, torch.nn.Linear)]
    row = window[0].numpy().tolist()

    def naive_forward() -> list[float]:
        h = row
        for i, (weight, bias) in enumerate(layers):
            h = [sum(w * x for w, x in zip(ws, h)) + b for ws, b in zip(weight, bias)]
            if i < len(layers) - 1:
                h = [x if x > 0 else 0.2 * x for x in h]
        return h

    naive_forward_s = _median_s(naive_forward, 20)
    results["learned_forward"] = {"fast_ms": forward_s * 1e3, "naive_ms": naive_forward_s * 1e3,
                                  "speedup": naive_forward_s / forward_s}
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    mdp, live_r, fwd = results["mdp_solve"], results["live_decision"], results["learned_forward"]
    print(f"MDP thresholds, b=20, r=0.25 (m={mdp['m_levels']}): {mdp['fast_s'] * 1e3:.2f} ms "
          f"({mdp['policy_iterations']} policy iterations) vs naive value iteration {mdp['naive_s']:.2f} s "
          f"({mdp['naive_sweeps']} sweeps): {mdp['speedup']:.0f}x")
    print(f"live decision: {live_r['fast_us']:.2f} us vs naive {live_r['naive_us']:.2f} us: {live_r['speedup']:.1f}x")
    print(f"learned forward pass: {fwd['fast_ms']:.3f} ms vs naive {fwd['naive_ms']:.3f} ms: {fwd['speedup']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
