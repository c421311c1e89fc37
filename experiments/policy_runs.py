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
from popex.testbed.measure import summarise
from experiments.planning import Predictor
from popex.testbed.harness import ImageSet, Testbed

__all__ = ["AMPLE_BUDGET_MS", "PolicyRow", "budget_ms", "requirement_dependent", "refresh_edge",
           "measure_policies", "stratified_latency_ms", "dominance_problems", "dominance_ties",
           "dominance_text"]

#: Budget of requests whose policy does not depend on the requirement, ms.
AMPLE_BUDGET_MS = 10_000.0
# The edge's overhead tracker keeps the median of 21 offloads: after a link
# change, this many offloads make the median the new link's.
_N_REFRESH_OFFLOADS = 12
_BASES = ("predicted", "measured", "test")


def _most_common_strategy(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of the strategy the edge used most often."""
    most_common = Counter(r["strategy"] for r in records).most_common(1)[0][0]
    return [r for r in records if r["strategy"] == most_common]


def _test_accuracy(test_predictor: Predictor | None, records: list[dict[str, Any]], link: Link) -> float:
    if test_predictor is None:
        return math.nan
    record = _most_common_strategy(records)[0]
    return test_predictor.strategy(record["split"], record["thresholds"], link=link).accuracy


def _row(prediction: Any, records: list[dict[str, Any]], *, profile: str, link: Link, deadline_ms: float,
         objective: str, budget: float, planned: dict[str, Any], overhead_ms: float, test_accuracy: float,
         test_mean_latency_ms: float, load_1min: float) -> PolicyRow:
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
        test_accuracy=test_accuracy, test_mean_latency_ms=test_mean_latency_ms,
        edge_planned_uplink_mbps=float(planned["uplink_mbps"]),
        edge_planned_rtt_ms=float(planned["rtt_ms"]), edge_offload_overhead_ms=overhead_ms,
        edge_predicted_ms=measured.edge_predicted_ms, load_1min=load_1min)


def _chosen(row: PolicyRow) -> str:
    return row.measured_strategy.removesuffix(" (mostly)")


def _compare(rows: Sequence[PolicyRow], basis: str) -> tuple[list[str], list[str]]:
    """(problems, ties) of :func:`dominance_problems`."""
    if basis not in _BASES:
        raise ConfigError(f"basis must be one of {_BASES}, got {basis!r}")
    accuracy_of = {"predicted": lambda r: r.predicted_accuracy, "measured": lambda r: r.measured_accuracy,
                   "test": lambda r: r.test_accuracy}[basis]

    def meets(row: PolicyRow) -> bool:
        return {"predicted": row.predicted_feasible, "measured": row.measured_meets, "test": row.test_meets}[basis]

    groups: dict[tuple, dict[str, PolicyRow]] = {}
    for row in rows:
        groups.setdefault((row.profile, row.uplink_mbps, row.rtt_ms, row.deadline_ms), {})[row.policy] = row
    problems, ties = [], []
    for (profile, uplink_mbps, _, deadline_ms), at in groups.items():
        popex = at.get("adaptive")
        if popex is None:
            continue
        ours = accuracy_of(popex)
        for policy, row in at.items():
            theirs = accuracy_of(row)
            if policy == "adaptive" or not meets(row):
                continue
            where = profile or f"{uplink_mbps:g} Mbit/s"
            if not meets(popex):
                latency_ms = {"predicted": None, "measured": popex.measured_latency_ms,
                              "test": popex.test_latency_ms}[basis]
                if latency_ms is None:
                    problems.append(f"{where}, {deadline_ms:g} ms: {policy} meets it, POPEX does not")
                elif _chosen(row) == _chosen(popex):
                    theirs_ms = row.measured_latency_ms if basis == "measured" else row.test_latency_ms
                    ties.append(f"{where}, {deadline_ms:g} ms: {policy} and POPEX both ran {_chosen(popex)}, "
                                f"measured {theirs_ms:.1f} and {latency_ms:.1f} ms")
                else:
                    problems.append(f"{where}, {deadline_ms:g} ms: {policy} meets it, POPEX does not "
                                    f"({latency_ms:.1f} ms)")
            elif ours < theirs:
                problems.append(f"{where}, {deadline_ms:g} ms: {policy} {100 * theirs:.2f}% > POPEX "
                                f"{100 * ours:.2f}%")
    return problems, ties


@dataclass(frozen=True)
class PolicyRow:
    """One policy on one link and requirement: predicted and measured.

    ``measured_meets`` compares the measured mean (mean objective) or p95
    (tail objective) latency with the requirement. ``test_accuracy`` is the
    accuracy, on the whole test split, of the strategy the edge used for
    most requests (NaN without a test predictor); ``measured_accuracy`` is
    that of the streamed images' answers. ``test_mean_latency_ms`` is the
    mean latency of that strategy on the whole test split: each exit path's
    measured mean latency, weighted by how often the test split takes that
    path (:func:`stratified_latency_ms`); :attr:`test_meets` compares it
    (tail objective: the measured p95) with the requirement. ``load_1min`` is the machine's
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
    test_mean_latency_ms: float
    edge_planned_uplink_mbps: float
    edge_planned_rtt_ms: float
    edge_offload_overhead_ms: float
    edge_predicted_ms: float
    load_1min: float

    @property
    def measured_latency_ms(self) -> float:
        """The measured latency the objective bounds: the mean, or the p95 for "tail"."""
        return self.measured_mean_latency_ms if self.objective == "mean" else self.measured_p95_latency_ms

    @property
    def test_latency_ms(self) -> float:
        """The test-split latency the objective bounds: the mean (streamed mean without one), or the measured p95."""
        if self.objective == "tail":
            return self.measured_p95_latency_ms
        return self.measured_mean_latency_ms if math.isnan(self.test_mean_latency_ms) else self.test_mean_latency_ms

    @property
    def test_meets(self) -> bool:
        """Whether :attr:`test_latency_ms` meets the requirement."""
        return bool(self.test_latency_ms <= self.deadline_ms)


def requirement_dependent(policy: str) -> bool:
    """Whether a policy's choice depends on the requirement (POPEX and Edgent do)."""
    return policy in ("adaptive", "edgent")


def budget_ms(policy: str, deadline_ms: float) -> float:
    """The deadline a request of ``policy`` carries: the requirement, or an ample budget for fixed baselines."""
    return deadline_ms if requirement_dependent(policy) else max(AMPLE_BUDGET_MS, 10.0 * deadline_ms)


def refresh_edge(testbed: Testbed, images: ImageSet, *, estimate_timeout_s: float) -> dict[str, Any]:
    """After a link change: a few offloads (passive uplink samples, fresh O), then wait for the estimate.

    Returns the status's ``uplink`` part.
    """
    testbed.stream(images.head(_N_REFRESH_OFFLOADS), policy="cloud-only", deadline_ms=AMPLE_BUDGET_MS,
                   desc="refresh", progress=False)
    return testbed.wait_estimate(timeout_s=estimate_timeout_s)


def stratified_latency_ms(test_predictor: Predictor | None, records: list[dict[str, Any]], link: Link) -> float:
    """Mean latency of the most used strategy over the whole test split (NaN if it cannot be had).

    A stream of a hundred images takes an early exit a few points more or
    less often than the 10,000 test images do, and with paths 30 ms apart
    that moves the mean by a millisecond or two: as much as the margin
    between policies at a tight requirement. So, as the test-split accuracy
    does for accuracy: each exit path's latency is the mean measured over
    the streamed images that took it, weighted by the share of the test
    split that takes it (post-stratification; one path = the plain mean).
    NaN when a path that the test split takes at least 1% of the time was
    never measured.
    """
    if test_predictor is None:
        return math.nan
    used = _most_common_strategy(records)
    prediction = test_predictor.strategy(used[0]["split"], used[0]["thresholds"], link=link)
    shares = {**{b: p for b, p in enumerate(prediction.exit_probs)},
              "final": max(0.0, 1.0 - sum(prediction.exit_probs))}
    total_ms, total_share = 0.0, 0.0
    for path, share in shares.items():
        measured = [r["latency_ms"] for r in used if r["exit"] == path]
        if not measured:
            if share >= 0.01:
                return math.nan
            continue
        total_ms += share * sum(measured) / len(measured)
        total_share += share
    return total_ms / total_share if total_share > 0 else math.nan


def measure_policies(testbed: Testbed, predictor: Predictor, images: ImageSet, *, profile: str, link: Link,
                     deadlines_ms: Sequence[float], objective: str, policies: Sequence[str] = POLICIES,
                     test_predictor: Predictor | None = None, progress: bool = True
                     ) -> tuple[list[PolicyRow], list[dict[str, Any]]]:
    """Predict and measure each policy at each requirement on the link in force.

    A policy that decides from the requirement streams the images once per
    requirement; a fixed baseline streams them once (ample budget) and its
    requests are judged against every requirement. ``test_predictor`` (a
    :class:`Predictor` on :func:`~experiments.planning.test_split_calibration`)
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
            test_mean_latency_ms = stratified_latency_ms(test_predictor, records, link)
            for judged_ms in (deadlines_ms if deadline_ms is None else [deadline_ms]):
                prediction = predictor.policy(policy, link=link, deadline_ms=judged_ms, objective=objective)
                rows.append(_row(prediction, records, profile=profile, link=link, deadline_ms=judged_ms,
                                 objective=objective, budget=budget, planned=planned, overhead_ms=overhead_ms,
                                 test_accuracy=test_accuracy, test_mean_latency_ms=test_mean_latency_ms,
                                 load_1min=load_1min))
    return rows, records_all


def dominance_problems(rows: Sequence[PolicyRow], *, basis: str) -> list[str]:
    """Where a baseline that meets the requirement beats POPEX (empty: the claim holds).

    Rows are grouped by (profile, rate, RTT, requirement). A baseline beats
    POPEX when it is more accurate, or when it meets the requirement and
    POPEX does not (POPEX's accuracy does not count then) with another
    strategy. When both ran the same strategy, their choice was the same and
    only the two measurements of it differ (a requirement within the noise
    of that strategy's latency): :func:`dominance_ties` lists those.

    Parameters
    ----------
    rows : sequence of PolicyRow
    basis : {"predicted", "measured", "test"}
        "predicted": predicted feasibility and calibration accuracy (the
        decision itself); "measured": measured "meets" and the streamed
        images' accuracy; "test": the test-split accuracy of the strategies
        used, and "meets" with their test-split mean latency
        (``test_meets``).

    Raises
    ------
    ConfigError
        On an unknown basis.
    """
    return _compare(rows, basis)[0]


def dominance_ties(rows: Sequence[PolicyRow], *, basis: str) -> list[str]:
    """Where a baseline met the requirement and POPEX, running the same strategy, did not (see
    :func:`dominance_problems`)."""
    return _compare(rows, basis)[1]


def dominance_text(rows: Sequence[PolicyRow], *, n_images: int, test_source: str) -> str:
    """The docs' paragraph on "POPEX >= every baseline that meets the requirement", on each basis."""

    def verdict(basis: str) -> str:
        problems, ties = _compare(rows, basis)
        text = "holds everywhere" if not problems else f"VIOLATED at {len(problems)}: " + "; ".join(problems[:8])
        if ties:
            text += (f" ({len(ties)} tie{'s' if len(ties) > 1 else ''}, the same strategy measured on either side "
                     "of the requirement: " + "; ".join(ties[:4]) + ")")
        return text

    return ("**POPEX >= every baseline that meets the requirement.** Predicted (the decision: calibration "
            f"accuracy, predicted feasibility): {verdict('predicted')}. Test split ({test_source}; the accuracy "
            "of the strategy each policy used, and its mean latency: each exit path's measured latency weighted "
            f"by how often the test split takes it): {verdict('test')}. Measured \"meets\" "
            f"with the accuracy of the {n_images} streamed images: {verdict('measured')} (a difference of one "
            f"image is {100 / n_images:.1f} points there).")
