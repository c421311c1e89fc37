"""Offload policies: POPEX's decision and the baselines, behind one interface.

A policy picks one row of the strategy table for a latency requirement.
The baselines are rows of the same table, so they share the runtime, the
latency model and the image stream with POPEX; only the choice differs:

- ``adaptive``: POPEX, the most accurate row that meets the requirement (DESIGN §5);
- ``edge-only``: the whole network on the edge, no early exit (split N, branches off);
- ``cloud-only``: the input goes to the cloud (split 0);
- ``neurosurgeon``: the fastest split without early exits (Kang et al.).

Policies are looked up by name; an unknown name is a ConfigError naming it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from popex.decision.decide import Decision, DecisionIndex
from popex.decision.table import OBJECTIVES, StrategyTable
from popex.errors import ConfigError

__all__ = ["POLICIES", "PolicyBook", "check_policy"]

POLICIES = ("adaptive", "edge-only", "cloud-only", "neurosurgeon")


def check_policy(policy: object) -> str:
    """Return ``policy`` if it names a policy, else raise ConfigError naming the choices.

    >>> check_policy("edge-only")
    'edge-only'
    """
    if policy not in POLICIES:
        raise ConfigError(f"policy must be one of {POLICIES}, got {policy!r}")
    return str(policy)


def _no_exit_rows(table: StrategyTable) -> np.ndarray:
    return np.flatnonzero(np.isnan(table.thresholds).all(axis=1))


@dataclass(frozen=True, eq=False)
class PolicyBook:
    """Every policy's answer machinery for one table, built once per table.

    Baseline rows do not depend on the requirement, so they are found once;
    the adaptive policy uses one :class:`DecisionIndex` per objective.

    Examples
    --------
    >>> from popex.decision import Calibration, Link, Planner, Profile, sweep_exit_stats
    >>> calibration = Calibration(confidence=np.array([[0.9, 0.9], [0.2, 0.8]]),
    ...     predicted=np.array([[0, 0], [0, 1]]), correct=np.array([[True, True], [False, True]]),
    ...     labels=np.array([0, 1]), temperature=np.ones(2))
    >>> profile = Profile(stage_names=("a", "b"), stage_edge_ms=np.array([5.0, 5.0]),
    ...     stage_cloud_ms=np.array([1.0, 1.0]), branch_after_stage=(1,), branch_edge_ms=np.array([1.0]),
    ...     split_bytes=np.array([1000, 1000, 40]), offload_overhead_ms=1.0)
    >>> stats = sweep_exit_stats(calibration, branch_after_stage=(1,), thresholds=[[0.5]])
    >>> book = PolicyBook.build(Planner(stats, profile).table(Link(uplink_mbps=8.0, rtt_ms=1.0)))
    >>> [int(book.table.split[book.decide("cloud-only", deadline_ms=50.0).row]) for _ in (0,)]
    [0]
    """

    table: StrategyTable
    indices: dict[str, DecisionIndex]
    fixed_rows: dict[tuple[str, str], int]

    @classmethod
    def build(cls, table: StrategyTable) -> PolicyBook:
        """Index ``table`` for every policy and objective."""
        n_stages = int(table.split.max())
        no_exit = _no_exit_rows(table)
        fixed_rows: dict[tuple[str, str], int] = {}
        for objective in OBJECTIVES:
            latency_ms = table.latency_ms(objective)
            fixed_rows["edge-only", objective] = int(no_exit[table.split[no_exit] == n_stages][0])
            fixed_rows["cloud-only", objective] = int(np.flatnonzero(table.split == 0)[0])
            fixed_rows["neurosurgeon", objective] = int(no_exit[np.argmin(latency_ms[no_exit])])
        indices = {objective: DecisionIndex(table, objective=objective) for objective in OBJECTIVES}
        return cls(table=table, indices=indices, fixed_rows=fixed_rows)

    def decide(self, policy: str, *, deadline_ms: float, objective: str = "mean") -> Decision:
        """The row ``policy`` picks for requirement ``deadline_ms``.

        Raises
        ------
        ConfigError
            On an unknown policy or objective, or a bad deadline.
        """
        policy = check_policy(policy)
        if objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        decision = self.indices[objective].lookup(deadline_ms)
        if policy == "adaptive":
            return decision
        row = self.fixed_rows[policy, objective]
        feasible = bool(self.table.latency_ms(objective)[row] <= decision.deadline_ms)
        return Decision(row=row, feasible=feasible, objective=objective, deadline_ms=decision.deadline_ms)
