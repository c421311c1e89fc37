"""One error handler for the cloud app: every failure becomes DESIGN.md §6 JSON.

A :class:`~popex.errors.PopexError` is the client's fault (4xx, its ``code``
and message as they are); a Werkzeug ``HTTPException`` keeps its status; any
other exception is a bug: logged with its traceback, answered with a 500
that reveals nothing.
"""

from __future__ import annotations

import logging

from flask import Flask, jsonify
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import HTTPException

from popex.errors import PopexError
from popex.runtime.cloud_runner import UnknownModelError

__all__ = ["error_response", "init_errors"]

log = logging.getLogger(__name__)

_STATUS_OF = {UnknownModelError: 404}  # every other PopexError is a 400
_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    411: "length_required",
    413: "too_large",
    415: "unsupported_media_type",
    429: "too_many_requests",
}


def error_response(status: int, code: str, message: str) -> ResponseReturnValue:
    """The §6 JSON error body with its status."""
    return jsonify({"error": {"code": code, "message": message}}), status


def _handle(err: Exception) -> ResponseReturnValue:
    if isinstance(err, PopexError):
        status = next((s for cls, s in _STATUS_OF.items() if isinstance(err, cls)), 400)
        return error_response(status, err.code, str(err))
    if isinstance(err, HTTPException):
        if err.code is None or err.code < 400:  # routing redirects (308) are not errors
            return err
        code = _HTTP_CODES.get(err.code, "http_error" if err.code < 500 else "internal_error")
        body, status = error_response(err.code, code, err.description or err.name)
        headers = {key: value for key, value in err.get_headers() if key.lower() != "content-type"}
        return body, status, headers
    log.exception("unexpected error while handling a request")
    return error_response(500, "internal_error", "internal error (a bug in the cloud service); see its log")


def init_errors(app: Flask) -> None:
    """Register the one handler for every exception raised by a view."""
    app.register_error_handler(Exception, _handle)
