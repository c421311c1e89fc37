"""``popex experiment prediction-error``: measured vs predicted mean latency, strategy by strategy.

On the shaped link (:mod:`popex.testbed.harness`), the real edge is made
to use a set of distinct strategies through policies and requirements: the
fixed baselines (edge-only, cloud-only, Neurosurgeon), Edgent, and POPEX at
requirements just above each point of the predicted accuracy/latency front
(so that each front strategy is chosen). Every request records the
strategy the edge actually used; for each strategy the measured mean
latency is compared with the latency model's E[T] for that strategy at the
true link (:class:`~experiments.planning.Predictor`, on the profile the
edge measured at start-up). The edge's own prediction (its plan, its link
estimate) is reported beside it.

Two passes, each with its own edge: one planning with the ``tail``
objective (a request's budget, its requirement, covers its worst case, so
the fallback does not clip the latencies compared; the fixed baselines get
an ample budget), over several rates; and one planning with the ``mean``
objective at a slow link, where the front is many edge strategies with
different exit rates (and Edgent's right-sized networks), so the
reach-probability weighting of the model is tested too.

Writes ``results/prediction-error/{prediction_error.csv, requests.csv,
prediction_error.png}`` and the ``## prediction-error`` section of
``docs/results.md``.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from popex.decision import Link
from experiments.planning import Predictor
from experiments.policy_runs import AMPLE_BUDGET_MS, refresh_edge
from experiments.report import (DEFAULT_DOCS_PATH, DEFAULT_OUT_ROOT, RunInfo, load_sample, markdown_table,
                                      publish_figure, pyplot, relative, replace_docs_section, write_csv)
from popex.testbed.harness import Testbed, TestbedConfig, load_images

__all__ = ["NAME", "TARGET_ERROR_FRACTION", "PredictionErrorConfig", "StrategyError", "front_requirements",
           "run_prediction_error"]

NAME = "prediction-error"
#: Acceptance: the median |measured − predicted| / measured over strategies.
TARGET_ERROR_FRACTION = 0.10
_N_WARMUP = 10
_FIXED = ("edge-only", "cloud-only", "neurosurgeon")


def _plot(errors: list[StrategyError], path: Path, mode: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    links = sorted({e.uplink_mbps for e in errors})
    markers = dict(zip(links, "osD^v"))
    top = max(max(e.measured_mean_latency_ms, e.predicted_mean_latency_ms) for e in errors) * 1.1
    ax.plot([0, top], [0, top], "k-", linewidth=0.8, label="measured = predicted")
    ax.fill_between([0, top], [0, top / 1.1], [0, top / 0.9], color="grey", alpha=0.15, label="±10%")
    for e in errors:
        ax.plot(e.predicted_mean_latency_ms, e.measured_mean_latency_ms, markers[e.uplink_mbps],
                color="tab:blue" if e.offload_share > 0 else "tab:green")
    for link in links:
        ax.plot([], [], markers[link], color="grey", label=f"{link:g} Mbit/s")
    ax.plot([], [], "s", color="tab:blue", label="offloads")
    ax.plot([], [], "s", color="tab:green", label="edge only")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("predicted mean latency (ms)")
    ax.set_ylabel("measured mean latency (ms)")
    median = float(np.median([e.error_fraction for e in errors]))
    ax.set_title(f"Per strategy: median error {100 * median:.1f}% (link: {mode})")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _summary(errors: list[StrategyError], info: RunInfo, config: PredictionErrorConfig, png: Path,
             docs_path: Path, source: str) -> str:
    median = float(np.median([e.error_fraction for e in errors]))
    edge_median = float(np.median([e.edge_error_fraction for e in errors]))
    verdict = "meets" if median <= TARGET_ERROR_FRACTION else "MISSES"
    table = markdown_table(
        ["edge objective", "Mbit/s", "strategy", "policies", "n", "measured ms", "predicted ms", "error",
         "edge's prediction", "offload meas./pred.", "fallback"],
        [[e.objective, f"{e.uplink_mbps:g}", e.strategy, e.policies, e.n_requests, f"{e.measured_mean_latency_ms:.1f}",
          f"{e.predicted_mean_latency_ms:.1f}", f"{100 * e.error_fraction:.1f}%",
          f"{e.edge_predicted_ms:.1f} ({100 * e.edge_error_fraction:.0f}%)",
          f"{100 * e.offload_share:.0f}% / {100 * e.predicted_offload_prob:.0f}%", f"{100 * e.fallback_share:.0f}%"]
         for e in errors])
    return "\n".join([
        f"![prediction error]({relative(png, docs_path.parent)})",
        "",
        info.text(),
        f"**Median |measured − predicted| / measured over {len(errors)} strategies: {100 * median:.1f}%** "
        f"({verdict} the {100 * TARGET_ERROR_FRACTION:.0f}% target). Predicted: E[T] of the strategy the edge used, "
        f"from the latency model on the profile the edge measured at start-up (edge stages {config.testbed.edge_slowdown:g}x "
        f"this machine's, measured cloud stages, measured O), at the true link (RTT {config.rtt_ms:g} ms). The "
        f"edge's own prediction (its current plan: its link estimate, its running O) has a median error of "
        f"{100 * edge_median:.1f}%. {config.n_images} test images ({source}) per policy and requirement. Two "
        "passes, each with its own edge: planning with the tail objective at "
        f"{', '.join(f'{u:g}' for u in config.links_mbps)} Mbit/s (baselines, Edgent, POPEX on its front), and with "
        f"the mean objective at {', '.join(f'{u:g}' for u in config.mean_links_mbps) or '-'} Mbit/s (Edgent's "
        "right-sized networks and POPEX's edge strategies with different exit rates).",
        "",
        table,
    ])


def _strategy_error(predictor: Predictor, link: Link, objective: str, strategy: str,
                    group: list[dict[str, Any]]) -> StrategyError:
    predicted = predictor.strategy(group[0]["split"], group[0]["thresholds"], link=link)
    measured_ms = float(np.mean([r["latency_ms"] for r in group]))
    edge_ms = float(np.mean([r["edge_predicted_ms"] for r in group]))
    return StrategyError(
        objective=objective, uplink_mbps=link.uplink_mbps, rtt_ms=link.rtt_ms, strategy=strategy,
        policies=",".join(sorted({r["policy"] for r in group})), n_requests=len(group),
        measured_mean_latency_ms=measured_ms, predicted_mean_latency_ms=predicted.expected_latency_ms,
        error_fraction=abs(measured_ms - predicted.expected_latency_ms) / measured_ms,
        edge_predicted_ms=edge_ms, edge_error_fraction=abs(measured_ms - edge_ms) / measured_ms,
        offload_share=float(np.mean([r["where"] == "cloud" or r["fallback"] for r in group])),
        predicted_offload_prob=predicted.offload_prob,
        fallback_share=float(np.mean([r["fallback"] for r in group])))


@dataclass(frozen=True)
class PredictionErrorConfig:
    """Settings of the experiment; :meth:`quick_config` is the CI version.

    Attributes
    ----------
    links_mbps : tuple of float
        Uplink rates of the tail pass, Mbit/s (one after the other on the same testbed).
    mean_links_mbps : tuple of float
        Uplink rates of the mean pass (empty: no mean pass).
    rtt_ms : float
    n_front_requirements : int
        POPEX requirements per link, placed just above front points.
    n_mean_front_requirements : int
        The same in the mean pass.
    requirement_margin_fraction : float
        Each requirement is the front point's worst-case latency times (1 + this).
    edgent_deadlines_ms : tuple of float
        Requirements Edgent is run at in the tail pass.
    mean_edgent_deadlines_ms : tuple of float
        Requirements Edgent is run at in the mean pass (different exit points).
    n_images : int
        Test images per (policy, requirement).
    estimate_timeout_s : float
    seed : int
    quick : bool
    testbed : TestbedConfig
    """

    links_mbps: tuple[float, ...] = (2.0, 8.0, 30.0)
    mean_links_mbps: tuple[float, ...] = (1.0,)
    rtt_ms: float = 20.0
    n_front_requirements: int = 4
    n_mean_front_requirements: int = 6
    requirement_margin_fraction: float = 0.08
    edgent_deadlines_ms: tuple[float, ...] = (60.0, 1000.0)
    mean_edgent_deadlines_ms: tuple[float, ...] = (40.0, 50.0)
    n_images: int = 80
    estimate_timeout_s: float = 30.0
    seed: int = 3
    quick: bool = False
    testbed: TestbedConfig = field(default_factory=lambda: TestbedConfig(edge_slowdown=50.0, objective="tail",
                                                                         probe_interval_s=2.0))

    @classmethod
    def quick_config(cls) -> PredictionErrorConfig:
        """One link per pass, two (tail) and one (mean) POPEX requirements, 15 images per run."""
        return cls(links_mbps=(8.0,), n_front_requirements=2, n_mean_front_requirements=1, edgent_deadlines_ms=(60.0,),
                   mean_edgent_deadlines_ms=(40.0,), n_images=15, estimate_timeout_s=10.0, quick=True)


@dataclass(frozen=True)
class StrategyError:
    """One strategy on one link: measured vs predicted mean latency."""

    objective: str
    uplink_mbps: float
    rtt_ms: float
    strategy: str
    policies: str
    n_requests: int
    measured_mean_latency_ms: float
    predicted_mean_latency_ms: float
    error_fraction: float
    edge_predicted_ms: float
    edge_error_fraction: float
    offload_share: float
    predicted_offload_prob: float
    fallback_share: float


def front_requirements(predictor: Predictor, link: Link, *, n_requirements: int, margin_fraction: float,
                       objective: str = "tail") -> list[float]:
    """Requirements (ms) just above ``n_requirements`` points of the ``objective`` front, spread over it.

    Each is a front row's latency (E[T] or worst case) times ``1 + margin_fraction``;
    the slowest front point is always included.
    """
    table = predictor.table(link)
    front = table.pareto_front(objective)
    picks = np.unique(np.linspace(0, len(front) - 1, min(n_requirements, len(front))).round().astype(int))
    if n_requirements == 1:
        picks = np.array([len(front) - 1])
    latency_ms = table.latency_ms(objective)
    return [float(latency_ms[front[i]] * (1.0 + margin_fraction)) for i in picks]


def run_prediction_error(config: PredictionErrorConfig, *, out_root: Path = DEFAULT_OUT_ROOT,
                         docs_path: Path | None = DEFAULT_DOCS_PATH, progress: bool = True
                         ) -> tuple[list[StrategyError], RunInfo]:
    """Run the experiment; write CSVs, PNG and the docs section; return the per-strategy errors and the run's info.

    Raises
    ------
    ServiceError
        If a service fails to start or answers an error.
    """
    started_s = time.monotonic()
    load_before = load_sample()
    out_dir = Path(out_root) / NAME
    images = load_images(config.n_images, seed=config.seed)
    testbed_config = replace(config.testbed, rtt_ms=config.rtt_ms)
    records: list[dict[str, Any]] = []
    errors: list[StrategyError] = []
    passes = [("tail", config.links_mbps, config.n_front_requirements, config.edgent_deadlines_ms, _FIXED),
              ("mean", config.mean_links_mbps, config.n_mean_front_requirements, config.mean_edgent_deadlines_ms, ())]
    mode, link_note = "", ""
    for objective, links_mbps, n_requirements, edgent_deadlines_ms, fixed in passes:
        if not links_mbps:
            continue
        testbed_config = replace(config.testbed, rtt_ms=config.rtt_ms, objective=objective)
        with Testbed(testbed_config, out_dir / f"run-{objective}") as testbed:
            testbed.stream(images.head(_N_WARMUP), policy="cloud-only", deadline_ms=AMPLE_BUDGET_MS,
                           desc="warm-up", progress=False)
            predictor = Predictor.from_model_dir(testbed_config.model_dir, testbed.profile(),
                                                 headroom_fraction=testbed_config.plan_headroom_fraction)
            for uplink_mbps in tqdm(links_mbps, desc=f"{NAME} ({objective})", file=sys.stderr,
                                    disable=not progress):
                link = Link(uplink_mbps=uplink_mbps, rtt_ms=config.rtt_ms)
                testbed.set_link(uplink_mbps=uplink_mbps)
                refresh_edge(testbed, images, estimate_timeout_s=config.estimate_timeout_s)
                runs = [(policy, AMPLE_BUDGET_MS) for policy in fixed]
                runs += [("edgent", d) for d in edgent_deadlines_ms]
                runs += [("adaptive", d) for d in front_requirements(
                    predictor, link, n_requirements=n_requirements,
                    margin_fraction=config.requirement_margin_fraction, objective=objective)]
                by_strategy: dict[str, list[dict[str, Any]]] = defaultdict(list)
                for policy, deadline_ms in runs:
                    batch = testbed.stream(images, policy=policy, deadline_ms=deadline_ms,
                                           desc=f"{uplink_mbps:g} Mbit/s {policy} {deadline_ms:g} ms",
                                           progress=progress)
                    for record in batch:
                        by_strategy[record["strategy"]].append(record)
                    records += [{"edge_objective": objective, "uplink_mbps": uplink_mbps, **record}
                                for record in batch]
                for strategy, group in sorted(by_strategy.items()):
                    errors.append(_strategy_error(predictor, link, objective, strategy, group))
            mode, link_note = testbed.mode, testbed.link_note
    csv_path = write_csv(out_dir / "prediction_error.csv", errors)
    requests_path = write_csv(out_dir / "requests.csv", records)
    png = out_dir / "prediction_error.png"
    _plot(errors, png, mode)
    info = RunInfo(name=NAME, quick=config.quick, run_time_s=time.monotonic() - started_s, mode=mode,
                   link_note=link_note, load_before=load_before, load_after=load_sample(),
                   files=(csv_path, requests_path, png))
    if docs_path is not None:
        figure = publish_figure(png, Path(docs_path))
        replace_docs_section(Path(docs_path), f"## {NAME}",
                             _summary(errors, info, config, figure, Path(docs_path), images.source))
    return errors, info
