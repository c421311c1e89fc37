"""``popex experiment adaptation``: a bandwidth trace replayed on the shaped link while images stream.

The harness changes the tbf rate on a schedule (steps and a ramp, e.g. 20
→ 2 → ramp to 10 → 1 → 20 Mbit/s) while a client sends images at a fixed
rate to the real edge, each with the same latency requirement. The edge's
uplink monitor (short probe interval, small window) must notice each change
and re-plan. Recorded over time:

- the true rate, the edge's estimate and the estimate it planned with
  (``/api/v1/status`` polled every ``status_interval_s``);
- the strategy the edge would use for the requirement (from the same poll)
  and the one each request used;
- each request's latency, and whether it was a fallback.

Reported for each rate change: how long until the edge plans with the new
link (the estimate it planned with has moved to the new rate: within 25%
above it after a drop, at least 80% of it after a rise; an overestimate
after a rise changes no decision), the strategy it chose then, the
strategy it settled on (the most common in the second half of the
segment) and when, and the latency model's own choice at the true link
for comparison; over the trace, the share of requests within the
requirement, with the fallback share separately. The edge plans with the
``tail`` objective (every request's worst case must meet the requirement).

Writes ``results/adaptation/{requests.csv, status.csv, steps.csv,
adaptation.png}`` and the ``## adaptation`` section of ``docs/results.md``.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import requests
from tqdm import tqdm

from popex.decision import Link
from experiments.bandwidth_trace import TraceStep, build_trace
from experiments.planning import Predictor
from experiments.policy_runs import AMPLE_BUDGET_MS, refresh_edge
from experiments.report import (DEFAULT_DOCS_PATH, DEFAULT_OUT_ROOT, RunInfo, load_sample, markdown_table,
                                      publish_figure, pyplot, relative, replace_docs_section, write_csv)
from popex.testbed.harness import Testbed, TestbedConfig, load_images, strategy_text

__all__ = ["NAME", "REPLAN_TARGET_S", "WITHIN_TARGET_SHARE", "TraceStep", "AdaptationConfig", "StepResult",
           "AdaptationResult", "build_trace", "run_adaptation"]

NAME = "adaptation"
#: Acceptance: the decision follows a step within this many seconds.
REPLAN_TARGET_S = 2.0
#: Acceptance: share of requests within the requirement over the trace.
WITHIN_TARGET_SHARE = 0.99
_N_WARMUP = 10
# The plan has followed a drop when its rate is at most 25% above the new
# one, and a rise when it is at least 80% of it (probes overestimate fast
# links through the tbf bucket; that changes no decision).
_DROP_FOLLOWED_FACTOR = 1.25
_RISE_FOLLOWED_FACTOR = 0.8


def _follows(planned_mbps: float, old_mbps: float, new_mbps: float) -> bool:
    if new_mbps < old_mbps:
        return planned_mbps <= _DROP_FOLLOWED_FACTOR * new_mbps
    return planned_mbps >= _RISE_FOLLOWED_FACTOR * new_mbps


def _step_results(steps: list[TraceStep], changed_s: list[float], duration_s: float,
                  samples: list[dict[str, Any]], model_strategy: Any) -> list[StepResult]:
    results = []
    for k, step in enumerate(steps[1:], start=1):
        start_s = changed_s[k]
        end_s = changed_s[k + 1] if k + 1 < len(steps) else duration_s
        before = [s for s in samples if s["t_s"] < start_s]
        during = [s for s in samples if start_s <= s["t_s"] < end_s]
        if not before or not during:
            continue
        second_half = [s for s in during if s["t_s"] >= (start_s + end_s) / 2] or during[-1:]
        steady = Counter(s["strategy"] for s in second_half).most_common(1)[0][0]
        followed = next((s for s in during
                         if _follows(s["planned_uplink_mbps"], steps[k - 1].uplink_mbps, step.uplink_mbps)), None)
        results.append(StepResult(
            time_s=start_s, uplink_mbps=step.uplink_mbps, kind=step.kind, previous_strategy=before[-1]["strategy"],
            replan_s=None if followed is None else followed["t_s"] - start_s,
            strategy_then="-" if followed is None else followed["strategy"], steady_strategy=steady,
            steady_s=next((s["t_s"] - start_s for s in during if s["strategy"] == steady), None),
            model_strategy=model_strategy(step.uplink_mbps)))
    return results


def _plot(steps: list[TraceStep], changed_s: list[float], duration_s: float, samples: list[dict[str, Any]],
          records: list[dict[str, Any]], config: AdaptationConfig, path: Path, mode: str) -> None:
    plt = pyplot()
    fig, (ax_rate, ax_split, ax_latency) = plt.subplots(3, 1, figsize=(12, 8.5), sharex=True)
    ax_rate.step(changed_s + [duration_s], [s.uplink_mbps for s in steps] + [steps[-1].uplink_mbps], where="post",
                 color="k", label="shaped rate (tbf)")
    t = [s["t_s"] for s in samples]
    ax_rate.plot(t, [s["estimate_uplink_mbps"] for s in samples], color="tab:blue", label="edge's estimate")
    ax_rate.plot(t, [s["planned_uplink_mbps"] for s in samples], color="tab:orange", linestyle="--",
                 label="estimate planned with")
    ax_rate.set_yscale("log")
    ax_rate.set_ylabel("uplink (Mbit/s)")
    ax_split.step(t, [s["split"] for s in samples], where="post", color="tab:purple", label="plan (status)")
    ax_split.plot([r["t_s"] for r in records], [r["split"] for r in records], ".", color="tab:red", markersize=3,
                  label="used by the request")
    ax_split.set_ylabel("split (stages on the edge)")
    colours = {"edge": "tab:green", "cloud": "tab:blue"}
    for where, colour in colours.items():
        picked = [r for r in records if r["where"] == where and not r["fallback"]]
        ax_latency.plot([r["t_s"] for r in picked], [r["latency_ms"] for r in picked], ".", color=colour,
                        markersize=4, label=f"answered on the {where}")
    fallbacks = [r for r in records if r["fallback"]]
    ax_latency.plot([r["t_s"] for r in fallbacks], [r["latency_ms"] for r in fallbacks], "x", color="tab:red",
                    label="fallback")
    ax_latency.axhline(config.deadline_ms, color="k", linestyle=":", label=f"requirement {config.deadline_ms:g} ms")
    ax_latency.set_ylabel("latency (ms)")
    ax_latency.set_xlabel("time (s)")
    for ax in (ax_rate, ax_split, ax_latency):
        for x in changed_s[1:]:
            ax.axvline(x, color="grey", alpha=0.25, linewidth=0.8)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    fig.suptitle(f"Adaptation to a bandwidth trace (RTT {config.rtt_ms:g} ms, {config.image_rate_hz:g} images/s, "
                 f"tail objective; link: {mode})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _summary(result: AdaptationResult, step_results: list[StepResult], info: RunInfo, config: AdaptationConfig,
             png: Path, docs_path: Path) -> str:
    follows = "met" if result.max_replan_s is not None and result.max_replan_s <= REPLAN_TARGET_S else "MISSED"
    within = "met" if result.within_share >= WITHIN_TARGET_SHARE else "MISSED"

    def seconds(value: float | None) -> str:
        return "never" if value is None else f"{value:.2f}"

    table = markdown_table(
        ["t (s)", "rate Mbit/s", "change", "before", "plan follows (s)", "strategy then", "settled on",
         "settled after (s)", "model's choice"],
        [[f"{s.time_s:.1f}", f"{s.uplink_mbps:g}", s.kind, s.previous_strategy, seconds(s.replan_s),
          s.strategy_then, s.steady_strategy, seconds(s.steady_s), s.model_strategy] for s in step_results])
    late = [s for s in step_results if s.kind == "step" and s.steady_strategy != s.strategy_then]
    testbed = config.testbed
    return "\n".join([
        f"![adaptation]({relative(png, docs_path.parent)})",
        "",
        info.text(),
        f"Requirement {config.deadline_ms:g} ms for every request (tail objective), {config.image_rate_hz:g} images/s "
        f"on a fixed schedule, RTT {config.rtt_ms:g} ms, edge device emulated {testbed.edge_slowdown:g}x slower; "
        f"uplink monitor: a probe of {testbed.probe_n_bytes} bytes every {testbed.probe_interval_s:g} s, window of "
        f"{testbed.uplink_window_n} samples (plus passive samples from offloads). \"Plan follows\": the estimate "
        "the edge planned with has reached the new rate (within 25% above it after a drop, at least 80% of it after "
        "a rise); \"strategy then\": the decision for that plan; \"settled on\": the most common strategy in the "
        "second half of the segment; \"model's choice\": the latency model's decision at the true link.",
        "",
        f"- **Decision follows a step**: the plan followed each of the {result.n_steps} steps in at most "
        + ("- (one never did)" if result.max_replan_s is None else f"{result.max_replan_s:.2f} s")
        + f" — {follows} (target {REPLAN_TARGET_S:g} s); {result.n_steps_within_target} of {result.n_steps} within it."
        + ("" if not late else " Later strategy changes within a segment ("
           + "; ".join(f"{s.uplink_mbps:g} Mbit/s: {s.strategy_then} → {s.steady_strategy} after {seconds(s.steady_s)} s"
                       for s in late)
           + ") came after the link estimate had settled: they follow the per-offload overhead O the edge keeps "
             "measuring, not the step."),
        f"- **Requests within the requirement**: {100 * result.within_share:.1f}% of {result.n_requests} — {within} "
        f"(target {100 * WITHIN_TARGET_SHARE:g}%); fallbacks {100 * result.fallback_share:.1f}% of requests; "
        f"without the fallbacks {100 * result.within_share_without_fallbacks:.1f}% within; p99 latency "
        f"{result.p99_latency_ms:.1f} ms, max {result.max_latency_ms:.1f} ms.",
        "",
        table,
    ])


@dataclass(frozen=True)
class AdaptationConfig:
    """Settings of the experiment; :meth:`quick_config` is the CI version.

    Attributes
    ----------
    segments : tuple
        The trace (see :func:`build_trace`).
    deadline_ms : float
        The requirement of every request, ms.
    image_rate_hz : float
        Requests per second, sent on a fixed schedule.
    n_workers : int
        Concurrent client connections (a slow answer does not delay the next send).
    status_interval_s : float
        How often the edge's status is read, s.
    rtt_ms : float
    n_images : int
        Distinct test images, sent round-robin.
    seed : int
    quick : bool
    testbed : TestbedConfig
    """

    segments: tuple[tuple[str, float, float, float], ...] = (
        ("hold", 15, 20, 20), ("hold", 15, 2, 2), ("ramp", 8, 2, 10), ("hold", 15, 10, 10), ("hold", 15, 1, 1),
        ("hold", 15, 20, 20))
    deadline_ms: float = 150.0
    image_rate_hz: float = 8.0
    n_workers: int = 4
    status_interval_s: float = 0.2
    rtt_ms: float = 20.0
    n_images: int = 200
    seed: int = 4
    quick: bool = False
    testbed: TestbedConfig = field(default_factory=lambda: TestbedConfig(
        edge_slowdown=60.0, objective="tail", probe_interval_s=0.5, probe_n_bytes=16384, uplink_window_n=3))

    @classmethod
    def quick_config(cls) -> AdaptationConfig:
        """The same trace, 6 s per hold: about a minute."""
        return cls(segments=(("hold", 6, 20, 20), ("hold", 6, 2, 2), ("ramp", 4, 2, 10), ("hold", 6, 10, 10),
                             ("hold", 6, 1, 1), ("hold", 6, 20, 20)), n_images=50, quick=True)


@dataclass(frozen=True)
class StepResult:
    """How the edge followed one rate change (times in s after the change; None: never within the segment).

    Attributes
    ----------
    time_s : float
        When the rate changed, s into the trace.
    uplink_mbps : float
        The new rate.
    kind : str
        "step" or "ramp".
    previous_strategy : str
        The edge's strategy just before the change.
    replan_s : float or None
        Until the edge planned with the new link (see the module doc).
    strategy_then : str
        The edge's strategy at that moment.
    steady_strategy : str
        The most common strategy in the second half of the segment.
    steady_s : float or None
        Until the strategy first equalled ``steady_strategy``.
    model_strategy : str
        The latency model's choice at the true link (profile measured at start-up).
    """

    time_s: float
    uplink_mbps: float
    kind: str
    previous_strategy: str
    replan_s: float | None
    strategy_then: str
    steady_strategy: str
    steady_s: float | None
    model_strategy: str


@dataclass(frozen=True)
class AdaptationResult:
    """The trace's summary.

    ``max_replan_s`` is the slowest :attr:`StepResult.replan_s` over the
    big steps (not the ramp's small ones); None if one never re-planned.
    """

    n_requests: int
    within_share: float
    fallback_share: float
    within_share_without_fallbacks: float
    p99_latency_ms: float
    max_latency_ms: float
    max_replan_s: float | None
    n_steps: int
    n_steps_within_target: int


class _Poller(threading.Thread):
    """Reads ``/api/v1/status`` every ``interval_s`` until stopped (a daemon; every call has a timeout)."""

    def __init__(self, testbed: Testbed, interval_s: float, t0_s: float) -> None:
        super().__init__(name="popex-adaptation-poller", daemon=True)
        self.testbed, self.interval_s, self.t0_s = testbed, interval_s, t0_s
        self.samples: list[dict[str, Any]] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                status = self.testbed.status()
            except Exception as err:  # a slow or failed poll is a gap in the record, not a failed run
                print(f"status poll failed: {err}", file=sys.stderr)
            else:
                uplink, strategy = status["uplink"], status["models"][0]["strategy"]
                self.samples.append({
                    "t_s": time.time() - self.t0_s, "true_uplink_mbps": self.testbed.uplink_mbps,
                    "estimate_uplink_mbps": uplink["uplink_mbps"], "estimate_rtt_ms": uplink["rtt_ms"],
                    "planned_uplink_mbps": uplink["planned"]["uplink_mbps"],
                    "planned_rtt_ms": uplink["planned"]["rtt_ms"], "n_replans": uplink["n_replans"],
                    "split": strategy["split"], "strategy": strategy_text(strategy["split"], strategy["thresholds"]),
                    "feasible": strategy["feasible"], "offload_overhead_ms": status["offload_overhead_ms"]})
            self.stop_event.wait(self.interval_s)


def run_adaptation(config: AdaptationConfig, *, out_root: Path = DEFAULT_OUT_ROOT,
                   docs_path: Path | None = DEFAULT_DOCS_PATH, progress: bool = True
                   ) -> tuple[AdaptationResult, RunInfo]:
    """Replay the trace; write CSVs, PNG and the docs section; return the summary and the run's info.

    Raises
    ------
    ConfigError
        On a bad trace.
    ServiceError
        If a service fails to start.
    """
    started_s = time.monotonic()
    load_before = load_sample()
    steps, duration_s = build_trace(config.segments)
    out_dir = Path(out_root) / NAME
    images = load_images(config.n_images, seed=config.seed)
    testbed_config = replace(config.testbed, rtt_ms=config.rtt_ms, default_deadline_ms=config.deadline_ms)
    records: list[dict[str, Any]] = []
    records_lock = threading.Lock()
    local = threading.local()
    with Testbed(testbed_config, out_dir / "run") as testbed:
        testbed.stream(images.head(_N_WARMUP), policy="cloud-only", deadline_ms=AMPLE_BUDGET_MS, desc="warm-up",
                       progress=False)
        predictor = Predictor.from_model_dir(testbed_config.model_dir, testbed.profile(),
                                             headroom_fraction=testbed_config.plan_headroom_fraction)
        testbed.set_link(uplink_mbps=steps[0].uplink_mbps)
        refresh_edge(testbed, images, estimate_timeout_s=15.0)
        t0_s = time.time()
        poller = _Poller(testbed, config.status_interval_s, t0_s)
        poller.start()

        def send(index: int, scheduled_s: float) -> None:
            session = getattr(local, "session", None)
            if session is None:
                session = local.session = requests.Session()
            i = index % len(images)
            try:
                record = testbed.classify(session, images.images_png[i], int(images.labels[i]), policy="adaptive",
                                          deadline_ms=config.deadline_ms)
            except Exception as err:  # counted as a miss, never lost
                record = {"error": str(err), "latency_ms": float("inf"), "fallback": False, "where": "error",
                          "split": -1, "strategy": "error", "correct": False}
            record.update(t_s=scheduled_s, true_uplink_mbps=testbed.uplink_mbps)
            with records_lock:
                records.append(record)

        changed_s = [0.0]
        n_requests = int(duration_s * config.image_rate_hz)
        with ThreadPoolExecutor(max_workers=config.n_workers) as pool:
            step_index = 1
            for index in tqdm(range(n_requests), desc=NAME, file=sys.stderr, disable=not progress):
                scheduled_s = index / config.image_rate_hz
                while step_index < len(steps) and steps[step_index].start_s <= scheduled_s:
                    time.sleep(max(0.0, t0_s + steps[step_index].start_s - time.time()))
                    changed_s.append(testbed.set_link(uplink_mbps=steps[step_index].uplink_mbps) - t0_s)
                    step_index += 1
                time.sleep(max(0.0, t0_s + scheduled_s - time.time()))
                pool.submit(send, index, time.time() - t0_s)
        poller.stop_event.set()
        poller.join(timeout=10.0)
        mode, link_note = testbed.mode, testbed.link_note
    records.sort(key=lambda r: r["t_s"])
    samples = list(poller.samples)
    def model_strategy(uplink_mbps: float) -> str:
        return predictor.policy("adaptive", link=Link(uplink_mbps=uplink_mbps, rtt_ms=config.rtt_ms),
                                deadline_ms=config.deadline_ms, objective=testbed_config.objective).strategy

    step_results = _step_results(steps, changed_s, duration_s, samples, model_strategy)
    latency_ms = np.array([r["latency_ms"] for r in records])
    fallback = np.array([bool(r["fallback"]) for r in records])
    within = latency_ms <= config.deadline_ms
    big = [s.replan_s for s in step_results if s.kind == "step"]
    result = AdaptationResult(
        n_requests=len(records), within_share=float(within.mean()), fallback_share=float(fallback.mean()),
        within_share_without_fallbacks=float(within[~fallback].mean()) if (~fallback).any() else float("nan"),
        p99_latency_ms=float(np.percentile(latency_ms, 99)), max_latency_ms=float(latency_ms.max()),
        max_replan_s=None if not big or any(r is None for r in big) else float(max(big)), n_steps=len(big),
        n_steps_within_target=sum(1 for r in big if r is not None and r <= REPLAN_TARGET_S))
    requests_path = write_csv(out_dir / "requests.csv", records)
    status_path = write_csv(out_dir / "status.csv", samples)
    steps_path = write_csv(out_dir / "steps.csv", step_results)
    png = out_dir / "adaptation.png"
    _plot(steps, changed_s, duration_s, samples, records, config, png, mode)
    info = RunInfo(name=NAME, quick=config.quick, run_time_s=time.monotonic() - started_s, mode=mode,
                   link_note=link_note, load_before=load_before, load_after=load_sample(),
                   files=(requests_path, status_path, steps_path, png))
    if docs_path is not None:
        figure = publish_figure(png, Path(docs_path))
        replace_docs_section(Path(docs_path), f"## {NAME}",
                             _summary(result, step_results, info, config, figure, Path(docs_path)))
    return result, info
