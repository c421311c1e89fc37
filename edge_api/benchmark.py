"""``GET /api/v1/models/<id>/benchmark``: the edge's profile of a model as a ``popex-benchmark/1`` object."""

from __future__ import annotations

import os

from flask import Blueprint, jsonify, request
from flask.typing import ResponseReturnValue

from edge_api.auth import require_client
from edge_api.node import get_node
from popex.tiers.service_benchmark import tier_benchmark

__all__ = ["OPERATIONS", "bp"]


#: The OpenAPI entry of this route (merged into the service's document).
OPERATIONS = {("benchmark.model_benchmark", "GET"): {
    "parameters": [{"name": "system", "in": "query", "required": False, "schema": {"type": "string"},
                    "description": "this system's name in the benchmark (default: the host name)"}],
    "responses": {"200": {"description": "popex-benchmark/1 (docs/tiers.md)", "content": {"application/json": {
        "schema": {"type": "object", "required": ["format", "tier", "system", "models"],
                   "properties": {"format": {"type": "string", "enum": ["popex-benchmark/1"]},
                                  "tier": {"type": "string"}, "system": {"type": "string"},
                                  "models": {"type": "object"}}}}}}}}}

bp = Blueprint("benchmark", __name__, url_prefix="/api/v1/models")


@bp.get("/<model_id>/benchmark")
@require_client
def model_benchmark(model_id: str) -> ResponseReturnValue:
    """The edge's stage and branch times of a model (its current profile); ``?system=`` names this edge."""
    node = get_node()
    model = node.registry.get(model_id)
    profile = node.runner.plan_of(model).profile
    system = (request.args.get("system") or os.uname().nodename)[:64]
    return jsonify(tier_benchmark(tier="edge", system=system, model_name=model_id,
                                  stage_names=profile.stage_names, stage_ms=profile.stage_edge_ms.tolist(),
                                  split_bytes=profile.split_bytes.tolist(),
                                  branch_after_stage=profile.branch_after_stage,
                                  branch_ms=profile.branch_edge_ms.tolist(),
                                  note="the edge's current profile"))
