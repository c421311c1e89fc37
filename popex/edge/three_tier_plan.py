"""The edge's Decision Maker over both hops: a device's cut x, the edge's cut y and every branch's threshold.

``GET /api/v1/plan`` (``edge_api.device``) and every device tensor
(:mod:`popex.edge.tensor_run`) read :meth:`DevicePlanner.plan`. The table is
:func:`popex.decision.three_tier.three_tier_table` over (θ, x, y) with:

- **exit statistics**: the model's two-tier plan's own sweep (``ModelPlan.stats``,
  the same calibration and threshold grids), so both planners agree on θ;
- **device times**: the device's reported stage and branch times
  (:mod:`popex.edge.device_link`), else the edge's, marked "assumed";
- **edge and cloud times**: the model's current profile (the emulated edge
  slowdown and the cloud's measured times included);
- **device -> edge hop**: the link the devices measured, no fixed overhead
  (their probes' base time already holds one request's HTTP cost);
- **edge -> cloud hop**: the edge's uplink monitor and measured overhead O;
  bytes on both hops scaled by the measured wire ratio (both tiers deflate);
- **device -> cloud** (x = y < N): the device still talks to its edge, which
  forwards at once, so that hop is the two hops in series.

The cloud evaluates no branch (``branches_on_cloud=False``). The decision is
the policy's (:func:`popex.decision.three_tier_policies.choose_three_tier`)
with the plan headroom; a device may pin the cuts (``x``/``y``) and get the
best thresholds for them. Tables are cached per model on the inputs they
were built from (profile object, both links, the device timings' version),
so repeated plan queries and tensors cost a dict lookup; a new estimate
rebuilds one table, milliseconds.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from popex.checks import check_deadline_ms, check_int, check_objective
from popex.decision.latency import Link
from popex.decision.three_tier import Hop, ThreeTierProfile, ThreeTierTable, three_tier_table
from popex.decision.three_tier_policies import THREE_TIER_POLICIES, choose_three_tier
from popex.edge.device_link import DeviceLinks
from popex.errors import ConfigError

__all__ = ["DEFAULT_THREE_TIER_POLICY", "DevicePlan", "DevicePlanner", "series_hop"]

DEFAULT_THREE_TIER_POLICY = "three-tier"
_MAX_CACHED_TABLES = 64


@dataclass(frozen=True)
class DevicePlan:
    """One decision over both hops: what the device runs, what the edge runs, and what it predicts.

    Attributes
    ----------
    model_id : str
    x, y : int
        The device runs stages 1..x, the edge x+1..y, the cloud y+1..N.
    thresholds : tuple of (float or None)
        Every branch's threshold; None = off.
    device_branches, edge_branches : tuple of int
        The active branches on each tier (k_b <= x; x < k_b <= y).
    accuracy, expected_latency_ms, worst_latency_ms : float
        Predicted on the calibration data.
    edge_prob, cloud_prob : float
        Predicted fraction of requests that reach the edge (leave the device) and the cloud.
    feasible : bool
        False: nothing met the requirement, the policy's fastest row.
    policy, objective : str
    deadline_ms : float
    device_edge, edge_cloud : Link
        The links planned with.
    device_timings : str
        "reported" (the device's own) or "assumed" (the edge's times).
    device_stage_ms : tuple of float
        The device stage times planned with, ms.
    """

    model_id: str
    n_stages: int
    branch_after_stage: tuple[int, ...]
    x: int
    y: int
    thresholds: tuple[float | None, ...]
    device_branches: tuple[int, ...]
    edge_branches: tuple[int, ...]
    accuracy: float
    expected_latency_ms: float
    worst_latency_ms: float
    edge_prob: float
    cloud_prob: float
    feasible: bool
    policy: str
    objective: str
    deadline_ms: float
    device_edge: Link
    edge_cloud: Link
    device_timings: str
    device_stage_ms: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        """The body of ``GET /api/v1/plan``.

        Returns
        -------
        dict
        """
        return {
            "model_id": self.model_id, "n_stages": self.n_stages, "branch_after_stage": list(self.branch_after_stage),
            "x": self.x, "y": self.y, "thresholds": list(self.thresholds),
            "device_branches": list(self.device_branches), "edge_branches": list(self.edge_branches),
            "accuracy": self.accuracy, "expected_latency_ms": self.expected_latency_ms,
            "worst_latency_ms": self.worst_latency_ms, "edge_prob": self.edge_prob, "cloud_prob": self.cloud_prob,
            "feasible": self.feasible, "policy": self.policy,
            "objective": self.objective, "deadline_ms": self.deadline_ms,
            "links": {name: {"uplink_mbps": link.uplink_mbps, "rtt_ms": link.rtt_ms}
                      for name, link in (("device_edge", self.device_edge), ("edge_cloud", self.edge_cloud))},
            "device_timings": self.device_timings, "device_stage_ms": list(self.device_stage_ms),
        }


def series_hop(first: Hop, second: Hop) -> Hop:
    """Two hops one after the other as one: RTTs and overheads add, so do the per-byte times.

    Parameters
    ----------
    first, second : Hop

    Returns
    -------
    Hop

    Examples
    --------
    >>> hop = series_hop(Hop(Link(10.0, 5.0), 1.0), Hop(Link(10.0, 20.0), 2.0))
    >>> hop.link.uplink_mbps, hop.link.rtt_ms, hop.overhead_ms
    (5.0, 25.0, 3.0)
    """
    rate = 1.0 / (1.0 / first.link.uplink_mbps + 1.0 / second.link.uplink_mbps)
    return Hop(Link(uplink_mbps=rate, rtt_ms=first.link.rtt_ms + second.link.rtt_ms),
               overhead_ms=first.overhead_ms + second.overhead_ms)


@dataclass(frozen=True, eq=False)
class _Table:
    table: ThreeTierTable
    device_edge: Link
    edge_cloud: Link
    device_timings: str
    device_stage_ms: np.ndarray


class DevicePlanner:
    """Three-tier plans of the edge's models, from the model plans, the uplink and the devices' reports.

    Parameters
    ----------
    plans : PlanBook
        The two-tier plans (statistics, profile) and the edge -> cloud link.
    devices : DeviceLinks
        The device -> edge link and the device timings.
    headroom_fraction : float
        As the two-tier plans (the config's ``plan_headroom_fraction``).
    """

    def __init__(self, *, plans: Any, devices: DeviceLinks, headroom_fraction: float) -> None:
        self.plans = plans
        self.devices = devices
        self.headroom_fraction = headroom_fraction
        self._tables: dict[tuple[Any, ...], _Table] = {}
        self._lock = threading.Lock()

    def _table(self, model_id: str, model_plan: Any) -> _Table:
        profile = model_plan.profile
        edge_cloud = self.plans.link
        device_edge = self.devices.link()
        key = (model_id, id(profile), edge_cloud, device_edge, self.devices.version)
        with self._lock:
            cached = self._tables.get(key)
        if cached is not None:
            return cached
        stage_ms, branch_ms = self.devices.timings(model_id)
        reported = stage_ms is not None
        stage_ms = np.asarray(profile.stage_edge_ms if stage_ms is None else stage_ms, dtype=np.float64)
        branch_ms = np.asarray(profile.branch_edge_ms if branch_ms is None else branch_ms, dtype=np.float64)
        three = ThreeTierProfile(
            stage_ms=np.stack([stage_ms, profile.stage_edge_ms, profile.stage_cloud_ms]),
            branch_ms=np.stack([branch_ms, profile.branch_edge_ms, profile.branch_edge_ms]),
            branch_after_stage=profile.branch_after_stage,
            split_bytes=np.asarray(profile.split_bytes, dtype=np.float64) * float(profile.wire_ratio))
        de = Hop(device_edge, overhead_ms=0.0)
        ec = Hop(edge_cloud, overhead_ms=float(profile.offload_overhead_ms))
        table = three_tier_table(model_plan.stats, three, device_edge=de, edge_cloud=ec,
                                 device_cloud=series_hop(de, ec), branches_on_cloud=False)
        built = _Table(table=table, device_edge=device_edge, edge_cloud=edge_cloud,
                       device_timings="reported" if reported else "assumed", device_stage_ms=stage_ms)
        with self._lock:
            if len(self._tables) >= _MAX_CACHED_TABLES:
                self._tables.clear()
            self._tables[key] = built
        return built

    def table(self, model: Any, model_plan: Any) -> ThreeTierTable:
        """The current three-tier table of a model (for experiments and views).

        Parameters
        ----------
        model : StoredModel
        model_plan : ModelPlan

        Returns
        -------
        ThreeTierTable
        """
        return self._table(model.model_id, model_plan).table

    def plan(self, model: Any, model_plan: Any, *, deadline_ms: float, objective: str,
             policy: str = DEFAULT_THREE_TIER_POLICY, x: int | None = None, y: int | None = None) -> DevicePlan:
        """The decision for a requirement: cuts and thresholds of every tier.

        Parameters
        ----------
        model : StoredModel
        model_plan : ModelPlan
            Its two-tier plan (statistics, current profile).
        deadline_ms : float
        objective : {"mean", "tail"}
        policy : str
            A key of :data:`popex.decision.three_tier_policies.THREE_TIER_POLICIES`.
        x, y : int, optional
            Pin the cuts (0 <= x <= y <= N): only the thresholds are chosen.

        Returns
        -------
        DevicePlan

        Raises
        ------
        ConfigError
            Bad requirement, objective, policy or cuts.
        """
        deadline_ms = check_deadline_ms(deadline_ms)
        objective = check_objective(objective)
        if policy not in THREE_TIER_POLICIES:
            raise ConfigError(f"unknown three-tier policy {str(policy)[:40]!r}; one of {', '.join(THREE_TIER_POLICIES)}")
        n_stages = model.loaded.net.n_stages
        built = self._table(model.model_id, model_plan)
        table = built.table
        allowed = np.ones(table.x.shape, dtype=bool)
        if x is not None:
            allowed &= table.x == check_int(x, name="x", low=0, high=n_stages)
        if y is not None:
            allowed &= table.y == check_int(y, name="y", low=0, high=n_stages)
        if not allowed.any():
            raise ConfigError(f"no cut with x = {x}, y = {y}: the cuts need 0 <= x <= y <= {n_stages}")
        choice = choose_three_tier(table, policy=policy, deadline_ms=deadline_ms, objective=objective,
                                   headroom_fraction=self.headroom_fraction, allowed=allowed)
        raw = table.thresholds[choice.config]
        thresholds = tuple(None if np.isnan(t) else float(t) for t in raw)
        positions = tuple(model_plan.profile.branch_after_stage)
        active = [b for b, t in enumerate(thresholds) if t is not None]
        q = table.exit_probs[choice.config]

        def in_flight(cut: int) -> float:  # still going after stage `cut`; nothing leaves after N
            return 0.0 if cut >= n_stages else float(1.0 - sum(q[b] for b in active if positions[b] <= cut))
        return DevicePlan(
            model_id=model.model_id, n_stages=n_stages, branch_after_stage=positions, x=choice.x, y=choice.y,
            thresholds=thresholds, device_branches=tuple(b for b in active if positions[b] <= choice.x),
            edge_branches=tuple(b for b in active if choice.x < positions[b] <= choice.y),
            accuracy=choice.accuracy, expected_latency_ms=choice.expected_latency_ms,
            worst_latency_ms=choice.worst_latency_ms, edge_prob=in_flight(choice.x),
            cloud_prob=in_flight(choice.y), feasible=choice.feasible, policy=policy, objective=objective,
            deadline_ms=deadline_ms, device_edge=built.device_edge, edge_cloud=built.edge_cloud,
            device_timings=built.device_timings, device_stage_ms=tuple(float(v) for v in built.device_stage_ms))
