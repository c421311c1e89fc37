"""``popex experiment latency-vs-uplink``: inference time vs uplink rate, POPEX against the baselines.

For each uplink rate of a log grid (0.5-100 Mbit/s, RTT fixed) every policy
(POPEX's ``adaptive``, ``edge-only``, ``cloud-only``, ``neurosurgeon``,
``edgent``) is

- **predicted** by the latency model (:class:`~experiments.planning.Predictor`)
  on the profile the edge measured, at the true link, and
- **measured**: the same test images streamed through the real edge and
  cloud over the shaped link (:mod:`popex.testbed.harness`), after the
  edge's uplink monitor has followed the rate change.

All policies get the same images; only the policy differs. POPEX and
Edgent decide from the requirement, so their requests carry it as their
budget (a request the cloud cannot finish in time is answered by the edge,
a fallback). The other baselines do not depend on the requirement; they
get an ample budget, so that their latency is measured unclipped, and
"meets" is judged against the requirement afterwards.

Writes ``results/latency-vs-uplink/{latency_vs_uplink.csv, requests.csv,
latency_vs_uplink.png}`` and the ``## latency-vs-uplink`` section of
``docs/results.md``.
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
from experiments.planning import Predictor, test_split_calibration
from experiments.policy_runs import AMPLE_BUDGET_MS, PolicyRow, dominance_text, measure_policies, \
    refresh_edge
from experiments.report import (DEFAULT_DOCS_PATH, DEFAULT_OUT_ROOT, RunInfo, load_sample, markdown_table,
                                      publish_figure, pyplot, relative, replace_docs_section, write_csv)
from popex.testbed.harness import Testbed, TestbedConfig, load_images

__all__ = ["NAME", "LatencyUplinkConfig", "run_latency_vs_uplink"]

NAME = "latency-vs-uplink"
_N_WARMUP = 10


def _plot(rows: list[PolicyRow], curves: dict[str, dict[str, np.ndarray]], grid_mbps: np.ndarray,
          config: LatencyUplinkConfig, path: Path, mode: str) -> None:
    plt = pyplot()
    fig, (ax_latency, ax_accuracy) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = dict(zip(POLICIES, ("tab:red", "tab:green", "tab:blue", "tab:purple", "tab:orange", "tab:brown")))
    for policy in POLICIES:
        colour = colours[policy]
        ax_latency.plot(grid_mbps, curves[policy]["latency_ms"], "--", color=colour, alpha=0.7)
        ax_accuracy.plot(grid_mbps, 100 * curves[policy]["accuracy"], "--", color=colour, alpha=0.7)
        picked = sorted((r for r in rows if r.policy == policy), key=lambda r: r.uplink_mbps)
        x = [r.uplink_mbps for r in picked]
        ax_latency.plot(x, [r.measured_latency_ms for r in picked], "-o", color=colour, label=policy)
        ax_accuracy.plot(x, [100 * r.measured_accuracy for r in picked], "-o", color=colour, label=policy)
    ax_latency.axhline(config.deadline_ms, color="k", linestyle=":", label=f"requirement {config.deadline_ms:g} ms")
    ax_latency.set_ylabel(f"{'mean' if config.objective == 'mean' else 'p95'} latency per image (ms)")
    ax_accuracy.set_ylabel("accuracy (%)")
    for ax in (ax_latency, ax_accuracy):
        ax.set_xscale("log")
        ax.set_xlabel("uplink (Mbit/s)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax_latency.set_title("dashed: predicted, solid: measured")
    ax_accuracy.set_title("dashed: calibration, solid: test images")
    fig.suptitle(f"Latency vs uplink (RTT {config.rtt_ms:g} ms, edge {config.testbed.edge_slowdown:g}x slower, "
                 f"link: {mode})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _summary(rows: list[PolicyRow], info: RunInfo, config: LatencyUplinkConfig, png: Path,
             docs_path: Path, n_images: int, source: str, test_source: str) -> str:
    table = markdown_table(
        ["uplink Mbit/s", "policy", "strategy used", "predicted strategy", "pred. ms", "meas. ms", "meets",
         "test ms", "meets (test)", "pred. acc", "test acc", "meas. acc", "fallback", "load"],
        [[f"{r.uplink_mbps:g}", r.policy, r.measured_strategy,
          "same" if r.predicted_strategy == r.measured_strategy else r.predicted_strategy,
          f"{r.predicted_latency_ms:.1f}",
          f"{r.measured_latency_ms:.1f}", "yes" if r.measured_meets else "no", f"{r.test_latency_ms:.1f}",
          "yes" if r.test_meets else "no", f"{100 * r.predicted_accuracy:.2f}%",
          f"{100 * r.test_accuracy:.2f}%", f"{100 * r.measured_accuracy:.1f}%",
          f"{100 * r.measured_fallback_share:.0f}%", f"{r.load_1min:.1f}"] for r in rows])
    same = [r for r in rows if r.measured_strategy == r.predicted_strategy]
    errors = [abs(r.measured_latency_ms - r.predicted_latency_ms) / r.measured_latency_ms for r in same]
    lines = [
        f"![latency vs uplink]({relative(png, docs_path.parent)})",
        "",
        info.text(),
        f"Requirement {config.deadline_ms:g} ms ({config.objective} objective), RTT {config.rtt_ms:g} ms, edge "
        f"device emulated {config.testbed.edge_slowdown:g}x slower than this machine, every policy planning with "
        f"{100 * config.testbed.plan_headroom_fraction:g}% headroom; {n_images} Fashion-MNIST "
        f"test images ({source}) per policy and rate, the same for every policy. POPEX and Edgent requests carry "
        "the requirement as their budget; the fixed baselines get an ample budget (their latency is unclipped) and "
        "\"meets\" compares their measured mean with the requirement. Predicted: the latency model on the profile "
        "the edge measured, at the true link (pred. ms and pred. acc are those of the predicted strategy; the edge "
        "decides from its own link estimate and overhead, so it can differ). Accuracy: pred. = calibration split (what the planner uses), test = "
        "the strategy the edge used, on the whole test split, meas. = the streamed images' answers. Latency: test = "
        "each exit path's measured mean weighted by how often the whole test split takes it. Load: the "
        "1-minute load average when the policy's requests started (a shared machine).",
        "",
        dominance_text(rows, n_images=n_images, test_source=test_source),
        "",
        (f"Median |measured − predicted| / measured where the edge used the predicted strategy: "
         f"{100 * float(np.median(errors)):.1f}% over {len(errors)} of {len(rows)} rows." if errors else ""),
        "",
        table,
    ]
    return "\n".join(lines)


@dataclass(frozen=True)
class LatencyUplinkConfig:
    """Settings of the experiment; :meth:`quick_config` is the CI version.

    Attributes
    ----------
    uplink_grid_mbps : tuple of float
        Rates measured, Mbit/s.
    rtt_ms : float
        RTT of the link, ms.
    deadline_ms : float
        The latency requirement, ms.
    objective : {"mean", "tail"}
    n_images : int
        Test images per policy and rate.
    n_predicted : int
        Points of the predicted curves (log grid over the same range).
    estimate_timeout_s : float
        Longest wait, after a rate change, for the edge to plan with it, s.
    seed : int
        Which test images.
    quick : bool
        Whether this is the CI version (recorded in the docs).
    testbed : TestbedConfig
    """

    uplink_grid_mbps: tuple[float, ...] = tuple(float(x) for x in np.round(np.geomspace(0.5, 100.0, 9), 3))
    rtt_ms: float = 20.0
    deadline_ms: float = 50.0
    objective: str = "mean"
    n_images: int = 150
    n_predicted: int = 60
    estimate_timeout_s: float = 30.0
    seed: int = 0
    quick: bool = False
    testbed: TestbedConfig = field(default_factory=lambda: TestbedConfig(edge_slowdown=50.0, probe_interval_s=2.0))

    @classmethod
    def quick_config(cls) -> LatencyUplinkConfig:
        """3 rates, 20 images per policy: about a minute."""
        return cls(uplink_grid_mbps=(0.5, 5.0, 50.0), n_images=20, estimate_timeout_s=12.0, quick=True)


def run_latency_vs_uplink(config: LatencyUplinkConfig, *, out_root: Path = DEFAULT_OUT_ROOT,
                          docs_path: Path | None = DEFAULT_DOCS_PATH, progress: bool = True
                          ) -> tuple[list[PolicyRow], RunInfo]:
    """Run the experiment; write CSV, PNG and the docs section; return the rows and how the run went.

    Raises
    ------
    ServiceError
        If a service fails to start or answers an error.
    """
    started_s = time.monotonic()
    load_before = load_sample()
    out_dir = Path(out_root) / NAME
    images = load_images(config.n_images, seed=config.seed)
    testbed_config = replace(config.testbed, rtt_ms=config.rtt_ms, objective=config.objective,
                             default_deadline_ms=config.deadline_ms)
    rows: list[PolicyRow] = []
    requests_log: list[dict[str, Any]] = []
    test_calibration, test_source = test_split_calibration(testbed_config.model_dir)  # before the services start
    with Testbed(testbed_config, out_dir / "run") as testbed:
        # Offloads at the fast start-up link: the edge measures O and its fixed time before the profile is read.
        testbed.stream(images.head(_N_WARMUP), policy="cloud-only", deadline_ms=AMPLE_BUDGET_MS, desc="warm-up",
                       progress=False)
        profile = testbed.profile()
        predictor = Predictor.from_model_dir(testbed_config.model_dir, profile,
                                             headroom_fraction=testbed_config.plan_headroom_fraction)
        test_predictor = Predictor(test_calibration, profile,
                                   headroom_fraction=testbed_config.plan_headroom_fraction)
        for uplink_mbps in tqdm(config.uplink_grid_mbps, desc=NAME, file=sys.stderr, disable=not progress):
            testbed.set_link(uplink_mbps=uplink_mbps)
            refresh_edge(testbed, images, estimate_timeout_s=config.estimate_timeout_s)
            new_rows, records = measure_policies(
                testbed, predictor, images, profile="", link=Link(uplink_mbps=uplink_mbps, rtt_ms=config.rtt_ms),
                deadlines_ms=[config.deadline_ms], objective=config.objective, test_predictor=test_predictor,
                progress=progress)
            rows += new_rows
            requests_log += records
        mode, link_note = testbed.mode, testbed.link_note
    grid_mbps = np.geomspace(min(config.uplink_grid_mbps), max(config.uplink_grid_mbps), config.n_predicted)
    curves = {}
    for policy in POLICIES:
        predictions = [predictor.policy(policy, link=Link(uplink_mbps=float(u), rtt_ms=config.rtt_ms),
                                        deadline_ms=config.deadline_ms, objective=config.objective)
                       for u in grid_mbps]
        curves[policy] = {"latency_ms": np.array([p.latency_ms(config.objective) for p in predictions]),
                          "accuracy": np.array([p.accuracy for p in predictions])}
    csv_path = write_csv(out_dir / "latency_vs_uplink.csv", rows)
    requests_path = write_csv(out_dir / "requests.csv", requests_log)
    png = out_dir / "latency_vs_uplink.png"
    _plot(rows, curves, grid_mbps, config, png, mode)
    info = RunInfo(name=NAME, quick=config.quick, run_time_s=time.monotonic() - started_s, mode=mode,
                   link_note=link_note, load_before=load_before, load_after=load_sample(),
                   files=(csv_path, requests_path, png))
    if docs_path is not None:
        figure = publish_figure(png, Path(docs_path))
        replace_docs_section(Path(docs_path), f"## {NAME}",
                             _summary(rows, info, config, figure, Path(docs_path), len(images), images.source,
                                      test_source))
    return rows, info
