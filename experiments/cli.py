"""``popex experiment NAME [--quick]``: one command per experiment.

Each experiment writes CSV + PNG into ``<out>/<NAME>/`` and replaces its own
``## <NAME>`` section of ``docs/results.md``. ``--quick`` is the CI version
(a minute or two); without it the full version runs (its run time is
printed and written into the docs). Modules are imported when their
experiment runs, so ``popex --help`` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["EXPERIMENTS", "ExperimentEntry", "add_experiment_parser"]


def _run(args: argparse.Namespace) -> int:
    entry = EXPERIMENTS[args.experiment]
    module = importlib.import_module(entry.module)
    config_class = getattr(module, entry.config_class)
    config = config_class.quick_config() if args.quick else config_class()
    if args.mode != "auto" and entry.uses_services:
        config = dataclasses.replace(config, testbed=dataclasses.replace(config.testbed, mode=args.mode))
    docs_path = args.docs if args.update_docs else None
    _, info = getattr(module, entry.run_function)(config, out_root=args.out, docs_path=docs_path,
                                                  progress=not args.no_progress and sys.stderr.isatty())
    print(info.text())
    for path in info.files:
        print(f"wrote {path}")
    if docs_path is not None:
        print(f"updated the '## {args.experiment}' section of {docs_path}")
    return 0


@dataclass(frozen=True)
class ExperimentEntry:
    """Where an experiment lives: its module, config class and run function."""

    module: str
    config_class: str
    run_function: str
    help: str
    uses_services: bool = True


EXPERIMENTS: dict[str, ExperimentEntry] = {
    "latency-vs-uplink": ExperimentEntry(
        "experiments.latency_uplink", "LatencyUplinkConfig", "run_latency_vs_uplink",
        "latency and accuracy vs uplink rate (0.5-100 Mbit/s), POPEX vs baselines, predicted and measured"),
    "accuracy-vs-deadline": ExperimentEntry(
        "experiments.deadline_accuracy", "DeadlineAccuracyConfig", "run_accuracy_vs_deadline",
        "accuracy vs latency requirement per policy at the Sao Paulo, Fremont and Paris links"),
    "threshold-sweep": ExperimentEntry(
        "experiments.threshold_sweep", "ThresholdSweepConfig", "run_threshold_sweep",
        "offloading probability and accuracy vs exit threshold 0.7-0.9 (calibration and test images)",
        uses_services=False),
    "rate-limit": ExperimentEntry("experiments.rate_limit", "RateLimitConfig", "run_rate_limit", "loss vs token rate and bucket depth per policy (iid/correlated, periodic/bursty)", uses_services=False),
    "prediction-error": ExperimentEntry(
        "experiments.prediction_error", "PredictionErrorConfig", "run_prediction_error",
        "measured vs predicted mean latency per strategy on the shaped link"),
    "adaptation": ExperimentEntry(
        "experiments.adaptation", "AdaptationConfig", "run_adaptation",
        "a bandwidth trace replayed on the shaped link: uplink estimate, split and latency over time"),
    "three-tier": ExperimentEntry("experiments.three_tier", "ThreeTierConfig", "run_three_tier", "device -> edge -> cloud plans run for real per device link rate and policy, predicted vs measured", uses_services=False),
}


def add_experiment_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``popex experiment`` and its experiments (also ``distortion``, where its module exists)."""
    from experiments.report import DEFAULT_DOCS_PATH, DEFAULT_OUT_ROOT

    parser = subparsers.add_parser("experiment", help="run one experiment: CSV + PNG in results/, a section of "
                                                      "docs/results.md")
    names = parser.add_subparsers(dest="experiment", required=True, metavar="NAME")
    for name, entry in EXPERIMENTS.items():
        p = names.add_parser(name, help=entry.help, description=entry.help)
        p.add_argument("--quick", action="store_true", help="the CI version: fewer points and images")
        p.add_argument("--out", type=Path, default=DEFAULT_OUT_ROOT, help="results root (default: results/)")
        p.add_argument("--update-docs", action="store_true",
                       help="also rewrite this experiment's section of the results document (default: only results/)")
        p.add_argument("--docs", type=Path, default=DEFAULT_DOCS_PATH, help="the results document --update-docs "
                                                                            "rewrites (default: docs/results.md)")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        if entry.uses_services:
            p.add_argument("--mode", choices=("auto", "netns", "emulation"), default="auto",
                           help="the link: kernel tbf in a network namespace (root), the edge's link emulation, "
                                "or auto (netns where possible)")
        else:
            p.set_defaults(mode="auto")
        p.set_defaults(run=_run)
    try:  # another experiment module registers itself the same way
        from experiments.distortion import add_distortion_experiment_parser
    except ImportError as err:  # pragma: no cover - only while that module is missing
        print(f"note: the distortion experiment is unavailable ({err})", file=sys.stderr)
    else:
        add_distortion_experiment_parser(names)
    return parser
