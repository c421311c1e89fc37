"""``GET /api/v1/models/<id>/benchmark``: the cloud's stage times of a model, measured now, as ``popex-benchmark/1``."""

from __future__ import annotations

import math
import os

from flask import Blueprint, current_app, jsonify, request
from flask.typing import ResponseReturnValue

from cloud_api.auth import CONFIG_KEY, require_token
from cloud_api.routes import get_runner
from popex.tiers.service_benchmark import tier_benchmark

__all__ = ["OPERATIONS", "bp"]


#: The OpenAPI entry of this route (merged into the service's document).
OPERATIONS = {("cloud_benchmark.model_benchmark", "GET"): {"security": [{"bearer": []}],
    "parameters": [{"name": "system", "in": "query", "required": False, "schema": {"type": "string"},
                    "description": "this system's name in the benchmark (default: the host name)"}],
    "responses": {"200": {"description": "popex-benchmark/1 (docs/tiers.md)", "content": {"application/json": {
        "schema": {"type": "object", "required": ["format", "tier", "system", "models"],
                   "properties": {"format": {"type": "string", "enum": ["popex-benchmark/1"]},
                                  "tier": {"type": "string"}, "system": {"type": "string"},
                                  "models": {"type": "object"}}}}}}}}}

bp = Blueprint("cloud_benchmark", __name__, url_prefix="/api/v1/models")


@bp.get("/<model_id>/benchmark")
@require_token
def model_benchmark(model_id: str) -> ResponseReturnValue:
    """Time each stage of a registered model here (``profile_n_repeats`` runs); ``?system=`` names this cloud."""
    runner = get_runner()
    net = runner.get(model_id).net
    stage_ms = runner.profile(model_id, n_repeats=current_app.extensions[CONFIG_KEY].profile_n_repeats)
    split_bytes = [4 * math.prod(shape) for shape in net.stage_output_shapes()]  # fp32, as the wire's default
    system = (request.args.get("system") or os.uname().nodename)[:64]
    return jsonify(tier_benchmark(tier="cloud", system=system, model_name=model_id, stage_names=net.stage_names,
                                  stage_ms=stage_ms, split_bytes=split_bytes, note="measured by the cloud on request"))
