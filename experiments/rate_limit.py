"""``popex experiment rate-limit``: loss vs the token rate r and vs the bucket depth b, every policy.

The shape of the rate-limit seed's figures: for i.i.d. and location-reset
(correlated) sequences, periodic and Markov-modulated (bursty) arrivals, the
average loss of weak-only, strong-only, the baseline, the lower bound and the
MDP policy, (a) against r at a fixed b and (b) against b at a fixed r, on two
metric files of the seed's schema: the default model's (its best local exit
vs its final exit on the calibration split, ``popex ratelimit metric``) and a
synthetic weak/strong pair (:func:`popex.ratelimit.data.synthetic_metric_data`).
The learned policy needs a training run per (r, b) and is left to
``popex ratelimit train`` / ``simulate --policies ...,learned``.

Writes ``results/rate-limit/{loss.csv, rate_limit.png}`` and the
``## rate-limit`` section of ``docs/results.md``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from experiments.report import (DEFAULT_DOCS_PATH, DEFAULT_OUT_ROOT, REPO_ROOT, RunInfo, load_sample,
                                markdown_table, publish_figure, pyplot, relative, replace_docs_section, write_csv)
from popex.ratelimit.data import MetricData, synthetic_metric_data
from popex.ratelimit.simulate import simulate

__all__ = ["NAME", "RateLimitConfig", "LossPoint", "run_rate_limit"]

NAME = "rate-limit"
_POLICIES = ("weak", "strong", "baseline", "lower-bound", "mdp")
_SCENARIOS = (("iid", "periodic"), ("locreset", "periodic"), ("iid", "mmpp"), ("locreset", "mmpp"))


@dataclass(frozen=True)
class RateLimitConfig:
    """Settings of the experiment; :meth:`quick_config` is the CI version."""

    model_dir: Path = REPO_ROOT / "models" / "b-alexnet"  # the model docs/ratelimit.md reports on
    rates: tuple[float, ...] = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)
    depths: tuple[float, ...] = (1, 2, 4, 8, 16)
    fixed_depth: float = 2.0
    fixed_rate: float = 0.25
    seq_len: int = 100_000
    n_synthetic_images: int = 20_000
    seed: int = 0
    quick: bool = False

    @classmethod
    def quick_config(cls) -> RateLimitConfig:
        """Three rates, two depths, short sequences."""
        return cls(rates=(0.1, 0.25, 0.5), depths=(1, 4), seq_len=5000, n_synthetic_images=4000, quick=True)


@dataclass(frozen=True)
class LossPoint:
    """One policy's loss at one (r, b) on one dataset and scenario."""

    dataset: str
    sequence: str
    arrivals: str
    sweep: str
    rate: float
    depth: float
    policy: str
    loss: float
    offload_rate: float


def _datasets(config: RateLimitConfig) -> dict[str, MetricData]:
    from popex.ratelimit.model_metric import model_metric_data

    return {"default-model": model_metric_data(config.model_dir, seed=config.seed).data,
            "synthetic": synthetic_metric_data(n_images=config.n_synthetic_images, seed=config.seed)}


def _plot(points: list[LossPoint], png: Path) -> None:
    plt = pyplot()
    datasets = list(dict.fromkeys(p.dataset for p in points))
    columns = [(d, s) for d in datasets for s in ("rate", "depth")]
    fig, axes = plt.subplots(len(_SCENARIOS), len(columns), figsize=(4 * len(columns), 3 * len(_SCENARIOS)),
                             squeeze=False)
    for row, (sequence, arrivals) in enumerate(_SCENARIOS):
        for col, (dataset, sweep) in enumerate(columns):
            ax = axes[row][col]
            for policy in _POLICIES:
                chosen = [p for p in points if (p.dataset, p.sequence, p.arrivals, p.sweep, p.policy)
                          == (dataset, sequence, arrivals, sweep, policy)]
                xs = [p.rate if sweep == "rate" else p.depth for p in chosen]
                ax.plot(xs, [p.loss for p in chosen], marker="o", markersize=3, label=policy)
            ax.set_title(f"{dataset}: {sequence}, {arrivals}", fontsize=9)
            ax.set_xlabel("r (tokens/slot)" if sweep == "rate" else "b (tokens)")
            ax.set_ylabel("average loss")
            if sweep == "depth":
                ax.set_xscale("log", base=2)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)
    plt.close(fig)


def _summary(points: list[LossPoint], config: RateLimitConfig, info: RunInfo, figure: Path, docs: Path) -> str:
    rows = []
    for dataset in dict.fromkeys(p.dataset for p in points):
        for sequence, arrivals in _SCENARIOS:
            at = {p.policy: p for p in points if (p.dataset, p.sequence, p.arrivals, p.sweep) ==
                  (dataset, sequence, arrivals, "rate") and p.rate == config.fixed_rate}
            if len(at) == len(_POLICIES):
                rows.append([dataset, sequence, arrivals] + [f"{at[name].loss:.4f}" for name in _POLICIES])
    table = markdown_table(["data", "sequence", "arrivals", *_POLICIES], rows)
    return (f"Average loss (mean local cost minus offloaded reward per image) at r = {config.fixed_rate} tokens "
            f"per slot, b = {config.fixed_depth} tokens, {config.seq_len:,} images per sequence:\n\n{table}\n\n"
            f"![loss vs r and b]({relative(figure, docs.parent)})\n\n{info.text()}")


def run_rate_limit(config: RateLimitConfig, *, out_root: Path = DEFAULT_OUT_ROOT,
                   docs_path: Path | None = DEFAULT_DOCS_PATH, progress: bool = True) -> tuple[list[LossPoint], RunInfo]:
    """Run both sweeps on both metric files; write CSV, PNG and the docs section."""
    started_s = time.monotonic()
    load_before = load_sample()
    out_dir = Path(out_root) / NAME
    datasets = _datasets(config)
    jobs = [(d, s, a, "rate", r, config.fixed_depth) for d in datasets for s, a in _SCENARIOS for r in config.rates]
    jobs += [(d, s, a, "depth", config.fixed_rate, b) for d in datasets for s, a in _SCENARIOS for b in config.depths]
    points: list[LossPoint] = []
    for dataset, sequence, arrivals, sweep, rate, depth in tqdm(jobs, desc=NAME, file=sys.stderr,
                                                                 disable=not progress):
        report = simulate(datasets[dataset], rate=rate, depth=depth, sequence=sequence, arrivals=arrivals,
                          seq_len=config.seq_len, seed=config.seed, policies=_POLICIES)
        points += [LossPoint(dataset=dataset, sequence=sequence, arrivals=arrivals, sweep=sweep, rate=rate,
                             depth=depth, policy=name, loss=result.loss, offload_rate=result.offload_rate)
                   for name, result in report.policies.items()]
    csv_path = write_csv(out_dir / "loss.csv", points)
    png = out_dir / "rate_limit.png"
    _plot(points, png)
    info = RunInfo(name=NAME, quick=config.quick, run_time_s=time.monotonic() - started_s, mode="offline",
                   link_note="simulation, no services", load_before=load_before, load_after=load_sample(),
                   files=(csv_path, png))
    if docs_path is not None:
        figure = publish_figure(png, Path(docs_path))
        replace_docs_section(Path(docs_path), f"## {NAME}", _summary(points, config, info, figure, Path(docs_path)))
    return points, info
