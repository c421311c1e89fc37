"""The uplink monitor (DESIGN.md §7): one estimate of the uplink from three signals.

The RTT (an ICMP echo, or a zero-byte probe where ICMP is refused or would
miss an emulated link), active probes (a timed upload, sized from the RTT
and the last estimate, measured against a zero-byte probe just before so that
the HTTP cost cancels out), and passive samples (every offload's bytes and
transfer time, the cloud's compute removed), measured by
:class:`~popex.edge.uplink_probe.UplinkProber`. The RTT is the median of a
sliding window; the rate is one fit over both kinds of transfer, each with
its own fixed cost (:mod:`popex.edge.uplink_fit`), so that probes and
offloads are reconciled rather than outvoted; when the estimate leaves a
hysteresis band around the estimate last planned with, ``on_change``
re-plans (:class:`~popex.edge.uplink_window.UplinkWindow`). Every sample is
appended to a CSV file for plots (:class:`~popex.edge.uplink_history.UplinkHistory`).

The lock guards the window only: the CSV is written and ``on_change`` is
called outside it, so a slow disk or a slow callback never holds up a
reader of the estimate (the planner reads it to measure the offload
overhead). One thread at a time does that work, in the order the samples
were added; a thread that adds a sample meanwhile leaves its row and its
change to that thread and returns at once.

The probing thread is started by :meth:`UplinkMonitor.start`, never by the
constructor.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from popex.checks import check_finite
from popex.decision.latency import Link
from popex.edge.cloud_port import CloudPort
from popex.edge.uplink_history import UplinkHistory
from popex.edge.uplink_probe import RTT_METHODS, UplinkProber, uplink_mbps_from_timing
from popex.edge.uplink_window import UplinkEstimate, UplinkSample, UplinkWindow

__all__ = [
    "RTT_METHODS",
    "UplinkSample",
    "UplinkEstimate",
    "UplinkMonitor",
    "uplink_mbps_from_timing",
]

_log = logging.getLogger(__name__)

# A probe with less time beyond the zero-byte round trip measured a round trip, not bytes.
_MIN_PROBE_SERIALISATION_MS = 0.05
# Rows waiting for a stalled disk, bounded so that memory cannot grow without end.
_N_UNWRITTEN_KEPT = 10_000


class UplinkMonitor:
    """Estimate the uplink from RTT, active probes and passive offload samples.

    Every parameter the edge's config supplies is required: the monitor
    stores what the factory gives it and has no defaults of its own to drift.

    Parameters
    ----------
    client : CloudPort
        Used for ``probe``; when ``client.link`` is a LinkEmulator every
        measurement goes through the emulated link.
    cloud_url : str
        The cloud's base URL; its host is pinged.
    initial_link : Link
        The estimate until samples arrive (configured or emulated link).
    probe_interval_s : float
        Seconds between two measurement rounds of the background thread.
    probe_n_bytes : int
        The most bytes one active probe uploads (each is sized from the RTT and the estimate).
    window_n : int
        Samples of each kind kept for the median.
    hysteresis_fraction : float
        Relative change of the rate or the RTT (vs. the estimate last planned
        with) that triggers ``on_change``; e.g. 0.2 for 20 %.
    history_path : str or path-like or None
        CSV file to append every sample to (created with a header); None: no file.
    rtt_method : {"auto", "icmp", "http"}
        How the RTT is measured (:data:`RTT_METHODS`).
    timeout_s : float
        Timeout of one ping or probe, s.
    on_change : callable(Link), optional
        Called with the new estimate when it leaves the hysteresis band,
        outside the monitor's lock (the edge queues a re-plan with it).

    Raises
    ------
    ConfigError
        On an out-of-range parameter.
    """

    def __init__(
        self,
        client: CloudPort,
        *,
        cloud_url: str,
        initial_link: Link,
        probe_interval_s: float,
        probe_n_bytes: int,
        window_n: int,
        hysteresis_fraction: float,
        history_path: str | Path | None,
        rtt_method: str,
        timeout_s: float,
        on_change: Callable[[Link], None] | None = None,
    ) -> None:
        self._window = UplinkWindow(initial_link=initial_link, window_n=window_n,
                                    hysteresis_fraction=hysteresis_fraction)
        self._prober = UplinkProber(client, cloud_url=cloud_url, probe_n_bytes=probe_n_bytes,
                                    rtt_method=rtt_method, timeout_s=timeout_s)
        self.probe_interval_s = check_finite(probe_interval_s, name="probe_interval_s", low=0.0, low_open=True,
                                             allow_text=False)
        self.client, self.cloud_url, self.initial_link = client, cloud_url, initial_link
        self.history_path = None if history_path is None else Path(history_path)
        self._history = None if history_path is None else UplinkHistory(history_path)
        self.on_change = on_change
        self._lock = threading.Lock()  # guards the window and what waits to be written or reported
        self._unwritten: deque[UplinkSample] = deque(maxlen=_N_UNWRITTEN_KEPT)
        self._pending_link: Link | None = None
        self._draining = False  # whether a thread is writing rows and reporting changes
        self._n_replans = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        """Start the background thread that measures every ``probe_interval_s`` (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="popex-uplink-monitor", daemon=True)
        self._thread.start()

    def stop(self, *, timeout_s: float = 5.0) -> None:
        """Stop the background thread (its current round finishes first).

        Parameters
        ----------
        timeout_s : float
            How long to wait for it, s.
        """
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout_s)
        self._thread = None

    @property
    def running(self) -> bool:
        """Whether the background thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    # -- measuring ----------------------------------------------------------------

    @property
    def rtt_source(self) -> str:
        """How the RTT is measured now: "icmp" or "http"."""
        return self._prober.rtt_method

    @property
    def rtt_note(self) -> str:
        """Why the RTT is measured the way it is (for the edge's status)."""
        return self._prober.rtt_note

    def measure_once(self) -> UplinkEstimate:
        """One round: a zero-byte probe, the RTT, then an active probe.

        The active probe's round trip is compared with the zero-byte one (RTT
        plus the HTTP cost of one request), so the HTTP cost cancels out. After
        a start or a failed round, an unrecorded zero-byte probe comes first:
        connection setup and a booting cloud would otherwise pass for RTT.

        Returns
        -------
        UplinkEstimate
            The estimate after the round (unchanged when the cloud did not answer).
        """
        if not self._prober.warm_up():
            return self.estimate()
        base_ms = self._prober.zero_probe_ms()
        if base_ms is None:
            return self.estimate()
        with self._lock:
            self._window.add_base_ms(base_ms)
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
        if self._prober.rtt_method == "icmp":
            rtt_ms = self._prober.ping_ms()
            if rtt_ms is not None:
                self._add(UplinkSample(time.time(), "icmp", None, rtt_ms))
                return rtt_ms
        base_ms = self._prober.zero_probe_ms()
        if base_ms is None:
            return None
        self._add(UplinkSample(time.time(), "http", None, base_ms))
        return base_ms

    def probe(self, *, base_ms: float | None = None) -> float | None:
        """Upload a probe sized from the RTT and the last estimate to the cloud once and add the sample.

        The size (:meth:`UplinkWindow.probe_n_bytes
        <popex.edge.uplink_window.UplinkWindow.probe_n_bytes>`, at most
        ``probe_n_bytes``) keeps the bytes' time well above the RTT jitter,
        where a fixed size would be lost in it on a fast, long link (16 KB at
        73 Mbit/s and 180 ms gave 0.9 to 608 Mbit/s), and well below the link's
        time on a slow one.

        Parameters
        ----------
        base_ms : float, optional
            Round trip of a zero-byte probe just before, ms; default: the
            median of recent ones (or the RTT estimate without any).

        Returns
        -------
        float or None
            This probe's Mbit/s, or None if the probe failed or carried no information.
        """
        base_ms = self._base_ms() if base_ms is None else base_ms
        with self._lock:
            n_bytes = self._window.probe_n_bytes(probe_interval_s=self.probe_interval_s,
                                                 max_n_bytes=self._prober.probe_n_bytes)
        result = self._prober.upload(n_bytes)
        if result is None:
            return None
        round_trip_ms = float(result.round_trip_ms)
        if round_trip_ms - base_ms < _MIN_PROBE_SERIALISATION_MS:
            return None
        uplink_mbps = uplink_mbps_from_timing(int(result.n_bytes), round_trip_ms, base_ms)
        self._add(UplinkSample(time.time(), "probe", uplink_mbps, base_ms, n_bytes=int(result.n_bytes),
                               excess_ms=round_trip_ms - base_ms))
        return uplink_mbps

    def add_passive_sample(self, n_bytes: int, transfer_ms: float) -> float | None:
        """Add a sample from a real offload.

        The round trip of a zero-byte request (median of the recent probes, or
        the RTT estimate before any) is taken off ``transfer_ms``; of the rest,
        the offloads' fixed cost (what the rate fit finds beyond the bytes'
        time, :mod:`popex.edge.uplink_fit`) is the part that is not the link.
        Every finite sample enters the fit (a small one pins that fixed cost),
        but only one whose bytes' time is beyond the RTT jitter carries the rate.

        Parameters
        ----------
        n_bytes : int
            Payload bytes uploaded.
        transfer_ms : float
            Round trip minus the cloud's compute time, ms.

        Returns
        -------
        float or None
            This sample's rate in Mbit/s, or None if it carried no rate (within
            the jitter, or not a finite time).
        """
        if not math.isfinite(transfer_ms) or n_bytes <= 0:
            return None
        base_ms = self._base_ms()
        sample = UplinkSample(time.time(), "passive", None, base_ms, n_bytes=int(n_bytes),
                              excess_ms=float(transfer_ms) - base_ms)
        with self._lock:
            serialisation_ms = self._window.serialisation_ms(sample)
        uplink_mbps = None if serialisation_ms is None else 8.0 * n_bytes / (1000.0 * serialisation_ms)
        self._add(dataclasses.replace(sample, uplink_mbps=uplink_mbps))
        return uplink_mbps

    # -- the estimate -------------------------------------------------------------

    def estimate(self) -> UplinkEstimate:
        """The current estimate: medians of the windows (the initial link for a signal without samples).

        Returns
        -------
        UplinkEstimate
        """
        with self._lock:
            return self._window.estimate(rtt_method=self._prober.rtt_method)

    def link(self) -> Link:
        """The current estimate as the link to plan with.

        Returns
        -------
        Link
        """
        return self.estimate().link()

    @property
    def planned_link(self) -> Link:
        """The estimate the plans were last built with."""
        with self._lock:
            return self._window.planned_link

    @property
    def n_replans(self) -> int:
        """How many times a change was reported to ``on_change``."""
        return self._n_replans

    def history(self, n_samples: int | None = None) -> list[UplinkSample]:
        """The newest samples, oldest first.

        Parameters
        ----------
        n_samples : int, optional
            How many; default all that are kept in memory.

        Returns
        -------
        list of UplinkSample
        """
        with self._lock:
            return self._window.history(n_samples)

    def status(self) -> dict[str, Any]:
        """JSON-ready state, for the edge's status route.

        Returns
        -------
        dict
            The estimate, its sources, the planned link and the recent history.
        """
        estimate = self.estimate()
        planned = self.planned_link
        return {
            "uplink_mbps": estimate.uplink_mbps,
            "rtt_ms": estimate.rtt_ms,
            "source": estimate.source,
            "rtt_source": estimate.rtt_source,
            "rtt_method": self._prober.rtt_method,
            "rtt_note": self._prober.rtt_note,
            "n_samples": estimate.n_samples,
            "n_rtt_samples": estimate.n_rtt_samples,
            "jitter_ms": estimate.jitter_ms,
            "fixed_ms": estimate.fixed_ms,
            "planned": {"uplink_mbps": planned.uplink_mbps, "rtt_ms": planned.rtt_ms},
            "n_replans": self._n_replans,
            "monitor_running": self.running,
            "history": [sample.to_dict() for sample in self.history()],
        }

    # -- private ------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.measure_once()
            except Exception:  # the monitor must outlive any one failed round
                _log.exception("uplink measurement failed")
            self._stop.wait(self.probe_interval_s)

    def _add_rtt(self, base_ms: float) -> None:
        """The round's RTT sample: ICMP where it answers, else the zero-byte round trip."""
        if self._prober.rtt_method == "icmp":
            rtt_ms = self._prober.ping_ms()
            if rtt_ms is not None:
                self._add(UplinkSample(time.time(), "icmp", None, rtt_ms))
                return
        self._add(UplinkSample(time.time(), "http", None, base_ms))

    def _base_ms(self) -> float:
        with self._lock:
            return self._window.base_ms()

    def _add(self, sample: UplinkSample) -> None:
        with self._lock:
            changed = self._window.add(sample)
            if self._history is not None:
                self._unwritten.append(sample)
            if changed is not None:
                self._pending_link = changed  # a newer change replaces one not yet reported
            if self._draining:
                return  # the draining thread writes this row and reports this change
            self._draining = True
        self._drain()

    def _drain(self) -> None:
        """Write the waiting rows, then report the waiting change, until nothing waits; outside the lock."""
        try:
            while True:
                with self._lock:
                    samples = list(self._unwritten)
                    self._unwritten.clear()
                    link, self._pending_link = self._pending_link, None
                    if not samples and link is None:
                        self._draining = False
                        return
                    if link is not None:
                        self._n_replans += 1
                if samples and self._history is not None:
                    self._history.write(samples)
                if link is not None and self.on_change is not None:
                    try:
                        self.on_change(link)
                    except Exception:  # a failed re-plan keeps the old plan; the next change retries
                        _log.exception("re-plan for %s failed", link)
        except BaseException:
            with self._lock:
                self._draining = False
            raise
