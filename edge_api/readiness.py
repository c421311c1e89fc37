"""``GET /readyz``: whether the edge can serve as configured (``/healthz`` stays plain liveness).

Ready when the default model (if the config names one) is prepared and the
cloud answers its health check. Not ready is a 503 with the same body, so a
load balancer or an orchestrator's readiness probe needs only the status.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, jsonify
from flask.typing import ResponseReturnValue

from edge_api.node import get_node
from popex.edge.cloud_port import CloudError
from popex.errors import PopexError

__all__ = ["readiness", "init_readiness"]

_HEALTH_TIMEOUT_S = 1.0


def _default_model(node: Any) -> dict[str, Any]:
    if node.config.default_model_dir is None:
        return {"ok": True, "state": None}
    model_id = node.runner.default_model_id
    if model_id is None:
        return {"ok": False, "state": "missing"}
    try:
        state = node.registry.get(model_id).state
    except PopexError:
        return {"ok": False, "state": "missing"}
    return {"ok": state == "ready", "state": state, "model_id": model_id}


def _cloud(node: Any) -> dict[str, Any]:
    try:
        healthy = bool(node.client.health(timeout_s=_HEALTH_TIMEOUT_S))
    except CloudError:
        healthy = False
    return {"ok": healthy, "url": node.config.cloud_url}


def readiness(node: Any) -> dict[str, Any]:
    """The readiness checks of an edge node: ``ready`` and each check with its ``ok``."""
    checks = {"default_model": _default_model(node), "cloud": _cloud(node)}
    return {"ready": all(check["ok"] for check in checks.values()), "checks": checks}


def readyz() -> ResponseReturnValue:
    """Readiness: 200 when the default model is prepared and the cloud is reachable, else 503."""
    body = readiness(get_node())
    return jsonify(body), 200 if body["ready"] else 503


def init_readiness(app: Flask) -> None:
    """Register ``GET /readyz``."""
    app.add_url_rule("/readyz", "readyz", readyz, methods=["GET"])
