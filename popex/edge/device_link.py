"""What the edge knows about its devices: the device -> edge link and the device's own stage times.

The edge plans both hops (:mod:`popex.edge.three_tier_plan`), but it cannot
time the device's uploads itself: a body may still be arriving when a route
starts, and the device's compute happens before the request exists. So the
device measures and reports (``POST /api/v1/device/report``, see
:mod:`popex.device.client`): the round trips of zero-byte probes (the
link's base time, RTT plus one request's HTTP cost), timed uploads (probes
and real tensors: round trip less the edge's own time), and its measured
stage and branch times (already as slow as the device is). Rates come from
:func:`popex.edge.uplink_probe.uplink_mbps_from_timing` against the median
base time and are smoothed in an :class:`~popex.edge.uplink_window.UplinkWindow`,
exactly as the edge -> cloud monitor smooths its own; a change beyond its
hysteresis band bumps :attr:`DeviceLinks.version`, which invalidates the
three-tier tables built on the old estimate.

One estimate per edge (every device behind the edge shares the access
link) and one set of device timings per model (the latest report): the
testbed runs one device class at a time.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from popex.checks import check_finite, check_int
from popex.decision.latency import Link
from popex.edge.uplink_probe import uplink_mbps_from_timing
from popex.edge.uplink_window import UplinkEstimate, UplinkSample, UplinkWindow
from popex.errors import DataError
from popex.untrusted import loads_json

__all__ = ["MAX_REPORT_BYTES", "DeviceReport", "DeviceLinks", "parse_device_report"]

#: Largest report body taken, bytes.
MAX_REPORT_BYTES = 64 * 1024
_MAX_SAMPLES = 64
_MAX_MS = 3_600_000.0
_MAX_BYTES = 2**31
# Below this the upload's serialisation time is timer noise, not a rate (as the edge's own probes).
_MIN_SERIALISATION_MS = 0.05


@dataclass(frozen=True)
class DeviceReport:
    """One checked report of a device.

    Attributes
    ----------
    model_id : str
    stage_ms : tuple of float or None
        The device's time of each stage, ms (None: not reported).
    branch_ms : tuple of float or None
        The device's time of each branch, ms.
    base_ms : tuple of float
        Round trips of zero-byte probes, ms.
    uploads : tuple of (int, float)
        ``(n_bytes, transfer_ms)``: bytes sent and the round trip less the edge's time.
    """

    model_id: str
    stage_ms: tuple[float, ...] | None
    branch_ms: tuple[float, ...] | None
    base_ms: tuple[float, ...]
    uploads: tuple[tuple[int, float], ...]


def _times(body: dict, key: str, n_expected: int) -> tuple[float, ...] | None:
    values = body.get(key)
    if values is None:
        return None
    if not isinstance(values, list) or len(values) != n_expected:
        raise DataError(f"{key} must be a list of {n_expected} numbers (ms), one per {key.split('_')[0]}")
    return tuple(check_finite(v, name=key, low=0.0, high=_MAX_MS, allow_text=False) for v in values)


def parse_device_report(data: bytes, *, model_of: Any) -> DeviceReport:
    """Check a device's report (JSON) against the model it names.

    Parameters
    ----------
    data : bytes
        ``{"model": id, "stage_ms": [N], "branch_ms": [B], "base_ms": [...],
        "uploads": [{"n_bytes": int, "transfer_ms": float}, ...]}``; every key
        but ``model`` is optional; at most 64 samples of each kind.
    model_of : callable(str) -> StoredModel
        Resolves the model (raises its own 404).

    Returns
    -------
    DeviceReport

    Raises
    ------
    DataError, ConfigError
        Not a JSON object of that shape, unknown keys, or a number out of range.
    """
    body = loads_json(data, name="the device report", max_bytes=MAX_REPORT_BYTES)
    allowed = {"model", "stage_ms", "branch_ms", "base_ms", "uploads"}
    if not isinstance(body, dict) or not isinstance(body.get("model"), str) or set(body) - allowed:
        raise DataError(f"the device report must be a JSON object with 'model' (a model id) and at most "
                        f"{sorted(allowed - {'model'})}")
    model = model_of(body["model"])
    net = model.loaded.net
    base = body.get("base_ms", [])
    uploads = body.get("uploads", [])
    if not isinstance(base, list) or not isinstance(uploads, list) or max(len(base), len(uploads)) > _MAX_SAMPLES:
        raise DataError(f"base_ms and uploads must be lists of at most {_MAX_SAMPLES} samples")
    parsed_uploads = []
    for upload in uploads:
        if not isinstance(upload, dict) or set(upload) != {"n_bytes", "transfer_ms"}:
            raise DataError('each upload must be {"n_bytes": int, "transfer_ms": ms}')
        parsed_uploads.append((check_int(upload["n_bytes"], name="n_bytes", low=1, high=_MAX_BYTES),
                               check_finite(upload["transfer_ms"], name="transfer_ms", low=0.0, high=_MAX_MS,
                                            allow_text=False)))
    return DeviceReport(
        model_id=model.model_id, stage_ms=_times(body, "stage_ms", net.n_stages),
        branch_ms=_times(body, "branch_ms", len(net.branch_after_stage)),
        base_ms=tuple(check_finite(v, name="base_ms", low=0.0, high=_MAX_MS, allow_text=False) for v in base),
        uploads=tuple(parsed_uploads))


class DeviceLinks:
    """The device -> edge link estimate and each model's device timings, behind one lock.

    Parameters
    ----------
    initial_link : Link
        The estimate until a device reports (the edge's configured initial uplink).
    window_n : int
        Samples kept for each median.
    hysteresis_fraction : float
        Relative change that counts as a new link (bumps :attr:`version`).
    """

    def __init__(self, *, initial_link: Link, window_n: int, hysteresis_fraction: float) -> None:
        self._window = UplinkWindow(initial_link=initial_link, window_n=window_n,
                                    hysteresis_fraction=hysteresis_fraction)
        self._timings: dict[str, tuple[np.ndarray | None, np.ndarray | None]] = {}
        self._lock = threading.Lock()
        self._version = 0

    @property
    def version(self) -> int:
        """Bumped whenever the planned link or a model's device timings change."""
        return self._version

    def add(self, report: DeviceReport) -> int:
        """Take one report: its timings replace the model's, its samples join the windows.

        Parameters
        ----------
        report : DeviceReport

        Returns
        -------
        int
            Rate samples that carried information.
        """
        n_rates = 0
        with self._lock:
            if report.stage_ms is not None or report.branch_ms is not None:
                old_stage, old_branch = self._timings.get(report.model_id, (None, None))
                self._timings[report.model_id] = (
                    old_stage if report.stage_ms is None else np.asarray(report.stage_ms, dtype=np.float64),
                    old_branch if report.branch_ms is None else np.asarray(report.branch_ms, dtype=np.float64))
                self._version += 1
            now_s = time.time()
            for base_ms in report.base_ms:
                self._window.add_base_ms(base_ms)
                if self._window.add(UplinkSample(now_s, "http", None, base_ms)) is not None:
                    self._version += 1
            base_ms = self._window.base_ms()
            for n_bytes, transfer_ms in report.uploads:
                if transfer_ms - base_ms < _MIN_SERIALISATION_MS:
                    continue
                uplink_mbps = uplink_mbps_from_timing(n_bytes, transfer_ms, base_ms)
                if not math.isfinite(uplink_mbps):
                    continue
                n_rates += 1
                # a device's timed upload is a probe of the device link: bytes and their excess over a zero-byte
                # round trip, fitted with the others (popex.edge.uplink_fit)
                sample = UplinkSample(now_s, "probe", uplink_mbps, base_ms, n_bytes=n_bytes,
                                      excess_ms=transfer_ms - base_ms)
                if self._window.add(sample) is not None:
                    self._version += 1
        return n_rates

    def link(self) -> Link:
        """The planned device -> edge link (changes only beyond the hysteresis band).

        Returns
        -------
        Link
        """
        with self._lock:
            return self._window.planned_link

    def estimate(self) -> UplinkEstimate:
        """The smoothed estimate, with its sample counts (for the plan's JSON).

        Returns
        -------
        UplinkEstimate
        """
        with self._lock:
            return self._window.estimate(rtt_method="http")

    def timings(self, model_id: str) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The latest reported device stage and branch times of a model, ms (None where never reported).

        Parameters
        ----------
        model_id : str

        Returns
        -------
        tuple of (np.ndarray or None, np.ndarray or None)
        """
        with self._lock:
            return self._timings.get(model_id, (None, None))

