"""Bearer tokens, checked alike on both services: constant time, every token compared, a 401 that says how.

``Authorization: Bearer <token>`` is the only form taken. Every candidate
token is compared with :func:`hmac.compare_digest` and none is skipped, so
the time taken tells neither how much of a guess was right nor which token
it came close to.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from flask import request
from werkzeug.datastructures import WWWAuthenticate
from werkzeug.exceptions import Unauthorized

__all__ = ["bearer_matches", "check_bearer"]

_BEARER = "bearer "


def _unauthorized(message: str, realm: str) -> Unauthorized:
    return Unauthorized(message, www_authenticate=WWWAuthenticate("Bearer", {"realm": realm}))


def bearer_matches(header: str, tokens: Iterable[str]) -> bool:
    """Whether an ``Authorization`` header value carries one of ``tokens`` (all compared, constant time each).

    Parameters
    ----------
    header : str
        The header's value ("" when absent).
    tokens : iterable of str
        The accepted tokens.

    Returns
    -------
    bool

    Examples
    --------
    >>> bearer_matches("Bearer s3cret-token", ["other-token", "s3cret-token"])
    True
    >>> bearer_matches("Basic s3cret-token", ["s3cret-token"])
    False
    """
    if header[:len(_BEARER)].lower() != _BEARER:
        return False
    provided = header[len(_BEARER):].strip().encode()
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(provided, token.encode())
    return matched


def check_bearer(tokens: Iterable[str], *, realm: str) -> None:
    """Raise a 401 (with ``WWW-Authenticate: Bearer``) unless the current request carries one of ``tokens``.

    Only the header is read: the body of a refused request is never touched.

    Raises
    ------
    Unauthorized
        Missing header, another scheme, or a wrong token.
    """
    header = request.headers.get("Authorization", "")
    if header[:len(_BEARER)].lower() != _BEARER:
        raise _unauthorized("missing token: send the header 'Authorization: Bearer <token>'", realm)
    if not bearer_matches(header, tokens):
        raise _unauthorized("wrong token", realm)
