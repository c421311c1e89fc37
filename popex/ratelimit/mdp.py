"""The MDP policy: value iteration over token levels, assuming i.i.d. metrics (the seed's MDP).

State: the level n in 0..m units at an arrival. Action: offload (reward =
the image's metric x, allowed when n >= p, costs p units) or not. Between
arrivals the level moves by the token-level transition matrix
``T[k, n'] = P(min(m, k + q*I) = n')`` over the inter-arrival distribution
(I = 1 for periodic arrivals; the per-arrival mix of 1 and 3 slots for the
Markov-modulated process). With W = T V:

    V(n) = gamma W(n)                                        n < p
    V(n) = gamma W(n) + E[max(x - t(n), 0)],  t(n) = gamma (W(n) - W(n-p))   n >= p

so the optimal policy is one threshold per level: offload iff x > t(n).
E[max(x - t, 0)] is read off the sorted training metrics with suffix sums.

With gamma = 0.9999 plain value iteration needs ~10^5 sweeps (seconds), so
:func:`solve_mdp` alternates the same improvement step with an exact
evaluation of the current thresholds (one (m+1)x(m+1) linear solve):
policy iteration, which converges in tens of steps to the same fixed point.
:func:`value_iteration` is the plain sweep, kept as the reference the tests
and ``benchmarks/ratelimit.py`` compare against. When every inter-arrival
refills at least one token (q * min I >= p) the bucket never binds and the
thresholds are exactly 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from popex.checks import check_finite
from popex.errors import DataError
from popex.ratelimit.bucket import BucketParams

__all__ = ["DISCOUNT", "MdpSolution", "transition_matrix", "solve_mdp", "value_iteration"]

#: The seed's discount factor.
DISCOUNT = 0.9999


@dataclass(frozen=True, eq=False)
class MdpSolution:
    """Thresholds per token level (``inf`` below one token), relative values, iterations run.

    Attributes
    ----------
    thresholds : np.ndarray, shape (m + 1,)
        Offload iff metric > thresholds[level].
    values : np.ndarray, shape (m + 1,)
        Relative values (V - V(m)).
    n_iterations : int
    converged : bool
    gain : float
        (1 - gamma) V(m): what the relative values leave out per step, so that
        Q(n, a) = a x - gain + gamma (T values)(n - p a) holds for the relative values.
    """

    thresholds: np.ndarray
    values: np.ndarray
    n_iterations: int
    converged: bool
    gain: float = 0.0


def transition_matrix(params: BucketParams, interval_probs: dict[int, float]) -> np.ndarray:
    """T[k, n'] = P(the level after action is k and the next arrival sees n'), shape (m + 1, m + 1).

    >>> from popex.ratelimit.bucket import integerise
    >>> transition_matrix(integerise(0.5, 1), {1: 1.0})
    array([[0., 1., 0.],
           [0., 0., 1.],
           [0., 0., 1.]])
    """
    n_levels = params.m + 1
    matrix = np.zeros((n_levels, n_levels))
    levels = np.arange(n_levels)
    for interval, prob in interval_probs.items():
        matrix[levels, np.minimum(params.m, levels + params.q * int(interval))] += prob
    return matrix


def _expected_excess(sorted_metric: np.ndarray, suffix: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    index = np.searchsorted(sorted_metric, thresholds, side="right")
    n = len(sorted_metric)
    return (suffix[index] - thresholds * (n - index)) / n


def _checked(metric_tr: np.ndarray, discount: float,
             interval_probs: dict[int, float] | None) -> tuple[np.ndarray, np.ndarray, float, dict[int, float]]:
    metric = np.sort(np.asarray(metric_tr, dtype=np.float64))
    if metric.ndim != 1 or len(metric) == 0 or not np.all(np.isfinite(metric)):
        raise DataError("metric_tr must be a non-empty 1-D array of finite numbers")
    discount = check_finite(discount, name="discount", low=0.0, high=1.0, low_open=True, allow_text=False)
    interval_probs = {1: 1.0} if interval_probs is None else dict(interval_probs)
    if not interval_probs or min(interval_probs) < 1 or abs(sum(interval_probs.values()) - 1.0) > 1e-9:
        raise DataError(f"interval_probs must map slots >= 1 to probabilities summing to 1, got {interval_probs}")
    suffix = np.concatenate([np.cumsum(metric[::-1])[::-1], [0.0]])
    return metric, suffix, discount, interval_probs


def _solution(thresholds: np.ndarray, values: np.ndarray, p: int, n_iterations: int,
              converged: bool, discount: float = DISCOUNT) -> MdpSolution:
    thresholds = np.array(thresholds, dtype=np.float64)
    thresholds[:p] = np.inf
    gain = (1.0 - discount) * float(values[-1])
    values = values - values[-1]
    for array in (thresholds, values):
        array.flags.writeable = False
    return MdpSolution(thresholds=thresholds, values=values, n_iterations=n_iterations, converged=converged,
                       gain=gain)


def solve_mdp(params: BucketParams, metric_tr: np.ndarray, *, interval_probs: dict[int, float] | None = None,
              discount: float = DISCOUNT, tolerance: float = 1e-10, max_iterations: int = 500) -> MdpSolution:
    """The optimal thresholds for the bucket ``params`` and i.i.d. metrics distributed as ``metric_tr``.

    Parameters
    ----------
    params : BucketParams
    metric_tr : np.ndarray, shape (n,)
        Training metrics (the empirical distribution of x).
    interval_probs : dict of int to float, optional
        Inter-arrival distribution in slots (default periodic, {1: 1}).
    discount : float
        gamma in (0, 1).
    tolerance : float
        Stop when no threshold moves by more than tolerance x range(metric).
    max_iterations : int
        Policy-iteration steps at most.

    Returns
    -------
    MdpSolution

    Raises
    ------
    DataError
        If the metrics are empty or not finite, or the interval distribution is not one.

    Examples
    --------
    >>> from popex.ratelimit.bucket import integerise
    >>> solve_mdp(integerise(1.0, 2), np.array([-1.0, 0.5, 2.0])).thresholds.tolist()  # r >= 1: never binds
    [inf, 0.0, 0.0]
    """
    metric, suffix, discount, interval_probs = _checked(metric_tr, discount, interval_probs)
    p, m, n = params.p, params.m, len(metric)
    if params.q * min(interval_probs) >= p:
        gain_values = np.full(m + 1, float(suffix[np.searchsorted(metric, 0.0, side="right")] / n) / (1 - discount))
        return _solution(np.zeros(m + 1), gain_values, p, 0, True, discount)
    matrix = transition_matrix(params, interval_probs)
    identity = np.eye(m + 1)
    thresholds = np.zeros(m + 1 - p)
    scale = tolerance * max(float(np.ptp(metric)), 1e-12)
    values = np.zeros(m + 1)
    for iteration in range(1, max_iterations + 1):
        index = np.searchsorted(metric, thresholds, side="right")
        offload_prob = (n - index) / n
        policy_matrix = matrix.copy()
        policy_matrix[p:] = offload_prob[:, None] * matrix[:m + 1 - p] + (1.0 - offload_prob)[:, None] * matrix[p:]
        reward = np.zeros(m + 1)
        reward[p:] = suffix[index] / n
        values = np.linalg.solve(identity - discount * policy_matrix, reward)
        ahead = discount * (matrix @ values)
        new = ahead[p:] - ahead[:m + 1 - p]
        moved = float(np.max(np.abs(new - thresholds))) if len(new) else 0.0
        thresholds = new
        if moved <= scale:
            return _solution(np.concatenate([np.zeros(p), thresholds]), values, p, iteration, True, discount)
    return _solution(np.concatenate([np.zeros(p), thresholds]), values, p, max_iterations, False, discount)


def value_iteration(params: BucketParams, metric_tr: np.ndarray, *, interval_probs: dict[int, float] | None = None,
                    discount: float = DISCOUNT, n_iterations: int = 1000) -> MdpSolution:
    """Plain (relative) value iteration, ``n_iterations`` sweeps: the reference for :func:`solve_mdp`.

    Returns
    -------
    MdpSolution
        ``converged`` is False: a fixed number of sweeps says nothing about convergence.
    """
    metric, suffix, discount, interval_probs = _checked(metric_tr, discount, interval_probs)
    matrix = transition_matrix(params, interval_probs)
    p, m = params.p, params.m
    values, thresholds = np.zeros(m + 1), np.zeros(m + 1)
    for _ in range(n_iterations):
        ahead = discount * (matrix @ values)
        thresholds[p:] = ahead[p:] - ahead[:m + 1 - p]
        values = ahead.copy()
        values[p:] += _expected_excess(metric, suffix, thresholds[p:])
        values -= values[m]
    return _solution(thresholds, values, p, n_iterations, False)
