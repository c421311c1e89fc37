"""The micro-batcher every tier uses: requests for the same work that arrive close together run as one batch.

A request names a *key* (on every tier: model id, cut, head set; on the
edge also the thresholds) and its remaining budget. Requests with equal keys
that arrive within ``batch_max_wait_ms`` of the first run as one batch of at
most ``max_batch_size``. The window never runs past the smallest remaining
budget in the batch minus the predicted time of the batch itself, so no
request waits so long that its batch cannot finish in time (DESIGN §3,
"Batching"). ``max_batch_size = 1`` runs every request at once on its own
thread: the behaviour without a batcher.

Two layers:

- :class:`BatchQueue`, the decision, free of threads and clocks: requests go
  in with the time they arrived, :meth:`BatchQueue.take_due` hands out the
  batches due at a given time. Tests drive it with a fake clock.
- :class:`MicroBatcher`, the threaded driver over it. It starts no thread: the
  first request of a batch leads it, waits for the window on its own thread,
  runs the whole batch and hands each member its answer (leader/follower),
  so a tier's request threads are the batcher's threads.

The predicted batch time comes from :class:`BatchTimes`: the last measured
time of each batch size, linear in the size between and beyond what was
measured (DESIGN §3: t(b) per batch size b). :class:`ArrivalRate` counts the
requests submitted, the observed arrival rate the batch-aware plan
(:mod:`popex.decision.batch_plan`) predicts waits from.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from popex.checks import check_finite, check_int

__all__ = ["MAX_BATCH_SIZE", "MAX_BATCH_WAIT_MS", "Pending", "Batch", "BatchTimes", "ArrivalRate", "BatchQueue",
           "MicroBatcher"]

#: Largest ``max_batch_size`` any tier accepts.
MAX_BATCH_SIZE = 1024
#: Longest ``batch_max_wait_ms`` any tier accepts.
MAX_BATCH_WAIT_MS = 10_000.0

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class Pending(Generic[T]):
    """One request waiting in the batcher: what it carries and when it must be done (seconds of the clock)."""

    item: T
    arrival_s: float
    deadline_s: float
    result: Any = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


@dataclass
class Batch(Generic[T]):
    """Requests of one key, in arrival order; ``closed`` once it left the queue."""

    key: Hashable
    members: list[Pending[T]]
    closed: bool = False

    @property
    def items(self) -> list[T]:
        """What each member carries, in arrival order."""
        return [member.item for member in self.members]


class BatchTimes:
    """Measured time of a batch per batch size, ms; the batcher's prediction of a batch's run time.

    Examples
    --------
    >>> times = BatchTimes()
    >>> times.predict_ms(4)
    0.0
    >>> times.record(2, 10.0)
    >>> times.predict_ms(4), times.predict_ms(1)
    (20.0, 5.0)
    """

    def __init__(self) -> None:
        self._ms: dict[int, float] = {}
        self._lock = threading.Lock()

    def record(self, n_items: int, elapsed_ms: float) -> None:
        """Keep the time a batch of ``n_items`` took (the latest wins: the machine's load changes)."""
        if n_items >= 1 and math.isfinite(elapsed_ms) and elapsed_ms >= 0:
            with self._lock:
                self._ms[int(n_items)] = float(elapsed_ms)

    def predict_ms(self, n_items: int) -> float:
        """Predicted time of a batch of ``n_items``: measured, else scaled from the nearest size measured."""
        with self._lock:
            if not self._ms:
                return 0.0
            if n_items in self._ms:
                return self._ms[n_items]
            nearest = min(self._ms, key=lambda size: (abs(size - n_items), size))
            return self._ms[nearest] * n_items / nearest


class ArrivalRate:
    """Requests per second over the last ``window_s`` of a clock (the observed arrival rate).

    Examples
    --------
    >>> rate = ArrivalRate(window_s=1.0)
    >>> for t in (0.0, 0.1, 0.2, 0.3):
    ...     rate.record(t)
    >>> rate.rate_per_s(1.0), rate.rate_per_s(5.0)
    (4.0, 0.0)
    """

    def __init__(self, *, window_s: float = 2.0) -> None:
        self.window_s = check_finite(window_s, name="window_s", low=0.0, high=3600.0, low_open=True)
        self._times_s: deque[float] = deque(maxlen=4096)
        self._lock = threading.Lock()

    def record(self, now_s: float) -> None:
        """One request arrived at ``now_s`` (seconds of the clock)."""
        with self._lock:
            self._times_s.append(float(now_s))

    def rate_per_s(self, now_s: float) -> float:
        """Arrivals in the window ending at ``now_s``, per second (0 when none)."""
        with self._lock:
            while self._times_s and self._times_s[0] < now_s - self.window_s:
                self._times_s.popleft()
            return len(self._times_s) / self.window_s


class BatchQueue(Generic[T]):
    """Which requests run together and when: the batcher's decision, on an explicit clock.

    Parameters
    ----------
    max_batch_size : int
        Most requests in one batch, 1..:data:`MAX_BATCH_SIZE`; 1 = no batching.
    batch_max_wait_ms : float
        Longest a batch stays open after its first request arrived, ms.
    predict_batch_ms : callable(int) -> float
        Predicted run time of a batch of that many requests, ms.

    Raises
    ------
    ConfigError
        If a size or wait is out of range.

    Examples
    --------
    >>> queue = BatchQueue(max_batch_size=2, batch_max_wait_ms=5.0, predict_batch_ms=lambda n: 1.0)
    >>> _ = queue.add("m", "a", budget_ms=100.0, now_s=0.0)
    >>> queue.take_due(0.001), queue.due_s()
    ([], 0.005)
    >>> [batch.items for batch in queue.take_due(0.005)]
    [['a']]
    >>> _ = queue.add("m", "c", budget_ms=100.0, now_s=0.010)
    >>> _ = queue.add("m", "d", budget_ms=100.0, now_s=0.011)
    >>> [batch.items for batch in queue.take_due(0.011)]
    [['c', 'd']]
    """

    def __init__(self, *, max_batch_size: int, batch_max_wait_ms: float,
                 predict_batch_ms: Callable[[int], float]) -> None:
        self.max_batch_size = check_int(max_batch_size, name="max_batch_size", low=1, high=MAX_BATCH_SIZE)
        self.batch_max_wait_ms = check_finite(batch_max_wait_ms, name="batch_max_wait_ms", low=0.0,
                                              high=MAX_BATCH_WAIT_MS)
        self.predict_batch_ms = predict_batch_ms
        self._open: dict[Hashable, Batch[T]] = {}
        self._ready: list[Batch[T]] = []

    def __len__(self) -> int:
        return len(self._open)

    def add(self, key: Hashable, item: T, *, budget_ms: float, now_s: float) -> tuple[Batch[T], Pending[T]]:
        """Put a request in the open batch of its key (a new one if none is open).

        Parameters
        ----------
        key : hashable
            Requests with equal keys may share a batch.
        item : object
            What the batch runner receives for this request.
        budget_ms : float
            Time left to this request, ms (inf: no limit; <= 0: run at once).
        now_s : float
            The clock when it arrived, s.

        Returns
        -------
        tuple of (Batch, Pending)
            The batch it joined (closed already if this request filled it) and its entry. A batch
            this request would have made late is closed instead, and the request opens a new one.
        """
        pending = Pending(item=item, arrival_s=now_s, deadline_s=now_s + budget_ms / 1000.0)
        batch = self._open.get(key)
        if batch is not None and self._latest_start_s(batch.members + [pending]) < now_s:
            self._close(batch)  # joining would make its tightest member late: it starts now, without this one
            batch = None
        if batch is None:
            batch = self._open[key] = Batch(key=key, members=[])
        batch.members.append(pending)
        if len(batch.members) >= self.max_batch_size:
            self._close(batch)
        return batch, pending

    def close_s(self, batch: Batch[T]) -> float:
        """When an open batch must start: the end of its window, or earlier so its tightest member finishes."""
        window_end_s = batch.members[0].arrival_s + self.batch_max_wait_ms / 1000.0
        return min(window_end_s, self._latest_start_s(batch.members))

    def due_s(self) -> float:
        """The earliest time an open batch must start (inf when none is open)."""
        return min((self.close_s(batch) for batch in self._open.values()), default=math.inf)

    def take_due(self, now_s: float) -> list[Batch[T]]:
        """Close and return the batches that must start now: closed since the last call (full, or
        displaced by a member that would have made them late), then the open ones whose time has come.

        Parameters
        ----------
        now_s : float
            The clock now, s.

        Returns
        -------
        list of Batch
        """
        for batch in [batch for batch in self._open.values() if self.close_s(batch) <= now_s]:
            self._close(batch)
        ready, self._ready = self._ready, []
        return ready

    def _latest_start_s(self, members: list[Pending[T]]) -> float:
        return min(member.deadline_s for member in members) - self.predict_batch_ms(len(members)) / 1000.0

    def _close(self, batch: Batch[T]) -> None:
        batch.closed = True
        self._ready.append(batch)
        if self._open.get(batch.key) is batch:
            del self._open[batch.key]


class MicroBatcher(Generic[T, R]):
    """Run requests in micro-batches on the callers' own threads (leader/follower; no thread of its own).

    Parameters
    ----------
    run_batch : callable(key, list of items) -> sequence of results
        Runs one batch; returns one result per item, in order. An exception
        it raises is raised to every member of the batch.
    max_batch_size : int
        1..:data:`MAX_BATCH_SIZE`; 1 runs each request at once on its caller's thread.
    batch_max_wait_ms : float
        Longest a batch waits for company after its first request, ms.
    clock : callable() -> float, optional
        Seconds (default ``time.perf_counter``); budgets count on it.

    Raises
    ------
    ConfigError
        If a size or wait is out of range.

    Examples
    --------
    >>> batcher = MicroBatcher(lambda key, items: [x * 2 for x in items], max_batch_size=1, batch_max_wait_ms=0)
    >>> batcher.submit("k", 21, budget_ms=100.0)
    42
    """

    def __init__(self, run_batch: Callable[[Hashable, list[T]], Sequence[R]], *, max_batch_size: int,
                 batch_max_wait_ms: float, clock: Callable[[], float] = time.perf_counter) -> None:
        self.run_batch = run_batch
        self.clock = clock
        self.times = BatchTimes()
        self.arrivals = ArrivalRate()
        self._queue: BatchQueue[T] = BatchQueue(max_batch_size=max_batch_size, batch_max_wait_ms=batch_max_wait_ms,
                                                predict_batch_ms=self.times.predict_ms)
        self._changed = threading.Condition()
        self.n_batches = 0

    @property
    def max_batch_size(self) -> int:
        return self._queue.max_batch_size

    def submit(self, key: Hashable, item: T, *, budget_ms: float) -> R:
        """Run ``item`` in a batch of its key and return its own result.

        Parameters
        ----------
        key : hashable
        item : object
        budget_ms : float
            Time left to this request, ms; the batch starts in time for the tightest member.

        Returns
        -------
        object
            ``run_batch``'s result for this item.

        Raises
        ------
        Exception
            Whatever ``run_batch`` raised for this item's batch.
        """
        with self._changed:
            now_s = self.clock()
            self.arrivals.record(now_s)
            batch, pending = self._queue.add(key, item, budget_ms=budget_ms, now_s=now_s)
            self._queue.take_due(now_s)  # the closed batches' leaders run them; they look at batch.closed
            leader = batch.members[0] is pending
            self._changed.notify_all()  # leaders re-read their close time (or see their batch closed)
        if leader:
            self._lead(batch)
        else:
            pending.done.wait()
        if pending.error is not None:
            raise pending.error
        return pending.result

    def _lead(self, batch: Batch[T]) -> None:
        with self._changed:
            while not batch.closed:
                wait_s = self._queue.close_s(batch) - self.clock()
                if wait_s <= 0:
                    self._queue.take_due(self.clock())  # closes this batch (and any other that is due)
                    break
                self._changed.wait(wait_s)
            self.n_batches += 1
        members = batch.members  # closed: nothing joins any more
        started_s = self.clock()
        try:
            results = list(self.run_batch(batch.key, batch.items))
            if len(results) != len(members):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(members)} items")
            for member, result in zip(members, results):
                member.result = result
        except BaseException as err:  # every member learns it; the leader re-raises it in submit
            for member in members:
                member.error = err
        finally:
            self.times.record(len(members), (self.clock() - started_s) * 1000.0)
            for member in members:
                member.done.set()
