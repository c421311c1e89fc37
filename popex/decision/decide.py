"""Pick the strategy for a latency requirement (DESIGN.md §5).

Rule: among the rows whose latency (mean objective: E[T]; tail objective:
worst case) is <= the deadline, the most accurate; ties go to the lower
latency, then to the lower row index. If no row is feasible, the fastest
row among those within ``infeasible_accuracy_margin`` (default 0.05: five
points) of the most accurate row (ties: lowest index), marked infeasible:
the fastest row of all can be one that answers 12% right, and a requirement
that cannot be met is better answered a little late than mostly wrong. The
decision says how fast the fastest row of all would be
(``fastest_latency_ms``), so that a client sees what is achievable.

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

from popex.checks import check_deadline_ms, check_finite, check_objective
from popex.decision.table import StrategyTable, _front_order
from popex.errors import ConfigError

__all__ = [
    "DEFAULT_INFEASIBLE_ACCURACY_MARGIN",
    "Decision",
    "DecisionIndex",
    "decide",
]


#: Accuracy (a fraction) an infeasible decision may give up for speed, at most.
DEFAULT_INFEASIBLE_ACCURACY_MARGIN = 0.05


def _check_margin(margin: object) -> float:
    return check_finite(margin, name="infeasible_accuracy_margin", low=0.0, high=1.0, allow_text=False)


def _infeasible_row(table: StrategyTable, latency_ms: np.ndarray, margin: float) -> int:
    """The fastest row within ``margin`` of the best accuracy (argmin: lowest index among equal minima)."""
    close = table.accuracy >= table.accuracy.max() - margin - 1e-12
    candidates = np.flatnonzero(close)
    return int(candidates[np.argmin(latency_ms[candidates])])


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
    fastest_latency_ms : float or None
        The fastest row's latency (this objective) when infeasible: the best achievable, ms.
    """

    row: int
    feasible: bool
    objective: str
    deadline_ms: float
    fastest_latency_ms: float | None = None

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
    infeasible_accuracy_margin : float, default 0.05
        When no row meets the requirement: the fastest row within this much
        accuracy of the best.

    Raises
    ------
    ConfigError
        On an unknown objective, an empty table or a margin outside [0, 1].

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

    def __init__(self, table: StrategyTable, *, objective: str = "mean",
                 infeasible_accuracy_margin: float = DEFAULT_INFEASIBLE_ACCURACY_MARGIN) -> None:
        self.objective = check_objective(objective)
        self.table = _check_table(table)
        margin = _check_margin(infeasible_accuracy_margin)
        latency_ms = table.latency_ms(self.objective)
        order, _, best = _front_order(latency_ms, table.n_correct)
        # Python lists: bisect on a list is far faster than on an ndarray.
        self._sorted_latency_ms: list[float] = latency_ms[order].tolist()
        self._best_row: list[int] = best.tolist()
        self._infeasible_row = _infeasible_row(table, latency_ms, margin)
        self._fastest_ms = float(latency_ms[order[0]])

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
            return Decision(self._infeasible_row, False, self.objective, deadline_ms, self._fastest_ms)
        return Decision(self._best_row[n_feasible - 1], True, self.objective, deadline_ms)


def decide(table: StrategyTable, *, deadline_ms: float, objective: str = "mean",
           infeasible_accuracy_margin: float = DEFAULT_INFEASIBLE_ACCURACY_MARGIN) -> Decision:
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
    infeasible_accuracy_margin : float, default 0.05
        When no row meets D: the fastest row within this much accuracy of the best.

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
    margin = _check_margin(infeasible_accuracy_margin)
    latency_ms = table.latency_ms(objective)
    feasible = np.flatnonzero(latency_ms <= deadline_ms)
    if feasible.size == 0:
        return Decision(_infeasible_row(table, latency_ms, margin), False, objective, deadline_ms,
                        float(latency_ms.min()))
    counts = table.n_correct[feasible]
    candidates = feasible[counts == counts.max()]
    row = candidates[np.argmin(latency_ms[candidates])]
    return Decision(int(row), True, objective, deadline_ms)
