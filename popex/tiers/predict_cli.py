"""``popex predict BENCH_DIR NETWORK_CSV MODEL [options]``: Scission's query interface.

Prints the K fastest configurations one line each, exactly as Scission
prints them (``[1] 9.0106s - 2.4087MB - Device(raspi4) = 0 - 6, ...``), or
``No results for the specified configuration``; ``--json`` prints one
object instead. The best configuration is drawn to a PNG (``--plot``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from popex.errors import BenchmarkError

__all__ = ["PREDICT_HELP", "add_predict_parser", "build_query"]

PREDICT_HELP = "Scission-style prediction: the fastest device/edge/cloud configurations from benchmark files"


def _megabytes(value: float | None, *, name: str) -> float | None:
    if value is None:
        return None
    if not math.isfinite(value) or value < 0:
        raise BenchmarkError(f"{name} must be a finite number of MB >= 0, got {value!r}")
    return value * 1000 * 1000  # Scission's decimal MB


def build_query(args: argparse.Namespace):
    """The :class:`popex.tiers.query.Query` of parsed ``popex predict`` arguments.

    Parameters
    ----------
    args : argparse.Namespace

    Returns
    -------
    popex.tiers.query.Query

    Raises
    ------
    BenchmarkError
        A bad criterion, limit, input size or result count.
    """
    from dataclasses import replace

    from popex.tiers.query import Query, parse_criteria, parse_time_limit

    if args.result_count < 1:
        raise BenchmarkError(f"--result-count must be >= 1, got {args.result_count}")
    tiers = {}
    for tier in ("device", "edge", "cloud"):
        criteria = parse_criteria(getattr(args, tier), tier=tier)
        seconds, percent = parse_time_limit(getattr(args, f"{tier}_time"), name=f"--{tier}-time")
        upload = _megabytes(getattr(args, f"{tier}_upload", None), name=f"--{tier}-upload")
        tiers[tier] = replace(criteria, time_limit_s=seconds, time_limit_percent=percent, upload_limit_bytes=upload)
    return Query(model=args.model, input_bytes=_megabytes(args.input, name="--input"), n_results=args.result_count,
                 **tiers)


def _cmd_predict(args: argparse.Namespace) -> int:
    from popex.tiers.benchmark_file import load_benchmark_dir
    from popex.tiers.network import load_network_csv
    from popex.tiers.predict import NO_RESULTS, format_line, predict, resolved_input_bytes

    bench = load_benchmark_dir(args.bench_dir)
    network = load_network_csv(args.network_csv)
    query = build_query(args)
    results = predict(bench, network, query)
    if args.json:
        body = {"model": args.model, "results": [c.to_dict() for c in results]}
        print(json.dumps(body))
    elif not results:
        print(NO_RESULTS)
    else:
        for rank, config in enumerate(results, start=1):
            print(format_line(rank, config))
    if results and not args.no_plot:
        from popex.tiers.plots import plot_configuration

        path = Path(args.plot) if args.plot else Path("results") / "predict" / f"{args.model}-best.png"
        plot_configuration(results[0], bench, network, args.model, path,
                           input_bytes=resolved_input_bytes(bench, query))
        print(f"graph of the best configuration: {path}", file=sys.stderr)
    return 0


def add_predict_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``popex predict``: see the module docstring.

    Parameters
    ----------
    subparsers : argparse._SubParsersAction

    Returns
    -------
    argparse.ArgumentParser
    """
    p = subparsers.add_parser("predict", help=PREDICT_HELP, description=__doc__.split("\n\n")[0])
    p.add_argument("bench_dir", metavar="BENCH_DIR", help="folder of popex-benchmark/1 files, one per system")
    p.add_argument("network_csv", metavar="NETWORK_CSV", help="source,destination,ping(ms),bandwidth(mbps)")
    p.add_argument("model", metavar="MODEL", help="model name, as in the benchmark files")
    for flag, tier in (("-d", "device"), ("-e", "edge"), ("-c", "cloud")):
        p.add_argument(flag, f"--{tier}", help=f"{tier} criteria: N, !N, -1, !-1, NAME, !NAME (comma-separated)")
    p.add_argument("-i", "--input", type=float, help="input size in MB (default: the files' input_bytes, else 0.15)")
    p.add_argument("-r", "--result-count", type=int, default=5, help="number of results (default 5)")
    p.add_argument("--device-upload", type=float, help="most MB the device may send")
    p.add_argument("--edge-upload", type=float, help="most MB the edge may send")
    for tier in ("device", "edge", "cloud"):
        p.add_argument(f"--{tier}-time", help=f"most {tier} compute: seconds, or T%% of the total compute")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", help="PNG of the best configuration (default results/predict/MODEL-best.png)")
    p.add_argument("--no-plot", action="store_true", help="draw nothing")
    p.set_defaults(run=_cmd_predict)
    return p
