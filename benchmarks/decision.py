"""Benchmark the decision pipeline against a naive per-configuration graph loop.

Measures, with ``time.perf_counter`` (median of repeats):

(a) the one-off sweep of exit statistics (all threshold configurations),
(b) rebuilding the strategy table for a new link estimate,
(c) one decision lookup (:class:`DecisionIndex`),

and, in the same run, the naive baselines they replace: per configuration,
exit statistics from plain boolean masks; per configuration and link, a
networkx graph plus Dijkstra; per deadline, a full scan (:func:`decide`).

Usage::

    .venv/bin/python benchmarks/decision.py [--model-dir models/default] [--json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from popex.decision.graph import build_graph, shortest_split  # noqa: E402
from popex.decision import (  # noqa: E402
    Calibration,
    DecisionIndex,
    Link,
    Planner,
    Profile,
    decide,
    load_calibration,
    sweep_exit_stats,
)

N_BRANCHES = 4
GRID = np.linspace(0.5, 0.95, 10)
NAIVE_BUDGET_S = 30.0
TARGETS = {"sweep_s": 2.0, "table_ms": 10.0, "lookup_us": 20.0}


def _synthetic_calibration(n_samples: int, seed: int = 0) -> Calibration:
    """Exits get more accurate with depth; confidence is higher when correct."""
    rng = np.random.default_rng(seed)
    n_exits = N_BRANCHES + 1
    difficulty = rng.random(n_samples)
    exit_skill = np.linspace(0.45, 0.92, n_exits)
    p_correct = np.clip(exit_skill[None, :] + 0.35 * (0.5 - difficulty[:, None]), 0.02, 0.99)
    correct = rng.random((n_samples, n_exits)) < p_correct
    labels = rng.integers(0, 10, n_samples)
    wrong = (labels[:, None] + rng.integers(1, 10, (n_samples, n_exits))) % 10
    predicted = np.where(correct, labels[:, None], wrong)
    confidence = np.where(
        correct, rng.beta(6, 1.5, (n_samples, n_exits)), rng.beta(2, 2.5, (n_samples, n_exits))
    )
    return Calibration(
        confidence=confidence, predicted=predicted, correct=correct, labels=labels,
        temperature=np.ones(n_exits),
    )


def _first_branches(calibration: Calibration) -> Calibration:
    """Keep branches 0..3 and the final exit of a calibration with more branches."""
    keep = list(range(N_BRANCHES)) + [calibration.n_branches]
    return Calibration(
        confidence=calibration.confidence[:, keep], predicted=calibration.predicted[:, keep],
        correct=calibration.correct[:, keep], labels=calibration.labels,
        temperature=calibration.temperature[keep],
        confidence_method=calibration.confidence_method,
    )


def _synthetic_profile() -> Profile:
    """A MobileNet-like 6-stage chain on a small edge box, branches after stages 1..4."""
    return Profile(
        stage_names=("stem", "block1", "block2", "block3", "block4", "head"),
        stage_edge_ms=[4.0, 6.5, 7.0, 8.0, 9.5, 3.0],
        stage_cloud_ms=[0.4, 0.6, 0.7, 0.8, 0.9, 0.3],
        branch_after_stage=(1, 2, 3, 4),
        branch_edge_ms=[0.8, 0.7, 0.6, 0.5],
        split_bytes=[602_112, 1_605_632, 802_816, 401_408, 200_704, 100_352, 40],
        offload_overhead_ms=3.0,
    )


def _load_inputs(model_dir: Path | None, n_samples: int) -> tuple[Calibration, str]:
    if model_dir is not None and (model_dir / "calibration.npz").exists():
        calibration = load_calibration(model_dir / "calibration.npz")
        if calibration.n_branches >= N_BRANCHES:
            source = f"{model_dir}/calibration.npz ({calibration.n_samples} samples"
            if calibration.n_branches > N_BRANCHES:
                source += f", first {N_BRANCHES} of {calibration.n_branches} branches"
                calibration = _first_branches(calibration)
            return calibration, source + ")"
        n_samples = calibration.n_samples
    return _synthetic_calibration(n_samples), f"synthetic ({n_samples} samples)"


def _median_s(function, n_repeats: int) -> float:
    times = []
    for _ in range(n_repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _naive_exit_stats(calibration: Calibration, thresholds: tuple) -> tuple[np.ndarray, int]:
    """Exit probabilities and correct count of one configuration, with boolean masks."""
    remaining = np.ones(calibration.n_samples, dtype=bool)
    probs = np.zeros(N_BRANCHES)
    n_correct = 0
    for b, threshold in enumerate(thresholds):
        if threshold is None:
            continue
        exits = remaining & (calibration.confidence[:, b].astype(np.float64) >= threshold)
        probs[b] = exits.sum() / calibration.n_samples
        n_correct += int((exits & calibration.correct[:, b]).sum())
        remaining &= ~exits
    n_correct += int((remaining & calibration.correct[:, N_BRANCHES]).sum())
    return probs, n_correct


def _timed_loop(items: list, work, budget_s: float) -> tuple[float, int]:
    """Seconds per item, running items until the budget is spent."""
    start = time.perf_counter()
    n_done = 0
    for item in items:
        work(item)
        n_done += 1
        if time.perf_counter() - start > budget_s:
            break
    return (time.perf_counter() - start) / n_done, n_done


def run(model_dir: Path | None, n_samples: int) -> dict:
    calibration, source = _load_inputs(model_dir, n_samples)
    profile = _synthetic_profile()
    grids = [GRID] * N_BRANCHES
    configs = list(itertools.product(*[[None] + GRID.tolist()] * N_BRANCHES))
    rng = np.random.default_rng(1)
    links = [Link(uplink_mbps=float(u), rtt_ms=float(r))
             for u, r in zip(rng.uniform(1, 100, 50), rng.uniform(5, 80, 50))]

    # (a) one-off sweep of exit statistics.
    sweep_s = _median_s(
        lambda: sweep_exit_stats(calibration, branch_after_stage=profile.branch_after_stage,
                                 thresholds=grids), 5)
    stats = sweep_exit_stats(calibration, branch_after_stage=profile.branch_after_stage,
                             thresholds=grids)
    planner_s = _median_s(lambda: Planner(stats, profile), 5)
    planner = Planner(stats, profile)

    # (b) table rebuild for a new link estimate.
    cycle = itertools.cycle(links)
    table_s = _median_s(lambda: planner.table(next(cycle)), 200)
    table = planner.table(links[0])

    # (c) decision lookup.
    index = DecisionIndex(table, objective="mean")
    deadlines = rng.uniform(0, float(table.expected_latency_ms.max()) * 1.1, 10_000).tolist()
    start = time.perf_counter()
    for deadline_ms in deadlines:
        index.lookup(deadline_ms)
    lookup_s = (time.perf_counter() - start) / len(deadlines)
    index_build_s = _median_s(lambda: DecisionIndex(table, objective="mean"), 20)
    scan_s = _median_s(lambda: decide(table, deadline_ms=deadlines[0]), 200)

    # Naive baselines, same process. Order is shuffled so a partial run is a fair sample.
    sample = [configs[i] for i in rng.permutation(len(configs))]
    naive_stats_s, n_stats_done = _timed_loop(
        sample, lambda cfg: _naive_exit_stats(calibration, cfg), NAIVE_BUDGET_S / 2)
    # The graph loop gets every configuration's q and active set from our sweep
    # (test_sweep_table checks them against a per-sample loop).
    full = stats.levels[N_BRANCHES]
    graph_inputs = [full.exit_probs[i] for i in rng.permutation(full.n_configs)]
    active = [~np.isnan(full.thresholds[i]) for i in range(full.n_configs)]
    naive_graph_s, n_graph_done = _timed_loop(
        list(zip(graph_inputs, active)),
        lambda qa: shortest_split(build_graph(profile, links[0], qa[0], qa[1])),
        NAIVE_BUDGET_S / 2)

    n_configs = len(configs)
    return {
        "source": source,
        "n_samples": calibration.n_samples,
        "n_configs": n_configs,
        "n_table_rows": len(table),
        "sweep_s": sweep_s,
        "planner_build_s": planner_s,
        "table_ms": table_s * 1e3,
        "lookup_us": lookup_s * 1e6,
        "index_build_ms": index_build_s * 1e3,
        "naive_sweep_s": naive_stats_s * n_configs,
        "naive_sweep_measured_configs": n_stats_done,
        "naive_graph_per_link_s": naive_graph_s * n_configs,
        "naive_graph_measured_configs": n_graph_done,
        "naive_scan_decide_us": scan_s * 1e6,
        "targets": TARGETS,
    }


def _report(result: dict) -> str:
    n_configs = result["n_configs"]

    def extrapolated(key: str) -> str:
        n_measured = result[f"{key}_measured_configs"]
        return "" if n_measured >= n_configs else f" (extrapolated from {n_measured})"

    lines = [
        f"calibration: {result['source']}; {n_configs} threshold configurations, "
        f"{result['n_table_rows']} table rows",
        f"{'measurement':<36}{'ours':>12}{'naive':>14}{'naive/ours':>12}{'target':>10}",
    ]
    rows = [
        ("(a) exit-stats sweep", result["sweep_s"], "s", result["naive_sweep_s"],
         f"<= {TARGETS['sweep_s']} s", extrapolated("naive_sweep")),
        ("(b) table for a new link", result["table_ms"], "ms",
         result["naive_graph_per_link_s"] * 1e3, f"<= {TARGETS['table_ms']} ms",
         extrapolated("naive_graph")),
        ("(c) decision lookup", result["lookup_us"], "us", result["naive_scan_decide_us"],
         f"<= {TARGETS['lookup_us']} us", ""),
    ]
    for name, ours, unit, naive, target, _ in rows:
        lines.append(f"{name:<36}{ours:>9.4g} {unit:<2}{naive:>11.4g} {unit:<2}"
                     f"{naive / ours:>11.0f}x{target:>12}")
    lines.append(f"one-off: Planner build {result['planner_build_s'] * 1e3:.3g} ms, "
                 f"DecisionIndex build {result['index_build_ms']:.3g} ms")
    lines.append("naive (a): boolean masks per configuration" + rows[0][5])
    lines.append("naive (b): networkx graph + Dijkstra per configuration" + rows[1][5])
    lines.append("naive (c): decide(), a full scan of the table")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=Path("models/b-alexnet"),
                        help="directory with calibration.npz (synthetic data if absent)")
    parser.add_argument("--n-samples", type=int, default=10_000,
                        help="samples of the synthetic calibration (default 10000)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    result = run(args.model_dir, args.n_samples)
    print(json.dumps(result, indent=2) if args.json else _report(result))


if __name__ == "__main__":
    main()
