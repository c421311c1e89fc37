"""The device's part of the three-tier plan, and the device -> edge link as the device measures it.

- :func:`parse_plan` checks the edge's ``GET /api/v1/plan`` answer
  (:class:`popex.edge.three_tier_plan.DevicePlan`) against the model the
  device holds before the device acts on it: cuts in range, one threshold
  per branch, each in [0, 1] or off. A plan that fails is not used (the
  device keeps the one it had, or runs everything itself).
- :class:`LinkMeter` keeps the device's own timings of the link: zero-byte
  probes (the base time: RTT plus one request's HTTP cost) and uploads
  (round trip less the edge's ``server_ms``). Its median rate is what tells
  the device that the link changed, so that it reports and re-plans
  (:meth:`popex.device.client.DeviceClient.refresh_plan`); the edge keeps
  its own, smoothed, estimate from the same samples
  (:mod:`popex.edge.device_link`).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from popex.edge.uplink_probe import uplink_mbps_from_timing
from popex.errors import DataError

__all__ = ["DevicePlanView", "LinkMeter", "parse_plan"]

# Below this the serialisation time is timer noise, not a rate (as popex.edge.device_link).
_MIN_SERIALISATION_MS = 0.05


@dataclass(frozen=True)
class DevicePlanView:
    """What the device needs of a plan: its cut, the edge's cut and every branch's threshold.

    Attributes
    ----------
    x, y : int
        The device runs stages 1..x, the edge x+1..y, the cloud y+1..N.
    thresholds : tuple of (float or None)
        Every branch's threshold (None = off); the device takes those with k_b <= x.
    expected_latency_ms, accuracy : float
        What the edge predicts for the plan.
    feasible : bool
    policy, objective : str
    deadline_ms : float
    """

    x: int
    y: int
    thresholds: tuple[float | None, ...]
    expected_latency_ms: float
    accuracy: float
    feasible: bool
    policy: str
    objective: str
    deadline_ms: float


def _number(body: dict, key: str) -> float:
    value = body.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"the plan's {key!r} must be a finite number, got {str(value)[:40]!r}")
    return float(value)


def parse_plan(body: Any, *, model_id: str, n_stages: int, n_branches: int) -> DevicePlanView:
    """Check the edge's plan against the device's model.

    Parameters
    ----------
    body : object
        The JSON body of ``GET /api/v1/plan``.
    model_id : str
        The device's model.
    n_stages, n_branches : int

    Returns
    -------
    DevicePlanView

    Raises
    ------
    DataError
        Not a plan of this model, cuts out of 0 <= x <= y <= N, or bad thresholds.

    Examples
    --------
    >>> plan = parse_plan({"model_id": "m", "x": 1, "y": 2, "thresholds": [0.9, None], "accuracy": 0.8,
    ...                    "expected_latency_ms": 12.0, "feasible": True, "policy": "three-tier",
    ...                    "objective": "mean", "deadline_ms": 50}, model_id="m", n_stages=3, n_branches=2)
    >>> plan.x, plan.y, plan.thresholds
    (1, 2, (0.9, None))
    """
    if not isinstance(body, dict) or body.get("model_id") != model_id:
        raise DataError(f"the edge's plan is not one of model {model_id[:12]}")
    x, y = body.get("x"), body.get("y")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (x, y)) or not 0 <= x <= y <= n_stages:
        raise DataError(f"the plan's cuts must satisfy 0 <= x <= y <= {n_stages}, got x={x!r}, y={y!r}")
    raw = body.get("thresholds")
    if not isinstance(raw, list) or len(raw) != n_branches:
        raise DataError(f"the plan must give {n_branches} thresholds (null = off)")
    thresholds = []
    for t in raw:
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0):
            raise DataError(f"a threshold must be in [0, 1] or null, got {str(t)[:40]!r}")
        thresholds.append(None if t is None else float(t))
    return DevicePlanView(
        x=x, y=y, thresholds=tuple(thresholds), expected_latency_ms=_number(body, "expected_latency_ms"),
        accuracy=_number(body, "accuracy"), feasible=bool(body.get("feasible")), policy=str(body.get("policy")),
        objective=str(body.get("objective")), deadline_ms=_number(body, "deadline_ms"))


class LinkMeter:
    """The device's recent link timings: base round trips and uploads, medians over the last ``window_n``.

    Parameters
    ----------
    window_n : int
        Samples kept of each kind.
    """

    def __init__(self, *, window_n: int = 9) -> None:
        self._base_ms: deque[float] = deque(maxlen=window_n)
        self._rates_mbps: deque[float] = deque(maxlen=window_n)
        self._uploads: deque[tuple[int, float]] = deque(maxlen=window_n)

    def add_base(self, round_trip_ms: float) -> None:
        """Add a zero-byte probe's round trip.

        Parameters
        ----------
        round_trip_ms : float
        """
        self._base_ms.append(float(round_trip_ms))

    def base_ms(self) -> float:
        """Median base round trip.

        Returns
        -------
        float
            ms; 0 before any probe.
        """
        return float(np.median(self._base_ms)) if self._base_ms else 0.0

    def add_upload(self, n_bytes: int, transfer_ms: float) -> None:
        """Add one upload.

        Parameters
        ----------
        n_bytes : int
            Bytes sent.
        transfer_ms : float
            The round trip less the edge's own time, ms.
        """
        self._uploads.append((int(n_bytes), float(transfer_ms)))
        if transfer_ms - self.base_ms() >= _MIN_SERIALISATION_MS:
            rate_mbps = uplink_mbps_from_timing(int(n_bytes), float(transfer_ms), self.base_ms())
            if math.isfinite(rate_mbps):
                self._rates_mbps.append(rate_mbps)

    def uplink_mbps(self) -> float:
        """Median rate of the recent uploads.

        Returns
        -------
        float
            Mbit/s; nan before any upload that carried a rate.
        """
        return float(np.median(self._rates_mbps)) if self._rates_mbps else math.nan

    def take_report(self) -> dict[str, Any]:
        """The samples to report, as the report's ``base_ms`` and ``uploads``; forgets the uploads.

        Returns
        -------
        dict
        """
        body = {"base_ms": list(self._base_ms),
                "uploads": [{"n_bytes": n, "transfer_ms": ms} for n, ms in self._uploads]}
        self._uploads.clear()
        return body
