"""``popex experiment accuracy-vs-deadline``: best accuracy under a latency requirement, per policy.

For the three city links of the distortion-robust early-exit paper
(``sao-paulo`` 93.6 Mbit/s / 10 ms, ``fremont`` 73.3 / 180, ``paris`` 60.0 /
216, from ``configs/links.yaml``), the accuracy each policy reaches at each
latency requirement:

- **predicted** from the strategy table (calibration accuracy; a policy
  that cannot meet the requirement has no accuracy there), on a fine grid
  of requirements;
- **measured** at a few requirements: the same test images through the
  real services over the shaped link (rate: tbf; RTT: the edge's link
  emulation, see :mod:`popex.testbed.harness`), with the policies run as
  in :mod:`experiments.policy_runs`.

Writes ``results/accuracy-vs-deadline/{accuracy_vs_deadline.csv,
predicted.csv, requests.csv, accuracy_vs_deadline.png}`` and the
``## accuracy-vs-deadline`` section of ``docs/results.md``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from popex.decision import Link
from popex.decision.policies import POLICIES
from popex.errors import ConfigError
from popex.link.profiles import load_link_profiles
from experiments.planning import Predictor, test_split_calibration
from experiments.policy_runs import AMPLE_BUDGET_MS, PolicyRow, dominance_text, measure_policies, \
    refresh_edge
from experiments.report import (DEFAULT_DOCS_PATH, DEFAULT_OUT_ROOT, RunInfo, load_sample, markdown_table,
                                      publish_figure, pyplot, relative, replace_docs_section, write_csv)
from popex.testbed.harness import Testbed, TestbedConfig, load_images

__all__ = ["NAME", "CITY_PROFILES", "DeadlineAccuracyConfig", "PredictedPoint", "run_accuracy_vs_deadline"]

NAME = "accuracy-vs-deadline"
CITY_PROFILES = ("sao-paulo", "fremont", "paris")
_N_WARMUP = 10
_COLOURS = dict(zip(POLICIES, ("tab:red", "tab:green", "tab:blue", "tab:purple", "tab:orange", "tab:brown")))


def _plot(rows: list[PolicyRow], points: list[PredictedPoint], config: DeadlineAccuracyConfig, path: Path,
          mode: str) -> None:
    plt = pyplot()
    n_profiles = len(config.profiles)
    fig, axes = plt.subplots(2, n_profiles, figsize=(5 * n_profiles, 7.5), sharex=True, squeeze=False)
    links = load_link_profiles()
    styles = dict(zip(POLICIES, ("-", "--", ":", "-.", (0, (6, 2)), (0, (1, 3)))))
    for column, profile in enumerate(config.profiles):
        ax_predicted, ax_measured = axes[0][column], axes[1][column]
        for k, policy in enumerate(POLICIES):
            curve = [p for p in points if p.profile == profile and p.policy == policy]
            accuracy = np.array([100 * p.accuracy if p.feasible else np.nan for p in curve])
            # Policies often reach the same accuracy: line styles, not offsets, keep the overlaps readable.
            ax_predicted.plot([p.deadline_ms for p in curve], accuracy, color=_COLOURS[policy], label=policy,
                              linestyle=styles[policy], linewidth=3.0 if policy == "adaptive" else 1.5,
                              alpha=0.6 if policy == "adaptive" else 1.0)
            measured = sorted((r for r in rows if r.profile == profile and r.policy == policy),
                              key=lambda r: r.deadline_ms)
            x = np.array([r.deadline_ms for r in measured]) * (1 + 0.015 * (k - 2))
            y = [100 * r.test_accuracy for r in measured]
            ax_measured.plot(x, y, "-", color=_COLOURS[policy], alpha=0.4)
            for xi, yi, row in zip(x, y, measured):
                ax_measured.plot(xi, yi, "o", color=_COLOURS[policy],
                                 markerfacecolor=_COLOURS[policy] if row.test_meets else "none",
                                 label=policy if row is measured[0] else None)
        link = links[profile]
        ax_predicted.set_title(f"{profile}: {link.uplink_mbps:g} Mbit/s, {link.rtt_ms:g} ms RTT")
        ax_measured.set_xlabel("latency requirement (ms)")
        for ax in (ax_predicted, ax_measured):
            ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("predicted accuracy (%)\n(only where the policy meets it)")
    axes[1][0].set_ylabel("test-split accuracy of the strategy used (%)\n(filled: its measured latency met it)")
    axes[0][0].legend(fontsize=8, loc="lower right")
    axes[1][0].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"Accuracy vs latency requirement ({config.objective} latency; link: {mode})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _first_feasible(points: list[PredictedPoint], profile: str, policy: str) -> str:
    for point in points:
        if point.profile == profile and point.policy == policy and point.feasible:
            return f"{point.deadline_ms:g}"
    return "never"


def _knees(points: list[PredictedPoint], profile: str) -> list[float]:
    """Requirements where a plan is tightest: each baseline's first feasible one, POPEX's first at its best."""
    knees = set()
    for policy in POLICIES:
        curve = [p for p in points if p.profile == profile and p.policy == policy and p.feasible and p.deadline_ms > 0]
        if not curve:
            continue
        if policy == "adaptive":
            best = max(p.accuracy for p in curve)
            knees.add(next(p.deadline_ms for p in curve if p.accuracy == best))
        else:
            knees.add(curve[0].deadline_ms)
    return sorted(knees)


def _predicted_points(predictor: Predictor, config: DeadlineAccuracyConfig, links: dict) -> list[PredictedPoint]:
    points = []
    for name in config.profiles:
        link = Link(uplink_mbps=links[name].uplink_mbps, rtt_ms=links[name].rtt_ms)
        for deadline_ms in np.linspace(0.0, config.max_deadline_ms, config.n_predicted):
            for policy in POLICIES:
                p = predictor.policy(policy, link=link, deadline_ms=float(deadline_ms), objective=config.objective)
                points.append(PredictedPoint(profile=name, deadline_ms=float(deadline_ms), policy=policy,
                                             strategy=p.strategy, latency_ms=p.latency_ms(config.objective),
                                             accuracy=p.accuracy, feasible=p.feasible))
    return points


def _summary(rows: list[PolicyRow], points: list[PredictedPoint], info: RunInfo, config: DeadlineAccuracyConfig,
             png: Path, docs_path: Path, n_images: int, source: str, test_source: str) -> str:
    predicted_problems = []
    for profile in config.profiles:
        by_deadline: dict[float, dict[str, PredictedPoint]] = {}
        for point in points:
            if point.profile == profile:
                by_deadline.setdefault(point.deadline_ms, {})[point.policy] = point
        for deadline_ms, at in by_deadline.items():
            ours = at["adaptive"].accuracy
            for policy, point in at.items():
                if point.feasible and point.accuracy > ours:
                    predicted_problems.append(f"{profile} {deadline_ms:g} ms: {policy}")
    n_grid = len({p.deadline_ms for p in points})
    first = markdown_table(["profile", *POLICIES],
                           [[profile, *(_first_feasible(points, profile, policy) for policy in POLICIES)]
                            for profile in config.profiles])
    table = markdown_table(
        ["profile", "requirement ms", "policy", "strategy (measured)", "pred. acc", "test acc", "meas. acc",
         "meas. ms", "meets", "test ms", "meets (test)", "fallback", "load"],
        [[r.profile, f"{r.deadline_ms:g}", r.policy, r.measured_strategy,
          f"{100 * r.predicted_accuracy:.2f}%" if r.predicted_feasible else "(cannot meet)",
          f"{100 * r.test_accuracy:.2f}%", f"{100 * r.measured_accuracy:.1f}%", f"{r.measured_latency_ms:.1f}",
          "yes" if r.measured_meets else "no", f"{r.test_latency_ms:.1f}", "yes" if r.test_meets else "no",
          f"{100 * r.measured_fallback_share:.0f}%", f"{r.load_1min:.1f}"]
         for r in rows])
    return "\n".join([
        f"![accuracy vs requirement]({relative(png, docs_path.parent)})",
        "",
        info.text(),
        f"Links from configs/links.yaml; {config.objective} latency must meet the requirement; edge device emulated "
        f"{config.testbed.edge_slowdown:g}x slower than this machine; every policy plans with "
        f"{100 * config.testbed.plan_headroom_fraction:g}% headroom (a row meets a requirement D when predicted "
        f"within {1 - config.testbed.plan_headroom_fraction:g} D). Predicted on {n_grid} requirements from 0 to "
        f"{config.max_deadline_ms:g} ms (calibration accuracy, the latency model on the profile the edge measured); "
        f"measured at {', '.join(f'{d:g}' for d in config.measured_deadlines_ms)} ms"
        + (" and, per city, where plans are tightest (each baseline's smallest feasible requirement, and the "
           "smallest at which POPEX reaches its best accuracy)" if config.measure_knees else "")
        + f" with {n_images} test images ({source}) per policy and requirement, the same images for every "
        "policy (fixed baselines measured once per link with an ample budget, judged against each requirement). "
        "Accuracy: pred. = calibration split, test = the strategy the edge used on the whole test split, meas. = "
        "the streamed images' answers. Latency: meas. = the streamed images' mean, test = each exit path's "
        "measured mean weighted by how often the whole test split takes that path. Load: the 1-minute load "
        "average when the requests started.",
        "",
        "Predicted, over the whole requirement grid: POPEX >= every baseline that can meet the requirement — "
        + ("holds at every requirement and link." if not predicted_problems
           else f"VIOLATED at {len(predicted_problems)} points: " + "; ".join(predicted_problems[:10])) + " At the "
        "measured requirements:",
        "",
        dominance_text(rows, n_images=n_images, test_source=test_source),
        "",
        "Smallest requirement (ms) each policy can meet (predicted):",
        "",
        first,
        "",
        table,
    ])


@dataclass(frozen=True)
class DeadlineAccuracyConfig:
    """Settings of the experiment; :meth:`quick_config` is the CI version.

    Attributes
    ----------
    profiles : tuple of str
        Link profiles of ``configs/links.yaml``.
    measured_deadlines_ms : tuple of float
        Requirements measured at every profile, ms.
    measure_knees : bool
        Also measure, per profile, where plans are tightest (predicted, on
        the 1 ms grid): the smallest requirement each baseline can meet, and
        the smallest at which POPEX reaches its best accuracy. A fixed grid
        mostly lands where every plan has room to spare.
    max_deadline_ms : float
        The predicted curves span 0 to this, ms.
    n_predicted : int
        Points of the predicted curves.
    objective : {"mean", "tail"}
    n_images : int
        Test images per policy and requirement.
    estimate_timeout_s : float
        Longest wait, after a link change, for the edge to plan with it, s.
    seed : int
    quick : bool
    testbed : TestbedConfig
    """

    profiles: tuple[str, ...] = CITY_PROFILES
    measured_deadlines_ms: tuple[float, ...] = (35.0, 60.0, 100.0, 250.0, 400.0)
    measure_knees: bool = True
    max_deadline_ms: float = 500.0
    n_predicted: int = 501
    objective: str = "mean"
    n_images: int = 100
    estimate_timeout_s: float = 30.0
    seed: int = 1
    quick: bool = False
    testbed: TestbedConfig = field(default_factory=lambda: TestbedConfig(edge_slowdown=50.0, probe_interval_s=2.0))

    @classmethod
    def quick_config(cls) -> DeadlineAccuracyConfig:
        """Two requirements per city, 10 images: about a minute and a half."""
        return cls(measured_deadlines_ms=(60.0, 250.0), measure_knees=False, n_images=10, estimate_timeout_s=10.0,
                   quick=True)


@dataclass(frozen=True)
class PredictedPoint:
    """One point of a predicted curve: a policy's accuracy at a requirement on a profile."""

    profile: str
    deadline_ms: float
    policy: str
    strategy: str
    latency_ms: float
    accuracy: float
    feasible: bool


def run_accuracy_vs_deadline(config: DeadlineAccuracyConfig, *, out_root: Path = DEFAULT_OUT_ROOT,
                             docs_path: Path | None = DEFAULT_DOCS_PATH, progress: bool = True
                             ) -> tuple[list[PolicyRow], RunInfo]:
    """Run the experiment; write CSVs, PNG and the docs section; return the measured rows and the run's info.

    Raises
    ------
    ConfigError
        On an unknown profile.
    ServiceError
        If a service fails to start or answers an error.
    """
    started_s = time.monotonic()
    load_before = load_sample()
    links = load_link_profiles()
    unknown = [name for name in config.profiles if name not in links]
    if unknown:
        raise ConfigError(f"unknown link profiles {unknown}; known: {', '.join(links)}")
    out_dir = Path(out_root) / NAME
    images = load_images(config.n_images, seed=config.seed)
    first = links[config.profiles[0]]
    testbed_config = replace(config.testbed, rtt_ms=first.rtt_ms, objective=config.objective,
                             default_deadline_ms=float(max(config.measured_deadlines_ms)))
    rows: list[PolicyRow] = []
    requests_log: list[dict[str, Any]] = []
    test_calibration, test_source = test_split_calibration(testbed_config.model_dir)  # before the services start
    with Testbed(testbed_config, out_dir / "run") as testbed:
        testbed.stream(images.head(_N_WARMUP), policy="cloud-only", deadline_ms=AMPLE_BUDGET_MS, desc="warm-up",
                       progress=False)
        profile = testbed.profile()
        predictor = Predictor.from_model_dir(testbed_config.model_dir, profile,
                                             headroom_fraction=testbed_config.plan_headroom_fraction)
        test_predictor = Predictor(test_calibration, profile,
                                   headroom_fraction=testbed_config.plan_headroom_fraction)
        points = _predicted_points(predictor, config, links)
        for name in tqdm(config.profiles, desc=NAME, file=sys.stderr, disable=not progress):
            link = links[name]
            deadlines_ms = sorted(set(config.measured_deadlines_ms)
                                  | set(_knees(points, name) if config.measure_knees else []))
            testbed.set_link(uplink_mbps=link.uplink_mbps, rtt_ms=link.rtt_ms)
            refresh_edge(testbed, images, estimate_timeout_s=config.estimate_timeout_s)
            new_rows, records = measure_policies(
                testbed, predictor, images, profile=name, link=Link(uplink_mbps=link.uplink_mbps, rtt_ms=link.rtt_ms),
                deadlines_ms=deadlines_ms, objective=config.objective, test_predictor=test_predictor,
                progress=progress)
            rows += new_rows
            requests_log += records
        mode, link_note = testbed.mode, testbed.link_note
    csv_path = write_csv(out_dir / "accuracy_vs_deadline.csv", rows)
    predicted_path = write_csv(out_dir / "predicted.csv", points)
    requests_path = write_csv(out_dir / "requests.csv", requests_log)
    png = out_dir / "accuracy_vs_deadline.png"
    _plot(rows, points, config, png, mode)
    info = RunInfo(name=NAME, quick=config.quick, run_time_s=time.monotonic() - started_s, mode=mode,
                   link_note=link_note, load_before=load_before, load_after=load_sample(),
                   files=(csv_path, predicted_path, requests_path, png))
    if docs_path is not None:
        figure = publish_figure(png, Path(docs_path))
        replace_docs_section(Path(docs_path), f"## {NAME}", _summary(rows, points, info, config, figure, Path(docs_path),
                                                                     len(images), images.source, test_source))
    return rows, info
