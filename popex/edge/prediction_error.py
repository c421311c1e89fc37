"""How far the plan's predictions are from what requests measured, per model (for the edge's status).

A plan is only as good as its latency model; an operator (and the audit
that found a model predicted at 1.1 ms and measured at 2.7 ms) needs to see
the gap without a separate experiment. The planner's thread records each
answered request's predicted and measured latency here; the status reads a
summary. A sliding window, because a re-plan changes the predictions.
"""

from __future__ import annotations

import math
import statistics
import threading
from collections import deque
from typing import Any

__all__ = ["PredictionErrors"]

_WINDOW_N = 200


class PredictionErrors:
    """Predicted vs measured latency of each model's recent requests.

    Examples
    --------
    >>> errors = PredictionErrors()
    >>> errors.add("m", predicted_ms=10.0, measured_ms=12.0)
    >>> round(errors.summary("m")["mean_error_fraction"], 6)
    0.2
    """

    def __init__(self) -> None:
        self._pairs: dict[str, deque[tuple[float, float]]] = {}
        self._lock = threading.Lock()

    def add(self, model_id: str, *, predicted_ms: float, measured_ms: float) -> None:
        """Record one request (non-finite or non-positive predictions are skipped).

        Parameters
        ----------
        model_id : str
        predicted_ms, measured_ms : float
            The strategy's predicted latency and the request's arrival-to-answer time, ms.
        """
        if not (math.isfinite(predicted_ms) and math.isfinite(measured_ms)) or predicted_ms <= 0:
            return
        with self._lock:
            self._pairs.setdefault(model_id, deque(maxlen=_WINDOW_N)).append((predicted_ms, measured_ms))

    def remove(self, model_id: str) -> None:
        """Forget a deleted model's requests.

        Parameters
        ----------
        model_id : str
        """
        with self._lock:
            self._pairs.pop(model_id, None)

    def summary(self, model_id: str) -> dict[str, Any]:
        """The recent requests' mean predicted and measured latency and their error.

        Parameters
        ----------
        model_id : str

        Returns
        -------
        dict
            ``n_requests``, ``mean_predicted_ms``, ``mean_measured_ms``,
            ``mean_error_fraction`` (measured mean / predicted mean − 1) and
            ``median_abs_error_fraction`` (per request); None values without requests.
        """
        with self._lock:
            pairs = list(self._pairs.get(model_id, ()))
        if not pairs:
            return {"n_requests": 0, "mean_predicted_ms": None, "mean_measured_ms": None,
                    "mean_error_fraction": None, "median_abs_error_fraction": None}
        predicted = statistics.fmean(p for p, _ in pairs)
        measured = statistics.fmean(m for _, m in pairs)
        return {"n_requests": len(pairs), "mean_predicted_ms": predicted, "mean_measured_ms": measured,
                "mean_error_fraction": measured / predicted - 1.0,
                "median_abs_error_fraction": statistics.median(abs(m / p - 1.0) for p, m in pairs)}
