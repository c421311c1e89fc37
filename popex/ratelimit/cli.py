"""``popex ratelimit simulate|train|metric``: the rate-limit study from the command line.

``simulate`` prints each policy's average loss and offload rate (``--json``:
one object ``{"bucket", "policies", "mdp_thresholds"}``); ``train`` fits the
learned policy (fitted Q-iteration, ``--quick`` for a short schedule);
``metric`` writes a metric file of the seed's schema from a model.
"""

from __future__ import annotations

import argparse
import json
import sys

from popex.ratelimit.metric import COSTS
from popex.ratelimit.sequences import ARRIVALS, SEQUENCES

__all__ = ["HELP", "add_ratelimit_parser"]

HELP = "token-bucket offloads: simulate, train, metric"


def _cmd_simulate(args: argparse.Namespace) -> int:
    from popex.ratelimit.data import load_metric_data
    from popex.ratelimit.policies import parse_policies
    from popex.ratelimit.sequences import LocationReset
    from popex.ratelimit.simulate import simulate

    policies = parse_policies(args.policies)
    report = simulate(load_metric_data(args.data), rate=args.rate, depth=args.depth, sequence=args.sequence,
                      arrivals=args.arrivals, location_reset=LocationReset(args.spread, args.reset_prob),
                      n_seq=args.n_seq, seq_len=args.seq_len, seed=args.seed, policies=policies,
                      learned_weights=args.learned_weights)
    if args.json:
        print(json.dumps(report.to_dict()))
        return 0
    bucket = report.bucket
    print(f"bucket r={bucket.rate:g} tokens/slot, b={bucket.depth:g} tokens (q={bucket.q}, p={bucket.p}, "
          f"m={bucket.m}); {args.sequence} sequences, {args.arrivals} arrivals, {args.n_seq} x {args.seq_len} images")
    print(f"  {'policy':<12} {'loss':>9} {'offload rate':>13}")
    for name, result in report.policies.items():
        print(f"  {name:<12} {result.loss:9.5f} {result.offload_rate:13.4f}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from popex.ratelimit.bucket import integerise
    from popex.ratelimit.data import load_metric_data
    from popex.ratelimit.learned import TrainSchedule, train_learned_policy
    from popex.ratelimit.sequences import LocationReset

    params = integerise(args.rate, args.depth)
    schedule = TrainSchedule.quick() if args.quick else TrainSchedule()
    policy, history = train_learned_policy(load_metric_data(args.data), params,
                                           schedule=TrainSchedule(**{**schedule.__dict__, "seed": args.seed}),
                                           location_reset=LocationReset(args.spread, args.reset_prob),
                                           progress=not args.quiet and sys.stderr.isatty())
    out = policy.save(args.out)
    kept = [h for h in history[1:] if h["z"] >= schedule.min_z]
    best = min(kept, key=lambda h: h["val_loss"]) if kept else history[0]
    verdict = (f"round {best['round']}, validation gain {best['gain']:.5f} per image over the MDP "
               f"({best['z']:.1f} standard errors)" if kept else
               f"no network beat the MDP by {schedule.min_z:g} standard errors on validation: the policy is the MDP")
    print(f"learned policy for q={params.q}, p={params.p}, m={params.m} written to {out}; {verdict}")
    return 0


def _cmd_metric(args: argparse.Namespace) -> int:
    from popex.ratelimit.model_metric import model_metric_data

    result = model_metric_data(args.model, split=args.split, cost=args.cost, data=args.data, seed=args.seed)
    path = result.data.save(args.out)
    print(f"wrote {path}: branch {result.branch} (split {result.split}) vs the final exit, {result.n_images} images "
          f"({len(result.data.metric_tr)} train / {len(result.data.metric_ts)} test), cost {args.cost}, inverse "
          f"temperature {result.inverse_temperature:.4f}")
    return 0


def _add_bucket(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="metric file (.npz: metric_tr, metric_ts, wcost_tr, scost_tr, "
                                                 "wcost_ts, scost_ts)")
    p.add_argument("--rate", type=float, required=True, help="r > 0: tokens per time slot")
    p.add_argument("--depth", type=float, required=True, help="b >= 1: bucket depth in tokens")
    p.add_argument("--spread", type=float, default=0.1, help="location-reset spread (fraction of the images)")
    p.add_argument("--reset-prob", type=float, default=0.01, help="location-reset probability per image")
    p.add_argument("--seed", type=int, default=0)


def add_ratelimit_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``popex ratelimit`` and its three subcommands."""
    parser = subparsers.add_parser("ratelimit", help=HELP, description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="ratelimit_command", required=True, metavar="COMMAND")
    p = commands.add_parser("simulate", help="every policy on seeded sequences: average loss and offload rate")
    _add_bucket(p)
    p.add_argument("--sequence", choices=SEQUENCES, default="iid")
    p.add_argument("--arrivals", choices=ARRIVALS, default="periodic")
    p.add_argument("--n-seq", type=int, default=1, help="sequences (default 1)")
    p.add_argument("--seq-len", type=int, default=100_000, help="images per sequence (default 100,000)")
    p.add_argument("--policies", default="weak,strong,baseline,lower-bound,mdp",
                   help="comma-separated: weak, strong, baseline, lower-bound, mdp, learned")
    p.add_argument("--learned-weights", help="directory written by `popex ratelimit train` (for 'learned')")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(run=_cmd_simulate)
    p = commands.add_parser("train", help="train the learned policy (fitted Q-iteration) for one bucket")
    _add_bucket(p)
    p.add_argument("--out", required=True, help="directory for policy.safetensors + policy.json")
    p.add_argument("--quick", action="store_true", help="the short schedule (a couple of minutes on 2 cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_cmd_train)
    p = commands.add_parser("metric", help="a metric file from a model's calibration split (best local exit vs final)")
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--split", type=int, help="stages on the edge (default: the last branch's stage)")
    p.add_argument("--cost", choices=COSTS, default="top1")
    p.add_argument("--data", help="labelled images instead of the calibration split (.npz, ImageFolder, CIFAR-10)")
    p.add_argument("--out", required=True, help="the .npz to write")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/test split")
    p.set_defaults(run=_cmd_metric)
    return parser
