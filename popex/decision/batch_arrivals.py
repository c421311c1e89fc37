"""How a micro-batcher's batches form at an arrival rate: batch sizes and waits under Poisson arrivals.

The batch-aware plan (:mod:`popex.decision.batch_plan`) predicts a request's
latency as its wait in the batcher (:mod:`popex.runtime.batcher`) plus its
per-sample time in a batch of the size it joined; this module gives the
distribution of those sizes and the mean wait at each, from the observed
arrival rate, the batcher's ``max_batch_size`` and ``batch_max_wait_ms``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from popex.checks import check_finite, check_int

__all__ = ["ArrivalModel", "arrival_model"]

#: Largest batch size modelled (the batcher's own cap).
_MAX_BATCH_SIZE = 1024


@dataclass(frozen=True)
class ArrivalModel:
    """How a micro-batcher's batches form at an arrival rate (Poisson arrivals, see :func:`arrival_model`).

    Attributes
    ----------
    arrival_rate_per_s : float
    p_batch : np.ndarray, shape (max_batch_size + 1,)
        P(a batch holds n requests), n = 0..max (0 at n = 0).
    mean_wait_ms : np.ndarray, shape (max_batch_size + 1,)
        Mean wait in the batcher of a request in a batch of n.
    """

    arrival_rate_per_s: float
    p_batch: np.ndarray
    mean_wait_ms: np.ndarray

    @property
    def p_query(self) -> np.ndarray:
        """P(a request is in a batch of n): batches weighted by their size."""
        weights = self.p_batch * np.arange(self.p_batch.size)
        return weights / weights.sum()



def _poisson_pmf(mu: float, n_terms: int) -> np.ndarray:
    j = np.arange(n_terms, dtype=np.float64)
    if mu == 0.0:
        return (j == 0).astype(np.float64)
    return np.exp(j * math.log(mu) - mu - np.array([math.lgamma(k + 1.0) for k in j]))


def arrival_model(arrival_rate_per_s: float, *, max_batch_size: int, batch_max_wait_ms: float) -> ArrivalModel:
    """Batch sizes and waits of a micro-batcher (:mod:`popex.runtime.batcher`) under Poisson arrivals.

    A batch opens with a request and closes ``batch_max_wait_ms`` later or
    when it holds ``max_batch_size``. With μ = rate · wait, a batch holds
    n < max with P = Poisson(n−1; μ) and max with the rest; a request of a
    batch that waited the whole window waits W (the first) or W/2 (the
    others) on average; in a full batch, closed at the time S of the
    (max−1)-th arrival after the first, S/2 on average, with
    E[S | S <= W] = (k/λ)·P(N >= k+1)/P(N >= k) for k = max − 1. The
    batcher's earlier close for a tight budget is not modelled.

    Parameters
    ----------
    arrival_rate_per_s : float
        >= 0 (0: every request alone, waiting the whole window).
    max_batch_size : int
        1 = no batching (no wait).
    batch_max_wait_ms : float

    Returns
    -------
    ArrivalModel

    Examples
    --------
    >>> model = arrival_model(0.0, max_batch_size=4, batch_max_wait_ms=2.0)
    >>> model.p_batch.tolist(), float(model.mean_wait_ms[1])
    ([0.0, 1.0, 0.0, 0.0, 0.0], 2.0)
    """
    rate = check_finite(arrival_rate_per_s, name="arrival_rate_per_s", low=0.0, high=1e9)
    top = check_int(max_batch_size, name="max_batch_size", low=1, high=_MAX_BATCH_SIZE)
    wait_ms = check_finite(batch_max_wait_ms, name="batch_max_wait_ms", low=0.0, high=1e7)
    p_batch, mean_wait = np.zeros(top + 1), np.zeros(top + 1)
    if top == 1:
        p_batch[1] = 1.0
        return ArrivalModel(arrival_rate_per_s=rate, p_batch=p_batch, mean_wait_ms=mean_wait)
    rate_per_ms = rate / 1000.0
    mu = rate_per_ms * wait_ms
    pmf = _poisson_pmf(mu, top + 1)
    p_batch[1:top] = pmf[:top - 1]
    p_batch[top] = max(0.0, 1.0 - pmf[:top - 1].sum())
    n = np.arange(1, top)
    mean_wait[1:top] = (wait_ms + (n - 1) * wait_ms / 2.0) / n
    k = top - 1
    tail_k, tail_k1 = 1.0 - pmf[:k].sum(), 1.0 - pmf[:k + 1].sum()
    if rate_per_ms > 0 and tail_k > 0:
        mean_wait[top] = min(wait_ms, k / rate_per_ms * max(0.0, tail_k1) / tail_k) / 2.0
    return ArrivalModel(arrival_rate_per_s=rate, p_batch=p_batch, mean_wait_ms=mean_wait)
