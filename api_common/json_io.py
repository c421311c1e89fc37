"""The JSON both apps read and write: untrusted bodies parsed with bounds, no NaN ever written.

Every ``request.get_json()`` goes through :func:`popex.untrusted.loads_json`
(size and nesting depth bounded, NaN and Infinity refused), so a body of ten
thousand ``[`` is a 400, not a ``RecursionError``. Answers are written with
``allow_nan=False``: a non-finite number that reached a view is a bug, and
it surfaces as one (logged, a 500) instead of as ``NaN`` in a body that no
JSON parser accepts.
"""

from __future__ import annotations

from typing import Any

from flask import Flask
from flask.json.provider import DefaultJSONProvider

from popex.untrusted import MAX_DOCUMENT_BYTES, loads_json

__all__ = ["BoundedJSONProvider", "init_json"]


class BoundedJSONProvider(DefaultJSONProvider):
    """Flask's JSON with bounded parsing and strict writing; keys in the order the views build them."""

    sort_keys = False

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        """Parse a request body (:func:`popex.untrusted.loads_json`; a ``DataError``, i.e. a 400, if refused)."""
        return loads_json(s, name="the JSON body", max_bytes=MAX_DOCUMENT_BYTES)

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        """Write an answer; a NaN or an infinity in it raises ValueError."""
        kwargs.setdefault("allow_nan", False)
        return super().dumps(obj, **kwargs)


def init_json(app: Flask) -> None:
    """Make ``app`` read and write JSON with :class:`BoundedJSONProvider`."""
    app.json = BoundedJSONProvider(app)
