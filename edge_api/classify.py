"""``POST /api/v1/classify``: one image in, one answer out."""

from __future__ import annotations

import time

from flask import Blueprint, g, jsonify, request
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import BadRequest, UnsupportedMediaType

from edge_api.auth import require_client
from edge_api.node import get_node
from edge_api.telemetry import CLASSIFICATION_KEY
from popex.checks import MAX_DEADLINE_MS, check_deadline_ms
from popex.errors import ConfigError, DataError
from popex.ratelimit.streams import request_stream

__all__ = ["bp"]

_FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
_BOOLEANS = {"true": True, "1": True, "false": False, "0": False}

bp = Blueprint("classify", __name__, url_prefix="/api/v1")


@bp.before_request
def _mark_arrival() -> None:
    # The request's budget counts from here, before its body is read.
    g.arrival_s = time.perf_counter()
    request.max_content_length = get_node().config.max_image_bytes


def _parameter(name: str) -> str | None:
    """A form field, else the query string; None when absent."""
    value = request.form.get(name) if request.mimetype in _FORM_TYPES else None
    return request.args.get(name) if value is None else value


def _deadline_ms() -> float | None:
    raw = _parameter("deadline_ms")
    if raw is None or raw.strip() == "":
        return None
    try:
        return check_deadline_ms(raw)
    except ConfigError as err:
        raise BadRequest(f"deadline_ms must be a finite number of milliseconds in [0, {MAX_DEADLINE_MS:g}], "
                         f"got {raw[:40]!r}") from err


def _distortion_aware() -> bool | None:
    raw = _parameter("distortion_aware")
    if raw is None or raw.strip() == "":
        return None
    value = _BOOLEANS.get(raw.strip().lower())
    if value is None:
        raise BadRequest(f"distortion_aware must be true, false, 1 or 0, got {raw[:40]!r}")
    return value


def _image_bytes() -> bytes:
    mimetype = request.mimetype
    if mimetype == "multipart/form-data":
        file = request.files.get("image")
        if file is None:
            raise BadRequest("multipart field 'image' is missing: send the picture as the file 'image'")
        data = file.read()
    elif mimetype == "application/json" or mimetype.endswith("+json"):
        raise UnsupportedMediaType("send an image (PNG, JPEG or BMP) as the body or as the multipart file "
                                   "'image', not JSON")
    elif mimetype == "application/x-www-form-urlencoded":
        raise UnsupportedMediaType("send the image as the multipart file 'image' or as the raw body")
    else:
        data = request.get_data(cache=False)
    if not data:
        raise DataError("empty image: 0 bytes received")
    return data


@bp.post("/classify")
@require_client
def classify() -> ResponseReturnValue:
    """Classify an image (multipart file 'image' or raw body) under deadline_ms, policy, distortion_aware."""
    image_bytes = _image_bytes()
    with request_stream(request.headers.get("X-Popex-Stream") or _parameter("stream")):  # per-stream buckets
        result = get_node().runner.classify(
            image_bytes, model_id=_parameter("model"), deadline_ms=_deadline_ms(),
            policy=_parameter("policy") or "adaptive", arrival_s=g.arrival_s,
            distortion_aware=_distortion_aware(),
        )
    setattr(g, CLASSIFICATION_KEY, result)  # counted and logged by edge_api.telemetry after the response
    return jsonify(result.to_dict())
