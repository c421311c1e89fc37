"""The request budget: how long one request may take, and its bookkeeping while it runs.

The budget counts from the request's arrival (before its body is read), so
an offload's timeout is what is left of it; see :func:`offload_budget_ms`
for why a "mean" requirement gets more than the requirement itself.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from popex.edge.strategy import Strategy

__all__ = ["RequestRun", "offload_budget_ms"]

_MEAN_BUDGET_SLACK = 1.25  # room for the latency model's error on the slowest path


@dataclass
class RequestRun:
    """Mutable bookkeeping of one request while the pipeline runs it (never shared between requests).

    Attributes
    ----------
    arrival_s : float
        ``time.perf_counter()`` at the request's arrival.
    deadline_ms : float
        The requirement, as reported.
    budget_ms : float
        When the edge stops waiting for the cloud, ms from arrival (see :func:`offload_budget_ms`).
    features : list of np.ndarray
        The input, then the output of each stage run so far.
    evaluated : list of (int, float, int)
        ``(branch, confidence, predicted label)`` of each branch evaluated.
    transfer_ms, cloud_ms : float
        The cloud call's round trip less the cloud's compute, and that compute.
    head : str or None
        The expert head set in use; None = pristine.
    sleep_overshoot_ms : float
        Emulated device: oversleep not yet paid back.
    expert_confidence : float or None
        The distortion classifier's, when it ran.
    first_stage : int
        Stages already run before the edge (a device's cut x, :mod:`popex.edge.tensor_run`);
        ``features`` is then padded with None up to index x.
    """

    arrival_s: float
    deadline_ms: float
    budget_ms: float
    features: list[np.ndarray]
    evaluated: list[tuple[int, float, int]]
    transfer_ms: float = 0.0
    cloud_ms: float = 0.0
    head: str | None = None
    sleep_overshoot_ms: float = 0.0
    expert_confidence: float | None = None
    first_stage: int = 0

    def elapsed_ms(self) -> float:
        """Time since arrival, ms.

        Returns
        -------
        float
        """
        return (time.perf_counter() - self.arrival_s) * 1000.0

    def remaining_ms(self) -> float:
        """What is left of the budget, ms (negative when overrun).

        Returns
        -------
        float
        """
        return self.budget_ms - self.elapsed_ms()


def offload_budget_ms(deadline_ms: float, objective: str, strategy: Strategy) -> float:
    """How long one request may wait for the cloud, ms from its arrival.

    "tail" bounds every request, so its budget is the requirement. "mean"
    bounds the average: the plan already counts the offloaded requests
    taking longer than the requirement while early exits take less, so
    cutting them off at the requirement would turn planned offloads into
    fallbacks (16% of the requests, 6 points of accuracy at 50 ms in the
    latency-vs-uplink experiment). They get the strategy's predicted
    worst-case path with some slack instead; the fallback still catches a
    cloud that is late beyond that, or gone.

    Parameters
    ----------
    deadline_ms : float
        The requirement, ms (checked by the caller).
    objective : {"mean", "tail"}
    strategy : Strategy
        The strategy the request runs (its ``worst_latency_ms`` is read).

    Returns
    -------
    float

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> s = SimpleNamespace(worst_latency_ms=70.0)  # a Strategy whose slowest path is predicted at 70 ms
    >>> offload_budget_ms(50.0, "tail", s), offload_budget_ms(50.0, "mean", s)
    (50.0, 87.5)
    """
    if objective != "mean" or not math.isfinite(strategy.worst_latency_ms):
        return deadline_ms
    return max(deadline_ms, _MEAN_BUDGET_SLACK * strategy.worst_latency_ms)
