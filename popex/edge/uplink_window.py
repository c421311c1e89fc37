"""The uplink estimate: sliding windows of samples, their medians, and the hysteresis band.

The estimate is the median of the last ``window_n`` samples of each kind
(rates, RTTs) because one probe that meets a burst of cross traffic, or a
passive sample whose timing caught a GC pause, must not move the plans,
while a real change of link takes over the median within about half a
window. The plans are rebuilt only when the estimate leaves a relative band
around the estimate they were last built with: re-planning costs about a
millisecond per model, and RTT jitter is not a change of link.

The window is not thread-safe: :class:`~popex.edge.uplink.UplinkMonitor`
guards it with its lock, and keeps file writes and callbacks outside it.
"""

from __future__ import annotations

import statistics
import sys
from collections import deque
from dataclasses import dataclass
from typing import Any

from popex.checks import check_finite, check_int
from popex.decision.latency import Link
from popex.errors import ConfigError

__all__ = ["UplinkSample", "UplinkEstimate", "UplinkWindow"]

_N_HISTORY_KEPT = 50
# RTT jitter of a millisecond is noise, not a change of link: below this
# absolute difference a relative change of the RTT does not re-plan.
_RTT_SLACK_MS = 1.0
_MAX_HYSTERESIS_FRACTION = 10.0


@dataclass(frozen=True)
class UplinkSample:
    """One measurement.

    Attributes
    ----------
    time_s : float
        Unix time of the measurement.
    source : str
        "probe", "passive", "icmp" or "http" (the last two are RTT samples).
    uplink_mbps : float or None
        None for an RTT sample.
    rtt_ms : float or None
        The RTT measured ("icmp"/"http") or used to compute the rate.
    """

    time_s: float
    source: str
    uplink_mbps: float | None
    rtt_ms: float | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, for the edge's status.

        Returns
        -------
        dict
            ``time_s``, ``source``, ``uplink_mbps`` and ``rtt_ms``.
        """
        return {"time_s": self.time_s, "source": self.source, "uplink_mbps": self.uplink_mbps, "rtt_ms": self.rtt_ms}


@dataclass(frozen=True)
class UplinkEstimate:
    """The smoothed estimate.

    Attributes
    ----------
    uplink_mbps : float
        Median of the rate samples in the window (the initial link if none).
    rtt_ms : float
        Median of the RTT samples in the window (the initial link if none).
    source : str
        Source of the newest rate sample ("probe", "passive"), or "configured".
    rtt_source : str
        How the RTT is measured now: "icmp", "http" or "configured".
    n_samples : int
        Rate samples in the window.
    n_rtt_samples : int
        RTT samples in the window.
    """

    uplink_mbps: float
    rtt_ms: float
    source: str
    rtt_source: str
    n_samples: int
    n_rtt_samples: int

    def link(self) -> Link:
        """The estimate as the link the planner plans with.

        Returns
        -------
        Link
        """
        return Link(uplink_mbps=self.uplink_mbps, rtt_ms=self.rtt_ms)


class UplinkWindow:
    """The recent samples, their medians, and the link the plans were last built with.

    Parameters
    ----------
    initial_link : Link
        The estimate until samples arrive (configured or emulated link), and
        the first planned link.
    window_n : int
        Samples of each kind kept for the median.
    hysteresis_fraction : float
        Relative change of the rate or the RTT (vs. the planned link) that
        counts as a change; e.g. 0.2 for 20 %.

    Raises
    ------
    ConfigError
        On an out-of-range parameter.
    """

    def __init__(self, *, initial_link: Link, window_n: int, hysteresis_fraction: float) -> None:
        if not isinstance(initial_link, Link):
            raise ConfigError(f"initial_link must be a Link, got {type(initial_link).__name__}")
        self.initial_link = initial_link
        self.window_n = check_int(window_n, name="window_n", low=1, high=sys.maxsize)
        self.hysteresis_fraction = check_finite(hysteresis_fraction, name="hysteresis_fraction", low=0.0,
                                                high=_MAX_HYSTERESIS_FRACTION, allow_text=False)
        self._rate_samples: deque[UplinkSample] = deque(maxlen=self.window_n)
        self._rtt_samples: deque[UplinkSample] = deque(maxlen=self.window_n)
        self._base_ms: deque[float] = deque(maxlen=self.window_n)  # zero-byte probe round trips
        self._history: deque[UplinkSample] = deque(maxlen=_N_HISTORY_KEPT)
        self._planned = initial_link

    @property
    def planned_link(self) -> Link:
        """The link the plans were last built with (the initial link until a change)."""
        return self._planned

    def add(self, sample: UplinkSample) -> Link | None:
        """Add a sample; if the estimate now leaves the band around the planned link, plan with it.

        Parameters
        ----------
        sample : UplinkSample
            A rate sample (``uplink_mbps`` set) or an RTT sample.

        Returns
        -------
        Link or None
            The new planned link, or None while the estimate stays inside the band.
        """
        (self._rtt_samples if sample.uplink_mbps is None else self._rate_samples).append(sample)
        self._history.append(sample)
        link = self._link()
        if not self._changed(link):
            return None
        self._planned = link
        return link

    def add_base_ms(self, base_ms: float) -> None:
        """Add the round trip of a zero-byte probe, which rate samples are measured against.

        Parameters
        ----------
        base_ms : float
            RTT plus the HTTP cost of one request, ms.
        """
        self._base_ms.append(base_ms)

    def base_ms(self) -> float:
        """What a rate sample's round trip is compared with.

        Returns
        -------
        float
            The median of the recent zero-byte round trips, or the RTT estimate before any, ms.
        """
        return float(statistics.median(self._base_ms)) if self._base_ms else self._link().rtt_ms

    def estimate(self, *, rtt_method: str) -> UplinkEstimate:
        """The medians of the windows (the initial link for a signal without samples).

        Parameters
        ----------
        rtt_method : str
            How the RTT is measured now, reported once RTT samples exist.

        Returns
        -------
        UplinkEstimate
        """
        link = self._link()
        return UplinkEstimate(
            uplink_mbps=link.uplink_mbps,
            rtt_ms=link.rtt_ms,
            source=self._rate_samples[-1].source if self._rate_samples else "configured",
            rtt_source=rtt_method if self._rtt_samples else "configured",
            n_samples=len(self._rate_samples),
            n_rtt_samples=len(self._rtt_samples),
        )

    def history(self, n_samples: int | None = None) -> list[UplinkSample]:
        """The newest samples, oldest first.

        Parameters
        ----------
        n_samples : int, optional
            How many; default all that are kept (the last 50).

        Returns
        -------
        list of UplinkSample
        """
        samples = list(self._history)
        if n_samples is None:
            return samples
        return samples[-n_samples:] if n_samples > 0 else []

    def _link(self) -> Link:
        rates = [sample.uplink_mbps for sample in self._rate_samples]
        rtts = [sample.rtt_ms for sample in self._rtt_samples]
        return Link(uplink_mbps=float(statistics.median(rates)) if rates else self.initial_link.uplink_mbps,
                    rtt_ms=float(statistics.median(rtts)) if rtts else self.initial_link.rtt_ms)

    def _changed(self, link: Link) -> bool:
        planned = self._planned
        band = self.hysteresis_fraction
        if abs(link.uplink_mbps - planned.uplink_mbps) > band * planned.uplink_mbps:
            return True
        return abs(link.rtt_ms - planned.rtt_ms) > max(band * planned.rtt_ms, _RTT_SLACK_MS)
