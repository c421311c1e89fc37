"""Client-side emulation of a slow uplink, for the demo and for tests.

This is emulation, not traffic shaping: the sender *waits* as long as the
bytes would take on a link of the given rate and round-trip time, then sends
them over the real (fast) network. Kernel-level shaping (tc/netem) lives in
docker/; this module needs no privileges and behaves the same everywhere.

The link is a token bucket with no burst allowance, i.e. a FIFO: it carries
one transmission at a time, so concurrent senders queue behind each other.
The time at which the link becomes free is kept under a lock.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Callable

from popex.errors import ConfigError

__all__ = ["EMULATED_RATE_MBPS", "LinkEmulator", "parse_link"]

#: Rate given to a link emulator that only has to add the RTT (the kernel shapes the rate).
EMULATED_RATE_MBPS = 100_000

_MAX_UPLINK_MBPS = 1e6
_MAX_RTT_MS = 60_000.0


def _check_rate(uplink_mbps: object, rtt_ms: object) -> tuple[float, float]:
    for name, value in (("uplink_mbps", uplink_mbps), ("rtt_ms", rtt_ms)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if not 0 < uplink_mbps <= _MAX_UPLINK_MBPS:
        raise ConfigError(f"uplink_mbps must be in (0, {_MAX_UPLINK_MBPS:g}], got {uplink_mbps}")
    if not 0 <= rtt_ms <= _MAX_RTT_MS:
        raise ConfigError(f"rtt_ms must be in [0, {_MAX_RTT_MS:g}], got {rtt_ms}")
    return float(uplink_mbps), float(rtt_ms)


class LinkEmulator:
    """An emulated uplink of ``uplink_mbps`` Mbit/s with round-trip time ``rtt_ms``.

    Parameters
    ----------
    uplink_mbps : float
        Link rate in Mbit/s (10^6 bits per second), > 0.
    rtt_ms : float
        Round-trip time in ms added to every transmission, >= 0.
    clock_s, sleep_s : callable, optional
        Monotonic clock in seconds and a sleep function; injectable so tests
        can run on a fake clock. Default: ``time.monotonic``, ``time.sleep``.

    Raises
    ------
    ConfigError
        If the rate or the RTT is not a finite number in range.

    Examples
    --------
    >>> link = LinkEmulator(8.0, 0.0)
    >>> link.serialisation_ms(1000)  # 8000 bits at 8 Mbit/s
    1.0
    """

    def __init__(self, uplink_mbps: float, rtt_ms: float, *,
                 clock_s: Callable[[], float] = time.monotonic,
                 sleep_s: Callable[[float], None] = time.sleep) -> None:
        self.uplink_mbps, self.rtt_ms = _check_rate(uplink_mbps, rtt_ms)
        self._clock_s = clock_s
        self._sleep_s = sleep_s
        self._lock = threading.Lock()
        self._free_at_s = -math.inf  # clock time at which the link has sent everything queued

    def __repr__(self) -> str:
        return f"LinkEmulator(uplink_mbps={self.uplink_mbps:g}, rtt_ms={self.rtt_ms:g})"

    def set_link(self, uplink_mbps: float, rtt_ms: float) -> None:
        """Change the emulated rate and RTT at run time (the edge's admin endpoint).

        Both change together under the link's lock, so a transmission queued
        after the call uses the new pair. Bytes already queued keep the time
        the old rate gave them.

        Parameters
        ----------
        uplink_mbps : float
            New rate in Mbit/s, > 0.
        rtt_ms : float
            New round-trip time in ms, >= 0.

        Raises
        ------
        ConfigError
            If a value is not a finite number in range (nothing changes).

        Examples
        --------
        >>> link = LinkEmulator(8.0, 0.0)
        >>> link.set_link(1.0, 20.0)
        >>> link
        LinkEmulator(uplink_mbps=1, rtt_ms=20)
        """
        uplink_mbps, rtt_ms = _check_rate(uplink_mbps, rtt_ms)
        with self._lock:
            self.uplink_mbps, self.rtt_ms = uplink_mbps, rtt_ms

    def serialisation_ms(self, n_bytes: int) -> float:
        """Time in ms that ``n_bytes`` occupy the link: 8·n_bytes / (1000·uplink_mbps)."""
        return 8.0 * n_bytes / (1000.0 * self.uplink_mbps)

    def delay_ms(self, n_bytes: int) -> float:
        """Delay in ms that :meth:`transmit` would see if called now (queue + serialisation + RTT).

        Nothing is reserved: a caller with a time budget uses it to decide
        whether to send at all.
        """
        n_bytes = self._check_n_bytes(n_bytes)
        with self._lock:
            now_s = self._clock_s()
            queue_ms = max(0.0, self._free_at_s - now_s) * 1000.0
        return queue_ms + self.serialisation_ms(n_bytes) + self.rtt_ms

    def transmit(self, n_bytes: int) -> float:
        """Block for the time ``n_bytes`` take on the link, then return that delay in ms.

        The delay is the wait behind earlier transmissions, plus the
        serialisation time of these bytes, plus one RTT.

        Parameters
        ----------
        n_bytes : int
            Bytes to send, >= 0.

        Returns
        -------
        float
            The emulated delay in ms (the time this call blocked, up to the
            accuracy of the sleep).

        Raises
        ------
        ConfigError
            If ``n_bytes`` is not a non-negative int.
        """
        n_bytes = self._check_n_bytes(n_bytes)
        with self._lock:
            now_s = self._clock_s()
            start_s = max(now_s, self._free_at_s)
            self._free_at_s = start_s + self.serialisation_ms(n_bytes) / 1000.0
            done_s = self._free_at_s
        delay_ms = (done_s - now_s) * 1000.0 + self.rtt_ms
        self._sleep_s(delay_ms / 1000.0)
        return delay_ms

    @staticmethod
    def _check_n_bytes(n_bytes: int) -> int:
        if isinstance(n_bytes, bool) or not isinstance(n_bytes, int) or n_bytes < 0:
            raise ConfigError(f"n_bytes must be a non-negative int, got {n_bytes!r}")
        return n_bytes


def parse_link(text: str) -> LinkEmulator:
    """Build a :class:`LinkEmulator` from ``"RATE_MBPS,RTT_MS"`` (the ``--emulate-link`` option).

    Parameters
    ----------
    text : str
        Uplink rate in Mbit/s and round-trip time in ms, comma-separated.

    Returns
    -------
    LinkEmulator

    Raises
    ------
    ConfigError
        If the text is not two numbers, or a value is out of range.

    Examples
    --------
    >>> parse_link("5.85,50")
    LinkEmulator(uplink_mbps=5.85, rtt_ms=50)
    """
    parts = str(text).split(",")
    if len(parts) != 2:
        raise ConfigError(f"--emulate-link needs RATE_MBPS,RTT_MS (e.g. 5.85,50), got {text!r}")
    try:
        uplink_mbps, rtt_ms = (float(part.strip()) for part in parts)
    except ValueError as err:
        raise ConfigError(f"--emulate-link needs two numbers RATE_MBPS,RTT_MS (e.g. 5.85,50), got {text!r}") from err
    return LinkEmulator(uplink_mbps, rtt_ms)
