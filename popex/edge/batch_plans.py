"""The batch-aware plan on the live edge: which of a strategy's branches a batch of n runs (config ``batch_plan``).

:mod:`popex.edge.batch_run` asks :meth:`BatchExitPlanner.strategy_for` for
the strategy a batch of n runs with. The answer is a dict read: the plan for
(model, head set, cut, thresholds) made from the model's current profile and
link (:func:`popex.decision.batch_plan.plan_batch_exits`). A strategy not
planned yet runs as it is while its plan is made on this planner's own
worker thread (:class:`~popex.edge.worker.JobWorker`), as is the model's
inference time matrix (:func:`popex.runtime.batch_profile.time_batches`,
measured once per model): the request path never profiles or plans. A plan
made for an older profile or link is used until its successor is ready.

The status view shows each plan with its predicted per-sample latency for
the chosen exits, every exit and none, and the expected per-query latency at
the arrival rate the micro-batcher observes (:class:`~popex.runtime.batcher.ArrivalRate`).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from popex.decision.batch_arrivals import arrival_model
from popex.decision.batch_plan import BatchCosts, BatchExitPlan, plan_batch_exits
from popex.decision.latency import Link, Profile
from popex.edge.strategy import Strategy
from popex.edge.worker import JobWorker
from popex.errors import PopexError
from popex.runtime.batch_profile import BatchTimings, batch_sizes_up_to, time_batches

__all__ = ["BatchExitPlanner"]

_log = logging.getLogger(__name__)

#: Timed runs per (stage, batch size) when a model's inference time matrix is measured.
_N_REPEATS = 10
#: Most plans kept (a client sweeping deadlines cannot grow it without limit).
_MAX_PLANS = 256


@dataclass
class _Entry:
    """One strategy's plan, the profile and link it was made for, and its strategy per batch size."""

    plan: BatchExitPlan
    profile: Profile
    link: Link
    model_id: str
    head: str | None
    strategies: dict[int, Strategy] = field(default_factory=dict)


class BatchExitPlanner:
    """Per-strategy batch-aware exits for the edge's batched path, planned off the request threads.

    Parameters
    ----------
    max_batch_size : int
        Largest batch planned for (the micro-batcher's, or an uploaded batch's limit).
    batcher_max_batch_size : int
        The micro-batcher's ``max_batch_size`` (its batches' sizes in the arrival model).
    batch_max_wait_ms : float
        The micro-batcher's window, ms.
    arrival_rate_per_s : callable() -> float
        The observed arrival rate (the micro-batcher's :class:`~popex.runtime.batcher.ArrivalRate`).
    """

    def __init__(self, *, max_batch_size: int, batcher_max_batch_size: int, batch_max_wait_ms: float,
                 arrival_rate_per_s: Callable[[], float]) -> None:
        self.max_batch_size = int(max_batch_size)
        self.batcher_max_batch_size = int(batcher_max_batch_size)
        self.batch_max_wait_ms = float(batch_max_wait_ms)
        self.arrival_rate_per_s = arrival_rate_per_s
        self._timings: dict[str, BatchTimings] = {}
        self._entries: dict[Hashable, _Entry] = {}
        self._pending: set[Hashable] = set()
        self._lock = threading.Lock()
        self._worker = JobWorker("popex-batch-plan")
        self._last: Future[Any] | None = None

    def set_timings(self, model_id: str, timings: BatchTimings) -> None:
        """Use these batch timings for a model instead of measuring them (a stored profile's, or a test's).

        Parameters
        ----------
        model_id : str
        timings : BatchTimings
            Stages and branches of that model.
        """
        with self._lock:
            self._timings[model_id] = timings

    def strategy_for(self, model: Any, plan: Any, strategy: Strategy, head: str | None, n_samples: int) -> Strategy:
        """The strategy a batch of ``n_samples`` runs with: ``strategy`` with the branches its plan skips off.

        Parameters
        ----------
        model : StoredModel
        plan : ModelPlan
            Its current profile and link are what the plan must have been made for.
        strategy : Strategy
            The batch's strategy (its key's).
        head : str or None
        n_samples : int

        Returns
        -------
        Strategy
            ``strategy`` itself when nothing is planned yet (the plan is then made in the background) or
            when the plan runs every active branch.
        """
        if not strategy.active_branches:
            return strategy
        key = (model.model_id, head, strategy.split, strategy.thresholds)
        entry = self._entries.get(key)
        profile, link = plan.profile, plan.link
        if entry is None or entry.profile is not profile or entry.link != link:
            self._request(key, model, plan, strategy, head)
        if entry is None:
            return strategy
        n = min(max(1, n_samples), len(entry.plan.sizes))
        chosen = entry.strategies.get(n)
        if chosen is None:
            exits = entry.plan.for_size(n).exits
            chosen = strategy if exits == strategy.active_branches else dataclasses.replace(
                strategy, thresholds=entry.plan.thresholds_for(n), active_branches=exits)
            entry.strategies[n] = chosen  # one key's write: atomic, and the same value from any thread
        return chosen

    def wait_idle(self, timeout_s: float = 60.0) -> bool:
        """Wait for the planning submitted so far (tests, benchmarks).

        Parameters
        ----------
        timeout_s : float

        Returns
        -------
        bool
            False on timeout.
        """
        deadline_s = time.monotonic() + timeout_s
        while True:
            with self._lock:
                last, pending = self._last, bool(self._pending)
            if last is None or (last.done() and not pending):
                return True
            remaining_s = deadline_s - time.monotonic()
            if remaining_s <= 0:
                return False
            try:
                last.result(timeout=remaining_s)
            except Exception:  # noqa: BLE001 - a failed plan is logged by the job; waiting is done
                pass

    def status(self) -> dict[str, Any]:
        """The plans made so far, with predictions at the observed arrival rate (``GET /api/v1/status``).

        Returns
        -------
        dict
        """
        rate_per_s = float(self.arrival_rate_per_s())
        arrival = arrival_model(rate_per_s, max_batch_size=self.batcher_max_batch_size,
                                batch_max_wait_ms=self.batch_max_wait_ms)
        plans = []
        for entry in list(self._entries.values()):
            if len(entry.plan.sizes) < arrival.p_batch.size - 1:
                continue
            plans.append({
                "model_id": entry.model_id, "head": entry.head, **entry.plan.to_dict(),
                "expected_per_query_ms": {which: entry.plan.expected_per_query_ms(arrival, exits=which)
                                          for which in ("chosen", "all", "none")},
            })
        return {"enabled": True, "arrival_rate_per_s": rate_per_s,
                "max_batch_size": self.batcher_max_batch_size, "batch_max_wait_ms": self.batch_max_wait_ms,
                "expected_batch_size": float(arrival.p_batch @ range(arrival.p_batch.size)), "plans": plans}

    def close(self) -> None:
        """Stop the planning thread (queued plans are dropped)."""
        self._worker.close()

    # -- private ------------------------------------------------------------------

    def _request(self, key: Hashable, model: Any, plan: Any, strategy: Strategy, head: str | None) -> None:
        with self._lock:
            if key in self._pending:
                return
            self._pending.add(key)
        try:
            future = self._worker.submit(lambda: self._make(key, model, plan, strategy, head))
        except RuntimeError:  # closed: the edge is stopping
            with self._lock:
                self._pending.discard(key)
            return
        with self._lock:
            self._last = future

    def _make(self, key: Hashable, model: Any, plan: Any, strategy: Strategy, head: str | None) -> None:
        try:
            with self._lock:
                timings = self._timings.get(model.model_id)
            if timings is None:
                timings = time_batches(model.loaded.net, batch_sizes=batch_sizes_up_to(self.max_batch_size),
                                       n_repeats=_N_REPEATS)
                with self._lock:
                    self._timings[model.model_id] = timings
            profile, link = plan.profile, plan.link
            calibration = model.calibration_of(head)
            costs = BatchCosts.build(profile, timings, link=link, split=strategy.split,
                                     max_n=min(self.max_batch_size, calibration.n_samples))
            made = plan_batch_exits(costs, calibration, strategy.thresholds)
            with self._lock:
                if len(self._entries) >= _MAX_PLANS and key not in self._entries:
                    self._entries.clear()
                self._entries[key] = _Entry(plan=made, profile=profile, link=link, model_id=model.model_id,
                                            head=head)
        except PopexError as err:  # the strategy keeps running as it is
            _log.warning("no batch plan for model %s at split %d: %s", model.model_id, strategy.split, err)
        finally:
            with self._lock:
                self._pending.discard(key)
