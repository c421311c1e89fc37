"""The three-tier routes a device calls, all behind the device token (``device_token``, POPEX_DEVICE_TOKEN).

- ``GET /api/v1/plan?model=&deadline_ms=&objective=&policy=&x=&y=``: the
  device's part of the plan (:class:`popex.edge.three_tier_plan.DevicePlan`);
- ``POST /api/v1/device/report``: the device's timings and link samples
  (:func:`popex.edge.device_link.parse_device_report`);
- ``POST /api/v1/device/probe``: reads and drops the body, says how long the
  edge took, so the device can time its uploads;
- ``POST /api/v1/classify/tensor?deadline_ms=&objective=&policy=&y=``: a wire
  payload at the device's cut (:func:`popex.edge.tensor_run.classify_tensor`);
  the answer carries ``cuts`` and ``server_ms`` (the edge's time after the
  body was read: the device's round trip less it is its upload's time).

An edge without a device token answers 403 on all four: a tensor route open
to anyone would let any host run the edge's stages.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, TypeVar

from flask import Blueprint, g, jsonify, request
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import BadRequest, Forbidden

from api_common.auth import check_bearer
from edge_api.node import get_node
from edge_api.telemetry import CLASSIFICATION_KEY
from popex.checks import check_deadline_ms, check_int
from popex.edge.device_link import MAX_REPORT_BYTES, parse_device_report
from popex.edge.tensor_run import classify_tensor
from popex.edge.three_tier_plan import DEFAULT_THREE_TIER_POLICY
from popex.errors import ConfigError

__all__ = ["OPERATIONS", "bp"]

F = TypeVar("F", bound=Callable[..., Any])
_REALM = "popex-device"
_CHUNK_BYTES = 256 * 1024
_MAX_PROBE_BYTES = 16 * 2**20
_MAX_CUT = 10_000  # a tensor's pinned y before its model is known; the planner checks it against N

_JSON = {"description": "JSON (edge_api.device; docs/tiers.md)", "content": {"application/json": {
    "schema": {"type": "object"}}}}
_QUERY = [{"name": name, "in": "query", "required": False, "schema": {"type": kind}}
          for name, kind in (("model", "string"), ("deadline_ms", "number"), ("objective", "string"),
                             ("policy", "string"))]
#: The OpenAPI entries of these routes (merged into the service's document).
OPERATIONS = {
    ("device.plan", "GET"): {"parameters": [*_QUERY, *({"name": n, "in": "query", "required": False,
                                                      "schema": {"type": "integer"}} for n in ("x", "y"))],
                             "responses": {"200": _JSON}},
    ("device.device_report", "POST"): {"responses": {"200": _JSON}},
    ("device.device_probe", "POST"): {"responses": {"200": _JSON}},
    ("device.classify_device_tensor", "POST"): {"parameters": [*_QUERY[1:], {"name": "y", "in": "query", "required": False,
                                                                          "schema": {"type": "integer"}}],
                                                 "responses": {"200": _JSON}},
}

bp = Blueprint("device", __name__, url_prefix="/api/v1")


def require_device(view: F) -> F:
    """A 403 when the edge has no device token, a 401 unless the request carries it."""

    @functools.wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        token = get_node().config.device_token
        if token is None:
            raise Forbidden("the three-tier device routes are off on this edge: set device_token "
                            "(POPEX_DEVICE_TOKEN) and give the devices that token")
        check_bearer((token,), realm=_REALM)
        return view(*args, **kwargs)

    return wrapped  # type: ignore[return-value]


def _number(name: str, check: Callable[[str], Any]) -> Any:
    raw = request.args.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        return check(raw)
    except ConfigError as err:
        raise BadRequest(f"{name}: {err}") from err


def _cut(raw: str, name: str, n_stages: int) -> int:
    if not raw.strip().isdigit():
        raise ConfigError(f"must be an int in 0..{n_stages}, got {raw[:20]!r}")
    return check_int(int(raw), name=name, low=0, high=n_stages)


@bp.before_request
def _mark_arrival() -> None:
    g.arrival_s = time.perf_counter()  # the budget counts from here


@bp.get("/plan")
@require_device
def plan() -> ResponseReturnValue:
    """The device's part of the three-tier plan for a requirement: cuts x, y and every branch's threshold."""
    node = get_node()
    runner = node.runner
    model = runner.resolve_model(request.args.get("model"))
    deadline_ms = _number("deadline_ms", check_deadline_ms)
    n_stages = model.loaded.net.n_stages
    decided = node.device_planner.plan(
        model, runner.plan_of(model), deadline_ms=runner.default_deadline_ms if deadline_ms is None else deadline_ms,
        objective=request.args.get("objective") or runner.objective,
        policy=request.args.get("policy") or DEFAULT_THREE_TIER_POLICY,
        x=_number("x", lambda raw: _cut(raw, "x", n_stages)), y=_number("y", lambda raw: _cut(raw, "y", n_stages)))
    return jsonify(decided.to_dict())


@bp.post("/device/report")
@require_device
def device_report() -> ResponseReturnValue:
    """Take a device's stage times and link samples (JSON); the next plans use them."""
    node = get_node()
    request.max_content_length = MAX_REPORT_BYTES
    report = parse_device_report(request.get_data(cache=False), model_of=node.runner.resolve_model)
    n_rates = node.device_planner.devices.add(report)
    link = node.device_planner.devices.link()
    return jsonify({"model_id": report.model_id, "n_rate_samples": n_rates,
                    "device_edge": {"uplink_mbps": link.uplink_mbps, "rtt_ms": link.rtt_ms}})


@bp.post("/device/probe")
@require_device
def device_probe() -> ResponseReturnValue:
    """Read and drop the body; its size and the edge's time reading it."""
    request.max_content_length = _MAX_PROBE_BYTES
    started_s = time.perf_counter()
    n_bytes = 0
    while chunk := request.stream.read(_CHUNK_BYTES):
        n_bytes += len(chunk)
    return jsonify({"n_bytes": n_bytes, "server_ms": (time.perf_counter() - started_s) * 1000.0})


@bp.post("/classify/tensor")
@require_device
def classify_device_tensor() -> ResponseReturnValue:
    """Finish a device's inference from its tensor at cut x (wire payload): the edge's stages, then the cloud's."""
    node = get_node()
    request.max_content_length = node.config.max_image_bytes
    body = request.get_data(cache=False)
    read_s = time.perf_counter()
    if not body:
        raise BadRequest("empty body: send the tensor as a popex wire payload (safetensors)")
    answer = classify_tensor(node.runner, node.device_planner, body,
                             content_encoding=request.headers.get("Content-Encoding"),
                             deadline_ms=_number("deadline_ms", check_deadline_ms),
                             objective=request.args.get("objective") or None, arrival_s=g.arrival_s,
                             policy=request.args.get("policy") or DEFAULT_THREE_TIER_POLICY,
                             max_bytes=node.config.max_image_bytes,
                             y=_number("y", lambda raw: _cut(raw, "y", _MAX_CUT)))
    setattr(g, CLASSIFICATION_KEY, answer.classification)  # counted and logged like an image's
    return jsonify({**answer.to_dict(), "server_ms": (time.perf_counter() - read_s) * 1000.0})
