"""Pick the strategy for a latency requirement (DESIGN.md §5).

Rule: among the rows whose latency (mean objective: E[T]; tail objective:
worst case) is <= the deadline, the most accurate; ties go to the lower
latency, then to the lower row index. If no row is feasible, the fastest
row (ties: lowest index), marked infeasible.

The public entries (:func:`decide`, :meth:`DecisionIndex.lookup`) check
their arguments with :mod:`popex.checks`; a requirement must be finite
(at most :data:`popex.checks.MAX_DEADLINE_MS`).

:func:`decide` scans the table; :class:`DecisionIndex` answers the same
question in O(log n) after an O(n log n) build, for the edge's hot path.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from popex.checks import check_deadline_ms, check_objective
from popex.decision.table import StrategyTable, _front_order
from popex.errors import ConfigError

__all__ = [
    "Decision",
    "DecisionIndex",
    "decide",
]


def _check_table(table: object) -> StrategyTable:
    if not isinstance(table, StrategyTable):
        raise ConfigError(f"expected a StrategyTable, got {type(table).__name__}")
    if len(table) == 0:
        raise ConfigError("the strategy table is empty; there is nothing to decide")
    return table


@dataclass(frozen=True)
class Decision:
    """The chosen strategy for one deadline.

    Attributes
    ----------
    row : int
        Index into the strategy table.
    feasible : bool
        False when no row meets the deadline and the fastest row was taken.
    objective : str
        "mean" or "tail".
    deadline_ms : float
        The latency requirement D, ms.
    """

    row: int
    feasible: bool
    objective: str
    deadline_ms: float

    def as_dict(self, table: StrategyTable) -> dict:
        """The table row as a JSON-ready dict plus ``"feasible"``.

        Parameters
        ----------
        table : StrategyTable
            The table this decision was made on.

        Returns
        -------
        dict
            :meth:`StrategyTable.row` of ``self.row`` with ``"feasible"`` added.
        """
        return {**table.row(self.row), "feasible": self.feasible}


class DecisionIndex:
    """Answer :func:`decide` for many deadlines on one table and objective.

    Rows are sorted by latency (stable) and the most accurate row of every
    prefix is stored, so a lookup is one ``bisect`` on the sorted latencies.

    Parameters
    ----------
    table : StrategyTable
        Non-empty strategy table.
    objective : {"mean", "tail"}, default "mean"

    Raises
    ------
    ConfigError
        On an unknown objective or an empty table.

    Examples
    --------
    >>> from popex.decision.latency import Link
    >>> nan = float("nan")
    >>> table = StrategyTable(
    ...     thresholds=np.full((3, 0), nan), split=np.array([0, 1, 2]),
    ...     accuracy=np.array([0.9, 0.8, 0.9]), n_correct=np.array([9, 8, 9]),
    ...     exit_probs=np.zeros((3, 0)), offload_prob=np.array([1.0, 1.0, 0.0]),
    ...     expected_latency_ms=np.array([30.0, 10.0, 20.0]),
    ...     worst_latency_ms=np.array([30.0, 10.0, 20.0]),
    ...     bytes_sent=np.zeros(3), link=Link(uplink_mbps=1.0, rtt_ms=0.0))
    >>> index = DecisionIndex(table)
    >>> index.lookup(25.0).row, index.lookup(15.0).row, index.lookup(5.0).feasible
    (2, 1, False)
    """

    def __init__(self, table: StrategyTable, *, objective: str = "mean") -> None:
        self.objective = check_objective(objective)
        self.table = _check_table(table)
        latency_ms = table.latency_ms(self.objective)
        order, _, best = _front_order(latency_ms, table.n_correct)
        # Python lists: bisect on a list is far faster than on an ndarray.
        self._sorted_latency_ms: list[float] = latency_ms[order].tolist()
        self._best_row: list[int] = best.tolist()
        self._fastest_row = int(order[0])

    def lookup(self, deadline_ms: float) -> Decision:
        """Decision for ``deadline_ms``; identical to :func:`decide`.

        Parameters
        ----------
        deadline_ms : float
            Latency requirement in ms, finite, in [0, MAX_DEADLINE_MS].

        Returns
        -------
        Decision

        Raises
        ------
        ConfigError
            On a deadline that is not a number, NaN, infinite, negative or
            above :data:`popex.checks.MAX_DEADLINE_MS`.
        """
        return self._lookup(check_deadline_ms(deadline_ms))

    def _lookup(self, deadline_ms: float) -> Decision:
        """:meth:`lookup` for a checked ``deadline_ms`` (the policies check it once, then call this)."""
        n_feasible = bisect.bisect_right(self._sorted_latency_ms, deadline_ms)
        if n_feasible == 0:
            return Decision(self._fastest_row, False, self.objective, deadline_ms)
        return Decision(self._best_row[n_feasible - 1], True, self.objective, deadline_ms)


def decide(table: StrategyTable, *, deadline_ms: float, objective: str = "mean") -> Decision:
    """Choose the most accurate strategy that meets ``deadline_ms`` by a full scan.

    Parameters
    ----------
    table : StrategyTable
        Non-empty strategy table.
    deadline_ms : float
        Latency requirement D in ms, finite, in [0, MAX_DEADLINE_MS]
        (the most accurate row: a deadline of ``MAX_DEADLINE_MS``).
    objective : {"mean", "tail"}, default "mean"
        Compare D with the expected ("mean") or worst-case ("tail") latency.

    Returns
    -------
    Decision

    Raises
    ------
    ConfigError
        On an unknown objective, a deadline that is not a finite number in
        [0, :data:`popex.checks.MAX_DEADLINE_MS`], or an empty table.

    See Also
    --------
    DecisionIndex : the same answer in O(log n) per deadline.
    """
    objective = check_objective(objective)
    deadline_ms = check_deadline_ms(deadline_ms)
    table = _check_table(table)
    latency_ms = table.latency_ms(objective)
    feasible = np.flatnonzero(latency_ms <= deadline_ms)
    if feasible.size == 0:
        # argmin returns the first (lowest) index among equal minima.
        return Decision(int(np.argmin(latency_ms)), False, objective, deadline_ms)
    counts = table.n_correct[feasible]
    candidates = feasible[counts == counts.max()]
    row = candidates[np.argmin(latency_ms[candidates])]
    return Decision(int(row), True, objective, deadline_ms)
