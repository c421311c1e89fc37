"""``/api/v1/models``: register and delete models (admin token), look at them and their plans (client token,
when the edge has one; :mod:`edge_api.auth`)."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import BadRequest

from api_common.uploads import uploaded_model_files
from edge_api.auth import is_admin_request, require_admin, require_client
from edge_api.node import get_node
from popex.edge.views import DEFAULT_ROW_LIMIT, MAX_ROW_LIMIT

__all__ = ["bp"]

# Named multipart fields of the spec form, and the paths they stand for; the ONNX form (or either
# form) also comes as "files" parts named by their paths, or as one "archive".
_NAMED_FIELDS = {"spec": "spec.json", "weights": "weights.safetensors", "calibration": "calibration.npz",
                 "classifier_spec": "distortion-classifier/spec.json",
                 "classifier_weights": "distortion-classifier/weights.safetensors"}
_PREFIXED_FIELDS = {"calibration_": "calibration_{}.npz"}

bp = Blueprint("models", __name__, url_prefix="/api/v1/models")


def _float_arg(name: str) -> float | None:
    raw = request.args.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        return float(raw)
    except ValueError as err:
        raise BadRequest(f"{name} must be a number, got {raw[:40]!r}") from err


def _int_arg(name: str, default: int, *, high: int) -> int:
    raw = request.args.get(name)
    if raw is None or raw.strip() == "":
        return default
    if not raw.strip().isdigit() or int(raw) > high:
        raise BadRequest(f"{name} must be an integer in [0, {high}], got {raw[:40]!r}")
    return int(raw)


@bp.post("")
@require_admin
def register_model() -> ResponseReturnValue:
    """Register a model in either form, with its calibrations (202 new, 200 known, 409 a taken name).

    Multipart: ``files`` parts named by their path in the model directory
    (``model.json``, ``stages/1.onnx``, ``calibration.npz``, ...), or one
    ``archive`` (zip or tar of the directory), or the fields ``spec``,
    ``weights``, ``calibration``, ``calibration_<expert>``,
    ``classifier_spec``, ``classifier_weights``.
    """
    node = get_node()
    request.max_content_length = node.config.max_model_bytes
    files = uploaded_model_files(_NAMED_FIELDS, prefixed=_PREFIXED_FIELDS, max_bytes=node.config.max_model_bytes)
    registration = node.preparation.register(files, trusted=is_admin_request())
    if registration.created:
        return jsonify({"model_id": registration.model_id, "state": "registered"}), 202
    model = node.registry.get(registration.model_id)
    return jsonify({"model_id": registration.model_id, "state": model.state}), 200


@bp.get("")
@require_client
def list_models() -> ResponseReturnValue:
    """Every registered model: id, name, state."""
    return jsonify({"models": get_node().views.list_models()})


@bp.delete("/<model_id>")
@require_admin
def delete_model(model_id: str) -> ResponseReturnValue:
    """Remove a model from the edge and the cloud (404 if the edge does not hold it)."""
    return jsonify(get_node().preparation.remove(model_id))


@bp.get("/<model_id>")
@require_client
def describe_model(model_id: str) -> ResponseReturnValue:
    """One model: state, classes, profile, current decision, expert heads and distortion classifier."""
    return jsonify(get_node().views.describe(model_id))


@bp.get("/<model_id>/strategies")
@require_client
def strategies(model_id: str) -> ResponseReturnValue:
    """The current strategy table (JSON rows ``?offset=&limit=``, or ``?format=csv``; ``?head=`` an expert's)
    and the chosen row."""
    output_format = request.args.get("format", "json")
    if output_format == "csv":
        csv_text = get_node().views.strategies_csv(model_id)
        return Response(csv_text, mimetype="text/csv",
                        headers={"Content-Disposition": f'attachment; filename="strategies-{model_id[:12]}.csv"'})
    if output_format != "json":
        raise BadRequest(f"format must be 'json' or 'csv', got {output_format[:20]!r}")
    return jsonify(get_node().views.strategies(model_id, deadline_ms=_float_arg("deadline_ms"),
                                            objective=request.args.get("objective") or None,
                                            head=request.args.get("head") or None,
                                            offset=_int_arg("offset", 0, high=10**9),
                                            limit=_int_arg("limit", DEFAULT_ROW_LIMIT, high=MAX_ROW_LIMIT)))
