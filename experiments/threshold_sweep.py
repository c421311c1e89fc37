"""``popex experiment threshold-sweep``: offloading probability and accuracy vs the exit threshold.

The 0.7-0.9 sweep of the distortion-robust early-exit paper: one threshold
θ on every branch, at a split after all branches (so a sample either exits
at a branch or is offloaded):

- **calibration**: exit probabilities and accuracy from the model's
  calibration split (what the planner believes), on a fine θ grid;
- **measured**: test images classified by the edge runtime with that
  strategy forced, the offloads answered by the real cloud service.

The edge runtime runs in this process (``edge_api.create_app`` with a real
:class:`~popex.edge.cloud_port.CloudClient` to a real cloud process,
requests through its Flask test client), because the service's API has no
way to force a strategy: the runner's plan book is replaced by one that
answers the swept strategy, the one seam the runner reads its strategy
through. Everything else (decoding, stages, exit checks, the wire format,
the cloud) is the deployed code path. The link does not matter for which
samples exit, so the cloud is on loopback, unshaped.

Writes ``results/threshold-sweep/{calibration.csv, measured.csv,
threshold_sweep.png}`` and the ``## threshold-sweep`` section of
``docs/results.md``.
"""

from __future__ import annotations

import contextlib
import secrets
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from popex.decision import Link, load_calibration, sweep_exit_stats
from popex.decision.latency import Profile
from popex.errors import ConfigError
from experiments.report import (DEFAULT_DOCS_PATH, DEFAULT_OUT_ROOT, RunInfo, load_sample, markdown_table,
                                      publish_figure, pyplot, relative, replace_docs_section, write_csv)
from popex.testbed.services import REPO_ROOT, ServiceError, start_cloud
from popex.testbed.harness import load_images
from popex.edge.strategy import Strategy

__all__ = ["NAME", "ThresholdSweepConfig", "CalibrationPoint", "MeasuredPoint", "ForcedPlans",
           "calibration_points", "run_threshold_sweep"]

NAME = "threshold-sweep"
_BUDGET_MS = 10_000.0
_READY_TIMEOUT_S = 120.0


@contextlib.contextmanager
def _edge_runtime(overrides: dict[str, Any]) -> Iterator[tuple[Any, Any]]:
    """The edge app built in this process, and its runner: the one place this runner reaches into edge_api.

    The config is the checkout's ``configs/edge.yaml`` with ``overrides``,
    never the caller's environment (``POPEX_EDGE_CONFIG``, ``POPEX_TOKEN``...),
    like the services the testbed launches.
    """
    from edge_api import close_app, create_app, get_node  # the edge runtime, in this process
    from edge_api.config import load_config

    app = create_app(load_config(overrides, environ={}))
    try:
        yield app, get_node(app).runner
    finally:
        close_app(app)


def _plot(calibration: list[CalibrationPoint], measured: list[MeasuredPoint], path: Path, n_images: int,
          split: int) -> None:
    plt = pyplot()
    fig, (ax_offload, ax_accuracy) = plt.subplots(1, 2, figsize=(11, 4.2))
    x = [p.threshold for p in calibration]
    ax_offload.plot(x, [100 * p.offload_prob for p in calibration], "-", color="tab:blue", label="calibration")
    ax_offload.plot([p.threshold for p in measured], [100 * p.offload_share for p in measured], "o",
                    color="tab:red", label=f"measured ({n_images} test images, services)")
    ax_accuracy.plot(x, [100 * p.accuracy for p in calibration], "-", color="tab:blue", label="calibration")
    ax_accuracy.plot([p.threshold for p in measured], [100 * p.accuracy for p in measured], "o", color="tab:red",
                     label="measured")
    ax_offload.set_ylabel("offloading probability (%)")
    ax_accuracy.set_ylabel("accuracy (%)")
    for ax in (ax_offload, ax_accuracy):
        ax.set_xlabel("exit threshold θ (every branch)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Threshold sweep at split {split} (both branches active, the rest offloaded)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _summary(calibration: list[CalibrationPoint], measured: list[MeasuredPoint], info: RunInfo, png: Path,
             docs_path: Path, source: str) -> str:
    table = markdown_table(
        ["θ", "offload (calibration)", "offload (measured)", "accuracy (calibration)", "accuracy (measured)",
         "exits per branch (measured)", "fallbacks"],
        [[f"{p.threshold:.3f}", f"{100 * p.calibration_offload_prob:.1f}%", f"{100 * p.offload_share:.1f}%",
          f"{100 * p.calibration_accuracy:.2f}%", f"{100 * p.accuracy:.2f}%",
          " / ".join(f"{100 * q:.1f}%" for q in p.exit_share_per_branch), f"{100 * p.fallback_share:.1f}%"]
         for p in measured])
    gaps = [abs(p.offload_share - p.calibration_offload_prob) for p in measured]
    first, last = calibration[0], calibration[-1]
    return "\n".join([
        f"![threshold sweep]({relative(png, docs_path.parent)})",
        "",
        info.text(),
        f"One threshold on every branch, split {measured[0].split}: a sample exits at the first branch whose "
        "confidence reaches θ, the rest are offloaded. Calibration: the model's calibration split (what the planner "
        f"uses). Measured: {measured[0].n_images} Fashion-MNIST test images ({source}) per θ through the edge "
        "runtime with the strategy forced and the real cloud service answering the offloads.",
        "",
        f"From θ = {first.threshold:g} to {last.threshold:g} the predicted offloading probability rises from "
        f"{100 * first.offload_prob:.1f}% to {100 * last.offload_prob:.1f}% and the accuracy from "
        f"{100 * first.accuracy:.2f}% to {100 * last.accuracy:.2f}%. Largest |measured − calibration| offloading "
        f"probability: {100 * max(gaps):.1f} points.",
        "",
        table,
    ])


@dataclass(frozen=True)
class ThresholdSweepConfig:
    """Settings of the experiment; :meth:`quick_config` is the CI version.

    Attributes
    ----------
    measured_thresholds : tuple of float
        θ values measured through the services.
    calibration_step : float
        Step of the calibration curve over [min, max] of the measured θ.
    split : int or None
        Stages on the edge; None: the stage of the last branch.
    n_images : int
        Test images per θ.
    seed : int
    quick : bool
    model_dir : Path
    """

    measured_thresholds: tuple[float, ...] = tuple(float(x) for x in np.round(np.arange(0.70, 0.9001, 0.025), 3))
    calibration_step: float = 0.005
    split: int | None = None
    n_images: int = 1000
    seed: int = 2
    quick: bool = False
    model_dir: Path = REPO_ROOT / "models" / "b-alexnet"

    @classmethod
    def quick_config(cls) -> ThresholdSweepConfig:
        """Three thresholds, 100 images each."""
        return cls(measured_thresholds=(0.7, 0.8, 0.9), n_images=100, quick=True)


@dataclass(frozen=True)
class CalibrationPoint:
    """The planner's view of one θ: exit probabilities, offloading probability, accuracy."""

    threshold: float
    split: int
    exit_prob_per_branch: tuple[float, ...]
    offload_prob: float
    accuracy: float


@dataclass(frozen=True)
class MeasuredPoint:
    """What the test images did with one θ forced."""

    threshold: float
    split: int
    n_images: int
    exit_share_per_branch: tuple[float, ...]
    offload_share: float
    fallback_share: float
    accuracy: float
    calibration_offload_prob: float
    calibration_accuracy: float
    mean_latency_ms: float


class _ForcedPlan:
    """A model plan that answers one strategy, whatever the request asks (see the module doc)."""

    def __init__(self, profile: Profile, strategy: Strategy) -> None:
        self.profile = profile
        self._strategy = strategy

    def strategy(self, deadline_ms: float, objective: str = "mean", policy: str = "adaptive",
                 head: str | None = None) -> Strategy:
        return self._strategy


class ForcedPlans:
    """Stands in for the edge runner's :class:`~popex.edge.plans.PlanBook`: one forced strategy per model.

    Parameters
    ----------
    link : Link
        Reported as the plans' link.
    """

    def __init__(self, *, link: Link) -> None:
        self.link = link
        self._plans: dict[str, _ForcedPlan] = {}

    def force(self, model_id: str, profile: Profile, strategy: Strategy) -> None:
        """Make ``model_id`` answer ``strategy``."""
        self._plans[model_id] = _ForcedPlan(profile, strategy)

    def get(self, model_id: str) -> _ForcedPlan:
        """The forced plan of ``model_id``.

        Raises
        ------
        ConfigError
            If nothing is forced for it.
        """
        if model_id not in self._plans:
            raise ConfigError(f"no strategy forced for model {model_id!r}")
        return self._plans[model_id]

    def update_profile(self, **changes: float) -> None:
        """Ignored: the strategy is forced, there is nothing to re-plan."""

    def set_link(self, link: Link) -> None:
        """Ignored, as :meth:`update_profile`."""


def calibration_points(calibration: Any, *, branch_after_stage: tuple[int, ...], thresholds: np.ndarray,
                       split: int) -> list[CalibrationPoint]:
    """Exit and offloading probabilities and accuracy for θ on every branch active at ``split``.

    Examples
    --------
    >>> from popex.decision.calibration import Calibration
    >>> cal = Calibration(confidence=np.array([[0.9, 1.0], [0.2, 1.0]]), predicted=np.array([[0, 0], [0, 1]]),
    ...     correct=np.array([[True, True], [False, True]]), labels=np.array([0, 1]), temperature=np.ones(2))
    >>> [p.offload_prob for p in calibration_points(cal, branch_after_stage=(1,), thresholds=np.array([0.5]),
    ...                                               split=1)]
    [0.5]
    """
    active = [b for b, k in enumerate(branch_after_stage) if k <= split]
    if not active:
        raise ConfigError(f"no branch is active at split {split} (branches after stages {branch_after_stage})")
    grids = [list(thresholds) for _ in branch_after_stage]
    stats = sweep_exit_stats(calibration, branch_after_stage=branch_after_stage, thresholds=grids)
    level = stats.levels[len(active)]
    points = []
    for threshold in thresholds:
        match = np.flatnonzero(np.all(level.thresholds[:, active] == threshold, axis=1))
        row = int(match[0])
        probs = tuple(float(q) for q in level.exit_probs[row])
        points.append(CalibrationPoint(threshold=float(threshold), split=split, exit_prob_per_branch=probs,
                                       offload_prob=float(1.0 - sum(probs)), accuracy=float(level.accuracy[row])))
    return points


def run_threshold_sweep(config: ThresholdSweepConfig, *, out_root: Path = DEFAULT_OUT_ROOT,
                        docs_path: Path | None = DEFAULT_DOCS_PATH, progress: bool = True
                        ) -> tuple[list[MeasuredPoint], RunInfo]:
    """Run the sweep; write CSVs, PNG and the docs section; return the measured points and the run's info.

    Raises
    ------
    ServiceError
        If the cloud does not start or the model cannot be prepared.
    """
    started_s = time.monotonic()
    load_before = load_sample()
    out_dir = Path(out_root) / NAME
    work_dir = out_dir / "run"
    images = load_images(config.n_images, seed=config.seed)
    calibration = load_calibration(Path(config.model_dir) / "calibration.npz")
    token = secrets.token_hex(16)
    measured: list[MeasuredPoint] = []
    with start_cloud(token=token, state_dir=work_dir / "cloud", log_path=work_dir / "cloud.log") as cloud:
        cloud.wait_ready()
        with _edge_runtime({"token": token, "admin_token": secrets.token_hex(16), "cloud_url": cloud.url,
                            "state_dir": str(work_dir / "edge"), "default_model_dir": str(config.model_dir),
                            "start_background": False, "profile_n_repeats": 5}) as (app, runner):
            model_id = runner.default_model_id
            deadline_s = time.monotonic() + _READY_TIMEOUT_S
            while runner.registry.get(model_id).state != "ready":
                if time.monotonic() > deadline_s or runner.registry.get(model_id).state == "failed":
                    raise ServiceError(f"the model was not prepared: {runner.registry.get(model_id).state}")
                time.sleep(0.2)
            profile = runner.plans.get(model_id).profile
            branch_after_stage = tuple(profile.branch_after_stage)
            split = config.split if config.split is not None else max(branch_after_stage)
            grid = np.round(np.arange(min(config.measured_thresholds), max(config.measured_thresholds)
                                      + config.calibration_step / 2, config.calibration_step), 6)
            curve = calibration_points(calibration, branch_after_stage=branch_after_stage, thresholds=grid,
                                       split=split)
            at_measured = {p.threshold: p for p in calibration_points(
                calibration, branch_after_stage=branch_after_stage,
                thresholds=np.array(config.measured_thresholds), split=split)}
            forced = ForcedPlans(link=runner.plans.link)
            runner.plans = forced
            client = app.test_client()
            n_branches = len(branch_after_stage)
            for threshold in tqdm(config.measured_thresholds, desc=NAME, file=sys.stderr, disable=not progress):
                thresholds = tuple(threshold if k <= split else None for k in branch_after_stage)
                point = at_measured[float(threshold)]
                active = tuple(b for b, k in enumerate(branch_after_stage) if k <= split)
                forced.force(model_id, profile, Strategy(
                    split=split, thresholds=thresholds, active_branches=active, latency_ms=0.0,
                    worst_latency_ms=0.0, accuracy=point.accuracy, offload_prob=point.offload_prob, feasible=True,
                    row=-1, objective="mean", deadline_ms=_BUDGET_MS, policy="adaptive"))
                exits, n_offloaded, n_fallback, n_correct, latency_ms = [0] * n_branches, 0, 0, 0, []
                for index in range(len(images)):
                    response = client.post("/api/v1/classify", query_string={"deadline_ms": _BUDGET_MS},
                                           data=images.images_png[index], content_type="image/png")
                    if response.status_code != 200:
                        raise ServiceError(f"classify answered {response.status_code}: {response.json}")
                    body = response.json
                    if body["where"] == "cloud" or body["fallback"]:
                        n_offloaded += 1
                        n_fallback += int(body["fallback"])
                    elif isinstance(body["exit"], int):
                        exits[body["exit"]] += 1
                    n_correct += int(body["label"] == int(images.labels[index]))
                    latency_ms.append(body["latency_ms"]["total"])
                n = len(images)
                measured.append(MeasuredPoint(
                    threshold=float(threshold), split=split, n_images=n,
                    exit_share_per_branch=tuple(e / n for e in exits), offload_share=n_offloaded / n,
                    fallback_share=n_fallback / n, accuracy=n_correct / n,
                    calibration_offload_prob=point.offload_prob, calibration_accuracy=point.accuracy,
                    mean_latency_ms=float(np.mean(latency_ms))))
    calibration_csv = write_csv(out_dir / "calibration.csv", curve)
    measured_csv = write_csv(out_dir / "measured.csv", measured)
    png = out_dir / "threshold_sweep.png"
    _plot(curve, measured, png, len(images), split)
    info = RunInfo(name=NAME, quick=config.quick, run_time_s=time.monotonic() - started_s, mode="loopback",
                   link_note=f"edge runtime in-process with split {split} and θ on every branch forced; real "
                             "cloud service on loopback", load_before=load_before, load_after=load_sample(),
                   files=(calibration_csv, measured_csv, png))
    if docs_path is not None:
        figure = publish_figure(png, Path(docs_path))
        replace_docs_section(Path(docs_path), f"## {NAME}",
                             _summary(curve, measured, info, figure, Path(docs_path), images.source))
    return measured, info
