"""A circuit breaker for the cloud: after N consecutive failures, offloads are skipped for T seconds.

Without it, a hung cloud (the audit's SIGSTOP for 10 s) made every request
wait its whole budget before falling back: 252 of 252 late at 100 ms. With
it, the edge stops offloading after ``n_failures`` timeouts or refused
connections in a row and answers locally at once; after ``open_s`` one
request at a time is let through as a probe (half-open); its success closes
the breaker, its failure opens it for another ``open_s``. A 4xx from the
cloud (it refused this payload) says the cloud is up: a success.

States: "closed" (offload), "open" (skip), "half_open" (one probe in flight).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from popex.checks import check_finite, check_int
from popex.edge.cloud_types import CloudRejected

__all__ = ["BREAKER_STATES", "CircuitBreaker"]

BREAKER_STATES = ("closed", "open", "half_open")


class CircuitBreaker:
    """Consecutive-failure breaker with half-open probes; thread-safe, O(1) per call.

    Parameters
    ----------
    n_failures : int
        Consecutive failures that open it.
    open_s : float
        How long it stays open before a probe is let through, s.
    clock : callable, optional
        Monotonic seconds (tests pass a fake).

    Raises
    ------
    ConfigError
        If ``n_failures`` < 1 or ``open_s`` is negative or not finite.

    Examples
    --------
    >>> now = [0.0]
    >>> breaker = CircuitBreaker(n_failures=2, open_s=5.0, clock=lambda: now[0])
    >>> breaker.record_failure(); breaker.record_failure(); breaker.state, breaker.allow()
    ('open', False)
    >>> now[0] = 5.0
    >>> breaker.allow(), breaker.allow(), breaker.state  # one probe at a time
    (True, False, 'half_open')
    >>> breaker.record_success(); breaker.state
    'closed'
    """

    def __init__(self, *, n_failures: int, open_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.n_failures = check_int(n_failures, name="n_failures", low=1, high=10**6)
        self.open_s = check_finite(open_s, name="open_s", low=0.0)
        self._clock = clock
        self._lock = threading.Lock()
        self._n_consecutive = 0
        self._opened_at_s: float | None = None
        self._probing = False
        self.n_opened = 0
        self.n_skipped = 0

    @property
    def state(self) -> str:
        """One of :data:`BREAKER_STATES`."""
        with self._lock:
            if self._opened_at_s is None:
                return "closed"
            return "half_open" if self._probing or self._clock() - self._opened_at_s >= self.open_s else "open"

    def allow(self) -> bool:
        """Whether this request may offload (a probe when half-open); a False is counted as skipped.

        Returns
        -------
        bool
        """
        with self._lock:
            if self._opened_at_s is None:
                return True
            if not self._probing and self._clock() - self._opened_at_s >= self.open_s:
                self._probing = True
                return True
            self.n_skipped += 1
            return False

    def record_success(self) -> None:
        """The cloud answered: close the breaker."""
        with self._lock:
            self._n_consecutive = 0
            self._opened_at_s = None
            self._probing = False

    def record_failure(self) -> None:
        """The cloud timed out or could not be reached: count it, open after ``n_failures`` in a row."""
        with self._lock:
            self._n_consecutive += 1
            if self._probing or (self._opened_at_s is None and self._n_consecutive >= self.n_failures):
                self.n_opened += 1  # opened, or a failed probe opened it again
                self._opened_at_s = self._clock()
                self._probing = False

    def record(self, error: Exception | None) -> None:
        """Record an offload's outcome: None (answered) or a 4xx refusal is a success, anything else a failure.

        Parameters
        ----------
        error : Exception or None
            What the cloud call raised.
        """
        (self.record_success if error is None or isinstance(error, CloudRejected) else self.record_failure)()

    def to_dict(self) -> dict[str, object]:
        """What ``/api/v1/status`` shows of it.

        Returns
        -------
        dict
            ``state``, ``n_consecutive_failures``, ``n_opened``, ``n_skipped``.
        """
        state = self.state
        with self._lock:
            return {"state": state, "n_consecutive_failures": self._n_consecutive, "n_opened": self.n_opened,
                    "n_skipped": self.n_skipped}
