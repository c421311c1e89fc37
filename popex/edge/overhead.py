"""A sliding median of recent measurements: the per-offload overhead O, the wire ratio, the fixed edge time.

The background planner keeps one per measured quantity and re-plans when
its median leaves the hysteresis band; the median, not the mean, so that
one stalled offload does not move the plan.
"""

from __future__ import annotations

import math
import statistics
import threading
from collections import deque

from popex.checks import check_finite, check_int

__all__ = ["OverheadTracker"]


class OverheadTracker:
    """Median of the recent measurements of one quantity (O in ms, or a ratio).

    Parameters
    ----------
    initial_ms : float
        The value until the first measurement, finite and >= 0.
    window_n : int, default 21
        Measurements kept.

    Raises
    ------
    ConfigError
        If ``initial_ms`` is negative or not finite, or ``window_n`` < 1.

    Examples
    --------
    >>> tracker = OverheadTracker(initial_ms=2.0, window_n=3)
    >>> for value in (1.0, 5.0, 3.0, 4.0):
    ...     tracker.add(value)
    >>> tracker.current_ms  # median of 5, 3, 4
    4.0
    """

    def __init__(self, *, initial_ms: float, window_n: int = 21) -> None:
        self.initial_ms = check_finite(initial_ms, name="initial_ms", low=0.0)
        self._samples: deque[float] = deque(maxlen=check_int(window_n, name="window_n", low=1, high=1_000_000))
        self._lock = threading.Lock()

    def add(self, overhead_ms: float) -> None:
        """Add one measurement; negative values (timer noise) count as 0, non-finite ones are dropped.

        Parameters
        ----------
        overhead_ms : float
            The measurement.
        """
        if math.isfinite(overhead_ms):
            with self._lock:
                self._samples.append(max(0.0, float(overhead_ms)))

    @property
    def n_samples(self) -> int:
        """Measurements in the window."""
        return len(self._samples)

    @property
    def current_ms(self) -> float:
        """Median of the window, or the initial value without measurements."""
        with self._lock:
            samples = list(self._samples)
        return float(statistics.median(samples)) if samples else self.initial_ms
