"""The ``popex`` command: train, profile, plan.

Every subcommand parses its arguments, calls one popex function and prints;
a PopexError becomes one line on stderr and exit status 2, never a traceback.

Only the chosen subcommand's options are registered, and only then is its
module imported: ``popex --help`` lists the subcommands from the table
below without importing torch, numpy or the experiment runners.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from popex.errors import PopexError, ProfileError

__all__ = ["OFFLINE_CLOUD_SPEEDUP", "main"]

#: How much faster than this machine ``popex profile`` and ``popex plan``
#: assume the cloud to be while no cloud profile exists: offline planning
#: pictures a datacentre CPU. The edge service's ``cloud_speedup``
#: (``configs/edge.yaml``) is a different assumption, its fallback until it
#: has profiled the real cloud, and has its own default there.
OFFLINE_CLOUD_SPEEDUP = 4.0
_CLOUD_SPEEDUP_HELP = ("assumed cloud speed relative to this machine while no cloud profile exists (default "
                       "%(default)g, an offline planning assumption: a datacentre CPU; the edge service's own "
                       "fallback is its cloud_speedup setting in configs/edge.yaml)")


def _cmd_train(args: argparse.Namespace) -> int:
    from popex.nets.recipe import TrainRecipe, train_model_dir
    from popex.nets.train import TrainConfig

    from popex.data.idx import DEFAULT_FASHION_MNIST_ROOT
    from popex.errors import ConfigError

    if args.data_root is None and args.dataset != "fashion-mnist":
        raise ConfigError(f"--dataset {args.dataset} needs --data-root (the folder of its files)")
    blocks = None
    if args.blocks is not None:
        try:
            blocks = tuple(int(b) for b in args.blocks.split(","))
        except ValueError as err:
            raise ConfigError(f"--blocks must be comma-separated integers, e.g. 2,2,2,2; got {args.blocks!r}") from err
    exit_fractions = None
    if args.exit_fractions is not None:
        try:
            exit_fractions = tuple(float(f) for f in args.exit_fractions.split(","))
        except ValueError as err:
            raise ConfigError(f"--exit-fractions must be comma-separated numbers, e.g. 0.25,0.5,0.75; "
                              f"got {args.exit_fractions!r}") from err
    recipe = TrainRecipe(
        arch=args.arch,
        width=args.width if args.width is not None else (0.5 if args.arch == "b-alexnet" else 1.0),
        data_root=args.data_root or DEFAULT_FASHION_MNIST_ROOT,
        val_fraction=args.val_fraction,
        confidence_method=args.confidence,
        train=TrainConfig(n_epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
                          seed=args.seed, n_threads=args.threads),
        dataset=args.dataset,
        max_train_images=args.max_train_images,
        image_size=args.image_size,
        blocks=blocks,
        depth=args.depth,
        bottleneck=args.bottleneck,
        exit_fractions=exit_fractions,
    )
    model_id = train_model_dir(args.out, recipe, progress=not args.quiet and sys.stderr.isatty())  # no \r noise in logs
    print(f"model {model_id} written to {args.out} (see {args.out}/MODEL_CARD.md)")
    return 0


def _add_train(subparsers: argparse._SubParsersAction) -> None:
    from popex.data.idx import DEFAULT_FASHION_MNIST_ROOT
    from popex.nets.recipe import DATASETS
    from popex.nets.zoo import ZOO

    p = subparsers.add_parser("train", help=_SUBCOMMANDS["train"].help)
    p.add_argument("--arch", choices=sorted(ZOO), default="b-alexnet")
    p.add_argument("--width", type=float, default=None,
                   help="channel multiplier of any architecture (default 0.5 for b-alexnet, else 1.0; "
                        "b-resnet: 16 x width channels in its first layer)")
    p.add_argument("--blocks", help="b-resnet: residual blocks per layer, comma-separated (default 2,2,2,2)")
    p.add_argument("--depth", type=float, default=None,
                   help="b-mobilenetv2: multiplier of each inverted-residual group's repeats (default 1)")
    p.add_argument("--bottleneck", type=int, default=None,
                   help="b-resnet: a stride-4 stem ending in this many channels, so that a cut after it ships less "
                        "than the input (split computing); the layers then start at 1/4 of the input side")
    p.add_argument("--exit-fractions", default=None,
                   help="b-resnet, b-mobilenetv2: place the branches at these shares of the compute, e.g. "
                        "0.25,0.5,0.75 (default: b-resnet after each layer, b-mobilenetv2 0.25,0.5,0.75)")
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument("--dataset", choices=DATASETS, default="fashion-mnist",
                   help="fashion-mnist: IDX files; cifar10: the binary batches; imagefolder: DIR/train/<class>/ "
                        "and DIR/test/<class>/ (or DIR/<class>/, 1/6 held out as test)")
    p.add_argument("--data-root", default=None,
                   help=f"folder of the dataset (default for fashion-mnist: {DEFAULT_FASHION_MNIST_ROOT})")
    p.add_argument("--max-train-images", type=int, default=None,
                   help="train on a seeded random subset of this many images (default: all)")
    p.add_argument("--image-size", type=int, default=None,
                   help="input side in pixels; images are resized (default: the dataset's size)")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--confidence", choices=("max_softmax", "entropy"), default="max_softmax")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_cmd_train)


def measure_profile(model_dir: str, *, n_repeats: int, n_warmup: int, n_threads: int | None,
                     cloud_speedup: float, offload_overhead_ms: float,
                     edge_slowdown: float = 1.0) -> tuple[object, object, str]:
    """Measure the edge here; the cloud is an assumption until a cloud profile exists.

    With ``edge_slowdown`` the edge is emulated as the edge service's
    ``emulate_edge_slowdown`` does (each measured time that many times
    longer) while the cloud stays this machine's speed over ``cloud_speedup``:
    the profile an emulated edge plans with, for ``popex plan`` offline.
    """
    from popex.checks import check_finite
    from popex.runtime.model_files import load_model_dir
    from popex.runtime.profiler import build_profile, time_stages

    check_finite(edge_slowdown, name="--emulate-edge-slowdown", low=1.0, high=1000.0)
    model = load_model_dir(model_dir, n_threads=n_threads or 1)  # what the tiers run: ONNX Runtime
    timings = time_stages(model.net, n_warmup=n_warmup, n_repeats=n_repeats, n_threads=n_threads,
                          progress=sys.stderr.isatty())
    if edge_slowdown == 1.0:
        profile = build_profile(timings, branch_after_stage=model.net.branch_after_stage,
                                offload_overhead_ms=offload_overhead_ms, cloud_speedup=cloud_speedup)
        edge_text = "edge times measured on this machine"
        cloud_text = f"edge / {cloud_speedup:g}"
    else:
        cloud_stage_ms = timings.stage_ms / cloud_speedup  # this machine's, before the edge's emulation
        timings = timings.scaled(edge_slowdown)
        profile = build_profile(timings, branch_after_stage=model.net.branch_after_stage,
                                cloud_stage_ms=cloud_stage_ms,
                                offload_overhead_ms=offload_overhead_ms, cloud_speedup=cloud_speedup)
        edge_text = f"edge emulated {edge_slowdown:g}x slower than this machine (times measured here x {edge_slowdown:g})"
        cloud_text = f"this machine's times / {cloud_speedup:g}"
    note = (f"{edge_text} ({timings.n_repeats} repeats, {timings.n_threads} threads); "
            f"cloud times ASSUMED = {cloud_text} (no cloud profile); "
            f"offload overhead O = {offload_overhead_ms:g} ms (config value)")
    return profile, timings, note


def _cmd_profile(args: argparse.Namespace) -> int:
    from popex.runtime.profiler import plot_profile, save_profile

    # Under results/ unless --out says otherwise: a model directory (tracked files) is never rewritten by default.
    out_dir = args.out or os.path.join("results", "profile", os.path.basename(os.path.abspath(args.model)))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):  # before the minutes of measuring
        raise ProfileError(f"--out {out_dir} is a file; give a directory (profile.json and profile.png go in it)")
    profile, timings, note = measure_profile(args.model, n_repeats=args.repeats, n_warmup=args.warmup,
                                              n_threads=args.threads, cloud_speedup=args.cloud_speedup,
                                              offload_overhead_ms=args.offload_overhead_ms,
                                              edge_slowdown=args.emulate_edge_slowdown)
    batch_timings = None
    if args.max_batch_size > 1:  # the inference time matrix of the batch-aware plan (popex batch-plan)
        from popex.runtime.batch_profile import batch_sizes_up_to, time_batches
        from popex.runtime.model_files import load_model_dir

        batch_timings = time_batches(load_model_dir(args.model, n_threads=args.threads).net,
                                     batch_sizes=batch_sizes_up_to(args.max_batch_size), progress=sys.stderr.isatty())
    paths = save_profile(profile, out_dir, timings=timings, note=note, batch_timings=batch_timings)
    png = plot_profile(profile, f"{out_dir}/profile.png", title=f"Profile of {args.model}")
    print(note)
    print(f"{'stage':<14}{'edge_ms':>10}{'spread_ms':>11}{'cloud_ms':>10}{'out_bytes':>11}")
    for i, name in enumerate(profile.stage_names):
        print(f"{name:<14}{profile.stage_edge_ms[i]:>10.3f}{timings.stage_spread_ms[i]:>11.3f}"
              f"{profile.stage_cloud_ms[i]:>10.3f}{int(profile.split_bytes[i + 1]):>11}")
    for b, k in enumerate(profile.branch_after_stage):
        print(f"{f'branch{b}@{k}':<14}{profile.branch_edge_ms[b]:>10.3f}{timings.branch_spread_ms[b]:>11.3f}")
    print(f"wrote {paths['json']}, {paths['csv']}, {png}")
    return 0


def _add_profile(subparsers: argparse._SubParsersAction) -> None:
    from popex.runtime.profiler import DEFAULT_OFFLOAD_OVERHEAD_MS

    p = subparsers.add_parser("profile", help=_SUBCOMMANDS["profile"].help)
    p.add_argument("--model", required=True, help="model directory (ONNX form, or spec.json + weights.safetensors)")
    p.add_argument("--out", help="output directory (default: results/profile/<model directory name>; give the "
                                 "model directory to update its profile.json)")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=1,
                   help="ONNX Runtime threads while timing (default 1: batch-1 inference of a small network is fastest "
                        "and steadiest on one thread, as the services run it)")
    p.add_argument("--cloud-speedup", type=float, default=OFFLINE_CLOUD_SPEEDUP, help=_CLOUD_SPEEDUP_HELP)
    p.add_argument("--offload-overhead-ms", type=float, default=DEFAULT_OFFLOAD_OVERHEAD_MS)
    p.add_argument("--emulate-edge-slowdown", type=float, default=1.0,
                   help="the edge as an emulated device this many times slower than this machine (as the edge "
                        "service's emulate_edge_slowdown); the cloud stays this machine / --cloud-speedup")
    p.add_argument("--max-batch-size", type=int, default=1,
                   help="also time every stage at batch sizes 1, 2, 4, ..., N (profile.json's \"batch\", for "
                        "popex batch-plan); default 1: batch 1 only")
    p.set_defaults(run=_cmd_profile)


def _cmd_plan(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from popex.runtime.profiler import load_profile
    from popex.decision import DecisionIndex, Link, Planner, load_calibration, sweep_exit_stats
    from popex.decision.calibration import CALIBRATION_FILE

    assumptions = []
    profile_path = Path(args.profile) if args.profile else Path(args.model) / "profile.json"
    if profile_path.is_file():
        profile = load_profile(profile_path)
        note = json.loads(profile_path.read_text()).get("note")
        assumptions.append(f"profile from {profile_path}" + (f": {note}" if note else ""))
    elif args.profile:
        raise ProfileError(f"profile file {args.profile!r} not found")
    else:
        profile, _, note = measure_profile(args.model, n_repeats=20, n_warmup=5, n_threads=1,
                                            cloud_speedup=args.cloud_speedup,
                                            offload_overhead_ms=args.offload_overhead_ms)
        assumptions.append(f"no profile file: {note}")
    calibration = load_calibration(Path(args.model) / CALIBRATION_FILE)
    from popex.decision.policies import edge_threshold_grids

    thresholds = edge_threshold_grids(profile.n_branches)  # the grid the edge service sweeps
    if args.thresholds:
        grid = [float(v) for v in args.thresholds.split(",")]
        thresholds = [grid] * profile.n_branches
    stats = sweep_exit_stats(calibration, branch_after_stage=profile.branch_after_stage, thresholds=thresholds)
    table = Planner(stats, profile).table(Link(uplink_mbps=args.uplink_mbps, rtt_ms=args.rtt_ms))
    decision = DecisionIndex(table, objective=args.objective).lookup(args.deadline_ms)
    chosen = table.row(decision.row)
    if args.json:
        print(json.dumps({
            "chosen": chosen,
            "feasible": decision.feasible,
            "objective": args.objective,
            "deadline_ms": args.deadline_ms,
            "link": {"uplink_mbps": args.uplink_mbps, "rtt_ms": args.rtt_ms},
            "assumptions": assumptions,
            "profile": profile.to_dict(),
            "strategies": table.to_rows(),
        }))
        return 0
    for line in assumptions:
        print(f"note: {line}")
    column = "expected_latency_ms" if args.objective == "mean" else "worst_latency_ms"
    print(f"{len(table)} strategies; Pareto front (accuracy vs {column}) at {args.uplink_mbps:g} Mbit/s, "
          f"{args.rtt_ms:g} ms RTT:")
    print(f"  {'thresholds':<28}{'split':>6}{'accuracy':>10}{'E[T] ms':>10}{'worst ms':>10}{'p_off':>7}{'bytes':>9}")
    for index in table.pareto_front(args.objective):
        row = table.row(int(index))
        mark = "*" if index == decision.row else " "
        thresholds_text = ",".join("off" if t is None else f"{t:.2f}" for t in row["thresholds"]) or "-"
        print(f"{mark} {thresholds_text:<28}{row['split']:>6}{row['accuracy']:>10.4f}"
              f"{row['expected_latency_ms']:>10.2f}{row['worst_latency_ms']:>10.2f}"
              f"{row['offload_prob']:>7.2f}{row['bytes_sent']:>9.0f}")
    verdict = "meets" if decision.feasible else "CANNOT meet (fastest strategy shown)"
    print(f"chosen (*): split {chosen['split']}, thresholds {chosen['thresholds']}, accuracy "
          f"{chosen['accuracy']:.4f}, {column} {chosen[column]:.2f}: {verdict} the {args.deadline_ms:g} ms requirement")
    return 0


def _add_plan(subparsers: argparse._SubParsersAction) -> None:
    from popex.runtime.profiler import DEFAULT_OFFLOAD_OVERHEAD_MS

    p = subparsers.add_parser("plan", help=_SUBCOMMANDS["plan"].help)
    p.add_argument("--model", required=True, help="model directory (calibration.npz, optional profile.json)")
    p.add_argument("--uplink-mbps", type=float, required=True)
    p.add_argument("--rtt-ms", type=float, required=True)
    p.add_argument("--deadline-ms", type=float, required=True, help="latency requirement D")
    p.add_argument("--objective", choices=("mean", "tail"), default="mean")
    p.add_argument("--profile", help="profile.json (default: MODEL/profile.json, else measured here)")
    p.add_argument("--thresholds", help="comma-separated threshold grid for every branch (default: the edge's, 0 "
                                                "(every sample leaves) and 0.50..0.95)")
    p.add_argument("--cloud-speedup", type=float, default=OFFLINE_CLOUD_SPEEDUP,
                   help=_CLOUD_SPEEDUP_HELP.replace("while no cloud profile exists", "when no profile file exists"))
    p.add_argument("--offload-overhead-ms", type=float, default=DEFAULT_OFFLOAD_OVERHEAD_MS,
                   help="used when no profile file exists")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=_cmd_plan)


def _build_parser(command: str | None) -> argparse.ArgumentParser:
    """The parser, with ``command``'s options registered (its module imported) and the others as names only."""
    parser = argparse.ArgumentParser(prog="popex", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, entry in _SUBCOMMANDS.items():
        if name == command:
            entry.registrar()(subparsers)
        else:
            subparsers.add_parser(name, help=entry.help, add_help=False)
    return parser


@dataclass(frozen=True)
class _Subcommand:
    """One subcommand: its one-line help, and what registers its options (a function, or "module:function")."""

    help: str
    register: Callable[[argparse._SubParsersAction], object] | str

    def registrar(self) -> Callable[[argparse._SubParsersAction], object]:
        """The registering function, importing its module now."""
        if callable(self.register):
            return self.register
        module, function = self.register.split(":")
        return getattr(importlib.import_module(module), function)


# The help of a subcommand registered elsewhere must be the same as there (tests/test_cli.py checks).
_SUBCOMMANDS: dict[str, _Subcommand] = {
    "train": _Subcommand("train an early-exit network on Fashion-MNIST, CIFAR-10 or an image folder; write a model dir",
                         _add_train),
    "profile": _Subcommand("measure per-stage/branch time and bytes; write JSON, CSV, PNG", _add_profile),
    "plan": _Subcommand("strategy table and decision for a link and a latency requirement", _add_plan),
    "batch-plan": _Subcommand("batch-aware exits: per batch size, the branches worth running, and predicted "
                              "per-sample latency", "popex.decision.batch_plan_cli:add_batch_plan_parser"),
    "distort": _Subcommand("write a blurred or noisy copy of an IDX or ImageFolder dataset",
                           "popex.data.distort:add_distort_parser"),
    "train-experts": _Subcommand("add blur/noise expert heads and a distortion classifier to a trained model",
                                 "popex.nets.expert_recipe:add_train_experts_parser"),
    "calibrate": _Subcommand("measure a model's exits on labelled images (calibration.npz)",
                             "popex.runtime.calibrate:add_calibrate_parser"),
    "export": _Subcommand("export a spec model directory to ONNX (popex-onnx/1), checked by ORT",
                          "popex.nets.export_spec:add_export_parser"),
    "predict": _Subcommand("Scission-style prediction: the fastest device/edge/cloud configurations from benchmark files",
                           "popex.tiers.predict_cli:add_predict_parser"),
    "benchmark": _Subcommand("benchmark a model's stages on this machine into a popex-benchmark/1 file (+ per-block plot)",
                             "popex.tiers.benchmark_cli:add_benchmark_parser"),
    "ratelimit": _Subcommand("token-bucket offloads: simulate, train, metric", "popex.ratelimit.cli:add_ratelimit_parser"),
    "device": _Subcommand("the device tier: classify images through the edge, answering locally when it is late or down",
                          "popex.device.cli:add_device_parser"),
    "experiment": _Subcommand("run one experiment: CSV + PNG in results/, a section of docs/results.md",
                              "experiments.cli:add_experiment_parser"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``popex``.

    Parameters
    ----------
    argv : sequence of str, optional
        The arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        The exit status: 0, 2 on a PopexError (one line on stderr), 130 on Ctrl-C.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and argv[0] in _SUBCOMMANDS else None
    args = _build_parser(command).parse_args(argv)
    try:
        return args.run(args)
    except PopexError as err:
        print(f"popex {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"popex {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `popex plan --json | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
