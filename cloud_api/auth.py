"""Shared-token check: every API route requires ``Authorization: Bearer <token>``."""

from __future__ import annotations

import functools
import hmac
from typing import Any, Callable, TypeVar

from flask import current_app, request
from werkzeug.datastructures import WWWAuthenticate
from werkzeug.exceptions import Unauthorized

__all__ = ["CONFIG_KEY", "require_token"]

CONFIG_KEY = "popex_cloud_config"  # app.extensions key of the CloudConfig
F = TypeVar("F", bound=Callable[..., Any])
_BEARER = "bearer "


def _unauthorized(message: str) -> Unauthorized:
    return Unauthorized(message, www_authenticate=WWWAuthenticate("Bearer", {"realm": "popex-cloud"}))


def require_token(view: F) -> F:
    """Reject the request with a 401 unless it carries the cloud's token.

    Compared with ``hmac.compare_digest``, so the time taken does not tell
    how much of a guess was right.
    """

    @functools.wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        header = request.headers.get("Authorization", "")
        if header[:len(_BEARER)].lower() != _BEARER:
            raise _unauthorized("missing token: send the header 'Authorization: Bearer <token>'")
        provided = header[len(_BEARER):].strip().encode()
        expected = current_app.extensions[CONFIG_KEY].token.encode()
        if not hmac.compare_digest(provided, expected):
            raise _unauthorized("wrong token")
        return view(*args, **kwargs)

    return wrapped  # type: ignore[return-value]
