"""``GET /api/v1/status`` and ``GET /healthz``."""

from __future__ import annotations

from flask import Blueprint, Flask, jsonify
from flask.typing import ResponseReturnValue

from edge_api.auth import require_client
from edge_api.node import get_node

__all__ = ["bp", "init_status"]

bp = Blueprint("status", __name__, url_prefix="/api/v1")


@bp.get("/status")
@require_client
def status() -> ResponseReturnValue:
    """Uplink estimate, cloud health, models, their current strategies and how far their predictions are off."""
    node = get_node()
    body = node.views.status()
    for model in body["models"]:
        model["edge_fixed_ms"] = node.planner.edge_fixed_ms(model["model_id"])
        model["prediction_error"] = node.planner.prediction_errors.summary(model["model_id"])
    return jsonify(body)


def healthz() -> ResponseReturnValue:
    """Liveness of the edge itself (the cloud's health is in /api/v1/status)."""
    return jsonify({"status": "ok", "n_models": len(get_node().registry)})


def init_status(app: Flask) -> None:
    """Register the status blueprint and ``/healthz``."""
    app.register_blueprint(bp)
    app.add_url_rule("/healthz", "healthz", healthz, methods=["GET"])
