"""``/api/v1/admin/rate-limit``: per request-stream offload buckets (admin token).

``PUT`` with ``{"stream": ID, "offload_rate_per_s": R, "offload_bucket_depth": B, "offload_policy":
"mdp"|"baseline"}`` puts a full bucket on the stream (replacing its old one); requests that carry the id
(``?stream=ID`` or ``X-Popex-Stream: ID`` on ``/api/v1/classify``) consult it instead of the edge's bucket.
``DELETE ?stream=ID`` removes it; ``GET`` answers the ``rate_limit`` block of the status. The buckets and
their threads are :class:`popex.ratelimit.streams.StreamLimiters`.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify, request
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import BadRequest, NotFound, UnsupportedMediaType

from edge_api.auth import require_admin
from edge_api.node import get_node
from popex.errors import ConfigError
from popex.ratelimit.streams import StreamLimiters

__all__ = ["OPERATIONS", "bp"]

bp = Blueprint("rate_limit_admin", __name__, url_prefix="/api/v1/admin")
_KEYS = {"stream", "offload_rate_per_s", "offload_bucket_depth", "offload_policy"}
_MAX_BODY_BYTES = 4096
_BEARER = [{"bearer": []}]
_BLOCK = {"200": {"description": "The rate_limit block (edge's keys, and streams: id -> block)",
                  "content": {"application/json": {"schema": {"type": "object"}}}}}
#: This module's entries of the OpenAPI document (edge_api.openapi_doc).
OPERATIONS = {
    ("rate_limit_admin.put_rate_limit", "PUT"): {
        "security": _BEARER,
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": ["stream", "offload_rate_per_s"],
            "properties": {"stream": {"type": "string", "maxLength": 64},
                           "offload_rate_per_s": {"type": "number", "minimum": 0, "exclusiveMinimum": True},
                           "offload_bucket_depth": {"type": "number", "minimum": 1},
                           "offload_policy": {"type": "string", "enum": ["mdp", "baseline"]}}}}}},
        "responses": _BLOCK},
    ("rate_limit_admin.delete_rate_limit", "DELETE"): {
        "security": _BEARER,
        "parameters": [{"name": "stream", "in": "query", "required": True, "schema": {"type": "string"}}],
        "responses": {"200": {"description": "Removed", "content": {"application/json": {
            "schema": {"type": "object"}}}}}},
    ("rate_limit_admin.get_rate_limit", "GET"): {"security": _BEARER, "responses": _BLOCK},
}


def _limiters() -> StreamLimiters:
    """The runner's StreamLimiters, wrapping the edge's own bucket (if any) on the first stream put."""
    runner = get_node().runner
    if not isinstance(runner.rate_limiter, StreamLimiters):
        runner.rate_limiter = StreamLimiters(runner.rate_limiter)  # one reference swap: requests see old or new
    return runner.rate_limiter


@bp.put("/rate-limit")
@require_admin
def put_rate_limit() -> ResponseReturnValue:
    """Put a bucket on a stream; answer its status block."""
    request.max_content_length = _MAX_BODY_BYTES
    if not request.is_json:
        raise UnsupportedMediaType('send JSON: {"stream": ID, "offload_rate_per_s": R, "offload_bucket_depth": B}')
    body: Any = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise BadRequest('the body must be a JSON object: {"stream": ID, "offload_rate_per_s": R, '
                         '"offload_bucket_depth": B, "offload_policy": "mdp"}')
    unknown = set(body) - _KEYS
    missing = {"stream", "offload_rate_per_s"} - set(body)
    if unknown or missing:
        raise ConfigError(f"keys {sorted(_KEYS)} (stream and offload_rate_per_s required); unknown "
                          f"{sorted(unknown)}, missing {sorted(missing)}")
    for key in ("offload_rate_per_s", "offload_bucket_depth"):
        if key in body and (isinstance(body[key], bool) or not isinstance(body[key], (int, float))):
            raise ConfigError(f"{key} must be a number, got {body[key]!r}")
    limiter = _limiters().put(body["stream"], rate_per_s=body["offload_rate_per_s"],
                              depth=body.get("offload_bucket_depth", 10.0),
                              policy=body.get("offload_policy", "mdp"))
    return jsonify({"stream": body["stream"], **limiter.status()})


@bp.delete("/rate-limit")
@require_admin
def delete_rate_limit() -> ResponseReturnValue:
    """Remove a stream's bucket."""
    stream = request.args.get("stream")
    if stream is None:
        raise BadRequest("name the stream: DELETE /api/v1/admin/rate-limit?stream=ID")
    if not _limiters().delete(stream):
        raise NotFound(f"stream {stream!r} has no bucket")
    return jsonify({"stream": stream, "deleted": True})


@bp.get("/rate-limit")
@require_admin
def get_rate_limit() -> ResponseReturnValue:
    """The edge's bucket and every stream's (a read: wraps nothing)."""
    limiter = get_node().runner.rate_limiter
    if isinstance(limiter, StreamLimiters):
        return jsonify(limiter.status())
    return jsonify({**({} if limiter is None else limiter.status()), "streams": {}})
