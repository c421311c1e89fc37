"""One daemon thread that runs jobs in order: the edge's model preparation runs on it.

A daemon, unlike ``ThreadPoolExecutor``'s workers, so that a long
profiling job cannot hold up the process when the server stops. It starts
with the first job, never in the constructor.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

__all__ = ["JobWorker"]


class JobWorker:
    """Runs submitted jobs one after the other on a daemon thread.

    Parameters
    ----------
    name : str
        The thread's name.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._queue: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, job: Callable[[], Any]) -> Future[Any]:
        """Queue ``job``; the first job starts the thread.

        Parameters
        ----------
        job : callable
            Called without arguments.

        Returns
        -------
        concurrent.futures.Future
            Its result or exception.

        Raises
        ------
        RuntimeError
            If the worker is closed.
        """
        future: Future[Any] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the worker is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._queue.put((future, job))
        return future

    def close(self) -> None:
        """Cancel the queued jobs; the one running finishes in its daemon thread."""
        with self._lock:
            self._closed = True
            self._queue.put(None)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            future, job = item
            if self._closed:
                future.cancel()
                continue
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(job())
            except BaseException as err:  # handed to whoever waits on the future
                future.set_exception(err)
