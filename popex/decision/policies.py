"""Offload policies: POPEX's decision and the baselines, behind one interface.

A policy picks one row of the strategy table for a latency requirement.
The baselines are rows of the same table, so they share the runtime, the
latency model and the image stream with POPEX; only the choice differs:

- ``adaptive``: POPEX, the most accurate row that meets the requirement (DESIGN §5);
- ``edge-only``: the whole network on the edge, no early exit (split N, branches off);
- ``cloud-only``: the input goes to the cloud (split 0);
- ``neurosurgeon``: the fastest split without early exits (Kang et al.);
- ``edgent``: Edgent (Li et al.): right-size the network, then split it. Its
  exit points are the branches and the final exit; "exit at branch b" means
  every sample leaves there (threshold :data:`EDGENT_THRESHOLD` = 0.0 on b,
  earlier branches off), so its rows exist only where the threshold grid
  holds 0.0 (the edge's does: :func:`edge_threshold_grids`). Edgent takes
  the deepest exit point whose fastest split meets the requirement, else
  the fastest of them (infeasible). Our cloud always runs to the final
  exit, so "exit at b" can only run on the edge (split >= k_b); with a
  grid without 0.0 Edgent has only the final exit and equals Neurosurgeon;
- ``precision-aware``: PAME's thresholds (:mod:`popex.decision.precision_aware`:
  the most early exits that keep accuracy >= 0.99 x the final exit's, chosen on
  the calibration), at the fastest split that holds them.

Policies are looked up by name; an unknown name is a ConfigError naming it.

Every policy judges feasibility against the requirement less a headroom
(``headroom_fraction``, the edge's ``plan_headroom_fraction``): a row
predicted within a few percent of the requirement is as likely to miss it
as to meet it (median prediction error 3-4%, and a few hundred images take
a given exit a few points more or less often than the calibration split),
so a plan keeps that much room. It applies to every policy alike, so the
baselines still differ from POPEX in their choice only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from popex.checks import OBJECTIVES, check_choice, check_deadline_ms, check_finite, check_objective
from popex.decision.decide import DEFAULT_INFEASIBLE_ACCURACY_MARGIN, Decision, DecisionIndex
from popex.decision.sweep import DEFAULT_THRESHOLDS
from popex.decision.table import StrategyTable
from popex.errors import ConfigError

__all__ = ["POLICIES", "EDGENT_THRESHOLD", "MAX_HEADROOM_FRACTION", "DEFAULT_HEADROOM_FRACTION", "PolicyBook",
           "check_policy", "check_headroom", "edge_threshold_grids"]

POLICIES = ("adaptive", "edge-only", "cloud-only", "neurosurgeon", "edgent", "precision-aware")

#: A branch with this threshold takes every sample (confidences are >= 0):
#: Edgent's "exit here always", the network right-sized to that branch.
EDGENT_THRESHOLD = 0.0
#: Largest accepted planning headroom (a fraction of the requirement).
MAX_HEADROOM_FRACTION = 0.5
#: The edge's default ``plan_headroom_fraction``.
DEFAULT_HEADROOM_FRACTION = 0.05


def _no_exit_rows(table: StrategyTable) -> np.ndarray:
    return np.flatnonzero(np.isnan(table.thresholds).all(axis=1))


def _rows_holding(table: StrategyTable, thresholds: tuple[float | None, ...],
                  branch_after_stage: tuple[int, ...]) -> np.ndarray:
    """Rows whose thresholds are ``thresholds`` on the branches at or before their split (the rest off)."""
    wanted = np.array([np.nan if t is None else t for t in thresholds], dtype=np.float64)
    reachable = np.asarray(branch_after_stage)[None, :] <= table.split[:, None]
    expected = np.where(reachable, wanted[None, :], np.nan)
    same = (table.thresholds == expected) | (np.isnan(table.thresholds) & np.isnan(expected))
    return np.flatnonzero(same.all(axis=1))


def _edgent_candidates(table: StrategyTable, latency_ms: np.ndarray) -> tuple[int, ...]:
    """Edgent's exit points, deepest first: for each, its fastest row (final exit, then branches B-1..0).

    Exit at branch b: threshold 0.0 on b, every other branch off (those after
    b are reported off anyway: at a split before them they cannot run, and
    after b nobody reaches them).
    """
    thresholds = table.thresholds
    n_branches = thresholds.shape[1]
    off = np.isnan(thresholds)
    groups = [np.flatnonzero(off.all(axis=1))]
    for b in range(n_branches - 1, -1, -1):
        others_off = np.delete(off, b, axis=1).all(axis=1)
        groups.append(np.flatnonzero(others_off & (thresholds[:, b] == EDGENT_THRESHOLD)))
    return tuple(int(rows[np.argmin(latency_ms[rows])]) for rows in groups if rows.size)


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
    edgent_rows: dict[str, tuple[int, ...]]
    headroom_fraction: float = 0.0

    @classmethod
    def build(cls, table: StrategyTable, *, headroom_fraction: float = 0.0,
              precision_aware: tuple[tuple[float | None, ...], tuple[int, ...]] | None = None,
              infeasible_accuracy_margin: float = DEFAULT_INFEASIBLE_ACCURACY_MARGIN) -> PolicyBook:
        """Index ``table`` for every policy and objective.

        Parameters
        ----------
        table : StrategyTable
            A planner's table (it holds the split-0 and split-N rows).
        headroom_fraction : float
            Rows must be predicted within ``requirement · (1 - headroom_fraction)``
            to count as meeting it.
        precision_aware : (thresholds, branch_after_stage), optional
            PAME's thresholds (:func:`popex.decision.precision_aware.precision_aware_thresholds`,
            on the table's grid) and the branch positions; without them the
            ``precision-aware`` policy is refused.
        infeasible_accuracy_margin : float, default 0.05
            The adaptive policy's answer when nothing fits (:class:`~popex.decision.decide.DecisionIndex`).

        Returns
        -------
        PolicyBook

        Raises
        ------
        ConfigError
            If the headroom is not in [0, :data:`MAX_HEADROOM_FRACTION`].
        """
        headroom_fraction = check_headroom(headroom_fraction)
        n_stages = int(table.split.max())
        no_exit = _no_exit_rows(table)
        fixed_rows: dict[tuple[str, str], int] = {}
        edgent_rows: dict[str, tuple[int, ...]] = {}
        for objective in OBJECTIVES:
            latency_ms = table.latency_ms(objective)
            fixed_rows["edge-only", objective] = int(no_exit[table.split[no_exit] == n_stages][0])
            fixed_rows["cloud-only", objective] = int(np.flatnonzero(table.split == 0)[0])
            fixed_rows["neurosurgeon", objective] = int(no_exit[np.argmin(latency_ms[no_exit])])
            edgent_rows[objective] = _edgent_candidates(table, latency_ms)
            holding = np.array([], dtype=np.int64) if precision_aware is None \
                else _rows_holding(table, *precision_aware)
            if holding.size:
                fixed_rows["precision-aware", objective] = int(holding[np.argmin(latency_ms[holding])])
        indices = {objective: DecisionIndex(table, objective=objective,
                                            infeasible_accuracy_margin=infeasible_accuracy_margin)
                   for objective in OBJECTIVES}
        return cls(table=table, indices=indices, fixed_rows=fixed_rows, edgent_rows=edgent_rows,
                   headroom_fraction=headroom_fraction)

    def decide(self, policy: str, *, deadline_ms: float, objective: str = "mean") -> Decision:
        """The row ``policy`` picks for requirement ``deadline_ms``.

        Parameters
        ----------
        policy : str
            One of :data:`POLICIES`.
        deadline_ms : float
            The latency requirement, ms: finite, in [0, MAX_DEADLINE_MS].
        objective : {"mean", "tail"}

        Returns
        -------
        Decision
            Its ``deadline_ms`` is what the rows were held to: the
            requirement less the book's headroom.

        Raises
        ------
        ConfigError
            On an unknown policy or objective, or a bad deadline.
        """
        policy = check_policy(policy)
        objective = check_objective(objective)
        held_to_ms = check_deadline_ms(deadline_ms) * (1.0 - self.headroom_fraction)
        decision = self.indices[objective]._lookup(held_to_ms)  # checked here, once
        if policy == "adaptive":
            return decision
        if policy == "edgent":
            return self._edgent(decision.deadline_ms, objective)
        if (policy, objective) not in self.fixed_rows:
            raise ConfigError(f"the {policy} policy needs thresholds from the calibration on this table's grid; "
                              "this table was built without them")
        row = self.fixed_rows[policy, objective]
        feasible = bool(self.table.latency_ms(objective)[row] <= decision.deadline_ms)
        return Decision(row=row, feasible=feasible, objective=objective, deadline_ms=decision.deadline_ms)

    def _edgent(self, deadline_ms: float, objective: str) -> Decision:
        candidates = self.edgent_rows[objective]
        latency_ms = self.table.latency_ms(objective)
        for row in candidates:  # deepest exit point first
            if latency_ms[row] <= deadline_ms:
                return Decision(row=row, feasible=True, objective=objective, deadline_ms=deadline_ms)
        fastest = min(candidates, key=lambda row: (latency_ms[row], row))
        return Decision(row=fastest, feasible=False, objective=objective, deadline_ms=deadline_ms)


def check_policy(policy: object) -> str:
    """Return ``policy`` if it names a policy, else raise ConfigError naming the choices.

    Parameters
    ----------
    policy : object
        A name from :data:`POLICIES`.

    Returns
    -------
    str

    Raises
    ------
    ConfigError
        For any other value.

    Examples
    --------
    >>> check_policy("edge-only")
    'edge-only'
    """
    return check_choice(policy, name="policy", choices=POLICIES)


def check_headroom(headroom_fraction: object) -> float:
    """The planning headroom as a float in [0, MAX_HEADROOM_FRACTION].

    Parameters
    ----------
    headroom_fraction : object
        A fraction of the requirement.

    Returns
    -------
    float

    Raises
    ------
    ConfigError
        If it is not a finite number within the bounds.

    Examples
    --------
    >>> check_headroom(0.05)
    0.05
    """
    return check_finite(headroom_fraction, name="headroom_fraction", low=0.0, high=MAX_HEADROOM_FRACTION,
                        allow_text=False)


def edge_threshold_grids(n_branches: int) -> list[list[float]]:
    """Per-branch threshold grids the edge plans with: the sweep's default grid plus 0.0.

    The 0.0 rows ("every sample exits at this branch") are Edgent's
    right-sized networks; they also widen POPEX's own choice when a
    requirement is tight. Kept here, beside the policy that needs them, so
    that the edge and the offline experiments plan with the same grid.

    Parameters
    ----------
    n_branches : int
        Branches of the model, >= 0.

    Returns
    -------
    list of list of float
        ``n_branches`` grids, each ``[0.0, 0.5, 0.55, ..., 0.95]``.

    Raises
    ------
    ConfigError
        If ``n_branches`` is not a non-negative int.

    Examples
    --------
    >>> grids = edge_threshold_grids(2)
    >>> len(grids), grids[0][:3]
    (2, [0.0, 0.5, 0.55])
    """
    if isinstance(n_branches, bool) or not isinstance(n_branches, (int, np.integer)) or n_branches < 0:
        raise ConfigError(f"n_branches must be an int >= 0, got {n_branches!r}")
    return [[EDGENT_THRESHOLD, *DEFAULT_THRESHOLDS] for _ in range(int(n_branches))]
