"""Logging for both services: one handler on the root logger, text or JSON lines, and refused requests logged.

:func:`init_logging` is called by each app factory with the config's
``log_level`` and ``log_format``. It installs (or replaces) one stream
handler of its own on the root logger, so the code's ``logging.getLogger``
lines appear under gunicorn and in tests alike, and a second app built in
the same process does not add a second handler. Nothing logged here carries
a payload, a header or a token: a refused request is logged by method,
route and status only.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

from flask import Flask, Response, request

__all__ = ["LOG_FORMATS", "LOG_LEVELS", "JsonLineFormatter", "init_logging", "init_request_logging"]

LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_HANDLER_NAME = "popex"
_MAX_PATH_CHARS = 120

log = logging.getLogger(__name__)


class JsonLineFormatter(logging.Formatter):
    """One JSON object per record: ``ts`` (UTC ISO 8601), ``level``, ``logger``, ``message`` (+ ``exc``)."""

    def format(self, record: logging.LogRecord) -> str:
        """See :meth:`logging.Formatter.format`."""
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def init_logging(*, level: str, log_format: str, stream: TextIO | None = None) -> logging.Handler:
    """Configure the root logger: one ``popex`` stream handler at ``level`` in ``log_format``.

    Parameters
    ----------
    level : {"DEBUG", "INFO", "WARNING", "ERROR"}
    log_format : {"text", "json"}
        Plain lines, or one JSON object per line (:class:`JsonLineFormatter`).
    stream : file, optional
        Default ``sys.stderr`` (where gunicorn's own log goes).

    Returns
    -------
    logging.Handler
        The handler installed (a previous ``popex`` handler is removed).
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler.get_name() == _HANDLER_NAME:
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JsonLineFormatter() if log_format == "json" else logging.Formatter(_TEXT_FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    return handler


def _route() -> str:
    """The matched route pattern (no ids, no query), else the path, cut short."""
    rule = request.url_rule
    return rule.rule if rule is not None else request.path[:_MAX_PATH_CHARS]


def _log_refused(response: Response) -> Response:
    if 400 <= response.status_code < 500:
        code = None
        if response.is_json:
            body = response.get_json(silent=True)
            error = body.get("error") if isinstance(body, dict) else None
            code = error.get("code") if isinstance(error, dict) else None
        log.info("refused %s %s: %d %s", request.method, _route(), response.status_code, code or "")
    return response


def init_request_logging(app: Flask) -> None:
    """Log one line per refused request (4xx): method, route pattern, status, error code; never the body."""
    app.after_request(_log_refused)
