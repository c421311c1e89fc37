"""Compute on the edge: stages, branches and the final exit, on this machine or an emulated slower one.

For demos on a server-class machine, where the edge would otherwise always
win, the edge can emulate a device ``edge_slowdown`` times slower: each piece
of compute takes at least its (already scaled) profile time. The emulated
device is a fixed model, "F times this machine's median", so load on this
machine is not multiplied by F.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from popex.checks import check_finite
from popex.edge.budget import RequestRun
from popex.edge.plans import ModelPlan
from popex.edge.store import StoredModel
from popex.runtime.exits import exit_confidence

__all__ = ["EdgeCompute"]

_MAX_EDGE_SLOWDOWN = 1000.0


class EdgeCompute:
    """Runs edge compute and turns exit logits into (confidence, label).

    Parameters
    ----------
    edge_slowdown : float
        Emulate an edge device this many times slower than this machine, in
        [1, 1000] (1 = no emulation).

    Raises
    ------
    ConfigError
        If ``edge_slowdown`` is out of range or not finite.
    """

    def __init__(self, *, edge_slowdown: float) -> None:
        self.edge_slowdown = check_finite(edge_slowdown, name="edge_slowdown", low=1.0, high=_MAX_EDGE_SLOWDOWN)

    def on_edge(self, compute: Callable[..., np.ndarray], *args: Any, emulated_ms: float,
                run: RequestRun | None = None, **kwargs: Any) -> np.ndarray:
        """Run ``compute(*args, **kwargs)``; on an emulated slower device, take at least ``emulated_ms``.

        ``time.sleep`` wakes late (0.1-1 ms on a busy VM, per piece); within a
        request the next piece sleeps that much less, or the emulated device
        would run slower than its model by a few ms per request.

        Parameters
        ----------
        compute : callable
            Returns a tensor (``net.run_stages``, ``net.run_branch``).
        emulated_ms : float
            The profile's (already scaled) time of this piece, ms.
        run : RequestRun, optional
            Carries the oversleep from one piece to the next.

        Returns
        -------
        np.ndarray
            What ``compute`` returned.
        """
        if self.edge_slowdown == 1.0:
            return compute(*args, **kwargs)
        started = time.perf_counter()
        result = compute(*args, **kwargs)
        owed_ms = run.sleep_overshoot_ms if run is not None else 0.0
        remaining_s = (emulated_ms - owed_ms) / 1000.0 - (time.perf_counter() - started)
        overshoot_ms = min(owed_ms, max(0.0, -remaining_s * 1000.0))  # what this piece could not repay
        if remaining_s > 0:
            sleep_started = time.perf_counter()
            time.sleep(remaining_s)
            overshoot_ms = max(0.0, (time.perf_counter() - sleep_started - remaining_s) * 1000.0)
        if run is not None:
            run.sleep_overshoot_ms = overshoot_ms
        return result

    def on_edge_batch(self, compute: Callable[..., np.ndarray], *args: Any, **kwargs: Any) -> np.ndarray:
        """Run one piece of a batch; on an emulated slower device it takes ``edge_slowdown`` x its time here.

        The profile holds batch-1 times, so a batch is emulated from its own
        measured time instead (the same factor, applied to what really ran).

        Parameters
        ----------
        compute : callable
            Returns a tensor (``net.run_stages``, ``net.run_branch``), called with the other arguments.

        Returns
        -------
        np.ndarray
            What ``compute`` returned.
        """
        started = time.perf_counter()
        result = compute(*args, **kwargs)
        if self.edge_slowdown > 1.0:
            time.sleep((self.edge_slowdown - 1.0) * (time.perf_counter() - started))
        return result

    @staticmethod
    def exit_batch(model: StoredModel, logits: np.ndarray, exit_index: int,
                   head: str | None) -> tuple[np.ndarray, np.ndarray]:
        """Confidences (float64, as the sweep compares) and labels of one exit for a batch of logits.

        Parameters
        ----------
        model : StoredModel
        logits : np.ndarray, shape (n, n_classes)
        exit_index : int
            The branch, or -1 for the final exit (its calibration temperature).
        head : str, optional

        Returns
        -------
        tuple of np.ndarray
            Shapes (n,) and (n,).
        """
        calibration = model.calibration_of(head)
        confidence, predicted = exit_confidence(
            logits, temperature=float(calibration.temperature[exit_index]), method=calibration.confidence_method
        )
        return confidence.astype(np.float64), predicted

    def evaluate_branch(self, model: StoredModel, plan: ModelPlan, branch: int, features: np.ndarray, *,
                        head: str | None = None, run: RequestRun | None = None) -> tuple[float, int]:
        """Run side branch ``branch`` on ``features``; its temperature-scaled confidence and label.

        Parameters
        ----------
        model : StoredModel
        plan : ModelPlan
            Gives the branch's profile time (emulation).
        branch : int
        features : np.ndarray, shape (1, ...)
            The output of the stage the branch is attached after.
        head : str, optional
            Expert head set; None = pristine.
        run : RequestRun, optional

        Returns
        -------
        tuple of (float, int)
            Confidence (float64, as the sweep compares) and predicted label.
        """
        logits = self.on_edge(model.loaded.net.run_branch, branch, features, head=head, run=run,
                              emulated_ms=float(plan.profile.branch_edge_ms[branch]))
        return self._exit(model, logits, branch, head)

    def final(self, model: StoredModel, logits: np.ndarray, *, head: str | None = None) -> tuple[float, int]:
        """Confidence and label of the final exit from its logits.

        Parameters
        ----------
        model : StoredModel
        logits : np.ndarray, shape (1, n_classes)
        head : str, optional

        Returns
        -------
        tuple of (float, int)
        """
        return self._exit(model, logits, -1, head)

    @staticmethod
    def _exit(model: StoredModel, logits: np.ndarray, exit_index: int, head: str | None) -> tuple[float, int]:
        confidence, predicted = EdgeCompute.exit_batch(model, logits, exit_index, head)
        return float(confidence[0]), int(predicted[0])
