"""What the edge does with one request: a row of the strategy table, as a decision made for a deadline.

A :class:`Strategy` is immutable and cached inside the plan it was made on
(:mod:`popex.edge.plans`), so a request reads it without a lock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Strategy", "strategy_from_row", "keep_unless_better"]


@dataclass(frozen=True)
class Strategy:
    """What the edge does with one request: where to split and when to exit.

    Attributes
    ----------
    split : int
        Stages run on the edge, 0..N (N = edge only).
    thresholds : tuple of (float or None), length B
        Confidence threshold of each branch; None = branch off.
    active_branches : tuple of int
        Branches evaluated: k_b <= split and threshold not None.
    latency_ms : float
        Predicted (expected) latency E[T], ms.
    worst_latency_ms : float
        Latency of a sample that passes every active branch, ms.
    accuracy : float
        On the calibration data.
    offload_prob : float
        Predicted fraction of requests sent to the cloud.
    feasible : bool
        False when no strategy meets the deadline (the fastest is used).
    row : int
        Row of the strategy table it came from.
    objective : str
        "mean" or "tail".
    deadline_ms : float
    policy : str
        Which policy chose it ("adaptive" is POPEX; the others are baselines).
    fastest_latency_ms : float or None
        When infeasible: the fastest strategy's predicted latency, the best achievable, ms.
    """

    split: int
    thresholds: tuple[float | None, ...]
    active_branches: tuple[int, ...]
    latency_ms: float
    worst_latency_ms: float
    accuracy: float
    offload_prob: float
    feasible: bool
    row: int
    objective: str
    deadline_ms: float
    policy: str = "adaptive"
    fastest_latency_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (plain Python types).

        Returns
        -------
        dict of str to object
        """
        return {
            "split": self.split,
            "thresholds": list(self.thresholds),
            "active_branches": list(self.active_branches),
            "predicted_latency_ms": self.latency_ms,
            "worst_latency_ms": self.worst_latency_ms,
            "accuracy": self.accuracy,
            "offload_prob": self.offload_prob,
            "feasible": self.feasible,
            "row": self.row,
            "objective": self.objective,
            "deadline_ms": self.deadline_ms,
            "policy": self.policy,
            "fastest_latency_ms": self.fastest_latency_ms,
        }


def strategy_from_row(row: Mapping[str, Any], *, row_index: int, feasible: bool, objective: str, deadline_ms: float,
                      policy: str, branch_after_stage: tuple[int, ...],
                      fastest_latency_ms: float | None = None) -> Strategy:
    """The strategy of one strategy-table row, chosen for a requirement.

    Parameters
    ----------
    row : mapping
        ``StrategyTable.row(i)``: split, thresholds, expected and worst latency, accuracy, offload_prob.
    row_index : int
        ``i``.
    feasible : bool
        Whether the decision met the requirement.
    objective : {"mean", "tail"}
    deadline_ms : float
    policy : str
        The policy that chose the row.
    branch_after_stage : tuple of int
        The stage each branch follows (which branches the split leaves active).
    fastest_latency_ms : float, optional
        An infeasible decision's best achievable latency, ms.

    Returns
    -------
    Strategy
    """
    split = row["split"]
    thresholds = tuple(row["thresholds"])
    active = tuple(b for b, t in enumerate(thresholds) if t is not None and branch_after_stage[b] <= split)
    return Strategy(split=split, thresholds=thresholds, active_branches=active,
                    latency_ms=row["expected_latency_ms"], worst_latency_ms=row["worst_latency_ms"],
                    accuracy=row["accuracy"], offload_prob=row["offload_prob"], feasible=feasible, row=row_index,
                    objective=objective, deadline_ms=deadline_ms, policy=policy, fastest_latency_ms=fastest_latency_ms)


def keep_unless_better(previous: Strategy | None, new: Strategy, row: Mapping[str, Any] | None, *,
                       held_to_ms: float, hysteresis_accuracy: float | None) -> Strategy:
    """After a re-plan: the strategy a requirement had, unless the new one is better by more than the hysteresis.

    A new link or overhead estimate moves every row's latency a little; a
    strategy chosen at the edge of the requirement would otherwise flip with
    each estimate (and with it the accuracy and the latency a client sees).
    The previous strategy stays while its row, re-evaluated on the new table,
    still meets the requirement and the new choice is at most
    ``hysteresis_accuracy`` more accurate.

    Parameters
    ----------
    previous : Strategy or None
        The decision for the same requirement on the plan that was replaced.
    new : Strategy
        The decision on the new plan.
    row : mapping or None
        ``StrategyTable.row(previous.row)`` of the new table (the rows of a
        model's tables are the same strategies in the same order).
    held_to_ms : float
        The requirement less the plan's headroom, ms.
    hysteresis_accuracy : float or None
        None: no hysteresis.

    Returns
    -------
    Strategy
        ``new``, or the previous strategy with the new table's numbers.

    Examples
    --------
    >>> old = Strategy(1, (None,), (), 9.0, 9.0, 0.80, 1.0, True, 4, "mean", 10.0)
    >>> new = Strategy(2, (None,), (), 9.5, 9.5, 0.805, 1.0, True, 7, "mean", 10.0)
    >>> row = {"split": 1, "thresholds": [None], "expected_latency_ms": 9.2, "worst_latency_ms": 9.2,
    ...        "accuracy": 0.80, "offload_prob": 1.0}
    >>> keep_unless_better(old, new, row, held_to_ms=9.5, hysteresis_accuracy=0.01).row
    4
    """
    if hysteresis_accuracy is None or previous is None or row is None or previous.row == new.row \
            or not new.feasible or new.policy != "adaptive":
        return new
    latency_ms = row["expected_latency_ms"] if new.objective == "mean" else row["worst_latency_ms"]
    if latency_ms > held_to_ms or new.accuracy - row["accuracy"] > hysteresis_accuracy:
        return new
    return Strategy(split=previous.split, thresholds=previous.thresholds, active_branches=previous.active_branches,
                    latency_ms=row["expected_latency_ms"], worst_latency_ms=row["worst_latency_ms"],
                    accuracy=row["accuracy"], offload_prob=row["offload_prob"], feasible=True, row=previous.row,
                    objective=new.objective, deadline_ms=new.deadline_ms, policy=new.policy)
