"""Stage time on the serving path (ONNX Runtime) vs eager torch, in the same process.

For each model (the shipped default, and an untrained B-MobileNetV2 at
32x32) every stage is timed at batch 1, 8 and 32, eager torch
(``torch.inference_mode``, one intra-op thread) and ONNX Runtime (one
session per stage, one intra-op thread), each variant running the whole
chain of stages as a request does, in blocks of ``--block`` requests (the
first of each dropped) that alternate between the variants, so load on the
machine favours neither and each meets the caches as a process serving only
it would (``--block 1`` alternates request by request instead). Reported:
the median per stage, the sum of stage medians, and the ratio ONNX Runtime /
torch (below 1: ONNX Runtime is faster).
Run: ``.venv/bin/python benchmarks/stages.py [--repeats 20] [--block 10]``.
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

import numpy as np  # noqa: E402
import torch  # noqa: E402

from popex.nets import EarlyExitNet, zoo_spec  # noqa: E402
from popex.nets.flops import stage_macs  # noqa: E402
from popex.nets.io import load_model, save_model  # noqa: E402
from popex.runtime.model_files import load_model_dir  # noqa: E402

BATCHES = (1, 8, 32)


def _chain_ms(run_stage, x, n_stages: int) -> list[float]:
    """Time every stage of one request's chain (stage 1, 2, ... N)."""
    times_ms = []
    for i in range(n_stages):
        started = time.perf_counter()
        x = run_stage(i, x)
        times_ms.append((time.perf_counter() - started) * 1000.0)
    return times_ms


def bench(name: str, model_dir: Path, *, n_repeats: int, block: int, n_warmup: int = 5) -> list[dict]:
    """Per-stage medians of both variants, in blocks of ``block`` chains (1: alternating chain by chain).

    With ``block > 1`` a variant runs ``block`` requests in a row and the
    first of each block is dropped, so each variant meets the caches as a
    process serving only it would; blocks alternate, so load drift favours
    neither. With ``block == 1`` every chain follows one of the other
    variant, which charges each the other's cache misses (both pay ~0.5 ms
    of weight reloads on the default model).
    """
    torch_net = load_model(model_dir).net.eval()
    served = load_model_dir(model_dir).net
    n_stages = served.n_stages
    macs = stage_macs(torch_net)
    variants = {
        "torch": (lambda i, x: torch_net.run_stages(x, start=i, stop=i + 1), torch.zeros),
        "onnx": (lambda i, x: served.run_stages(x, start=i, stop=i + 1),
                 lambda *shape: np.zeros(shape, np.float32)),
    }
    rows = []
    with torch.inference_mode():
        for batch in BATCHES:
            samples: dict[str, list[list[float]]] = {v: [[] for _ in range(n_stages)] for v in variants}
            for repeat in range(n_warmup + n_repeats):
                for variant in (("torch", "onnx") if repeat % 2 == 0 else ("onnx", "torch")):
                    run_stage, zeros = variants[variant]
                    x = zeros(batch, *served.input_shape)
                    for k in range(block):
                        times_ms = _chain_ms(run_stage, x, n_stages)
                        if repeat >= n_warmup and (k > 0 or block == 1):
                            for i, ms in enumerate(times_ms):
                                samples[variant][i].append(ms)
            torch_ms = [statistics.median(s) for s in samples["torch"]]
            onnx_ms = [statistics.median(s) for s in samples["onnx"]]
            rows.append({"model": name, "batch": batch, "torch_stage_ms": torch_ms, "onnx_stage_ms": onnx_ms,
                         "torch_sum_ms": sum(torch_ms), "onnx_sum_ms": sum(onnx_ms),
                         "macs": batch * sum(macs)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="blocks per variant and batch (default 20)")
    parser.add_argument("--block", type=int, default=10, help="requests in a row per variant, the first dropped "
                        "(default 10: as a process serving only that variant; 1: alternate request by request)")
    parser.add_argument("--model", action="append", help="a model directory (default: models/default, models/b-alexnet "
                        "and an untrained B-MobileNetV2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        models = [(Path(m).name, Path(m)) for m in args.model] if args.model else None
        if models is None:
            mobilenet_dir = Path(scratch) / "b-mobilenetv2"
            torch.manual_seed(0)
            save_model(EarlyExitNet(zoo_spec("b-mobilenetv2")).eval(), mobilenet_dir)
            models = [("default (b-resnet, bottleneck stem)", REPO / "models" / "default"),
                      ("b-alexnet (the previous default)", REPO / "models" / "b-alexnet"),
                      ("b-mobilenetv2 (untrained, 32x32)", mobilenet_dir)]
        print("| model | batch | eager torch, sum of stage medians (ms) | ONNX Runtime (ms) | ratio | "
              "per-stage ratios | GMAC/s, torch / ONNX Runtime |")
        print("|---|---|---|---|---|---|---|")
        for name, directory in models:
            for row in bench(name, directory, n_repeats=args.repeats, block=args.block):
                ratios = [o / t for o, t in zip(row["onnx_stage_ms"], row["torch_stage_ms"])]
                print(f"| {name} | {row['batch']} | {row['torch_sum_ms']:.3f} | {row['onnx_sum_ms']:.3f} | "
                      f"{row['onnx_sum_ms'] / row['torch_sum_ms']:.2f}x | "
                      f"{min(ratios):.2f}-{max(ratios):.2f}x | "
                      f"{row['macs'] / row['torch_sum_ms'] / 1e6:.1f} / {row['macs'] / row['onnx_sum_ms'] / 1e6:.1f} |",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
