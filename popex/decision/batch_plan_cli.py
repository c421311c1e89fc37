"""``popex batch-plan``: the batch-aware exits of a model's strategy, offline (:mod:`popex.decision.batch_plan`).

The strategy is the one a policy picks for a link and a requirement (as
``popex plan``; default the precision-aware policy, the batched-serving
seed's thresholds); its exits are then planned per batch size from the
inference time matrix (the profile's ``"batch"`` entry, written by ``popex
profile --max-batch-size N``, else measured here) and the calibration.
Printed per batch size: the exits chosen, and the predicted per-sample
latency and batch completion time with them, with every exit and with none;
then the expected per-query latency at an arrival rate.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["add_batch_plan_parser"]

_HELP = "batch-aware exits: per batch size, the branches worth running, and predicted per-sample latency"


def _strategy(model_dir: Path, profile, *, uplink_mbps: float, rtt_ms: float, deadline_ms: float,
              objective: str, policy: str):
    from popex.decision import Link, Planner, load_calibration, sweep_exit_stats
    from popex.decision.calibration import CALIBRATION_FILE
    from popex.decision.policies import PolicyBook, edge_threshold_grids
    from popex.decision.precision_aware import precision_aware_thresholds

    calibration = load_calibration(model_dir / CALIBRATION_FILE)
    grids = edge_threshold_grids(profile.n_branches)
    stats = sweep_exit_stats(calibration, branch_after_stage=profile.branch_after_stage, thresholds=grids)
    link = Link(uplink_mbps=uplink_mbps, rtt_ms=rtt_ms)
    table = Planner(stats, profile).table(link)
    precision = (precision_aware_thresholds(calibration, grids=grids).thresholds, profile.branch_after_stage)
    book = PolicyBook.build(table, precision_aware=precision)
    decision = book.decide(policy, deadline_ms=deadline_ms, objective=objective)
    return calibration, link, table.row(decision.row), decision.feasible


def _cmd_batch_plan(args: argparse.Namespace) -> int:
    from popex.cli import measure_profile
    from popex.decision.batch_arrivals import arrival_model
    from popex.decision.batch_plan import BatchCosts, plan_batch_exits
    from popex.errors import ProfileError
    from popex.runtime.batch_profile import batch_sizes_up_to, load_batch_timings, time_batches
    from popex.runtime.model_files import load_model_dir
    from popex.runtime.profiler import load_profile

    model_dir = Path(args.model)
    profile_path = Path(args.profile) if args.profile else model_dir / "profile.json"
    notes = []
    if profile_path.is_file():
        profile = load_profile(profile_path)
        notes.append(f"profile from {profile_path}")
    elif args.profile:
        raise ProfileError(f"profile file {args.profile!r} not found")
    else:
        profile, _, note = measure_profile(args.model, n_repeats=20, n_warmup=5, n_threads=1,
                                            cloud_speedup=args.cloud_speedup, offload_overhead_ms=2.0)
        notes.append(f"no profile file: {note}")
    try:
        timings = load_batch_timings(profile_path)
        if timings.batch_sizes[-1] < args.max_batch_size:
            raise ProfileError(f"the stored batch timings stop at {timings.batch_sizes[-1]}")
        notes.append(f"batch timings from {profile_path} (sizes {list(timings.batch_sizes)})")
    except ProfileError as err:
        model = load_model_dir(args.model, n_threads=1)
        timings = time_batches(model.net, batch_sizes=batch_sizes_up_to(args.max_batch_size),
                               progress=sys.stderr.isatty())
        notes.append(f"batch timings measured here ({err}); sizes {list(timings.batch_sizes)}")
    calibration, link, row, feasible = _strategy(model_dir, profile, uplink_mbps=args.uplink_mbps,
                                                 rtt_ms=args.rtt_ms, deadline_ms=args.deadline_ms,
                                                 objective=args.objective, policy=args.policy)
    thresholds = tuple(row["thresholds"])
    costs = BatchCosts.build(profile, timings, link=link, split=row["split"],
                             max_n=min(args.max_batch_size, calibration.n_samples))
    plan = plan_batch_exits(costs, calibration, thresholds)
    arrival = arrival_model(args.arrival_rate_per_s, max_batch_size=len(plan.sizes),
                            batch_max_wait_ms=args.batch_max_wait_ms)
    per_query = {which: plan.expected_per_query_ms(arrival, exits=which) for which in ("chosen", "all", "none")}
    if args.json:
        print(json.dumps({"notes": notes, "policy": args.policy, "feasible": feasible, "strategy": row,
                          "arrival_rate_per_s": args.arrival_rate_per_s, "batch_max_wait_ms": args.batch_max_wait_ms,
                          "expected_per_query_ms": per_query, "plan": plan.to_dict()}))
        return 0
    for line in notes:
        print(f"note: {line}")
    text = ",".join("off" if t is None else f"{t:.2f}" for t in thresholds) or "-"
    print(f"{args.policy} strategy at {args.uplink_mbps:g} Mbit/s, {args.rtt_ms:g} ms RTT, {args.deadline_ms:g} ms: "
          f"split {row['split']}, thresholds {text}" + ("" if feasible else " (infeasible: the fastest)"))
    print(f"{'batch':>5}  {'exits':<10}{'per-sample ms':>14}{'all exits':>11}{'no exits':>10}"
          f"{'completion ms':>15}{'no exits':>10}{'accuracy':>10}")
    for n in sorted(set(batch_sizes_up_to(len(plan.sizes)))):
        size = plan.for_size(n)
        exits = ",".join(str(b) for b in size.exits) or "none"
        print(f"{n:>5}  {exits:<10}{size.per_sample_ms:>14.3f}{size.all_exits_per_sample_ms:>11.3f}"
              f"{size.no_exits_per_sample_ms:>10.3f}{size.completion_ms:>15.3f}{size.no_exits_completion_ms:>10.3f}"
              f"{size.accuracy:>10.4f}")
    print(f"at {args.arrival_rate_per_s:g} requests/s into a batcher of {len(plan.sizes)} with a "
          f"{args.batch_max_wait_ms:g} ms window (mean batch {float(arrival.p_batch @ range(arrival.p_batch.size)):.2f}):"
          f" expected per-query latency {per_query['chosen']:.3f} ms (all exits {per_query['all']:.3f}, "
          f"no exits {per_query['none']:.3f})")
    return 0


def add_batch_plan_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``popex batch-plan``.

    Parameters
    ----------
    subparsers : argparse._SubParsersAction
        The ``popex`` command's.

    Returns
    -------
    argparse.ArgumentParser
    """
    from popex.cli import OFFLINE_CLOUD_SPEEDUP
    from popex.decision.policies import POLICIES

    p = subparsers.add_parser("batch-plan", help=_HELP)
    p.add_argument("--model", required=True, help="model directory (calibration.npz, optional profile.json)")
    p.add_argument("--profile", help="profile.json (default: MODEL/profile.json, else measured here)")
    p.add_argument("--max-batch-size", type=int, default=16, help="plan batches of 1..N (default 16)")
    p.add_argument("--uplink-mbps", type=float, default=10.0)
    p.add_argument("--rtt-ms", type=float, default=20.0)
    p.add_argument("--deadline-ms", type=float, default=100.0, help="latency requirement the policy plans for")
    p.add_argument("--objective", choices=("mean", "tail"), default="mean")
    p.add_argument("--policy", choices=POLICIES, default="precision-aware")
    p.add_argument("--arrival-rate-per-s", type=float, default=0.0, help="requests/s into the micro-batcher")
    p.add_argument("--batch-max-wait-ms", type=float, default=2.0, help="the micro-batcher's window")
    p.add_argument("--cloud-speedup", type=float, default=OFFLINE_CLOUD_SPEEDUP,
                   help="assumed cloud speed relative to this machine when no profile file exists")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=_cmd_batch_plan)
    return p
