"""``popex benchmark``: benchmark a POPEX model's stages here, into a ``popex-benchmark/1`` file.

    popex benchmark --tier edge --system vm2Core --model models/default --out bench/
    popex benchmark --tier device --system pi-emulated --model models/default --emulate-slowdown 5.45 --out bench/

Writes (or updates) ``OUT/<tier>-<system>.json`` with the model's blocks
(median time of ``--repeats`` runs after a warm-up, output bytes, FLOPs,
parameters) and a per-block plot ``OUT/<tier>-<system>-<model>.png``;
prints the whole-model time against the sum of the blocks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["BENCHMARK_HELP", "add_benchmark_parser"]

BENCHMARK_HELP = "benchmark a model's stages on this machine into a popex-benchmark/1 file (+ per-block plot)"


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from popex.tiers.benchmark_file import load_benchmark_file, write_benchmark_file
    from popex.tiers.measure import benchmark_model, merge_into
    from popex.tiers.plots import plot_blocks

    name = args.name or Path(args.model).resolve().name
    measurement = benchmark_model(args.model, name=name, n_repeats=args.repeats, n_warmup=args.warmup,
                                  slowdown=args.emulate_slowdown, n_threads=args.threads,
                                  progress=sys.stderr.isatty())
    out = Path(args.out)
    path = out / f"{args.tier}-{args.system}.json"
    note = (f"measured by popex benchmark, {args.threads} ONNX Runtime thread(s)"
            + (f", times x {args.emulate_slowdown:g} (emulated)" if args.emulate_slowdown != 1 else ""))
    bench = merge_into(load_benchmark_file(path) if path.is_file() else None, measurement, tier=args.tier,
                       system=args.system, note=note)
    write_benchmark_file(bench, path)
    png = plot_blocks(measurement.model, out / f"{args.tier}-{args.system}-{name}.png",
                      title=f"{name} on {args.tier} {args.system}")
    model = measurement.model
    print(f"{'block':<6}{'name':<18}{'time ms':>10}{'output bytes':>14}{'MFLOPs':>10}{'params':>10}")
    for i, block in enumerate(model.blocks):
        print(f"{i:<6}{(block.name or '-')[:17]:<18}{block.time_ms:>10.3f}{block.output_bytes:>14,}"
              f"{(block.flops or 0) / 1e6:>10.2f}{block.params or 0:>10,}")
    print(f"whole model {measurement.whole_model_ms:.3f} ms, sum of blocks {measurement.sum_of_blocks_ms:.3f} ms: "
          f"additivity error {measurement.additivity_error:+.1%} (median of {args.repeats} after {args.warmup} "
          "warm-up runs)")
    print(f"wrote {path} and {png}")
    return 0


def add_benchmark_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``popex benchmark``: see the module docstring.

    Parameters
    ----------
    subparsers : argparse._SubParsersAction

    Returns
    -------
    argparse.ArgumentParser
    """
    p = subparsers.add_parser("benchmark", help=BENCHMARK_HELP, description=__doc__.split("\n\n")[0])
    p.add_argument("--tier", required=True, choices=("device", "edge", "cloud"))
    p.add_argument("--system", required=True, help="this system's name (as in the network file)")
    p.add_argument("--model", required=True, help="model directory (ONNX form, or spec.json + weights.safetensors)")
    p.add_argument("--name", help="the model's name in the file (default: the directory's name)")
    p.add_argument("--repeats", type=int, default=30, help="timed runs per block; the median is kept (default 30)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs first (default 5)")
    p.add_argument("--emulate-slowdown", type=float, default=1.0,
                   help="multiply every time by F: a system F times slower than this one (default 1)")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1)")
    p.add_argument("--out", required=True, help="directory of benchmark files (the file is created or updated)")
    p.set_defaults(run=_cmd_benchmark)
    return p
