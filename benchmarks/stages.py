"""Stage time on the serving path (ONNX Runtime) vs eager torch, in the same process.

For each model (the shipped default, and an untrained B-MobileNetV2 at
32x32) every stage is timed at batch 1, 8 and 32, eager torch
(``torch.inference_mode``, one intra-op thread) and ONNX Runtime (one
session per stage, one intra-op thread) each variant running the whole
chain of stages as a request does, the variants alternating repeat by
repeat (which goes first alternates too), so load on the machine and warm
caches favour neither. Reported: the median per stage, the sum
of stage medians, and the ratio ONNX Runtime / torch (below 1: ONNX Runtime
is faster). Run: ``.venv/bin/python benchmarks/stages.py [--repeats 50]``.
"""

from __future__ import annotations

import argparse
import functools
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
from popex.nets.io import load_model, save_model  # noqa: E402
from popex.runtime.model_files import load_model_dir  # noqa: E402

BATCHES = (1, 8, 32)


def _time_ms(fn, x) -> float:
    started = time.perf_counter()
    fn(x)
    return (time.perf_counter() - started) * 1000.0


def bench(name: str, model_dir: Path, *, n_repeats: int, n_warmup: int = 5) -> list[dict]:
    torch_net = load_model(model_dir).net.eval()
    served = load_model_dir(model_dir).net
    rows = []
    for batch in BATCHES:
        torch_inputs = [torch.zeros(batch, *torch_net.input_shape)]
        onnx_inputs = [np.zeros((batch, *served.input_shape), np.float32)]
        with torch.inference_mode():
            for i in range(served.n_stages):
                torch_inputs.append(torch_net.run_stages(torch_inputs[-1], start=i, stop=i + 1))
                onnx_inputs.append(served.run_stages(onnx_inputs[-1], start=i, stop=i + 1))
            samples = {"torch": [[] for _ in range(served.n_stages)], "onnx": [[] for _ in range(served.n_stages)]}
            variants = {
                "torch": lambda i, x: torch_net.run_stages(x, start=i, stop=i + 1),
                "onnx": lambda i, x: served.run_stages(x, start=i, stop=i + 1),
            }
            inputs = {"torch": torch_inputs, "onnx": onnx_inputs}
            for repeat in range(n_warmup + n_repeats):
                # Each variant runs the whole chain as a request does (stage 1, 2, ... N), timing every
                # stage; which variant goes first alternates, so load drift and warm caches favour neither.
                for variant in (("torch", "onnx") if repeat % 2 == 0 else ("onnx", "torch")):
                    for i in range(served.n_stages):
                        ms = _time_ms(functools.partial(variants[variant], i), inputs[variant][i])
                        if repeat >= n_warmup:
                            samples[variant][i].append(ms)
        torch_ms = [statistics.median(s) for s in samples["torch"]]
        onnx_ms = [statistics.median(s) for s in samples["onnx"]]
        rows.append({"model": name, "batch": batch, "torch_stage_ms": torch_ms, "onnx_stage_ms": onnx_ms,
                     "torch_sum_ms": sum(torch_ms), "onnx_sum_ms": sum(onnx_ms)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50, help="timed runs per stage and batch (default 50)")
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
              "per-stage ratios |")
        print("|---|---|---|---|---|---|")
        for name, directory in models:
            for row in bench(name, directory, n_repeats=args.repeats):
                ratios = [o / t for o, t in zip(row["onnx_stage_ms"], row["torch_stage_ms"])]
                print(f"| {name} | {row['batch']} | {row['torch_sum_ms']:.3f} | {row['onnx_sum_ms']:.3f} | "
                      f"{row['onnx_sum_ms'] / row['torch_sum_ms']:.2f}x | "
                      f"{min(ratios):.2f}-{max(ratios):.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
