"""Prediction with early exits: the most accurate (θ, x, y, systems) that meets a latency requirement.

What Scission cannot do. For a POPEX model (its ``calibration.npz``) whose
stages and branches were benchmarked on the candidate systems (``popex
benchmark``, which records branch times), every system triple, every cut
0 <= x <= y <= N and every threshold configuration θ is evaluated with the
three-tier latency model of DESIGN §3 (:mod:`popex.decision.three_tier`,
exit statistics from :mod:`popex.decision.sweep`); hops are the network
file's (ping as the RTT, bandwidth as the rate). The answer is the most
accurate θ whose best (systems, cut) meets the requirement under the
objective (ties: lower latency), beside the no-exit answer (every branch
off: the backbone's accuracy, Scission's configuration space).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from popex.checks import check_deadline_ms, check_objective
from popex.decision.calibration import CALIBRATION_FILE, load_calibration
from popex.decision.latency import Link
from popex.decision.sweep import sweep_exit_stats
from popex.decision.three_tier import Hop, ThreeTierProfile, three_tier_table
from popex.decision.three_tier_policies import choose_three_tier
from popex.errors import BenchmarkError
from popex.tiers.benchmark_file import BenchmarkSet, SystemBenchmark
from popex.tiers.network import Network
from popex.tiers.query import Query

__all__ = ["predict_with_exits", "format_exit_answer"]

_UNUSED_LINK = Hop(Link(uplink_mbps=1.0, rtt_ms=0.0))  # stands in for a missing pair; its cuts are masked


def _tier_times(system: SystemBenchmark | None, model: str, n_stages: int, n_branches: int) -> tuple[list, list]:
    if system is None:
        return [0.0] * n_stages, [0.0] * n_branches
    bench = system.models[model]
    if len(bench.branches) != n_branches:
        raise BenchmarkError(f"{system.source}: model {model!r} has {len(bench.branches)} branch times, the "
                             f"calibration {n_branches} exits before the final one (benchmark it with popex benchmark)")
    return [b.time_ms for b in bench.blocks], [b.time_ms for b in bench.branches]


def _hop(network: Network, source: SystemBenchmark | None, destination: SystemBenchmark | None) -> Hop | None:
    if source is None or destination is None or (source.system, destination.system) not in network.hops:
        return None
    hop = network.hops[(source.system, destination.system)]
    return Hop(Link(uplink_mbps=hop.bandwidth_mbps, rtt_ms=hop.ping_ms))


def _row(table, index: tuple[int, int], triple, objective: str, deadline_ms: float) -> dict[str, Any]:
    config, cut = index
    x, y = int(table.x[cut]), int(table.y[cut])
    n_stages = int(table.y.max())
    d, e, c = triple
    latency = float(table.latency_ms(objective)[config, cut])
    return {"thresholds": [None if math.isnan(t) else float(t) for t in table.thresholds[config]],
            "x": x, "y": y,
            "systems": {"device": d.system, "edge": e.system if x < y else None,
                        "cloud": c.system if y < n_stages else None},
            "stages": {"device": [1, x] if x > 0 else None, "edge": [x + 1, y] if x < y else None,
                       "cloud": [y + 1, n_stages] if y < n_stages else None},
            "accuracy": float(table.accuracy[config]),
            "exit_probs": [float(p) for p in table.exit_probs[config]],
            "expected_latency_ms": float(table.expected_ms[config, cut]),
            "worst_latency_ms": float(table.worst_ms[config, cut]),
            "feasible": latency <= deadline_ms}


def predict_with_exits(bench: BenchmarkSet, network: Network, query: Query, *, model_dir: str | Path,
                       deadline_ms: float, objective: str = "mean") -> dict[str, Any]:
    """The most accurate early-exit configuration meeting ``deadline_ms``, and the no-exit one.

    Parameters
    ----------
    bench : BenchmarkSet
        Must hold ``query.model`` with branch times on every system used.
    network : Network
    query : Query
        Its model name; system-name criteria (``NAME`` / ``!NAME``) narrow the systems.
    model_dir : path
        The POPEX model directory (``calibration.npz``).
    deadline_ms : float
        The requirement D.
    objective : {"mean", "tail"}

    Returns
    -------
    dict
        ``chosen`` and ``no_exit`` (thresholds with None = off, x, y, systems,
        accuracy, expected and worst latency in ms, feasible), ``deadline_ms``,
        ``objective``, ``n_strategies``.

    Raises
    ------
    BenchmarkError
        Missing calibration, branch times or model; no configuration the network file can carry.
    """
    deadline_ms = check_deadline_ms(deadline_ms)
    objective = check_objective(objective)
    path = Path(model_dir) / CALIBRATION_FILE
    if not path.is_file():
        raise BenchmarkError(f"--popex-model {str(model_dir)!r} has no {CALIBRATION_FILE}")
    calibration = load_calibration(path)
    devices = [s for s in bench.tier("device") if query.model in s.models and
               (not query.device.systems_in or s.system in query.device.systems_in)
               and s.system not in query.device.systems_out]
    if not devices:
        raise BenchmarkError(f"no device system has benchmarked model {query.model!r}")
    reference = devices[0].models[query.model]
    positions = tuple(b.after_block + 1 for b in reference.branches)
    n_stages = len(reference.blocks)

    def candidates(tier: str, criteria) -> list:
        found = [s for s in bench.tier(tier) if query.model in s.models and
                 (not criteria.systems_in or s.system in criteria.systems_in) and s.system not in criteria.systems_out]
        return found + [None]  # None: the tier runs nothing

    stats = sweep_exit_stats(calibration, branch_after_stage=positions)
    split_bytes = [reference.input_bytes or 0] + [b.output_bytes for b in reference.blocks]
    chosen, plain = [], []  # per triple: the three-tier policy's choice, with exits and without
    n_strategies = 0
    for d in devices:
        for e in candidates("edge", query.edge):
            for c in candidates("cloud", query.cloud):
                times = [_tier_times(s, query.model, n_stages, len(positions)) for s in (d, e, c)]
                profile = ThreeTierProfile(stage_ms=np.array([t for t, _ in times]),
                                           branch_ms=np.array([b for _, b in times]).reshape(3, len(positions)),
                                           branch_after_stage=positions, split_bytes=split_bytes)
                hops = {"de": _hop(network, d, e), "ec": _hop(network, e, c), "dc": _hop(network, d, c)}
                table = three_tier_table(stats, profile, device_edge=hops["de"] or _UNUSED_LINK,
                                         edge_cloud=hops["ec"] or _UNUSED_LINK,
                                         device_cloud=hops["dc"] or _UNUSED_LINK)
                edge_used, cloud_used = table.x < table.y, table.y < n_stages
                # each configuration once: without an edge (cloud) only in the triple whose edge (cloud) is None
                possible = ((edge_used == (e is not None)) & (cloud_used == (c is not None))
                            & (~edge_used | (hops["de"] is not None))
                            & (~(edge_used & cloud_used) | (hops["ec"] is not None))
                            & (~(~edge_used & cloud_used) | (hops["dc"] is not None)))
                if not possible.any():
                    continue
                n_strategies += int(possible.sum()) * len(table.accuracy)
                off = np.all(np.isnan(table.thresholds), axis=1)
                for found, rows in ((chosen, None), (plain, off)):
                    choice = choose_three_tier(table, policy="three-tier", deadline_ms=deadline_ms,
                                               objective=objective, allowed=possible, configs=rows)
                    found.append((choice, table, (d, e, c)))
    if not chosen:
        raise BenchmarkError(f"{network.source} carries no configuration of model {query.model!r}")

    def best(found: list) -> dict[str, Any]:
        def rank(item) -> tuple:  # the same rule across triples as within one: feasible, accurate, fast
            choice = item[0]
            latency = choice.expected_latency_ms if objective == "mean" else choice.worst_latency_ms
            return (not choice.feasible, -choice.accuracy if choice.feasible else 0.0, latency)

        choice, table, triple = min(found, key=rank)
        return _row(table, (choice.config, choice.cut), triple, objective, deadline_ms)

    return {"deadline_ms": deadline_ms, "objective": objective, "n_strategies": n_strategies,
            "chosen": best(chosen), "no_exit": best(plain)}


def _describe(row: dict[str, Any]) -> str:
    parts = [f"{tier.capitalize()}({row['systems'][tier] if tier != 'device' or stages else row['systems'][tier]}) = "
             + (f"stages {stages[0]}-{stages[1]}" if stages else "nothing")
             for tier, stages in row["stages"].items() if stages or tier == "device"]
    thresholds = ",".join("off" if t is None else f"{t:.2f}" for t in row["thresholds"]) or "-"
    return (f"thresholds {thresholds}, {', '.join(parts)}: E[T] {row['expected_latency_ms']:.2f} ms, worst "
            f"{row['worst_latency_ms']:.2f} ms, accuracy {row['accuracy']:.4f}")


def format_exit_answer(answer: dict[str, Any]) -> str:
    """Two lines: the early-exit choice and the no-exit answer, each with its verdict.

    Parameters
    ----------
    answer : dict
        From :func:`predict_with_exits`.

    Returns
    -------
    str
    """
    lines = []
    for label, key in (("with early exits", "chosen"), ("no exits", "no_exit")):
        row = answer[key]
        verdict = "meets" if row["feasible"] else "MISSES"
        lines.append(f"{label}: {_describe(row)} ({verdict} {answer['deadline_ms']:g} ms, {answer['objective']})")
    return "\n".join(lines)
