"""Policies over the three-tier table, behind one interface: which cuts each may use, then one decision.

=================  ===========================================  ==========
policy             cuts it may use                              x, y
=================  ===========================================  ==========
``device-only``    the whole network on the device              x = y = N
``edge-only``      the device sends the input, the edge runs all  x = 0, y = N
``cloud-only``     the device sends the input to the cloud      x = y = 0
``device-cloud``   best two-tier split without an edge          x = y
``edge-cloud``     best two-tier split without device compute   x = 0
``three-tier``     adaptive: any cut                            x <= y
=================  ===========================================  ==========

Every policy then decides alike (DESIGN §5): among its (θ, cut) rows whose
latency under the objective meets the requirement less a headroom, the most
accurate, ties to lower latency; if none does, its fastest row, marked
infeasible. So a comparison of policies differs only in what they may use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from popex.checks import check_deadline_ms, check_objective
from popex.decision.three_tier import ThreeTierTable
from popex.errors import ConfigError

__all__ = ["THREE_TIER_POLICIES", "ThreeTierChoice", "policy_cuts", "choose_three_tier"]

THREE_TIER_POLICIES: dict[str, Callable[[np.ndarray, np.ndarray, int], np.ndarray]] = {
    "device-only": lambda x, y, n: (x == n) & (y == n),
    "edge-only": lambda x, y, n: (x == 0) & (y == n),
    "cloud-only": lambda x, y, n: (x == 0) & (y == 0),
    "device-cloud": lambda x, y, n: x == y,
    "edge-cloud": lambda x, y, n: x == 0,
    "three-tier": lambda x, y, n: np.ones_like(x, dtype=bool),
}


@dataclass(frozen=True)
class ThreeTierChoice:
    """One policy's decision: the row (θ) and cut, and what the model predicts for them."""

    policy: str
    config: int
    cut: int
    x: int
    y: int
    accuracy: float
    expected_latency_ms: float
    worst_latency_ms: float
    feasible: bool


def policy_cuts(table: ThreeTierTable, policy: str) -> np.ndarray:
    """Which cuts of ``table`` a policy may use.

    Parameters
    ----------
    table : ThreeTierTable
    policy : str
        A key of :data:`THREE_TIER_POLICIES`.

    Returns
    -------
    np.ndarray of bool, shape (n_cuts,)

    Raises
    ------
    ConfigError
        An unknown policy, named with the known ones.
    """
    if policy not in THREE_TIER_POLICIES:
        raise ConfigError(f"unknown three-tier policy {policy!r}; one of {', '.join(THREE_TIER_POLICIES)}")
    return THREE_TIER_POLICIES[policy](table.x, table.y, int(table.y.max()))


def choose_three_tier(table: ThreeTierTable, *, policy: str, deadline_ms: float, objective: str = "mean",
                      headroom_fraction: float = 0.0, allowed: np.ndarray | None = None,
                      configs: np.ndarray | None = None) -> ThreeTierChoice:
    """The most accurate (θ, cut) of a policy that meets ``deadline_ms``; else its fastest, infeasible.

    Parameters
    ----------
    table : ThreeTierTable
    policy : str
        A key of :data:`THREE_TIER_POLICIES`.
    deadline_ms : float
    objective : {"mean", "tail"}
    headroom_fraction : float
        Rows meet D when within ``D·(1 - headroom_fraction)``.
    allowed : np.ndarray of bool, shape (n_cuts,), optional
        Further cuts to leave out (e.g. a hop the network cannot carry).
    configs : np.ndarray of bool, shape (n_configs,), optional
        Threshold rows that may be chosen (e.g. only "every branch off").

    Returns
    -------
    ThreeTierChoice

    Raises
    ------
    ConfigError
        Unknown policy, bad requirement, or no cut left.
    """
    deadline_ms = check_deadline_ms(deadline_ms)
    objective = check_objective(objective)
    cuts = policy_cuts(table, policy) & (True if allowed is None else np.asarray(allowed, dtype=bool))
    if not cuts.any():
        raise ConfigError(f"policy {policy!r} has no usable cut")
    rows = np.ones(table.accuracy.shape, dtype=bool) if configs is None else np.asarray(configs, dtype=bool)
    latency = np.where(cuts[None, :] & rows[:, None], table.latency_ms(objective), np.inf)
    best_cut = np.argmin(latency, axis=1)
    best_ms = latency[np.arange(latency.shape[0]), best_cut]
    meets = best_ms <= deadline_ms * (1.0 - headroom_fraction)
    if not np.isfinite(best_ms).any():
        raise ConfigError("no threshold row may be chosen")
    if meets.any():
        accuracy = np.where(meets, table.accuracy, -np.inf)
        ties = np.flatnonzero(accuracy == accuracy.max())
        config = int(ties[np.argmin(best_ms[ties])])
    else:
        config = int(np.argmin(best_ms))
    cut = int(best_cut[config])
    return ThreeTierChoice(policy=policy, config=config, cut=cut, x=int(table.x[cut]), y=int(table.y[cut]),
                           accuracy=float(table.accuracy[config]),
                           expected_latency_ms=float(table.expected_ms[config, cut]),
                           worst_latency_ms=float(table.worst_ms[config, cut]), feasible=bool(meets[config]))
