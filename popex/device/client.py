"""The device tier's runtime: execute the edge's three-tier plan, and answer locally when the edge fails.

A device holds the model (the same files the edge registered, run with ONNX
Runtime, :mod:`popex.device.local`) and its part of the plan, pulled from
the edge (``GET /api/v1/plan``, :meth:`DeviceClient.refresh_plan`): the cut
x and the thresholds of its branches. For each image it runs stages 1..x and
its active branches; a confident branch answers on the device. Otherwise it
sends the tensor at x in the wire format (:mod:`popex.wire`, deflated when
that shrinks it) to ``POST /api/v1/classify/tensor`` with the budget it has
left; the edge runs x+1..y and may forward to the cloud. With x = N the
device answers itself. On a connection failure, a timeout, a 5xx or an edge
that does not hold the model, the device finishes the network itself (stages
x+1..N, its final exit: its best local exit) and marks the answer
``fallback``. A 4xx about the request itself is the caller's error and is
raised, not hidden.

The plan is refreshed every ``refresh_every_n`` images, after
``refresh_period_s``, when the requirement changes, and when the device's own
measurement of the device -> edge link moves by more than
``link_change_fraction`` (:class:`popex.device.plan.LinkMeter`, from
zero-byte and sized probes to ``POST /api/v1/device/probe`` and from the
timings of its real uploads). Each refresh first reports those samples and
the device's measured stage and branch times (``POST /api/v1/device/report``),
so the edge plans with the device's link and speed
(:mod:`popex.edge.device_link`). A refresh runs between images, outside
their latency.

An edge without the three-tier routes (no device token: 403) is served the
two-tier way: the device sends the image (x = 0, ``POST /api/v1/classify``).
"""

from __future__ import annotations

import math
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import requests

from popex.checks import check_deadline_ms, check_finite, check_int
from popex.device.local import DeviceTimings, LocalExit, LocalModel
from popex.device.plan import DevicePlanView, LinkMeter, parse_plan
from popex.errors import DataError, PopexError
from popex.wire import compress_payload, encode_offload

__all__ = ["DEFAULT_TIMEOUT_MS", "DeviceAnswer", "DeviceClient", "DeviceError"]

#: The edge's answer is awaited this long when no deadline is given.
DEFAULT_TIMEOUT_MS = 10_000.0
_FALLBACK_STATUSES = {404, 409, 503}  # the edge lacks the model or is not ready: answer here
_CONTROL_TIMEOUT_S = 10.0
_N_BASE_PROBES = 3
_N_SIZED_PROBES = 6  # more than half the edge's window (uplink_window_n = 9), so one refresh moves its median
_PROBE_TARGET_MS = 30.0
_MAX_REPORT_ROUNDS = 3  # a sized probe lasts about this long at the last estimate: well above the jitter
_MIN_PROBE_BYTES, _MAX_PROBE_BYTES = 4 * 1024, 4 * 2**20


class DeviceError(PopexError):
    """The edge refused the request itself (a 4xx): falling back would hide the caller's error."""

    code = "device_error"


@dataclass(frozen=True)
class DeviceAnswer:
    """One image's answer.

    Attributes
    ----------
    label : int
    class_name : str
    exit : int or str
        The branch that answered, or "final".
    where : str
        The tier that produced the answer: "device", "edge" or "cloud".
    cuts : tuple of (int, int)
        (x, y) the request ran with.
    latency_ms : float
        From the image's arrival on the device to its answer.
    fallback : bool
        True when a tier answered in place of the next one (the device for an edge that failed, or the edge
        for a cloud that failed).
    ran : dict of str to (int, int)
        Per tier that computed, the first and last stage (1-based) it ran.
    reason : str, optional
        Why a fallback.
    input_ms : float
        Of ``latency_ms``, the time decoding and preprocessing the image (before stage 1, outside the plan's E[T]).
    """

    label: int
    class_name: str
    exit: int | str
    where: str
    cuts: tuple[int, int]
    latency_ms: float
    fallback: bool
    ran: dict[str, tuple[int, int]] = field(default_factory=dict)
    reason: str | None = None
    input_ms: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The JSON line of ``popex device classify --json``.

        Returns
        -------
        dict
        """
        body = {"label": self.label, "class_name": self.class_name, "exit": self.exit, "where": self.where,
                "cuts": list(self.cuts), "latency_ms": self.latency_ms, "fallback": self.fallback,
                "ran": {tier: list(stages) for tier, stages in self.ran.items()}, "input_ms": self.input_ms}
        if self.reason:
            body["reason"] = self.reason
        return body


class _EdgeFailed(Exception):
    """The edge did not answer usefully: the device answers itself."""


class DeviceClient:
    """A device: the model here, the edge at ``edge_url``, the plan from the edge.

    Parameters
    ----------
    edge_url : str
        e.g. ``http://127.0.0.1:8000``.
    model_dir : path
        The model's directory (either form); its id names it to the edge.
    device_token : str, optional
        The edge's device token: with it the device runs the three-tier plan; without it, it sends images.
    slowdown : float
        Emulated device: local compute takes this many times longer (>= 1).
    n_threads : int
        ONNX Runtime threads for local compute.
    objective, policy : str, optional
        Sent with the plan query and the tensors (default: the edge's objective, the adaptive three-tier policy).
    pin_x, pin_y : int, optional
        Ask the edge for a plan with these cuts (it still chooses the thresholds).
    refresh_every_n : int
        Re-plan after this many images.
    refresh_period_s : float
        Re-plan when the plan is older than this.
    link_change_fraction : float
        Re-plan when the device's measured rate moves by more than this fraction.
    edge_timeout_ms : float, optional
        Wait this long for the edge's answer; default: what is left of the deadline.
    """

    def __init__(self, *, edge_url: str, model_dir: str | os.PathLike[str], device_token: str | None = None,
                 slowdown: float = 1.0, n_threads: int = 1, objective: str | None = None, policy: str | None = None,
                 pin_x: int | None = None, pin_y: int | None = None, refresh_every_n: int = 50,
                 refresh_period_s: float = 30.0, link_change_fraction: float = 0.3,
                 edge_timeout_ms: float | None = None) -> None:
        self.edge_url = edge_url.rstrip("/")
        self.local = LocalModel(model_dir, slowdown=slowdown, n_threads=n_threads)
        self.model_id, self.net = self.local.model_id, self.local.net
        self.device_token = device_token
        self.objective, self.policy, self.pin_x, self.pin_y = objective, policy, pin_x, pin_y
        self.refresh_every_n = check_int(refresh_every_n, name="refresh_every_n", low=1, high=10**9)
        self.refresh_period_s = check_finite(refresh_period_s, name="refresh_period_s", low=0.0)
        self.link_change_fraction = check_finite(link_change_fraction, name="link_change_fraction", low=0.0)
        self.edge_timeout_ms = edge_timeout_ms
        self.plan: DevicePlanView | None = None
        self.n_refreshes = 0
        self.refresh_error: str | None = None  # why the last refresh failed (None: it did not)
        self._image_mode = False  # the edge has no device routes (403): send images
        self.meter = LinkMeter()
        self._timings: DeviceTimings | None = None
        self._plan_key: tuple[Any, ...] | None = None
        self._plan_age = (0, 0.0, math.nan)  # images since, monotonic time of, and the rate at the last refresh
        self._session = requests.Session()

    def close(self) -> None:
        """Close the HTTP session."""
        self._session.close()

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.device_token}"} if self.device_token else {}

    def _post(self, path: str, *, timeout_s: float, **kwargs: Any) -> requests.Response:
        return self._session.post(f"{self.edge_url}{path}", timeout=timeout_s,
                                  headers={**self._headers(), **kwargs.pop("headers", {})}, **kwargs)

    def _probe(self) -> None:
        for _ in range(_N_BASE_PROBES):
            started_s = time.perf_counter()
            response = self._post("/api/v1/device/probe", data=b"", timeout_s=_CONTROL_TIMEOUT_S)
            response.raise_for_status()
            self.meter.add_base((time.perf_counter() - started_s) * 1000.0)
        n_bytes = _MIN_PROBE_BYTES  # the first is small whatever the link was; the rest sized from the last one
        for i in range(_N_SIZED_PROBES):
            # every other probe half the size: pairs of sizes let the edge's fit cancel the fixed cost
            n_bytes = n_bytes // 2 if i % 2 else n_bytes
            started_s = time.perf_counter()
            response = self._post("/api/v1/device/probe", data=os.urandom(n_bytes), timeout_s=_CONTROL_TIMEOUT_S)
            response.raise_for_status()
            # the whole round trip: the probe route's server_ms is its time reading the body, the transfer itself
            transfer_ms = (time.perf_counter() - started_s) * 1000.0
            self.meter.add_upload(n_bytes, transfer_ms)  # random bytes: incompressible, like a tensor
            rate_mbps = 8.0 * n_bytes / (1000.0 * max(transfer_ms - self.meter.base_ms(), 1e-3))
            n_bytes = int(min(_MAX_PROBE_BYTES, max(2 * _MIN_PROBE_BYTES, rate_mbps * 125.0 * _PROBE_TARGET_MS)))

    def refresh_plan(self, *, deadline_ms: float | None = None) -> DevicePlanView | None:
        """Measure the link, report it and the device's timings, and pull the plan for a requirement.

        Parameters
        ----------
        deadline_ms : float, optional
            The requirement; default: the edge's.

        Returns
        -------
        DevicePlanView or None
            The new plan; None when the edge has no three-tier routes (the device then sends images), or
            when the edge could not be asked (the previous plan stays).
        """
        self._plan_age = (0, time.monotonic(), self._plan_age[2])
        self._plan_key = (deadline_ms,)
        if not self.device_token:
            self.plan = None
            return None
        self.n_refreshes += 1
        try:
            self._timings = self.local.measure_timings()  # again each time: the device's load changes too
            for _ in range(_MAX_REPORT_ROUNDS):  # until the edge's (robust, windowed) estimate agrees with ours
                self._probe()
                report = {"model": self.model_id, "stage_ms": list(self._timings.stage_ms),
                          "branch_ms": list(self._timings.branch_ms), **self.meter.take_report()}
                response = self._post("/api/v1/device/report", json=report, timeout_s=_CONTROL_TIMEOUT_S)
                response.raise_for_status()
                edge_mbps, own_mbps = float(response.json()["device_edge"]["uplink_mbps"]), self.meter.uplink_mbps()
                if not math.isfinite(own_mbps) or abs(edge_mbps - own_mbps) <= self.link_change_fraction * own_mbps:
                    break
            params = {"model": self.model_id, "objective": self.objective, "policy": self.policy,
                      "x": self.pin_x, "y": self.pin_y,
                      "deadline_ms": None if deadline_ms is None else repr(check_deadline_ms(deadline_ms))}
            response = self._session.get(f"{self.edge_url}/api/v1/plan", headers=self._headers(),
                                         params={k: v for k, v in params.items() if v is not None},
                                         timeout=_CONTROL_TIMEOUT_S)
            if response.status_code == 403:  # no device routes on this edge: the two-tier way
                self.plan, self._image_mode = None, True
                return None
            response.raise_for_status()
            self.plan = parse_plan(response.json(), model_id=self.model_id, n_stages=self.local.n_stages,
                                   n_branches=len(self.net.branch_after_stage))
        except requests.HTTPError as err:
            if err.response is not None and err.response.status_code == 403:  # no device routes: the two-tier way
                self.plan, self._image_mode = None, True
                return None
            self.refresh_error = f"{type(err).__name__}: {str(err)[:300]}"
            return None
        except (requests.RequestException, ValueError, KeyError, TypeError, DataError) as err:
            self.refresh_error = f"{type(err).__name__}: {str(err)[:300]}"
            return None  # the edge is down or confused: keep the plan there was (or none: answer locally)
        self.refresh_error, self._image_mode = None, False
        self._plan_age = (0, time.monotonic(), self.meter.uplink_mbps())
        return self.plan

    def _needs_refresh(self, deadline_ms: float | None) -> bool:
        n_since, at_s, planned_mbps = self._plan_age
        if self._plan_key != (deadline_ms,) or n_since >= self.refresh_every_n:
            return True
        if time.monotonic() - at_s >= self.refresh_period_s:
            return True
        rate_mbps = self.meter.uplink_mbps()
        return math.isfinite(planned_mbps) and math.isfinite(rate_mbps) and \
            abs(rate_mbps - planned_mbps) > self.link_change_fraction * planned_mbps

    def _answer(self, started_s: float, label: int, exit_: int | str, where: str, cuts: tuple[int, int],
                ran: dict[str, tuple[int, int]], fallback: bool = False, reason: str | None = None,
                class_name: str | None = None) -> DeviceAnswer:
        return DeviceAnswer(label=label, class_name=self.local.class_name(label) if class_name is None else class_name,
                            exit=exit_, where=where, cuts=cuts, latency_ms=(time.perf_counter() - started_s) * 1000.0,
                            fallback=fallback, ran=ran, reason=reason, input_ms=self._input_ms)

    def _finish_locally(self, h: np.ndarray, x: int, started_s: float, cuts: tuple[int, int],
                        reason: str) -> DeviceAnswer:
        n = self.local.n_stages
        logits = self.local.stages(h, x, n)
        final = self.local.exit_of(-1, logits, n)
        return self._answer(started_s, final.label, "final", "device", cuts, {"device": (1, n)}, True, reason)

    def _edge_tensor(self, h: np.ndarray, x: int, started_s: float, deadline_ms: float | None) -> dict[str, Any]:
        elapsed_ms = (time.perf_counter() - started_s) * 1000.0
        budget_ms = None if deadline_ms is None else max(0.0, deadline_ms - elapsed_ms)
        payload = encode_offload(h, model_id=self.model_id, split=x, request_id=uuid.uuid4().hex,
                                 budget_ms=budget_ms)
        deflated = compress_payload(payload)
        body = payload if deflated is None else deflated
        params = {"deadline_ms": None if deadline_ms is None else repr(deadline_ms), "objective": self.objective,
                  "policy": self.policy, "y": self.pin_y}
        timeout_ms = self.edge_timeout_ms or (DEFAULT_TIMEOUT_MS if budget_ms is None else max(budget_ms, 1.0))
        sent_s = time.perf_counter()
        try:
            response = self._post("/api/v1/classify/tensor", data=body, timeout_s=timeout_ms / 1000.0,
                                  params={k: v for k, v in params.items() if v is not None},
                                  headers={"Content-Type": "application/octet-stream",
                                           **({} if deflated is None else {"Content-Encoding": "deflate"})})
        except requests.RequestException as err:
            raise _EdgeFailed(f"edge unreachable or late: {type(err).__name__}") from err
        round_trip_ms = (time.perf_counter() - sent_s) * 1000.0
        if response.status_code >= 500 or response.status_code in _FALLBACK_STATUSES:
            raise _EdgeFailed(f"edge answered {response.status_code}")
        if response.status_code != 200:
            raise DeviceError(f"the edge refused the tensor ({response.status_code}): {response.text[:300]}")
        try:
            answer = response.json()
            int(answer["label"]), str(answer["where"])
            server_ms = float(answer["server_ms"])
        except (ValueError, KeyError, TypeError) as err:
            raise _EdgeFailed("malformed edge answer") from err
        self.meter.add_upload(len(body), max(0.0, round_trip_ms - server_ms))
        return answer

    def _through_edge(self, answer: dict[str, Any], x: int, started_s: float) -> DeviceAnswer:
        n = self.local.n_stages
        where, exit_ = str(answer["where"]), answer.get("exit", "final")
        cuts = answer.get("cuts") or [x, n]
        y = int(answer.get("split", cuts[1]))
        ran = {"device": (1, x)} if x > 0 else {}
        if where == "cloud":
            ran.update({"edge": (x + 1, y)} if y > x else {})
            ran["cloud"] = (y + 1, n)
        else:
            last = n if exit_ == "final" else int(self.net.branch_after_stage[int(exit_)])
            ran["edge"] = (x + 1, last)
        return self._answer(started_s, int(answer["label"]), exit_, where, (x, y), ran,
                            fallback=bool(answer.get("fallback")),
                            reason=f"edge: {answer['fallback_reason']}" if answer.get("fallback") else None,
                            class_name=str(answer.get("class_name", "")) or None)

    def _classify_image(self, image_bytes: bytes, started_s: float, deadline_ms: float | None) -> DeviceAnswer:
        """The two-tier way: the image to ``POST /api/v1/classify`` (an edge without device routes)."""
        n = self.local.n_stages
        params = {"model": self.model_id}
        if deadline_ms is not None:
            params["deadline_ms"] = repr(deadline_ms)
        timeout_ms = self.edge_timeout_ms or (DEFAULT_TIMEOUT_MS if deadline_ms is None else max(deadline_ms, 1.0))
        try:
            response = self._session.post(f"{self.edge_url}/api/v1/classify", data=image_bytes, params=params,
                                          headers={"Content-Type": "application/octet-stream"},
                                          timeout=timeout_ms / 1000.0)
        except requests.RequestException as err:
            response, reason = None, f"edge unreachable or late: {type(err).__name__}"
        else:
            reason = f"edge answered {response.status_code}"
        if response is None or response.status_code >= 500 or response.status_code in _FALLBACK_STATUSES:
            return self._finish_locally(self.local.input_tensor(image_bytes), 0, started_s, (n, n), reason)
        if response.status_code != 200:
            raise DeviceError(f"the edge refused the request ({response.status_code}): {response.text[:300]}")
        try:
            body = response.json()
            int(body["label"]), str(body["where"])
        except (ValueError, KeyError, TypeError):
            return self._finish_locally(self.local.input_tensor(image_bytes), 0, started_s, (n, n),
                                        "malformed edge answer")
        return self._through_edge({**body, "split": body.get("split", n) if body["where"] == "cloud" else n}, 0,
                                  started_s)

    def classify(self, image_bytes: bytes, *, deadline_ms: float | None = None) -> DeviceAnswer:
        """Classify one image under the current plan; the device's own answer if the edge fails.

        Parameters
        ----------
        image_bytes : bytes
            PNG, JPEG or BMP.
        deadline_ms : float, optional
            The requirement: planned for, sent to the edge, and (unless ``edge_timeout_ms``) the edge's timeout.

        Returns
        -------
        DeviceAnswer

        Raises
        ------
        DeviceError
            The edge answered a 4xx about the request (a bad image or deadline).
        DataError
            The image cannot be decoded while the device computes on it.
        """
        if deadline_ms is not None:
            deadline_ms = check_deadline_ms(deadline_ms)
        if self._needs_refresh(deadline_ms):
            self.refresh_plan(deadline_ms=deadline_ms)
        n_since, at_s, planned_mbps = self._plan_age
        self._plan_age = (n_since + 1, at_s, planned_mbps)
        started_s = time.perf_counter()
        self._input_ms = 0.0
        plan = self.plan
        if plan is None and (self.device_token is None or self._image_mode):
            return self._classify_image(image_bytes, started_s, deadline_ms)
        n = self.local.n_stages
        x = n if plan is None else plan.x  # no plan from a three-tier edge: the device runs everything
        cuts = (x, n if plan is None else plan.y)
        h, done = self.local.input_tensor(image_bytes), 0
        self._input_ms = (time.perf_counter() - started_s) * 1000.0
        branches = [] if plan is None else [(b, t) for b, t in enumerate(plan.thresholds)
                                            if t is not None and self.net.branch_after_stage[b] <= x]
        for b, threshold in sorted(branches, key=lambda item: self.net.branch_after_stage[item[0]]):
            after = int(self.net.branch_after_stage[b])
            h, done = self.local.stages(h, done, after), after
            local: LocalExit = self.local.branch(b, h)
            if local.confidence >= threshold:
                return self._answer(started_s, local.label, b, "device", cuts, {"device": (1, after)})
        h, done = self.local.stages(h, done, x), x
        if x == n:
            final = self.local.exit_of(-1, h, n)
            return self._answer(started_s, final.label, "final", "device", cuts, {"device": (1, n)},
                                fallback=plan is None, reason="no plan from the edge" if plan is None else None)
        try:
            answer = self._edge_tensor(h, x, started_s, deadline_ms)
        except _EdgeFailed as err:
            self._plan_age = (self.refresh_every_n, 0.0, math.nan)  # ask again before the next image
            return self._finish_locally(h, x, started_s, cuts, str(err))
        return self._through_edge(answer, x, started_s)
