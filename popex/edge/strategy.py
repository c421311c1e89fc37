"""What the edge does with one request: a row of the strategy table, as a decision made for a deadline.

A :class:`Strategy` is immutable and cached inside the plan it was made on
(:mod:`popex.edge.plans`), so a request reads it without a lock.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Strategy", "strategy_from_row"]


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
