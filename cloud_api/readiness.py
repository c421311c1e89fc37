"""``GET /readyz`` of the cloud: ready once its runner has loaded the stored models (no token needed)."""

from __future__ import annotations

from flask import Flask, current_app, jsonify
from flask.typing import ResponseReturnValue

from cloud_api.routes import RUNNER_KEY

__all__ = ["init_readiness"]


def readyz() -> ResponseReturnValue:
    """Readiness: 200 once the stored models are loaded, else 503."""
    runner = current_app.extensions.get(RUNNER_KEY)
    if runner is None:
        return jsonify({"ready": False, "n_models": 0}), 503
    return jsonify({"ready": True, "n_models": runner.n_models}), 200


def init_readiness(app: Flask) -> None:
    """Register ``GET /readyz``."""
    app.add_url_rule("/readyz", "readyz", readyz, methods=["GET"])
