"""``/api/v1/admin/link``: read or change the edge -> cloud link at run time (token-protected).

``PUT`` takes ``{"uplink_mbps": R, "rtt_ms": D}`` or ``{"profile": NAME}``
(a profile of ``configs/links.yaml``, read once when the edge started) and
answers the link now in force; ``GET`` answers it too. Both need ``Authorization: Bearer <the edge's
admin token>`` (:mod:`edge_api.auth`). How the link is applied (tc on ``shaping_interface``, or the
emulated link) is :class:`popex.link.control.LinkController`'s job.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify, request
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import BadRequest, UnsupportedMediaType

from edge_api.auth import require_admin
from edge_api.node import get_node
from popex.errors import ConfigError

__all__ = ["bp"]

_MAX_BODY_BYTES = 4096
_LINK_KEYS = {"uplink_mbps", "rtt_ms"}

bp = Blueprint("admin", __name__, url_prefix="/api/v1/admin")


@bp.before_request
def _limit_body() -> None:
    request.max_content_length = _MAX_BODY_BYTES


def _json_object() -> dict[str, Any]:
    if not request.is_json:
        raise UnsupportedMediaType('send JSON: {"uplink_mbps": R, "rtt_ms": D} or {"profile": NAME}')
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise BadRequest('the body must be a JSON object: {"uplink_mbps": R, "rtt_ms": D} or {"profile": NAME}')
    return body


@bp.get("/link")
@require_admin
def get_link() -> ResponseReturnValue:
    """The link in force."""
    return jsonify(get_node().link_controller.current().to_dict())


@bp.put("/link")
@require_admin
def put_link() -> ResponseReturnValue:
    """Put a link (rate and RTT, or a named profile) in force; answer it."""
    body = _json_object()
    keys = set(body)
    if keys == {"profile"}:
        setting = get_node().link_controller.set_profile(body["profile"])
    elif keys == _LINK_KEYS:
        setting = get_node().link_controller.set_link(body["uplink_mbps"], body["rtt_ms"])
    else:
        raise ConfigError(f'expected the keys {{"uplink_mbps", "rtt_ms"}} or {{"profile"}}, got {sorted(keys)}')
    return jsonify(setting.to_dict())
