"""Offloading policies under a token bucket, behind one interface.

A policy is fitted on the train split (:func:`make_policy`) and, for one
sequence, returns a :class:`Plan` the simulator (and the live edge) follows:

- ``weak``: never offload; ``strong``: offload everything, ignoring the bucket
  (the unattainable reference);
- ``lower-bound``: offload iff metric >= the baseline's threshold with no
  bucket at all (the same fraction as the baseline, unconstrained);
- ``baseline``: one threshold at the (1 - r*tau) quantile of the training
  metrics (tau the mean inter-arrival in slots), offload iff metric >= it and
  a token is there;
- ``mdp``: one threshold per token level (:mod:`popex.ratelimit.mdp`);
- ``learned``: Q(n, a) for every level from the current and previous 95
  metrics (:mod:`popex.ratelimit.learned`, torch, loaded only for it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from popex.errors import ConfigError
from popex.ratelimit.bucket import BucketParams
from popex.ratelimit.mdp import DISCOUNT, solve_mdp

__all__ = ["POLICIES", "Plan", "Policy", "baseline_threshold", "make_policy", "parse_policies"]

POLICIES = ("weak", "strong", "baseline", "lower-bound", "mdp", "learned")


@dataclass(frozen=True, eq=False)
class Plan:
    """What a policy does on one sequence: exactly one field is set.

    Attributes
    ----------
    thresholds : np.ndarray, shape (m + 1,), optional
        Through the bucket: offload iff metric > thresholds[level] and a token is there.
    wants : np.ndarray of bool, shape (T, m + 1), optional
        Through the bucket: offload at step t iff wants[t, level] and a token is there.
    mask : np.ndarray of bool, shape (T,), optional
        No bucket: offload exactly these steps.
    """

    thresholds: np.ndarray | None = None
    wants: np.ndarray | None = None
    mask: np.ndarray | None = None


class Policy(Protocol):
    """A fitted policy: its name and its plan for a sequence of metrics."""

    name: str

    def plan(self, metric: np.ndarray) -> Plan:
        """The plan for the metrics of one sequence (shape (T,))."""
        ...


def baseline_threshold(metric_tr: np.ndarray, rate: float, mean_interval_slots: float) -> float:
    """The (1 - r*tau) quantile of the training metrics; -inf when r*tau >= 1 (offload everything).

    >>> baseline_threshold(np.arange(100.0), 0.25, 1.0)
    74.25
    """
    level = 1.0 - rate * mean_interval_slots
    return -np.inf if level <= 0.0 else float(np.quantile(np.asarray(metric_tr, dtype=np.float64), level))


@dataclass(frozen=True, eq=False)
class _Fixed:
    name: str
    offload: bool

    def plan(self, metric: np.ndarray) -> Plan:
        return Plan(mask=np.full(len(metric), self.offload))


@dataclass(frozen=True, eq=False)
class _Unbucketed:
    name: str
    threshold: float

    def plan(self, metric: np.ndarray) -> Plan:
        return Plan(mask=np.asarray(metric) >= self.threshold)


@dataclass(frozen=True, eq=False)
class _Thresholds:
    name: str
    thresholds: np.ndarray

    def plan(self, metric: np.ndarray) -> Plan:
        return Plan(thresholds=self.thresholds)


def make_policy(name: str, *, params: BucketParams, metric_tr: np.ndarray, interval_probs: dict[int, float],
                learned_weights: str | None = None, discount: float = DISCOUNT) -> Policy:
    """Fit the policy called ``name`` on the training metrics.

    Parameters
    ----------
    name : one of :data:`POLICIES`
    params : BucketParams
    metric_tr : np.ndarray, shape (n,)
    interval_probs : dict of int to float
        Inter-arrival distribution in slots (the baseline uses its mean, the MDP all of it).
    learned_weights : str, optional
        Directory of a trained learned policy (``popex ratelimit train``); needed for "learned".
    discount : float

    Returns
    -------
    Policy

    Raises
    ------
    ConfigError
        On an unknown name, or "learned" without weights (or for another bucket).
    """
    mean_interval = sum(i * p for i, p in interval_probs.items())
    if name == "weak":
        return _Fixed(name, False)
    if name == "strong":
        return _Fixed(name, True)
    threshold = baseline_threshold(metric_tr, params.rate, mean_interval)
    if name == "lower-bound":
        return _Unbucketed(name, threshold)
    if name == "baseline":
        # ">=" as a strict comparison against the next float below
        table = np.full(params.m + 1, np.nextafter(threshold, -np.inf))
        table[:params.p] = np.inf
        return _Thresholds(name, table)
    if name == "mdp":
        solution = solve_mdp(params, metric_tr, interval_probs=interval_probs, discount=discount)
        return _Thresholds(name, solution.thresholds)
    if name == "learned":
        if learned_weights is None:
            raise ConfigError("the learned policy needs --learned-weights DIR (written by `popex ratelimit train`)")
        from popex.ratelimit.learned import LearnedPolicy

        return LearnedPolicy.load(learned_weights, params=params)
    raise ConfigError(f"unknown policy {name!r}; the policies are {list(POLICIES)}")


def parse_policies(text: str) -> tuple[str, ...]:
    """A comma-separated list of policy names, each checked.

    >>> parse_policies("weak, mdp")
    ('weak', 'mdp')
    """
    names = tuple(part.strip() for part in str(text).split(",") if part.strip())
    if not names:
        raise ConfigError(f"--policies needs at least one of {list(POLICIES)}")
    unknown = [n for n in names if n not in POLICIES]
    if unknown:
        raise ConfigError(f"unknown policy {unknown[0]!r}; the policies are {list(POLICIES)}")
    return names
