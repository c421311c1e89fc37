"""``GET /``: the edge's dashboard, one static page whose script polls the JSON API (no CDN, no build step).

The page and its script live in ``edge_api/static/`` (Flask serves the
folder at ``/static/``); the script reads ``/api/v1/status`` and
``/api/v1/requests`` every two seconds and draws the uplink estimate and RTT
over time, each model's current strategy, and recent requests' latency
against their requirement.
"""

from __future__ import annotations

from flask import Blueprint, current_app, send_from_directory
from flask.typing import ResponseReturnValue

__all__ = ["bp"]

bp = Blueprint("dashboard", __name__)


@bp.get("/")
def index() -> ResponseReturnValue:
    """The dashboard (HTML; its data comes from the JSON API)."""
    response = send_from_directory(current_app.static_folder or "static", "dashboard.html", max_age=0)
    response.headers["Content-Security-Policy"] = "default-src 'self'; img-src 'self' data:"
    return response
