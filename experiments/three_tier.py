"""``popex experiment three-tier``: the three-tier plans run for real, measured against their predictions.

Three real tiers (:mod:`popex.testbed.tiers`): a cloud and an edge in a
network namespace behind a tbf-shaped device -> edge veth, the edge -> cloud
hop emulated by the edge (``--emulate-link``), and the device this process
(:class:`popex.device.DeviceClient`), emulated as a Raspberry-Pi-class
system (its slowdown from ``configs/devices.yaml``). For each device link
rate (reshaped in place) and each policy (device-only, edge-only,
cloud-only, the two-tier device-cloud and edge-cloud, fixed (x, y) splits,
and the adaptive three-tier), the device refreshes its plan (it measures the
link, reports it and its stage times, pulls the plan) and streams the same
test images. Per plan: the measured mean latency and accuracy beside the
edge's prediction (the plan's E[T] and accuracy, from the links and device
times it measured). Without root (no namespace) the device link is the
unshaped loopback.

Writes ``results/three-tier/{three_tier.csv, requests.csv, three_tier.png}``
and the ``## three-tier`` section of ``docs/results.md``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from experiments.report import (DEFAULT_DOCS_PATH, DEFAULT_OUT_ROOT, RunInfo, load_sample, markdown_table,
                                publish_figure, pyplot, relative, replace_docs_section, write_csv)
from popex.device.client import DeviceClient
from popex.runtime.devices import find_device
from popex.testbed.harness import load_images
from popex.testbed.netns import HarnessUnavailable
from popex.testbed.tiers import DEFAULT_THREE_TIER_MODEL_DIR, three_tier_services

__all__ = ["NAME", "TARGET_ERROR_FRACTION", "PlanRun", "ThreeTierConfig", "run_three_tier"]

NAME = "three-tier"
#: Acceptance: the median |measured − predicted| / measured of the three-tier plans.
TARGET_ERROR_FRACTION = 0.10
_N_WARMUP = 3
_POLICIES = ("device-only", "edge-only", "cloud-only", "device-cloud", "edge-cloud", "three-tier")


@dataclass(frozen=True)
class ThreeTierConfig:
    """Settings of the experiment; :meth:`quick_config` is the CI version.

    Attributes
    ----------
    device_links_mbps : tuple of float
        Device -> edge rates, Mbit/s (tbf, one after the other).
    edge_link : str
        The edge -> cloud link the edge emulates, ``"RATE_MBPS,RTT_MS"``.
    device : str
        A device profile of ``configs/devices.yaml`` (its slowdown).
    deadline_ms : float
        The requirement (mean objective).
    fixed_cuts : tuple of (int, int)
        Fixed (x, y) splits run as baselines (their thresholds still chosen).
    n_images : int
        Test images per policy and rate (after the warm-up).
    quick : bool
    """

    device_links_mbps: tuple[float, ...] = (0.3, 2.0, 20.0)
    edge_link: str = "10,10"
    device: str = "raspi4"
    deadline_ms: float = 50.0
    fixed_cuts: tuple[tuple[int, int], ...] = ((1, 4), (3, 5))
    n_images: int = 60
    quick: bool = False
    model_dir: Path = field(default=DEFAULT_THREE_TIER_MODEL_DIR)

    @classmethod
    def quick_config(cls) -> ThreeTierConfig:
        """Two rates, 20 images a policy: about a minute."""
        return cls(device_links_mbps=(0.3, 20.0), n_images=20, quick=True)


@dataclass(frozen=True)
class PlanRun:
    """One policy's plan at one device link, run: predicted and measured."""

    device_link_mbps: float
    policy: str
    x: int
    y: int
    thresholds: str
    n_requests: int
    predicted_mean_latency_ms: float
    measured_mean_latency_ms: float
    error_fraction: float
    predicted_accuracy: float
    measured_accuracy: float
    meets: bool
    where_device: float
    where_edge: float
    where_cloud: float
    fallback_share: float


def _label(policy: str, cut: tuple[int, int] | None) -> str:
    return f"fixed x={cut[0]},y={cut[1]}" if cut else policy


def _run_plan(client: DeviceClient, images: Any, rate_mbps: float, label: str, config: ThreeTierConfig,
              records: list[dict[str, Any]], progress: bool) -> PlanRun:
    plan = client.refresh_plan(deadline_ms=config.deadline_ms)
    if plan is None:
        raise RuntimeError(f"no plan for {label}: {client.refresh_error}")
    for image in images.images_png[:_N_WARMUP]:
        client.classify(image, deadline_ms=config.deadline_ms)
    answers = []
    stream = list(zip(images.images_png[_N_WARMUP:], images.labels[_N_WARMUP:]))
    for image, true_label in tqdm(stream, desc=f"{rate_mbps:g} Mbit/s {label}", disable=not progress, leave=False):
        answer = client.classify(image, deadline_ms=config.deadline_ms)
        answers.append(answer)
        records.append({"device_link_mbps": rate_mbps, "policy": label, "x": answer.cuts[0], "y": answer.cuts[1],
                        "where": answer.where, "exit": answer.exit, "latency_ms": answer.latency_ms,
                        "input_ms": answer.input_ms,
                        "correct": answer.label == int(true_label), "fallback": answer.fallback})
    measured_ms = float(np.mean([a.latency_ms - a.input_ms for a in answers]))  # from the input tensor, as E[T]
    share = {where: float(np.mean([a.where == where for a in answers])) for where in ("device", "edge", "cloud")}
    return PlanRun(
        device_link_mbps=rate_mbps, policy=label, x=plan.x, y=plan.y,
        thresholds="[" + ",".join("off" if t is None else f"{t:.2f}" for t in plan.thresholds) + "]",
        n_requests=len(answers), predicted_mean_latency_ms=plan.expected_latency_ms,
        measured_mean_latency_ms=measured_ms,
        error_fraction=abs(measured_ms - plan.expected_latency_ms) / measured_ms,
        predicted_accuracy=plan.accuracy,
        measured_accuracy=float(np.mean([a.label == int(t) for a, (_, t) in zip(answers, stream)])),
        meets=measured_ms <= config.deadline_ms, where_device=share["device"], where_edge=share["edge"],
        where_cloud=share["cloud"], fallback_share=float(np.mean([a.fallback for a in answers])))


def _plot(runs: list[PlanRun], path: Path, deadline_ms: float) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.8))
    top = max(max(r.measured_mean_latency_ms, r.predicted_mean_latency_ms) for r in runs) * 1.1
    left.plot([0, top], [0, top], "k-", linewidth=0.8, label="measured = predicted")
    left.fill_between([0, top], [0, top / 1.1], [0, top / 0.9], color="grey", alpha=0.15, label="±10%")
    labels = list(dict.fromkeys(r.policy for r in runs))
    colours = {label: plt.cm.tab10(i % 10) for i, label in enumerate(labels)}
    rates = sorted({r.device_link_mbps for r in runs})
    markers = dict(zip(rates, "osD^v"))
    for r in runs:
        left.plot(r.predicted_mean_latency_ms, r.measured_mean_latency_ms, markers[r.device_link_mbps],
                  color=colours[r.policy])
        right.plot(r.measured_mean_latency_ms, 100 * r.measured_accuracy, markers[r.device_link_mbps],
                   color=colours[r.policy])
    for label in labels:
        right.plot([], [], "s", color=colours[label], label=label)
    for rate in rates:
        left.plot([], [], markers[rate], color="grey", label=f"device link {rate:g} Mbit/s")
    right.axvline(deadline_ms, color="tab:red", linestyle="--", linewidth=1, label="requirement")
    left.set(xlim=(0, top), ylim=(0, top), xlabel="predicted mean latency (ms)", ylabel="measured mean latency (ms)",
             title="Three-tier plans: measured vs predicted")
    right.set(xscale="log", xlabel="measured mean latency (ms)", ylabel="measured accuracy (%)",
              title="Accuracy vs latency per policy")
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _verdicts(runs: list[PlanRun]) -> tuple[list[str], bool, bool]:
    lines, holds_measured, holds_predicted = [], True, True
    for rate in sorted({r.device_link_mbps for r in runs}):
        at = [r for r in runs if r.device_link_mbps == rate]
        adaptive = next(r for r in at if r.policy == "three-tier")
        meeting = [r for r in at if r.meets and r.policy != "three-tier"]
        best = max(meeting, key=lambda r: r.measured_accuracy, default=None)
        best_predicted = max(meeting, key=lambda r: r.predicted_accuracy, default=None)
        measured_ok = adaptive.meets and (best is None or adaptive.measured_accuracy >= best.measured_accuracy)
        predicted_ok = adaptive.meets and (best_predicted is None
                                           or adaptive.predicted_accuracy >= best_predicted.predicted_accuracy)
        holds_measured &= measured_ok
        holds_predicted &= predicted_ok
        lines.append(f"- {rate:g} Mbit/s: adaptive x={adaptive.x}, y={adaptive.y}, "
                     f"{adaptive.measured_mean_latency_ms:.1f} ms ({'meets' if adaptive.meets else 'MISSES'} the "
                     f"requirement), {100 * adaptive.measured_accuracy:.1f}% measured / "
                     f"{100 * adaptive.predicted_accuracy:.2f}% predicted; best baseline meeting it: "
                     + (f"{best.policy} {100 * best.measured_accuracy:.1f}% measured" if best else "none")
                     + (f", {best_predicted.policy} {100 * best_predicted.predicted_accuracy:.2f}% predicted"
                        if best_predicted else "")
                     + f" - measured {'holds' if measured_ok else 'does NOT hold'}, "
                       f"predicted {'holds' if predicted_ok else 'does NOT hold'}")
    return lines, holds_measured, holds_predicted


def _summary(runs: list[PlanRun], info: RunInfo, config: ThreeTierConfig, png: Path, docs_path: Path,
             slowdown: float, source: str) -> str:
    three = [r.error_fraction for r in runs if 0 < r.x < r.y]
    adaptive = [r.error_fraction for r in runs if r.policy == "three-tier"]
    median_all = float(np.median([r.error_fraction for r in runs]))
    median_three = float(np.median(three)) if three else float("nan")
    verdict_lines, holds, holds_predicted = _verdicts(runs)
    table = markdown_table(
        ["device link Mbit/s", "policy", "x", "y", "θ", "predicted ms", "measured ms", "error", "pred./meas. acc.",
         "device/edge/cloud", "fallback"],
        [[f"{r.device_link_mbps:g}", r.policy, r.x, r.y, r.thresholds, f"{r.predicted_mean_latency_ms:.1f}",
          f"{r.measured_mean_latency_ms:.1f}", f"{100 * r.error_fraction:.0f}%",
          f"{100 * r.predicted_accuracy:.1f}% / {100 * r.measured_accuracy:.1f}%",
          f"{100 * r.where_device:.0f}/{100 * r.where_edge:.0f}/{100 * r.where_cloud:.0f}%",
          f"{100 * r.fallback_share:.0f}%"] for r in runs])
    return "\n".join([
        f"![three tiers]({relative(png, docs_path.parent)})",
        "",
        info.text(),
        f"Device: `{config.device}` ({slowdown:g}x this machine, `configs/devices.yaml`), device -> edge by tbf at "
        f"{', '.join(f'{u:g}' for u in config.device_links_mbps)} Mbit/s, edge -> cloud emulated by the edge at "
        f"{config.edge_link.split(',')[0]} Mbit/s, {config.edge_link.split(',')[1]} ms RTT; requirement "
        f"{config.deadline_ms:g} ms (mean objective); {config.n_images} test images ({source}) per policy and rate "
        f"after {_N_WARMUP} warm-up. Predicted: the plan the edge handed the device (its E[T] and accuracy from the "
        "device's reported link and stage times and the edge's own measurements). Measured: the device's latency "
        "from its input tensor to the answer (the image's decoding and preprocessing on the device, the same for "
        "every plan and outside E[T], taken off).",
        "",
        f"**Median |measured − predicted| / measured: {100 * median_three:.1f}% over the {len(three)} plans that cut "
        f"on the device and on the edge (0 < x < y)**, {100 * float(np.median(adaptive)):.1f}% over the adaptive "
        f"policy's plans, {100 * median_all:.1f}% over all {len(runs)} plans (target "
        f"{100 * TARGET_ERROR_FRACTION:.0f}%: {'meets' if median_three <= TARGET_ERROR_FRACTION else 'MISSES'}).",
        "",
        "Adaptive three-tier vs the baselines that meet the requirement (measured mean latency <= requirement): "
        f"by measured accuracy on the same {config.n_images} images it "
        + ("holds at every rate" if holds else "does not hold at every rate")
        + "; by predicted accuracy (the calibration split, 6,000 images) it "
        + ("holds at every rate." if holds_predicted else "does not hold at every rate.")
        + f" One image is {100 / config.n_images:.1f} points of measured accuracy.",
        *verdict_lines,
        "",
        table,
    ])


def run_three_tier(config: ThreeTierConfig, *, out_root: Path = DEFAULT_OUT_ROOT,
                   docs_path: Path | None = DEFAULT_DOCS_PATH, progress: bool = True,
                   ) -> tuple[list[PlanRun], RunInfo]:
    """Run every policy's plan at every device link rate; write the CSVs, the plot and the docs section.

    Parameters
    ----------
    config : ThreeTierConfig
    out_root : Path
        ``<out_root>/three-tier/`` receives the files.
    docs_path : Path, optional
        The results document whose ``## three-tier`` section is rewritten (None: not).
    progress : bool
        Show progress bars.

    Returns
    -------
    tuple of (list of PlanRun, RunInfo)
    """
    started_s = time.monotonic()
    out_dir = Path(out_root) / NAME
    load_before = load_sample()
    slowdown = find_device(config.device).slowdown
    images = load_images(config.n_images + _N_WARMUP, seed=7)
    runs: list[PlanRun] = []
    records: list[dict[str, Any]] = []
    plans = [(policy, None) for policy in _POLICIES] + [("three-tier", cut) for cut in config.fixed_cuts]
    try:
        services_context = three_tier_services(out_dir / "services", model_dir=config.model_dir,
                                               device_link_mbps=config.device_links_mbps[0],
                                               edge_link=config.edge_link)
        services = services_context.__enter__()
        mode, rates = "netns", config.device_links_mbps
    except HarnessUnavailable as err:
        print(f"note: {err}; the device link is the unshaped loopback", file=sys.stderr)
        services_context = three_tier_services(out_dir / "services", model_dir=config.model_dir,
                                               edge_link=config.edge_link)
        services = services_context.__enter__()
        mode, rates = "loopback", (float("inf"),)
    try:
        for rate_mbps in rates:
            if services.link is not None:
                services.set_device_link_mbps(rate_mbps)
            for policy, cut in plans:
                client = DeviceClient(edge_url=services.edge.url, model_dir=services.model_dir,
                                      device_token=services.device_token, slowdown=slowdown, objective="mean",
                                      policy=policy, pin_x=cut[0] if cut else None, pin_y=cut[1] if cut else None,
                                      refresh_every_n=10**6, refresh_period_s=3600.0, link_change_fraction=10.0,
                                      edge_timeout_ms=10_000.0)
                try:
                    runs.append(_run_plan(client, images, rate_mbps, _label(policy, cut), config, records, progress))
                finally:
                    client.close()
    finally:
        services_context.__exit__(None, None, None)
    csv_path = write_csv(out_dir / "three_tier.csv", runs)
    requests_path = write_csv(out_dir / "requests.csv", records)
    png = out_dir / "three_tier.png"
    _plot(runs, png, config.deadline_ms)
    info = RunInfo(name=NAME, quick=config.quick, run_time_s=time.monotonic() - started_s, mode=mode,
                   link_note="device -> edge tbf; edge -> cloud emulated by the edge" if mode == "netns" else "",
                   load_before=load_before, load_after=load_sample(), files=(csv_path, requests_path, png))
    if docs_path is not None:
        figure = publish_figure(png, Path(docs_path))
        replace_docs_section(Path(docs_path), f"## {NAME}",
                             _summary(runs, info, config, figure, Path(docs_path), slowdown, images.source))
    return runs, info
