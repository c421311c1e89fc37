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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from popex.decision import Link
from popex.decision.policies import POLICIES
from popex.experiments.measure import summarise
from popex.experiments.planning import Predictor
from popex.experiments.testbed import ImageSet, Testbed

__all__ = ["AMPLE_BUDGET_MS", "PolicyRow", "budget_ms", "requirement_dependent", "refresh_edge",
           "measure_policies", "dominance_problems"]

#: Budget of requests whose policy does not depend on the requirement, ms.
AMPLE_BUDGET_MS = 10_000.0
# The edge's overhead tracker keeps the median of 21 offloads: after a link
# change, this many offloads make the median the new link's.
_N_REFRESH_OFFLOADS = 12


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
    (tail objective) latency with the requirement.
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
    edge_planned_uplink_mbps: float
    edge_planned_rtt_ms: float
    edge_offload_overhead_ms: float
    edge_predicted_ms: float

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


def _row(prediction: Any, records: list[dict[str, Any]], *, profile: str, link: Link, deadline_ms: float,
         objective: str, budget: float, planned: dict[str, Any], overhead_ms: float) -> PolicyRow:
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
        edge_planned_uplink_mbps=float(planned["uplink_mbps"]), edge_planned_rtt_ms=float(planned["rtt_ms"]),
        edge_offload_overhead_ms=overhead_ms, edge_predicted_ms=measured.edge_predicted_ms)


def measure_policies(testbed: Testbed, predictor: Predictor, images: ImageSet, *, profile: str, link: Link,
                     deadlines_ms: Sequence[float], objective: str, policies: Sequence[str] = POLICIES,
                     progress: bool = True) -> tuple[list[PolicyRow], list[dict[str, Any]]]:
    """Predict and measure each policy at each requirement on the link in force.

    A policy that decides from the requirement streams the images once per
    requirement; a fixed baseline streams them once (ample budget) and its
    requests are judged against every requirement.

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
            records = testbed.stream(images, policy=policy, deadline_ms=budget,
                                     desc=f"{where} {policy}" + ("" if deadline_ms is None else f" {deadline_ms:g} ms"),
                                     progress=progress)
            records_all += [{"profile": profile, "uplink_mbps": link.uplink_mbps, "rtt_ms": link.rtt_ms, **record}
                            for record in records]
            for judged_ms in (deadlines_ms if deadline_ms is None else [deadline_ms]):
                prediction = predictor.policy(policy, link=link, deadline_ms=judged_ms, objective=objective)
                rows.append(_row(prediction, records, profile=profile, link=link, deadline_ms=judged_ms,
                                 objective=objective, budget=budget, planned=planned, overhead_ms=overhead_ms))
    return rows, records_all


def dominance_problems(rows: Sequence[PolicyRow], *, predicted: bool) -> list[str]:
    """Where POPEX is less accurate than a baseline that meets the requirement (empty: the claim holds).

    Rows are grouped by (profile, rate, RTT, requirement); ``predicted``
    picks the predicted columns (calibration) or the measured ones.
    """
    groups: dict[tuple, dict[str, PolicyRow]] = {}
    for row in rows:
        groups.setdefault((row.profile, row.uplink_mbps, row.rtt_ms, row.deadline_ms), {})[row.policy] = row
    problems = []
    for (profile, uplink_mbps, rtt_ms, deadline_ms), at in groups.items():
        popex = at.get("adaptive")
        if popex is None:
            continue
        ours = popex.predicted_accuracy if predicted else popex.measured_accuracy
        for policy, row in at.items():
            meets = row.predicted_feasible if predicted else row.measured_meets
            theirs = row.predicted_accuracy if predicted else row.measured_accuracy
            if policy != "adaptive" and meets and ours < theirs:
                where = profile or f"{uplink_mbps:g} Mbit/s"
                problems.append(f"{where}, {deadline_ms:g} ms: {policy} {100 * theirs:.2f}% > POPEX "
                                f"{100 * ours:.2f}%")
    return problems
