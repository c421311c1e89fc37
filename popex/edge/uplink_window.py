"""The uplink estimate: sliding windows of samples, the rate fit, and the hysteresis band.

The RTT is the median of the last ``window_n`` RTT samples, and the rate a
byte-weighted robust fit over the last ``window_n`` transfers of each source
(active probes, passive offloads; :func:`popex.edge.uplink_fit.fit_rate`),
because one probe that meets a burst of cross traffic, or a passive sample
whose timing caught a GC pause, must not move the plans, while a real change
of link takes over within about half a window. Each source has its own
window, so a busy edge's offloads cannot push the probes out of it. The
window also sizes the next probe (:meth:`UplinkWindow.probe_n_bytes`). The plans are rebuilt only when the estimate leaves a relative band
around the estimate they were last built with: re-planning costs about a
millisecond per model, and RTT jitter is not a change of link.

The window is not thread-safe: :class:`~popex.edge.uplink.UplinkMonitor`
guards it with its lock, and keeps file writes and callbacks outside it.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
from collections import deque
from dataclasses import dataclass
from typing import Any

from popex.checks import check_finite, check_int
from popex.decision.latency import Link
from popex.edge.uplink_fit import JITTER_FACTOR, SOURCES, RateFit, Transfer, fit_rate, jitter_ms
from popex.errors import ConfigError

__all__ = ["UplinkSample", "UplinkEstimate", "UplinkWindow"]

_N_HISTORY_KEPT = 50
# RTT jitter of a millisecond is noise, not a change of link: below this
# absolute difference a relative change of the RTT does not re-plan.
_RTT_SLACK_MS = 1.0
_MAX_HYSTERESIS_FRACTION = 10.0
# A probe's serialisation time: many jitters (so that the jitter is a small part of it) and a
# fraction of the RTT (a long path jitters more, and a shaper's bucket, let through at line
# speed, is a smaller part of a longer transfer), at least this long, ms ...
_PROBE_N_JITTERS = 20.0
_PROBE_RTT_FRACTION = 0.5
_MIN_PROBE_SERIALISATION_MS = 50.0
# ... but never more than this share of the link's time between two rounds (a slow link stays the offloads').
_MAX_PROBE_LINK_SHARE = 0.1
_MIN_PROBE_N_BYTES = 1024


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
    n_bytes : int or None
        A rate sample's bytes on the wire.
    excess_ms : float or None
        A rate sample's round trip beyond a zero-byte probe's, the cloud's compute removed, ms.
    """

    time_s: float
    source: str
    uplink_mbps: float | None
    rtt_ms: float | None
    n_bytes: int | None = None
    excess_ms: float | None = None

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
        Source of the newest rate sample that carried the rate ("probe", "passive"), or "configured".
    rtt_source : str
        How the RTT is measured now: "icmp", "http" or "configured".
    n_samples : int
        Rate samples (or pairs of them) that carried the rate.
    n_rtt_samples : int
        RTT samples in the window.
    jitter_ms : float
        The RTT jitter (:func:`popex.edge.uplink_fit.jitter_ms`), ms.
    fixed_ms : dict of str to float
        Each source's fixed cost beyond a zero-byte probe, ms.
    """

    uplink_mbps: float
    rtt_ms: float
    source: str
    rtt_source: str
    n_samples: int
    n_rtt_samples: int
    jitter_ms: float = 0.0
    fixed_ms: dict[str, float] = dataclasses.field(default_factory=dict)

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
        self._transfers: dict[str, deque[UplinkSample]] = {
            source: deque(maxlen=self.window_n) for source in SOURCES}
        self._fit = RateFit(ms_per_byte=None, fixed_ms={source: 0.0 for source in SOURCES})
        self._rate_source = "configured"
        self._n_probes = 0
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
        if sample.n_bytes is None:
            self._rtt_samples.append(sample)
        else:
            self._add_transfer(sample)
        self._history.append(sample)
        link = self._link()
        if not self._changed(link):
            return None
        self._planned = link
        return link

    def _add_transfer(self, sample: UplinkSample) -> None:
        self._transfers[sample.source].append(sample)
        transfers = [Transfer(s.source, int(s.n_bytes), float(s.excess_ms))
                     for samples in self._transfers.values() for s in samples]
        fit = fit_rate(transfers, jitter_ms=self.jitter_ms(), prior_fixed_ms=self._fit.fixed_ms)
        if fit.ms_per_byte is None:  # nothing carries the rate yet: keep the last fit's rate
            fit = dataclasses.replace(fit, ms_per_byte=self._fit.ms_per_byte, n_used=self._fit.n_used)
        if self.serialisation_ms(sample, fit) is not None:
            self._rate_source = sample.source
        self._fit = fit

    def serialisation_ms(self, sample: UplinkSample, fit: RateFit | None = None) -> float | None:
        """The part of a rate sample's excess that is the bytes' time, or None within the jitter.

        Parameters
        ----------
        sample : UplinkSample
            A rate sample (``n_bytes`` and ``excess_ms`` set).
        fit : RateFit, optional
            Whose fixed cost to take off; default the current fit.

        Returns
        -------
        float or None
            ms.
        """
        fit = self._fit if fit is None else fit
        serialisation_ms = float(sample.excess_ms) - fit.fixed_ms.get(sample.source, 0.0)
        return serialisation_ms if serialisation_ms >= JITTER_FACTOR * self.jitter_ms() else None

    def jitter_ms(self) -> float:
        """The RTT jitter of the recent zero-byte round trips (see :func:`popex.edge.uplink_fit.jitter_ms`).

        Returns
        -------
        float
            ms.
        """
        return jitter_ms(self._base_ms)

    def probe_n_bytes(self, *, probe_interval_s: float, max_n_bytes: int) -> int:
        """The size of the next active probe, from the RTT, the jitter and the rate estimate.

        Its serialisation time is the largest of 20 jitters, half the RTT and
        50 ms (tc tbf's smallest bucket is 12.8 ms at 1 Mbit/s), but at most a tenth of the link's time between two rounds;
        every other probe is half that size, so that pairs of sizes give the
        rate with the fixed costs cancelled (:mod:`popex.edge.uplink_fit`).

        Parameters
        ----------
        probe_interval_s : float
            Seconds between two measurement rounds.
        max_n_bytes : int
            The configured largest probe.

        Returns
        -------
        int
            Bytes, in [1024, max_n_bytes] (``max_n_bytes`` when smaller).
        """
        link = self._link()
        bytes_per_ms = 125.0 * link.uplink_mbps
        target_ms = max(_PROBE_N_JITTERS * self.jitter_ms(), _PROBE_RTT_FRACTION * link.rtt_ms,
                        _MIN_PROBE_SERIALISATION_MS)
        target_ms = min(target_ms, _MAX_PROBE_LINK_SHARE * 1000.0 * probe_interval_s)
        self._n_probes += 1
        if self._n_probes % 2 == 0:
            target_ms *= 0.5
        n_bytes = int(min(max(target_ms * bytes_per_ms, _MIN_PROBE_N_BYTES), max_n_bytes))
        return max(1, n_bytes)

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
            source=self._rate_source if self._fit.ms_per_byte is not None else "configured",
            rtt_source=rtt_method if self._rtt_samples else "configured",
            n_samples=self._fit.n_used,
            n_rtt_samples=len(self._rtt_samples),
            jitter_ms=self.jitter_ms(),
            fixed_ms=dict(self._fit.fixed_ms),
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
        uplink_mbps = self._fit.uplink_mbps
        rtts = [sample.rtt_ms for sample in self._rtt_samples]
        return Link(uplink_mbps=self.initial_link.uplink_mbps if uplink_mbps is None else uplink_mbps,
                    rtt_ms=float(statistics.median(rtts)) if rtts else self.initial_link.rtt_ms)

    def _changed(self, link: Link) -> bool:
        planned = self._planned
        band = self.hysteresis_fraction
        if abs(link.uplink_mbps - planned.uplink_mbps) > band * planned.uplink_mbps:
            return True
        return abs(link.rtt_ms - planned.rtt_ms) > max(band * planned.rtt_ms, _RTT_SLACK_MS)
