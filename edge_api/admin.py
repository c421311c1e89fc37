"""``/api/v1/admin/link``: read or change the edge -> cloud link at run time (token-protected).

``PUT`` takes ``{"uplink_mbps": R, "rtt_ms": D}`` or ``{"profile": NAME}``
(a profile of ``configs/links.yaml``, read once when the edge started) and
answers the link now in force; ``GET`` answers it too. Both need ``Authorization: Bearer <the edge's
token>``. How the link is applied (tc on ``shaping_interface``, or the
emulated link) is :class:`popex.link.control.LinkController`'s job.
"""

from __future__ import annotations

import functools
import hmac
from typing import Any, Callable, TypeVar

from flask import Blueprint, jsonify, request
from flask.typing import ResponseReturnValue
from werkzeug.datastructures import WWWAuthenticate
from werkzeug.exceptions import BadRequest, Unauthorized, UnsupportedMediaType

from edge_api.node import get_node
from popex.errors import ConfigError

__all__ = ["bp", "require_admin_token"]

_MAX_BODY_BYTES = 4096
_BEARER = "bearer "
_LINK_KEYS = {"uplink_mbps", "rtt_ms"}
F = TypeVar("F", bound=Callable[..., Any])

bp = Blueprint("admin", __name__, url_prefix="/api/v1/admin")


def _unauthorized(message: str) -> Unauthorized:
    return Unauthorized(message, www_authenticate=WWWAuthenticate("Bearer", {"realm": "popex-edge-admin"}))


def require_admin_token(view: F) -> F:
    """Reject the request with a 401 unless it carries the edge's token (compared in constant time)."""

    @functools.wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        header = request.headers.get("Authorization", "")
        if header[:len(_BEARER)].lower() != _BEARER:
            raise _unauthorized("missing token: send the header 'Authorization: Bearer <token>'")
        provided = header[len(_BEARER):].strip().encode()
        expected = get_node().config.token.encode()
        if not hmac.compare_digest(provided, expected):
            raise _unauthorized("wrong token")
        return view(*args, **kwargs)

    return wrapped  # type: ignore[return-value]


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
@require_admin_token
def get_link() -> ResponseReturnValue:
    """The link in force."""
    return jsonify(get_node().link_controller.current().to_dict())


@bp.put("/link")
@require_admin_token
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
