"""The batching pattern matrix: how many samples of a batch of n continue past each branch, for given thresholds.

A batch is n samples drawn without replacement from the calibration split,
so the number that continue past branch b is hypergeometric in the number
of calibration samples that do (the first branch whose confidence, compared
in float64, reaches its threshold takes a sample, as in
:mod:`popex.runtime.compaction`). The batch-aware plan
(:mod:`popex.decision.batch_plan`) takes its expectations over these rows.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np

from popex.checks import check_int
from popex.decision.calibration import Calibration
from popex.errors import ConfigError

__all__ = ["hypergeometric_pmf", "continuing_counts", "batching_pattern"]


@functools.lru_cache(maxsize=65536)
def hypergeometric_pmf(n_population: int, n_success: int, n_draws: int) -> np.ndarray:
    """P(m successes) for m = 0..n_draws, drawing n_draws of n_population without replacement (cached, read-only).

    Parameters
    ----------
    n_population, n_success, n_draws : int
        0 <= n_success <= n_population, 0 <= n_draws <= n_population.

    Returns
    -------
    np.ndarray, shape (n_draws + 1,)

    Examples
    --------
    >>> hypergeometric_pmf(4, 2, 2).tolist()
    [0.16666666666666666, 0.6666666666666666, 0.16666666666666666]
    """
    total = math.comb(n_population, n_draws)  # exact integers: the pmf sums to 1 up to rounding
    pmf = np.array([math.comb(n_success, m) * math.comb(n_population - n_success, n_draws - m) / total
                    for m in range(n_draws + 1)])
    pmf.flags.writeable = False
    return pmf


def _running_after(calibration: Calibration, thresholds: Sequence[float | None]) -> np.ndarray:
    """(B, n_samples) bool: still in the batch after branch b (first branch whose confidence >= θ exits)."""
    confidence = calibration.confidence.astype(np.float64)
    running = np.ones(calibration.n_samples, dtype=bool)
    rows = []
    for b in range(calibration.n_branches):
        if thresholds[b] is not None:
            running = running & ~(confidence[:, b] >= float(thresholds[b]))
        rows.append(running)
    return np.array(rows).reshape(calibration.n_branches, calibration.n_samples)


def continuing_counts(calibration: Calibration, thresholds: Sequence[float | None]) -> np.ndarray:
    """How many calibration samples continue past each branch with these thresholds.

    Parameters
    ----------
    calibration : Calibration
    thresholds : sequence of (float or None), length B
        None = off (nobody exits there).

    Returns
    -------
    np.ndarray of int64, shape (B,)

    Examples
    --------
    >>> cal = Calibration(confidence=np.array([[0.9, 1.0], [0.2, 1.0]]), predicted=np.zeros((2, 2), int),
    ...                   correct=np.ones((2, 2), bool), labels=np.zeros(2, int), temperature=np.ones(2))
    >>> continuing_counts(cal, [0.5]).tolist(), continuing_counts(cal, [None]).tolist()
    ([1], [2])
    """
    if len(thresholds) != calibration.n_branches:
        raise ConfigError(f"need one threshold per branch ({calibration.n_branches}), got {len(thresholds)}")
    return _running_after(calibration, thresholds).sum(axis=1).astype(np.int64)


def batching_pattern(calibration: Calibration, thresholds: Sequence[float | None],
                     batch_sizes: Sequence[int]) -> np.ndarray:
    """The batching pattern matrix: P(m samples of a batch of n continue past branch b).

    Parameters
    ----------
    calibration : Calibration
        The batch is n samples drawn without replacement from its split.
    thresholds : sequence of (float or None), length B
    batch_sizes : sequence of int
        Each 1..n_samples.

    Returns
    -------
    np.ndarray, shape (B, len(batch_sizes), max(batch_sizes) + 1)
        ``[b, j, m]``; each ``[b, j]`` sums to 1 over m = 0..batch_sizes[j] (zero beyond).

    Examples
    --------
    >>> cal = Calibration(confidence=np.array([[0.9, 1.0], [0.2, 1.0]]), predicted=np.zeros((2, 2), int),
    ...                   correct=np.ones((2, 2), bool), labels=np.zeros(2, int), temperature=np.ones(2))
    >>> batching_pattern(cal, [0.5], [1, 2])[0].tolist()
    [[0.5, 0.5, 0.0], [0.0, 1.0, 0.0]]
    """
    sizes = [check_int(n, name="batch size", low=1, high=calibration.n_samples) for n in batch_sizes]
    counts = continuing_counts(calibration, thresholds)
    pattern = np.zeros((len(counts), len(sizes), max(sizes, default=0) + 1))
    for b, k in enumerate(counts):
        for j, n in enumerate(sizes):
            pattern[b, j, :n + 1] = hypergeometric_pmf(calibration.n_samples, int(k), n)
    return pattern
