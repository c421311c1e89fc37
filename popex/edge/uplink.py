"""The uplink monitor (DESIGN.md §7): one estimate of the uplink from three signals.

- **RTT**: an ICMP echo to the cloud host (ping3), or an HTTP round trip (a
  zero-byte upload to the probe endpoint) where ICMP is not permitted or
  would miss the link: when the client emulates the link, ICMP would measure
  the real, fast network, and ``/healthz`` is control traffic that the client
  sends around the emulated link, so only a probe sees the emulated RTT.
- **Active probe**: upload ``probe_n_bytes`` to the cloud's probe endpoint,
  timed: ``uplink_mbps = 8·n_bytes / (1000·(round_trip_ms − rtt_ms))``,
  where ``rtt_ms`` is the round trip of a zero-byte probe sent just before:
  RTT plus the HTTP cost of one request, so that the HTTP cost (a few ms,
  which on a fast link dwarfs the bytes) cancels out. Through an emulated
  link the probes wait like any upload, so the estimate sees the emulated rate.
- **Passive**: every offload reports its bytes and transfer time (round
  trip minus the cloud's compute time); the same formula applies, with the
  median of the recent zero-byte round trips.

Each signal enters a sliding window; the estimate is the median of the last
``window_n`` samples. When it moves beyond a relative hysteresis band away
from the estimate that was last planned with, the ``on_change`` callback
re-plans. Every sample is appended to a CSV file for plots.

The probing thread is started by :meth:`UplinkMonitor.start`, never by the
constructor.
"""

from __future__ import annotations

import csv
import logging
import math
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from popex.decision.latency import Link
from popex.errors import ConfigError

__all__ = [
    "RTT_METHODS",
    "UplinkSample",
    "UplinkEstimate",
    "UplinkMonitor",
    "uplink_mbps_from_timing",
]

_log = logging.getLogger(__name__)

#: How the RTT is measured: "auto" (ICMP unless the link is emulated or ICMP
#: is refused, then HTTP), "icmp" or "http".
RTT_METHODS = ("auto", "icmp", "http")
_MAX_PING_TIMEOUT_S = 2.0  # an unanswered ping must not stall the round for long
_HISTORY_COLUMNS = ("time_s", "source", "uplink_mbps", "rtt_ms")
_N_HISTORY_KEPT = 50
# RTT jitter of a millisecond is noise, not a change of link: below this
# absolute difference a relative change of the RTT does not re-plan.
_RTT_SLACK_MS = 1.0
# A passive sample whose serialisation part is below this is mostly timer
# and HTTP jitter (a small tensor on a fast link) and says nothing about the rate.
_MIN_PASSIVE_SERIALISATION_MS = 1.0
# The same for a probe, whose size the operator chose; it only guards against
# a round trip at or below the RTT.
_MIN_PROBE_SERIALISATION_MS = 0.05


class _Client(Protocol):
    """What the monitor needs from :class:`popex.edge.cloud_port.CloudClient`."""

    link: Any

    def probe(self, n_bytes: int, *, timeout_s: float) -> Any: ...



def uplink_mbps_from_timing(n_bytes: int, round_trip_ms: float, rtt_ms: float) -> float:
    """Uplink rate from one timed upload: ``8·n_bytes / (1000·(round_trip_ms − rtt_ms))``.

    Parameters
    ----------
    n_bytes : int
        Bytes uploaded.
    round_trip_ms : float
        Time from the first byte sent to the answer, ms.
    rtt_ms : float
        Round-trip time of the link, ms.

    Returns
    -------
    float
        Mbit/s; ``nan`` when ``round_trip_ms <= rtt_ms`` (no information).

    Examples
    --------
    >>> uplink_mbps_from_timing(125_000, 110.0, 10.0)  # 1 Mbit in 100 ms
    10.0
    """
    serialisation_ms = round_trip_ms - rtt_ms
    if not serialisation_ms > 0:
        return math.nan
    return 8.0 * n_bytes / (1000.0 * serialisation_ms)


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
        """JSON-ready form."""
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
        """The estimate as a :class:`~popex.decision.Link`."""
        return Link(uplink_mbps=self.uplink_mbps, rtt_ms=self.rtt_ms)


def _host_of(url: str) -> str:
    host = urlparse(url).hostname
    if not host:
        raise ConfigError(f"cloud URL {url!r} has no host name")
    return host


def _positive(name: str, value: object, *, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a positive number, got {value!r}")
    if integer and int(value) != value:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


class UplinkMonitor:
    """Estimate the uplink from RTT, active probes and passive offload samples.

    Parameters
    ----------
    client : CloudClient
        Used for ``probe``; when ``client.link`` is a
        LinkEmulator every measurement goes through the emulated link.
    cloud_url : str
        The cloud's base URL; its host is pinged.
    initial_link : Link
        The estimate until samples arrive (configured or emulated link).
    probe_interval_s : float
        Seconds between two measurement rounds of the background thread.
    probe_n_bytes : int
        Bytes uploaded by one active probe.
    window_n : int
        Samples of each kind kept for the median.
    hysteresis_fraction : float
        Relative change of the rate or the RTT (vs. the estimate last planned
        with) that triggers ``on_change``; e.g. 0.2 for 20 %.
    history_path : str or path-like, optional
        CSV file to append every sample to (created with a header).
    on_change : callable(Link), optional
        Called with the new estimate when it leaves the hysteresis band.
    rtt_method : {"auto", "icmp", "http"}
    timeout_s : float
        Timeout of one ping, health check or probe.

    Raises
    ------
    ConfigError
        On an out-of-range parameter.
    """

    def __init__(
        self,
        client: _Client,
        *,
        cloud_url: str,
        initial_link: Link,
        probe_interval_s: float = 5.0,
        probe_n_bytes: int = 65536,
        window_n: int = 9,
        hysteresis_fraction: float = 0.2,
        history_path: str | Path | None = None,
        on_change: Callable[[Link], None] | None = None,
        rtt_method: str = "auto",
        timeout_s: float = 10.0,
    ) -> None:
        if not isinstance(initial_link, Link):
            raise ConfigError(f"initial_link must be a Link, got {type(initial_link).__name__}")
        if rtt_method not in RTT_METHODS:
            raise ConfigError(f"rtt_method must be one of {RTT_METHODS}, got {rtt_method!r}")
        if isinstance(hysteresis_fraction, bool) or not 0 <= hysteresis_fraction < 10:
            raise ConfigError(f"hysteresis_fraction must be in [0, 10), got {hysteresis_fraction!r}")
        self.client = client
        self.cloud_url = cloud_url
        self.host = _host_of(cloud_url)
        self.initial_link = initial_link
        self.probe_interval_s = _positive("probe_interval_s", probe_interval_s)
        self.probe_n_bytes = int(_positive("probe_n_bytes", probe_n_bytes, integer=True))
        self.window_n = int(_positive("window_n", window_n, integer=True))
        self.hysteresis_fraction = float(hysteresis_fraction)
        self.timeout_s = _positive("timeout_s", timeout_s)
        self.history_path = None if history_path is None else Path(history_path)
        self.on_change = on_change
        self.emulated = getattr(client, "link", None) is not None
        if rtt_method == "auto" and self.emulated:
            self._rtt_method, self.rtt_note = (
                "http", "zero-byte probe round trip: the link is emulated in the client and ICMP would bypass it")
        elif rtt_method == "auto":
            self._rtt_method, self.rtt_note = "icmp", "ICMP echo to the cloud host"
        else:
            self._rtt_method, self.rtt_note = rtt_method, f"configured rtt_method={rtt_method}"
        self._lock = threading.Lock()
        self._replan_lock = threading.Lock()
        self._rate_samples: deque[UplinkSample] = deque(maxlen=self.window_n)
        self._rtt_samples: deque[UplinkSample] = deque(maxlen=self.window_n)
        self._history: deque[UplinkSample] = deque(maxlen=_N_HISTORY_KEPT)
        self._planned = initial_link
        self._n_replans = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warm = False  # whether the last round reached the cloud
        self._base_ms: deque[float] = deque(maxlen=self.window_n)  # zero-byte probe round trips

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        """Start the background thread that measures every ``probe_interval_s`` (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="popex-uplink-monitor", daemon=True)
        self._thread.start()

    def stop(self, *, timeout_s: float = 5.0) -> None:
        """Stop the background thread and wait up to ``timeout_s`` for it."""
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout_s)
        self._thread = None

    @property
    def running(self) -> bool:
        """Whether the background thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.measure_once()
            except Exception:  # the monitor must outlive any one failed round
                _log.exception("uplink measurement failed")
            self._stop.wait(self.probe_interval_s)

    # -- measuring ----------------------------------------------------------------

    @property
    def rtt_source(self) -> str:
        """How the RTT is measured now: "icmp" or "http"."""
        return self._rtt_method

    def measure_once(self) -> UplinkEstimate:
        """One round: a zero-byte probe, the RTT, then an active probe; returns the new estimate.

        The zero-byte probe's round trip (RTT plus the HTTP cost of one
        request) is what the active probe's round trip is compared with, so
        the HTTP cost cancels out of the rate. After a start or a failed
        round, an unrecorded zero-byte probe comes first: connection setup
        and a cloud that is still booting would otherwise pass for RTT.
        """
        if not self._warm and self._zero_probe_ms() is None:
            return self.estimate()
        self._warm = True
        base_ms = self._zero_probe_ms()
        if base_ms is None:
            return self.estimate()
        with self._lock:
            self._base_ms.append(base_ms)
        self._add_rtt(base_ms)
        self.probe(base_ms=base_ms)
        return self.estimate()

    def measure_rtt(self) -> float | None:
        """Measure the RTT once (ICMP, or the round trip of a zero-byte probe) and add the sample.

        Returns
        -------
        float or None
            RTT in ms, or None if the cloud did not answer (no sample added).
        """
        if self._rtt_method == "icmp":
            rtt_ms = self._ping_ms()
            if rtt_ms is not None:
                self._add(UplinkSample(time.time(), "icmp", None, rtt_ms))
                return rtt_ms
        base_ms = self._zero_probe_ms()
        if base_ms is None:
            return None
        self._add(UplinkSample(time.time(), "http", None, base_ms))
        return base_ms

    def probe(self, *, base_ms: float | None = None) -> float | None:
        """Upload ``probe_n_bytes`` to the cloud once and add the rate sample.

        Parameters
        ----------
        base_ms : float, optional
            Round trip of a zero-byte probe just before, ms; default: the
            median of recent ones (or the RTT estimate without any).

        Returns
        -------
        float or None
            Mbit/s, or None if the probe failed or carried no information.
        """
        base_ms = self._base_estimate_ms() if base_ms is None else base_ms
        try:
            result = self.client.probe(self.probe_n_bytes, timeout_s=self.timeout_s)
        except Exception as err:  # unreachable or late cloud: no sample this round
            _log.debug("uplink probe failed: %s", err)
            self._warm = False
            return None
        round_trip_ms = float(result.round_trip_ms)
        if round_trip_ms - base_ms < _MIN_PROBE_SERIALISATION_MS:
            return None
        uplink_mbps = uplink_mbps_from_timing(int(result.n_bytes), round_trip_ms, base_ms)
        self._add(UplinkSample(time.time(), "probe", uplink_mbps, base_ms))
        return uplink_mbps

    def add_passive_sample(self, n_bytes: int, transfer_ms: float) -> float | None:
        """Add a sample from a real offload.

        The round trip of a zero-byte request (median of the recent probes,
        or the RTT estimate before any) is taken off ``transfer_ms``; what
        is left is the time the bytes took.

        Parameters
        ----------
        n_bytes : int
            Payload bytes uploaded.
        transfer_ms : float
            Round trip minus the cloud's compute time, ms.

        Returns
        -------
        float or None
            The rate in Mbit/s, or None if the sample carried no information
            (the serialisation part was below timer noise).
        """
        base_ms = self._base_estimate_ms()
        if not math.isfinite(transfer_ms) or transfer_ms - base_ms < _MIN_PASSIVE_SERIALISATION_MS:
            return None
        uplink_mbps = uplink_mbps_from_timing(int(n_bytes), float(transfer_ms), base_ms)
        self._add(UplinkSample(time.time(), "passive", uplink_mbps, base_ms))
        return uplink_mbps

    def _add_rtt(self, base_ms: float) -> None:
        """The round's RTT sample: ICMP where it answers, else the zero-byte round trip."""
        if self._rtt_method == "icmp":
            rtt_ms = self._ping_ms()
            if rtt_ms is not None:
                self._add(UplinkSample(time.time(), "icmp", None, rtt_ms))
                return
        self._add(UplinkSample(time.time(), "http", None, base_ms))

    def _zero_probe_ms(self) -> float | None:
        # A zero-byte probe rather than /healthz: the client sends health checks
        # as control traffic, around the emulated link, while probes wait for it
        # like offloads do.
        try:
            return float(self.client.probe(0, timeout_s=self.timeout_s).round_trip_ms)
        except Exception as err:  # an unreachable cloud is a normal state for the monitor
            _log.debug("zero-byte probe failed: %s", err)
            self._warm = False
            return None

    def _base_estimate_ms(self) -> float:
        with self._lock:
            bases = list(self._base_ms)
        return float(statistics.median(bases)) if bases else self.estimate().rtt_ms

    def _ping_ms(self) -> float | None:
        import ping3  # only the monitor needs it

        try:
            result = ping3.ping(self.host, timeout=min(self.timeout_s, _MAX_PING_TIMEOUT_S), unit="ms")
        except (PermissionError, OSError) as err:
            self._rtt_method = "http"
            self.rtt_note = f"ICMP not permitted here ({err}); using the HTTP round trip of a zero-byte probe"
            _log.info("uplink monitor: %s", self.rtt_note)
            return None
        if result is False:  # ping3: an error such as an unknown host
            self._rtt_method = "http"
            self.rtt_note = "ICMP echo failed; using the HTTP round trip of a zero-byte probe"
            return None
        if result is None:  # timeout: maybe filtered, maybe the host is down
            return None
        return float(result)

    # -- the estimate -------------------------------------------------------------

    def estimate(self) -> UplinkEstimate:
        """Median of the windows (the initial link for a signal without samples)."""
        with self._lock:
            rates = [s.uplink_mbps for s in self._rate_samples]
            rtts = [s.rtt_ms for s in self._rtt_samples]
            source = self._rate_samples[-1].source if self._rate_samples else "configured"
        return UplinkEstimate(
            uplink_mbps=float(statistics.median(rates)) if rates else self.initial_link.uplink_mbps,
            rtt_ms=float(statistics.median(rtts)) if rtts else self.initial_link.rtt_ms,
            source=source,
            rtt_source=self._rtt_method if rtts else "configured",
            n_samples=len(rates),
            n_rtt_samples=len(rtts),
        )

    def link(self) -> Link:
        """The current estimate as a Link."""
        return self.estimate().link()

    @property
    def planned_link(self) -> Link:
        """The estimate the plans were last built with."""
        return self._planned

    @property
    def n_replans(self) -> int:
        """How many times ``on_change`` was called."""
        return self._n_replans

    def history(self, n_samples: int = _N_HISTORY_KEPT) -> list[UplinkSample]:
        """The newest ``n_samples`` samples, oldest first."""
        with self._lock:
            samples = list(self._history)
        return samples[-n_samples:] if n_samples > 0 else []

    def status(self) -> dict[str, Any]:
        """JSON-ready state: the estimate, its sources and the recent history."""
        estimate = self.estimate()
        return {
            "uplink_mbps": estimate.uplink_mbps,
            "rtt_ms": estimate.rtt_ms,
            "source": estimate.source,
            "rtt_source": estimate.rtt_source,
            "rtt_method": self._rtt_method,
            "rtt_note": self.rtt_note,
            "n_samples": estimate.n_samples,
            "n_rtt_samples": estimate.n_rtt_samples,
            "planned": {"uplink_mbps": self._planned.uplink_mbps, "rtt_ms": self._planned.rtt_ms},
            "n_replans": self._n_replans,
            "monitor_running": self.running,
            "history": [sample.to_dict() for sample in self.history()],
        }

    # -- private ------------------------------------------------------------------

    def _add(self, sample: UplinkSample) -> None:
        with self._lock:
            if sample.uplink_mbps is None:
                self._rtt_samples.append(sample)
            else:
                self._rate_samples.append(sample)
            self._history.append(sample)
            self._append_csv(sample)
        self._maybe_replan()

    def _append_csv(self, sample: UplinkSample) -> None:
        if self.history_path is None:
            return
        try:
            is_new = not self.history_path.is_file()
            self.history_path.parent.mkdir(parents=True, exist_ok=True)
            with self.history_path.open("a", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle)
                if is_new:
                    writer.writerow(_HISTORY_COLUMNS)
                writer.writerow([
                    f"{sample.time_s:.3f}",
                    sample.source,
                    "" if sample.uplink_mbps is None else f"{sample.uplink_mbps:.6g}",
                    "" if sample.rtt_ms is None else f"{sample.rtt_ms:.6g}",
                ])
        except OSError as err:  # a full disk must not stop the estimate
            _log.warning("cannot append to %s: %s", self.history_path, err)

    def _changed(self, link: Link) -> bool:
        planned = self._planned
        band = self.hysteresis_fraction
        if abs(link.uplink_mbps - planned.uplink_mbps) > band * planned.uplink_mbps:
            return True
        return abs(link.rtt_ms - planned.rtt_ms) > max(band * planned.rtt_ms, _RTT_SLACK_MS)

    def _maybe_replan(self) -> None:
        link = self.link()
        if not self._changed(link):
            return
        # One re-plan at a time; a sample that arrives meanwhile is judged
        # against the new plan by the next sample.
        if not self._replan_lock.acquire(blocking=False):
            return
        try:
            if not self._changed(link):
                return
            self._planned = link
            self._n_replans += 1
            if self.on_change is not None:
                try:
                    self.on_change(link)
                except Exception:  # a failed re-plan keeps the old plan; the next change retries
                    _log.exception("re-plan for %s failed", link)
        finally:
            self._replan_lock.release()
