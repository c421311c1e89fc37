"""The background planner: measurements in, re-planned strategy tables out, off the request path.

A request only reads the current plan (one reference read) and drops what it
measured into a queue: the per-offload overhead O, the wire compression
ratio, the fixed edge time, a passive uplink sample. One daemon thread,
started by :meth:`BackgroundPlanner.start` (never by the constructor),
drains the queue in order: it feeds the uplink monitor, updates the sliding
medians and, when a median leaves the hysteresis band, rebuilds every
model's tables, which :class:`~popex.edge.plans.PlanBook` swaps in
atomically. Uplink changes from the monitor's ``on_change`` callback arrive
through the same queue, so re-planning never runs on a request thread.

Without the thread (tests, ``start_background: false``) the queue is run by
whoever calls :meth:`BackgroundPlanner.drain`.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from popex.checks import check_finite
from popex.decision.latency import Link
from popex.edge.overhead import OverheadTracker
from popex.edge.prediction_error import PredictionErrors
from popex.errors import PopexError

__all__ = ["BackgroundPlanner"]

_log = logging.getLogger(__name__)

# O changes by less than this are noise (a scheduler tick), not a reason to re-plan.
_OVERHEAD_SLACK_MS = 0.5
_WIRE_RATIO_SLACK = 0.05  # re-plan when the median compression ratio moves more than this
_MAX_HYSTERESIS_FRACTION = 10.0
_JOIN_TIMEOUT_S = 5.0

Job = Callable[[], Any]


class BackgroundPlanner:
    """Turns measurements into re-plans, in one background thread.

    Parameters
    ----------
    plans : PlanBook
        The plans it rebuilds (``update_profile``, ``set_link``).
    monitor : UplinkMonitor or None
        Receives the passive samples of offloads and gives the link
        estimate that O is measured against; None: the plans' link.
    initial_offload_overhead_ms : float
        O until measured, ms.
    replan_hysteresis_fraction : float
        Relative change of a median (vs. the value last planned with) that re-plans.

    Raises
    ------
    ConfigError
        On a negative or non-finite value.
    """

    def __init__(self, *, plans: Any, monitor: Any | None, initial_offload_overhead_ms: float,
                 replan_hysteresis_fraction: float) -> None:
        self.plans = plans
        self.monitor = monitor
        self.replan_hysteresis_fraction = check_finite(replan_hysteresis_fraction,
                                                       name="replan_hysteresis_fraction", low=0.0,
                                                       high=_MAX_HYSTERESIS_FRACTION)
        #: Median per-offload overhead O, ms.
        self.overhead = OverheadTracker(initial_ms=initial_offload_overhead_ms)
        #: Median bytes sent / payload bytes of recent offloads (1 until the first).
        self.wire_ratio = OverheadTracker(initial_ms=1.0)
        #: Median time from a request's arrival to its preprocessed input (the
        #: profile's edge_fixed_ms): reading, decoding, the distortion
        #: classifier (distortion-aware requests), preprocessing.
        self.edge_fixed = OverheadTracker(initial_ms=0.0)
        #: The same per model (decoding and the distortion classifier differ by model), planned per model.
        self.edge_fixed_by_model: dict[str, OverheadTracker] = {}
        self._planned_by_model: dict[str, float] = {}
        #: Predicted vs measured latency of each model's recent requests (the status shows them).
        self.prediction_errors = PredictionErrors()
        self._planned = {"offload_overhead_ms": self.overhead.current_ms, "edge_fixed_ms": 0.0, "wire_ratio": 1.0}
        self._queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._run_lock = threading.Lock()  # one job at a time, whichever thread runs it
        self._state_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        #: Called on the planner's thread after each re-plan with its reason (the app's log and metrics).
        self.replan_listeners: list[Callable[[str], None]] = []
        #: Called on the planner's thread per request offload with (bytes on the wire, payload bytes).
        self.offload_listeners: list[Callable[[int, int], None]] = []

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        """Start the planner thread (a daemon); a second call does nothing.

        Raises
        ------
        RuntimeError
            If the planner was closed.
        """
        with self._state_lock:
            if self._closed:
                raise RuntimeError("the planner is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="popex-planner", daemon=True)
                self._thread.start()

    @property
    def running(self) -> bool:
        """Whether the planner thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def close(self) -> None:
        """Stop taking measurements and stop the thread after the job it runs (queued ones are dropped)."""
        with self._state_lock:
            self._closed = True
            thread = self._thread
        self._queue.put(None)
        if thread is not None and thread is not threading.current_thread():
            thread.join(_JOIN_TIMEOUT_S)

    def drain(self, timeout_s: float = 60.0) -> bool:
        """Run everything queued so far: wait for the thread, or run it here when there is no thread.

        Parameters
        ----------
        timeout_s : float
            Longest wait for the thread, s.

        Returns
        -------
        bool
            False if the thread did not get there within ``timeout_s`` (or the planner is closed).
        """
        if self.running:
            done = threading.Event()
            self._queue.put(done.set)
            return done.wait(timeout_s)
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return not self._closed
            if job is not None and not self._closed:
                self._execute(job)

    # -- what requests and the monitor send ----------------------------------------

    def submit(self, job: Job) -> None:
        """Queue ``job`` to run on the planner thread, after what is queued already (dropped once closed).

        Parameters
        ----------
        job : callable
            Called without arguments; an exception is logged, not raised.
        """
        if not self._closed:
            self._queue.put(job)

    def submit_offload(self, n_bytes: int, *, encode_ms: float, round_trip_ms: float, cloud_ms: float,
                       payload_n_bytes: int | None = None) -> None:
        """Queue one successful offload: a passive uplink sample, an O measurement and, given
        the uncompressed ``payload_n_bytes``, a wire-ratio measurement.

        Parameters
        ----------
        n_bytes : int
            What went on the wire.
        encode_ms, round_trip_ms, cloud_ms : float
            Encoding time, the cloud call's round trip and the cloud's compute in it, ms.
        payload_n_bytes : int, optional
            Left out for synthetic tensors (the start-up O measurement sends
            zeros): their compression ratio says nothing about real activations.
        """
        self.submit(lambda: self._offloaded(n_bytes, encode_ms=encode_ms, round_trip_ms=round_trip_ms,
                                            cloud_ms=cloud_ms, payload_n_bytes=payload_n_bytes))

    def submit_edge_fixed(self, fixed_ms: float, *, model_id: str | None = None) -> None:
        """Queue one measurement of a request's fixed edge time (arrival to preprocessed input), ms.

        With ``model_id`` it is that model's fixed time, and re-plans that model
        alone (the global median stays the first guess for a new model).

        Parameters
        ----------
        fixed_ms : float
        model_id : str, optional
        """
        if model_id is None:
            self.submit(lambda: self._track(self.edge_fixed, "edge_fixed_ms", fixed_ms))
        else:
            self.submit(lambda: self._track_model_fixed(model_id, fixed_ms))

    def submit_answer(self, model_id: str, *, predicted_ms: float, measured_ms: float) -> None:
        """Queue one answered request's predicted and measured latency (for the status).

        Parameters
        ----------
        model_id : str
        predicted_ms, measured_ms : float
        """
        self.submit(lambda: self.prediction_errors.add(model_id, predicted_ms=predicted_ms, measured_ms=measured_ms))

    def edge_fixed_ms(self, model_id: str) -> float:
        """The fixed edge time of ``model_id``: its own median, else the median over all models, ms.

        Parameters
        ----------
        model_id : str

        Returns
        -------
        float
        """
        tracker = self.edge_fixed_by_model.get(model_id)
        return self.edge_fixed.current_ms if tracker is None else tracker.current_ms

    def submit_link(self, link: Link) -> None:
        """Queue a re-plan of every model for a new uplink estimate (the monitor's ``on_change``).

        Parameters
        ----------
        link : Link
        """
        def replan() -> None:
            self.plans.set_link(link)
            self._replanned(f"uplink estimate {link.uplink_mbps:.3g} Mbit/s, RTT {link.rtt_ms:.3g} ms")

        self.submit(replan)

    # -- measurement ----------------------------------------------------------------

    def link_part_ms(self, n_bytes: int) -> float:
        """The link's share of an offload's round trip as the plan models it, ms.

        ``8·n_bytes/(1000·B) + R`` from the current uplink estimate. Always
        the estimate, even when the client emulates the link: with an HTTP
        RTT, R already holds one request's HTTP cost, and O must be what the
        plan does not yet count, or that cost (and, on a kernel-shaped link,
        the transfer) would be counted twice.

        Parameters
        ----------
        n_bytes : int
            Bytes on the wire.

        Returns
        -------
        float
        """
        link: Link = self.monitor.link() if self.monitor is not None else self.plans.link
        return link.transfer_ms(n_bytes) + link.rtt_ms

    def overhead_ms(self, n_bytes: int, *, encode_ms: float, round_trip_ms: float, cloud_ms: float) -> float:
        """One measurement of O: ``encode_ms + (round_trip_ms − cloud_ms − link part)``.

        Parameters
        ----------
        n_bytes : int
        encode_ms, round_trip_ms, cloud_ms : float

        Returns
        -------
        float
            ms; see :meth:`link_part_ms`.
        """
        return encode_ms + (round_trip_ms - cloud_ms - self.link_part_ms(n_bytes))

    # -- private --------------------------------------------------------------------

    def _loop(self) -> None:
        while (job := self._queue.get()) is not None and not self._closed:
            self._execute(job)

    def _execute(self, job: Job) -> None:
        with self._run_lock:
            try:
                job()
            except Exception:  # a failed re-plan keeps the old plan; the next measurement retries
                _log.exception("planner job failed")

    def _replanned(self, reason: str) -> None:
        _log.info("re-planned: %s", reason)
        for listener in self.replan_listeners:
            listener(reason)

    def _offloaded(self, n_bytes: int, *, encode_ms: float, round_trip_ms: float, cloud_ms: float,
                   payload_n_bytes: int | None) -> None:
        if self.monitor is not None:
            self.monitor.add_passive_sample(n_bytes, round_trip_ms - cloud_ms)
        self._track(self.overhead, "offload_overhead_ms",
                    self.overhead_ms(n_bytes, encode_ms=encode_ms, round_trip_ms=round_trip_ms, cloud_ms=cloud_ms))
        if payload_n_bytes:
            self._track(self.wire_ratio, "wire_ratio", n_bytes / payload_n_bytes, slack=_WIRE_RATIO_SLACK)
            for listener in self.offload_listeners:
                listener(n_bytes, payload_n_bytes)

    def _track_model_fixed(self, model_id: str, fixed_ms: float) -> None:
        self.edge_fixed.add(fixed_ms)
        tracker = self.edge_fixed_by_model.setdefault(model_id, OverheadTracker(initial_ms=0.0))
        tracker.add(fixed_ms)
        current = tracker.current_ms
        planned = self._planned_by_model.get(model_id, 0.0)
        if model_id not in self.plans or \
                abs(current - planned) <= max(self.replan_hysteresis_fraction * planned, _OVERHEAD_SLACK_MS):
            return
        self._planned_by_model[model_id] = current
        try:
            self.plans.get(model_id).update_profile(edge_fixed_ms=current)
        except PopexError:
            _log.exception("re-plan of %s with edge_fixed_ms = %.3f failed", model_id, current)
        else:
            self._replanned(f"{model_id[:12]} edge_fixed_ms {planned:.3g} -> {current:.3g}")

    def _track(self, tracker: OverheadTracker, field: str, value: float, *, slack: float = _OVERHEAD_SLACK_MS) -> None:
        tracker.add(value)
        current = tracker.current_ms
        planned = self._planned[field]
        if abs(current - planned) > max(self.replan_hysteresis_fraction * planned, slack):
            self._planned[field] = current
            try:
                self.plans.update_profile(**{field: current})
            except PopexError:
                _log.exception("re-plan with %s = %.3f failed", field, current)
            else:
                self._replanned(f"{field} {planned:.3g} -> {current:.3g}")
