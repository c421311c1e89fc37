"""Exceptions raised by popex.

Every message is meant for a user: it names the bad value and, where it
helps, what to do. The services map these to DESIGN.md §6 JSON errors, so a
``PopexError`` is always a 4xx, never a 5xx.
"""

__all__ = [
    "PopexError",
    "UnknownModelError",
    "ConflictError",
    "CostError",
    "TooLargeError",
    "BusyError",
    "error_status_and_body",
    "SpecError",
    "WeightsError",
    "CalibrationError",
    "ProfileError",
    "DataError",
    "ConfigError",
    "ExportError",
    "BenchmarkError",
]


class PopexError(Exception):
    """Base class: an error caused by input, reported without a traceback."""

    code = "popex_error"
    http_status = 400


class UnknownModelError(PopexError):
    """No model with this id (or name) is registered here."""

    code = "unknown_model"
    http_status = 404


class ConflictError(PopexError):
    """The request contradicts what is registered (a taken name, other files under a known id)."""

    code = "conflict"
    http_status = 409


class CostError(PopexError):
    """A model would cost more to plan, store or run than the service's caps allow (checked before it runs)."""

    code = "too_costly"


class TooLargeError(PopexError):
    """A body or a model is larger than a cap that is checked after the upload's own limit."""

    code = "too_large"
    http_status = 413


class BusyError(PopexError):
    """The service does this work for one caller at a time and is doing it now; retry shortly."""

    code = "busy"
    http_status = 429


class SpecError(PopexError):
    """A model spec (JSON) is malformed or does not build."""

    code = "bad_spec"


class WeightsError(PopexError):
    """A weights file is not safetensors or does not match its spec."""

    code = "bad_weights"


class CalibrationError(PopexError):
    """A calibration .npz is malformed or does not match its model."""

    code = "bad_calibration"


class ProfileError(PopexError):
    """A latency profile is malformed or does not match its model."""

    code = "bad_profile"


class DataError(PopexError):
    """A dataset file or an image cannot be read."""

    code = "bad_data"


class ConfigError(PopexError):
    """A configuration value is missing or out of range."""

    code = "bad_config"


class ExportError(PopexError):
    """A torch module cannot be exported to ONNX, or its export does not reproduce it."""

    code = "export_error"


class BenchmarkError(PopexError):
    """A multi-tier benchmark file or network file is malformed, or a query cannot be answered from them."""

    code = "bad_benchmark"


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    409: "conflict",
    405: "method_not_allowed",
    408: "request_timeout",
    411: "length_required",
    413: "too_large",
    415: "unsupported_media_type",
    429: "too_many_requests",
}


def error_status_and_body(err: Exception) -> tuple[int, dict] | None:
    """The DESIGN.md §6 answer to an exception, or None for a bug (a 500 the caller logs).

    A PopexError is the client's fault: its ``http_status`` (4xx), ``code`` and
    message. An HTTP exception of the web framework (anything with an integer
    ``code`` >= 400 and a ``description``, e.g. Werkzeug's) keeps its status.
    Kept here, free of Flask, so that both services answer alike.

    >>> error_status_and_body(UnknownModelError("no model 'x'"))
    (404, {'error': {'code': 'unknown_model', 'message': "no model 'x'"}})
    >>> error_status_and_body(ValueError("bug")) is None
    True
    """
    if isinstance(err, PopexError):
        return err.http_status, {"error": {"code": err.code, "message": str(err)}}
    status = getattr(err, "code", None)
    if isinstance(status, int) and 400 <= status < 600 and hasattr(err, "description"):
        code = _HTTP_CODES.get(status, "http_error" if status < 500 else "internal_error")
        message = getattr(err, "description", None) or getattr(err, "name", "error")
        return status, {"error": {"code": code, "message": message}}
    return None
