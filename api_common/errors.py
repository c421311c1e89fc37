"""One error handler for both apps: every failure becomes DESIGN.md §6 JSON.

The mapping itself is :func:`popex.errors.error_status_and_body`, shared with
the other service; anything it does not know is a bug: logged with its
traceback, answered with a 500 that reveals nothing. ``RecursionError`` and
``MemoryError`` are the input's fault wherever they escape a check: 400 and
413, never a 500.
"""

from __future__ import annotations

import functools
import logging

from flask import Flask, jsonify
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import HTTPException

from popex.errors import error_status_and_body

__all__ = ["error_response", "init_errors"]

log = logging.getLogger(__name__)


def error_response(status: int, code: str, message: str) -> ResponseReturnValue:
    """The §6 JSON error body with its status."""
    return jsonify({"error": {"code": code, "message": message}}), status


def _handle(err: Exception, *, service_name: str) -> ResponseReturnValue:
    if isinstance(err, HTTPException) and (err.code is None or err.code < 400):
        return err  # routing redirects (308) are not errors
    if isinstance(err, RecursionError):  # input nested past what a parser or a check could walk
        return error_response(400, "too_deep", "the input nests too deeply to be processed")
    if isinstance(err, TimeoutError):  # the client stalled mid-body (api_common.gunicorn_worker's read timeout)
        return error_response(408, "request_timeout", "the request body did not arrive in time")
    if isinstance(err, MemoryError):  # input that declares more than this service holds for one request
        log.warning("refused a request that needed more memory than available")
        return error_response(413, "too_large", "the input needs more memory than this service gives a request")
    answer = error_status_and_body(err)
    if answer is None:
        log.exception("unexpected error while handling a request")
        return error_response(500, "internal_error", f"internal error (a bug in the {service_name} service); "
                                                     "see its log")
    status, body = answer
    headers = {}
    if isinstance(err, HTTPException):  # e.g. Allow on a 405, WWW-Authenticate on a 401
        headers = {key: value for key, value in err.get_headers() if key.lower() != "content-type"}
    return jsonify(body), status, headers


def init_errors(app: Flask, *, service_name: str) -> None:
    """Register the one handler for every exception raised by a view; ``service_name`` names the app in a 500."""
    app.register_error_handler(Exception, functools.partial(_handle, service_name=service_name))
