"""Who may do what on the edge: the admin token for every write, an optional client token for reads.

- **Writes** (``POST`` and ``DELETE /api/v1/models``, ``/api/v1/admin/*``)
  need ``Authorization: Bearer <admin_token>`` (``POPEX_ADMIN_TOKEN``). The
  edge refuses to start without one unless ``allow_open_writes: true``
  says, on purpose, that anyone who reaches the port may write
  (:func:`check_write_access`, called by ``edge_api.create_app``).
- **Reads** (classify, ``/api/v1/status``, the models' views, strategies,
  recent requests) are open unless ``client_token`` is set; then they need
  that token or the admin token.
- ``/healthz``, ``/readyz``, ``/metrics`` and the API description stay open:
  probes and scrapers carry no secret.

The admin token is never the token the edge shares with the cloud: a holder
of that one (the cloud) must not administer the edge.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

from flask import request

from api_common.auth import bearer_matches, check_bearer
from edge_api.node import get_node
from popex.errors import ConfigError

__all__ = ["check_write_access", "is_admin_request", "require_admin", "require_client"]

F = TypeVar("F", bound=Callable[..., Any])
_ADMIN_REALM = "popex-edge-admin"
_CLIENT_REALM = "popex-edge"


def check_write_access(config: Any) -> None:
    """Refuse a config whose writes would be open by accident.

    Parameters
    ----------
    config : EdgeConfig

    Raises
    ------
    ConfigError
        If there is no admin token and ``allow_open_writes`` is false, or if
        the admin or the client token is the one shared with the cloud.
    """
    if config.admin_token is None and not config.allow_open_writes:
        raise ConfigError("the edge refuses to start with open writes: set POPEX_ADMIN_TOKEN (admin_token) to a "
                          "secret of its own, which POST/DELETE /api/v1/models and /api/v1/admin/* then require, "
                          "or set allow_open_writes: true to let anyone who reaches the port register models")
    for name in ("admin_token", "client_token", "device_token"):
        if getattr(config, name) is not None and getattr(config, name) == config.token:
            raise ConfigError(f"{name} must differ from the token shared with the cloud (POPEX_TOKEN)")


def is_admin_request() -> bool:
    """Whether the current request carries the admin token (False when the edge has none)."""
    admin_token = get_node().config.admin_token
    return admin_token is not None and bearer_matches(request.headers.get("Authorization", ""), (admin_token,))


def require_admin(view: F) -> F:
    """A 401 unless the request carries the admin token (open only under ``allow_open_writes`` without one)."""

    @functools.wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        admin_token = get_node().config.admin_token
        if admin_token is not None:
            check_bearer((admin_token,), realm=_ADMIN_REALM)
        return view(*args, **kwargs)

    return wrapped  # type: ignore[return-value]


def require_client(view: F) -> F:
    """A 401 unless the request carries the client or the admin token, when the edge has a client token."""

    @functools.wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        config = get_node().config
        if config.client_token is not None:
            check_bearer(tuple(t for t in (config.client_token, config.admin_token) if t is not None),
                         realm=_CLIENT_REALM)
        return view(*args, **kwargs)

    return wrapped  # type: ignore[return-value]
