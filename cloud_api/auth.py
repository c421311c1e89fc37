"""Shared-token check: every API route requires ``Authorization: Bearer <token>``."""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

from flask import current_app

from api_common.auth import check_bearer

__all__ = ["CONFIG_KEY", "require_token"]

CONFIG_KEY = "popex_cloud_config"  # app.extensions key of the CloudConfig
F = TypeVar("F", bound=Callable[..., Any])


def require_token(view: F) -> F:
    """Reject the request with a 401 unless it carries the cloud's token (:func:`api_common.auth.check_bearer`:
    constant time, before the body is read)."""

    @functools.wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        check_bearer((current_app.extensions[CONFIG_KEY].token,), realm="popex-cloud")
        return view(*args, **kwargs)

    return wrapped  # type: ignore[return-value]
