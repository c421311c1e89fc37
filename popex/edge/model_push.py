"""Push-and-retry for cloud replicas that lack a model (DESIGN §6, §8).

Cloud replicas behind a load balancer share no storage: a replica that has
never seen a model answers an offload with 409 ``unknown_model``. The edge
then pushes the model (content-addressed, so pushing what a replica already
holds is harmless) and retries the offload once, all within the request's
budget; if the budget runs out, the request falls back as for any other
cloud failure. Concurrent requests that were refused share one push: the
others wait for it and then retry.

The push and the retry reach the replica that refused only if the load
balancer keeps an edge on one replica (nginx ``hash $remote_addr``,
Kubernetes ``sessionAffinity: ClientIP``; see ``docker/`` and
``deploy/kubernetes/``), which also lets that replica batch the edge's
offloads. When the replica dies, the balancer moves the edge to another,
which refuses once, gets the model and serves from then on.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from popex.edge.cloud_types import CloudRejected, CloudTimeout

__all__ = ["ModelPusher", "is_unknown_model"]

T = TypeVar("T")


def is_unknown_model(err: Exception) -> bool:
    """Whether a cloud refusal is a replica's "I do not hold this model" (409 ``unknown_model``).

    Parameters
    ----------
    err : Exception

    Returns
    -------
    bool
    """
    return isinstance(err, CloudRejected) and err.status == 409 and err.code == "unknown_model"


class ModelPusher:
    """Runs offload calls, pushing the model and retrying once when the replica lacks it.

    Parameters
    ----------
    client : CloudPort
        Where the model is pushed (``put_model``).

    Attributes
    ----------
    n_pushes : int
        Models pushed because of a 409 so far.
    """

    def __init__(self, *, client: Any) -> None:
        self.client = client
        self.n_pushes = 0
        self._locks: dict[str, threading.Lock] = {}
        self._pushed_s: dict[str, float] = {}
        self._guard = threading.Lock()

    def call(self, offload: Callable[[float], T], *, model: Any, remaining_ms: Callable[[], float]) -> T:
        """``offload(timeout_s)``; on a 409 ``unknown_model``, push ``model`` and call it once more.

        Parameters
        ----------
        offload : callable(float) -> object
            One offload with the given timeout, s.
        model : StoredModel
            The model offloaded (its id and files are pushed).
        remaining_ms : callable() -> float
            What is left of the budget now, ms; every call gets at most that.

        Returns
        -------
        object
            What ``offload`` returned.

        Raises
        ------
        CloudError
            The offload's or the push's error; CloudTimeout when no budget is left to retry.
        """
        try:
            return offload(remaining_ms() / 1000.0)
        except CloudRejected as err:
            if not is_unknown_model(err):
                raise
            self._push(model, remaining_ms, refused_s=time.monotonic())
            left_ms = remaining_ms()
            if left_ms <= 0:
                raise CloudTimeout("the model was pushed to the cloud, but no budget is left to retry") from err
            return offload(left_ms / 1000.0)

    def _push(self, model: Any, remaining_ms: Callable[[], float], *, refused_s: float) -> None:
        with self._guard:
            lock = self._locks.setdefault(model.model_id, threading.Lock())
        with lock:  # one push per model at a time; the others wait for it, then retry
            if self._pushed_s.get(model.model_id, -float("inf")) > refused_s:
                return  # another request pushed it after this one was refused
            left_ms = remaining_ms()
            if left_ms <= 0:
                raise CloudTimeout("no budget left to push the model to the cloud replica that lacks it")
            self.client.put_model(model.model_id, model.loaded.files, timeout_s=left_ms / 1000.0)
            self._pushed_s[model.model_id] = time.monotonic()
            self.n_pushes += 1
