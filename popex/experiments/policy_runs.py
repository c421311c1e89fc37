"""Run every policy on one link and requirement: predicted and measured, one row per policy.

Shared by ``latency-vs-uplink`` and ``accuracy-vs-deadline``. All policies
get the same images; only the policy differs. POPEX and Edgent decide from
the requirement, so their requests carry it as their budget (a request the
cloud cannot finish in time is answered by the edge: a fallback). The other
baselines do not depend on the requirement; they get an ample budget so
that their latency is measured unclipped, and "meets" compares their
measured latency with the requirement afterwards.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from popex.decision import Link
from popex.decision.policies import POLICIES
from popex.errors import ConfigError
from popex.experiments.measure import summarise
from popex.experiments.planning import Predictor
from popex.experiments.testbed import ImageSet, Testbed

__all__ = ["AMPLE_BUDGET_MS", "PolicyRow", "budget_ms", "requirement_dependent", "refresh_edge",
           "measure_policies", "dominance_problems", "dominance_text"]

#: Budget of requests whose policy does not depend on the requirement, ms.
AMPLE_BUDGET_MS = 10_000.0
# The edge's overhead tracker keeps the median of 21 offloads: after a link
# change, this many offloads make the median the new link's.
_N_REFRESH_OFFLOADS = 12
_BASES = ("predicted", "measured", "test")


def requirement_dependent(policy: str) -> bool:
    """Whether a policy's choice depends on the requirement (POPEX and Edgent do)."""
    return policy in ("adaptive", "edgent")


def budget_ms(policy: str, deadline_ms: float) -> float:
    """The deadline a request of ``policy`` carries: the requirement, or an ample budget for fixed baselines."""
    return deadline_ms if requirement_dependent(policy) else max(AMPLE_BUDGET_MS, 10.0 * deadline_ms)


@dataclass(frozen=True)
class PolicyRow:
    """One policy on one link and requirement: predicted and measured.

    ``measured_meets`` compares the measured mean (mean objective) or p95
    (tail objective) latency with the requirement. ``test_accuracy`` is the
    accuracy, on the whole test split, of the strategy the edge used for
    most requests (NaN without a test predictor); ``measured_accuracy`` is
    that of the streamed images' answers. ``load_1min`` is the machine's
    load average when the policy's requests started.
    """

    profile: str
    uplink_mbps: float
    rtt_ms: float
    deadline_ms: float
    objective: str
    policy: str
    predicted_strategy: str
    predicted_latency_ms: float
    predicted_accuracy: float
    predicted_feasible: bool
    budget_ms: float
    measured_strategy: str
    n_requests: int
    measured_mean_latency_ms: float
    measured_p95_latency_ms: float
    measured_accuracy: float
    measured_within_share: float
    measured_offload_share: float
    measured_fallback_share: float
    measured_meets: bool
    test_accuracy: float
    edge_planned_uplink_mbps: float
    edge_planned_rtt_ms: float
    edge_offload_overhead_ms: float
    edge_predicted_ms: float
    load_1min: float

    @property
    def measured_latency_ms(self) -> float:
        """The measured latency the objective bounds: the mean, or the p95 for "tail"."""
        return self.measured_mean_latency_ms if self.objective == "mean" else self.measured_p95_latency_ms


def refresh_edge(testbed: Testbed, images: ImageSet, *, estimate_timeout_s: float) -> dict[str, Any]:
    """After a link change: a few offloads (passive uplink samples, fresh O), then wait for the estimate.

    Returns the status's ``uplink`` part.
    """
    testbed.stream(images.head(_N_REFRESH_OFFLOADS), policy="cloud-only", deadline_ms=AMPLE_BUDGET_MS,
                   desc="refresh", progress=False)
    return testbed.wait_estimate(timeout_s=estimate_timeout_s)


def _test_accuracy(test_predictor: Predictor | None, records: list[dict[str, Any]], link: Link) -> float:
    if test_predictor is None:
        return math.nan
    most_common = Counter(r["strategy"] for r in records).most_common(1)[0][0]
    record = next(r for r in records if r["strategy"] == most_common)
    return test_predictor.strategy(record["split"], record["thresholds"], link=link).accuracy


def _row(prediction: Any, records: list[dict[str, Any]], *, profile: str, link: Link, deadline_ms: float,
         objective: str, budget: float, planned: dict[str, Any], overhead_ms: float, test_accuracy: float,
         load_1min: float) -> PolicyRow:
    measured = summarise(records, deadline_ms=deadline_ms)
    measured_latency_ms = measured.mean_latency_ms if objective == "mean" else measured.p95_latency_ms
    return PolicyRow(
        profile=profile, uplink_mbps=link.uplink_mbps, rtt_ms=link.rtt_ms, deadline_ms=deadline_ms,
        objective=objective, policy=prediction.policy, predicted_strategy=prediction.strategy,
        predicted_latency_ms=prediction.latency_ms(objective), predicted_accuracy=prediction.accuracy,
        predicted_feasible=prediction.feasible, budget_ms=budget, measured_strategy=measured.strategy,
        n_requests=measured.n_requests, measured_mean_latency_ms=measured.mean_latency_ms,
        measured_p95_latency_ms=measured.p95_latency_ms, measured_accuracy=measured.accuracy,
        measured_within_share=measured.within_share, measured_offload_share=measured.offload_share,
        measured_fallback_share=measured.fallback_share, measured_meets=bool(measured_latency_ms <= deadline_ms),
        test_accuracy=test_accuracy, edge_planned_uplink_mbps=float(planned["uplink_mbps"]),
        edge_planned_rtt_ms=float(planned["rtt_ms"]), edge_offload_overhead_ms=overhead_ms,
        edge_predicted_ms=measured.edge_predicted_ms, load_1min=load_1min)


def measure_policies(testbed: Testbed, predictor: Predictor, images: ImageSet, *, profile: str, link: Link,
                     deadlines_ms: Sequence[float], objective: str, policies: Sequence[str] = POLICIES,
                     test_predictor: Predictor | None = None, progress: bool = True
                     ) -> tuple[list[PolicyRow], list[dict[str, Any]]]:
    """Predict and measure each policy at each requirement on the link in force.

    A policy that decides from the requirement streams the images once per
    requirement; a fixed baseline streams them once (ample budget) and its
    requests are judged against every requirement. ``test_predictor`` (a
    :class:`Predictor` on :func:`~popex.experiments.planning.test_split_calibration`)
    scores the strategy used on the whole test split.

    Returns
    -------
    rows : list of PolicyRow
        One per policy and requirement.
    records : list of dict
        Every request, with ``profile``, ``uplink_mbps`` and ``rtt_ms`` added.
    """
    status = testbed.status()
    planned = status["uplink"].get("planned", status["uplink"])
    overhead_ms = float(status["offload_overhead_ms"])
    where = profile or f"{link.uplink_mbps:g} Mbit/s"
    rows, records_all = [], []
    for policy in policies:
        runs = ([(d, d) for d in deadlines_ms] if requirement_dependent(policy)
                else [(None, budget_ms(policy, max(deadlines_ms)))])
        for deadline_ms, budget in runs:
            load_1min = float(os.getloadavg()[0])
            records = testbed.stream(images, policy=policy, deadline_ms=budget,
                                     desc=f"{where} {policy}" + ("" if deadline_ms is None else f" {deadline_ms:g} ms"),
                                     progress=progress)
            records_all += [{"profile": profile, "uplink_mbps": link.uplink_mbps, "rtt_ms": link.rtt_ms, **record}
                            for record in records]
            test_accuracy = _test_accuracy(test_predictor, records, link)
            for judged_ms in (deadlines_ms if deadline_ms is None else [deadline_ms]):
                prediction = predictor.policy(policy, link=link, deadline_ms=judged_ms, objective=objective)
                rows.append(_row(prediction, records, profile=profile, link=link, deadline_ms=judged_ms,
                                 objective=objective, budget=budget, planned=planned, overhead_ms=overhead_ms,
                                 test_accuracy=test_accuracy, load_1min=load_1min))
    return rows, records_all


def dominance_problems(rows: Sequence[PolicyRow], *, basis: str) -> list[str]:
    """Where a baseline that meets the requirement beats POPEX (empty: the claim holds).

    Rows are grouped by (profile, rate, RTT, requirement). A baseline beats
    POPEX when it is more accurate, or when it meets the requirement and
    POPEX does not (POPEX's accuracy does not count then).

    Parameters
    ----------
    rows : sequence of PolicyRow
    basis : {"predicted", "measured", "test"}
        "predicted": predicted feasibility and calibration accuracy (the
        decision itself); "measured": measured "meets" and the streamed
        images' accuracy; "test": measured "meets" and the test-split
        accuracy of the strategies used.

    Raises
    ------
    ConfigError
        On an unknown basis.
    """
    if basis not in _BASES:
        raise ConfigError(f"basis must be one of {_BASES}, got {basis!r}")
    accuracy_of = {"predicted": lambda r: r.predicted_accuracy, "measured": lambda r: r.measured_accuracy,
                   "test": lambda r: r.test_accuracy}[basis]
    groups: dict[tuple, dict[str, PolicyRow]] = {}
    for row in rows:
        groups.setdefault((row.profile, row.uplink_mbps, row.rtt_ms, row.deadline_ms), {})[row.policy] = row
    problems = []
    for (profile, uplink_mbps, _, deadline_ms), at in groups.items():
        popex = at.get("adaptive")
        if popex is None:
            continue
        ours = accuracy_of(popex)

        def meets(row: PolicyRow) -> bool:
            return row.predicted_feasible if basis == "predicted" else row.measured_meets

        for policy, row in at.items():
            theirs = accuracy_of(row)
            if policy == "adaptive" or not meets(row):
                continue
            where = profile or f"{uplink_mbps:g} Mbit/s"
            if not meets(popex):
                problems.append(f"{where}, {deadline_ms:g} ms: {policy} meets it, POPEX does not"
                                + ("" if basis == "predicted" else f" ({popex.measured_latency_ms:.1f} ms)"))
            elif ours < theirs:
                problems.append(f"{where}, {deadline_ms:g} ms: {policy} {100 * theirs:.2f}% > POPEX "
                                f"{100 * ours:.2f}%")
    return problems


def dominance_text(rows: Sequence[PolicyRow], *, n_images: int, test_source: str) -> str:
    """The docs' paragraph on "POPEX >= every baseline that meets the requirement", on each basis."""

    def verdict(basis: str) -> str:
        problems = dominance_problems(rows, basis=basis)
        return "holds everywhere" if not problems else f"VIOLATED at {len(problems)}: " + "; ".join(problems[:8])

    return ("**POPEX >= every baseline that meets the requirement.** Predicted (the decision: calibration "
            f"accuracy, predicted feasibility): {verdict('predicted')}. Measured \"meets\" with the test-split "
            f"accuracy of the strategy each policy used ({test_source}): {verdict('test')}. Measured \"meets\" "
            f"with the accuracy of the {n_images} streamed images: {verdict('measured')} (a difference of one "
            f"image is {100 / n_images:.1f} points there).")
