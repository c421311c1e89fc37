"""Batch-aware exits: predicted vs measured per-sample latency, chosen exits vs every exit vs none, same run.

On this machine (no emulation), edge only (split N, so every piece is
measured, none assumed), the default model:

1. the inference time matrix (``time_batches``, batch sizes 1..16) and the
   profile from its batch-1 column, so prediction and measurement share one
   machine state;
2. for each threshold setting (the precision-aware thresholds, and a strict
   0.95 on every branch, where branches let few samples go), the plan
   (``plan_batch_exits``) per batch size;
3. batches of n test images (drawn without replacement, seeded) run through
   the compacted path (``popex.runtime.compaction.run_compacted``) with the
   chosen exits, every exit and none, interleaved batch by batch in a random
   order; a sample's
   latency is the time from its batch's start to its exit (the end of the
   batch for the samples that reach the final exit).

Reported: mean per-sample latency measured and predicted for each variant,
the prediction error, and the measured ratio chosen / all exits and chosen /
no exits (the baselines run in the same process, interleaved).

Run: ``.venv/bin/python benchmarks/batch_plan.py [--n-batches 40]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from popex.data import Preprocessing, default_test_set, preprocess  # noqa: E402
from popex.decision.batch_plan import BatchCosts, plan_batch_exits, predict_batch  # noqa: E402
from popex.decision.calibration import load_calibration  # noqa: E402
from popex.decision.latency import Link  # noqa: E402
from popex.decision.precision_aware import precision_aware_thresholds  # noqa: E402
from popex.runtime.batch_profile import batch_sizes_up_to, time_batches  # noqa: E402
from popex.runtime.compaction import run_compacted  # noqa: E402
from popex.runtime.exits import exit_confidence  # noqa: E402
from popex.runtime.model_files import load_model_dir  # noqa: E402
from popex.runtime.profiler import build_profile, time_stages  # noqa: E402

MODEL_DIR = REPO / "models" / "default"
SIZES = (1, 2, 4, 8, 16)


def _measure(net, calibration, inputs, thresholds) -> float:
    """Mean per-sample latency of one batch through the compacted path with these thresholds, ms."""
    active = {b: float(t) for b, t in enumerate(thresholds) if t is not None}
    finish_s = np.zeros(len(inputs))

    def branch_exit(b, h):
        return exit_confidence(net.run_branch(b, h), temperature=float(calibration.temperature[b]),
                               method=calibration.confidence_method)

    def on_branch(b, indices, confidence, label):
        finish_s[indices[confidence >= active[b]]] = time.perf_counter()

    started = time.perf_counter()
    run = run_compacted(inputs, start=0, stop=net.n_stages, branch_after_stage=net.branch_after_stage,
                        thresholds=active, run_stage=lambda h, i: net.run_stages(h, start=i, stop=i + 1),
                        branch_exit=branch_exit, on_branch=on_branch)
    if run.continuing.size:
        exit_confidence(run.features, temperature=float(calibration.temperature[-1]),
                        method=calibration.confidence_method)
        finish_s[run.continuing] = time.perf_counter()
    return float((finish_s - started).mean() * 1000.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-batches", type=int, default=40, help="batches per size and variant")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    loaded = load_model_dir(MODEL_DIR, n_threads=1)
    net = loaded.net
    calibration = load_calibration(MODEL_DIR / "calibration.npz")
    test = default_test_set().dataset
    inputs = preprocess(test.images, Preprocessing.from_spec_dict(loaded.spec), is_batch=True)
    timings = time_batches(net, batch_sizes=batch_sizes_up_to(max(SIZES)), n_repeats=30)
    single = time_stages(net, n_warmup=2, n_repeats=3)  # bytes at each split; times from the matrix
    single = dataclasses.replace(single, stage_ms=timings.stage_ms[:, 0], branch_ms=timings.branch_ms[:, 0])
    profile = build_profile(single, branch_after_stage=net.branch_after_stage, offload_overhead_ms=0.0,
                            cloud_speedup=1.0)
    costs = BatchCosts.build(profile, timings, link=Link(uplink_mbps=100.0, rtt_ms=1.0), split=net.n_stages,
                             max_n=max(SIZES))
    settings = {
        "precision-aware": precision_aware_thresholds(calibration).thresholds,
        "strict 0.95": tuple(0.95 for _ in range(net.n_branches)),
    }
    rng = np.random.default_rng(args.seed)
    print(f"default model, {len(inputs)} test images, batch-1 stage times {np.round(timings.stage_ms[:, 0], 3)} ms, "
          f"branches {np.round(timings.branch_ms[:, 0], 3)} ms")
    print(f"{'thresholds':<16}{'batch':>6}  {'chosen':<8}{'variant':<8}{'predicted ms':>13}{'measured ms':>13}"
          f"{'error':>8}")
    summary = []
    for name, thresholds in settings.items():
        plan = plan_batch_exits(costs, calibration, thresholds)
        for n in SIZES:
            chosen = plan.thresholds_for(n)
            variants = {"chosen": chosen, "all": tuple(thresholds), "none": tuple(None for _ in thresholds)}
            measured = {key: [] for key in variants}
            for _ in range(args.n_batches):
                batch = inputs[rng.choice(len(inputs), n, replace=False)]
                for key in rng.permutation(list(variants)):  # interleaved, in a random order: no variant is
                    measured[key].append(_measure(net, calibration, batch, variants[key]))  # favoured
            exits = ",".join(str(b) for b in plan.for_size(n).exits) or "none"
            means = {}
            for key, variant in variants.items():
                predicted_ms = predict_batch(costs, calibration, variant, n)[0]
                means[key] = float(np.mean(measured[key]))
                print(f"{name:<16}{n:>6}  {exits:<8}{key:<8}{predicted_ms:>13.3f}{means[key]:>13.3f}"
                      f"{(predicted_ms - means[key]) / means[key] * 100:>7.1f}%")
            summary.append((name, n, exits, means["chosen"] / means["all"], means["chosen"] / means["none"]))
    print(f"\n{'thresholds':<16}{'batch':>6}  {'chosen':<8}{'chosen/all':>11}{'chosen/none':>12}  (measured)")
    for name, n, exits, vs_all, vs_none in summary:
        print(f"{name:<16}{n:>6}  {exits:<8}{vs_all:>10.2f}x{vs_none:>11.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
