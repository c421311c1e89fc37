"""``/api/v1/models``: register models and look at their plans."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import BadRequest

from edge_api.node import get_node

__all__ = ["bp"]

_FILES = {"spec": "spec.json", "weights": "weights.safetensors", "calibration": "calibration.npz"}
# A model with expert heads also sends calibration_<expert> for each expert and these two.
_CLASSIFIER_FILES = ("classifier_spec", "classifier_weights")
_EXPERT_CALIBRATION_PREFIX = "calibration_"

bp = Blueprint("models", __name__, url_prefix="/api/v1/models")


def _uploaded(name: str) -> bytes:
    """Bytes of multipart file ``name``, or a 400 naming what to send."""
    file = request.files.get(name)
    if file is None:
        wanted = ", ".join(f"'{key}' ({filename})" for key, filename in _FILES.items())
        raise BadRequest(f"multipart file {name!r} is missing: send the files {wanted}")
    return file.read()


def _optional(name: str) -> bytes | None:
    file = request.files.get(name)
    return None if file is None else file.read()


def _expert_calibrations() -> dict[str, bytes]:
    """Files ``calibration_<expert>``, by expert name (the registry checks them against the spec)."""
    return {name[len(_EXPERT_CALIBRATION_PREFIX):]: request.files[name].read() for name in request.files
            if name.startswith(_EXPERT_CALIBRATION_PREFIX)}


def _float_arg(name: str) -> float | None:
    raw = request.args.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        return float(raw)
    except ValueError as err:
        raise BadRequest(f"{name} must be a number, got {raw[:40]!r}") from err


@bp.post("")
def register_model() -> ResponseReturnValue:
    """Register a model from multipart files spec, weights, calibration (+ expert files) (202 new, 200 known)."""
    node = get_node()
    request.max_content_length = node.config.max_model_bytes
    spec_bytes, weights_bytes, calibration_bytes = (_uploaded(name) for name in _FILES)
    classifier_spec, classifier_weights = (_optional(name) for name in _CLASSIFIER_FILES)
    registration = node.preparation.register(spec_bytes, weights_bytes, calibration_bytes,
                                    expert_calibrations=_expert_calibrations(), classifier_spec=classifier_spec,
                                    classifier_weights=classifier_weights)
    if registration.created:
        return jsonify({"model_id": registration.model_id, "state": "registered"}), 202
    model = node.registry.get(registration.model_id)
    return jsonify({"model_id": registration.model_id, "state": model.state}), 200


@bp.get("")
def list_models() -> ResponseReturnValue:
    """Every registered model: id, name, state."""
    return jsonify({"models": get_node().views.list_models()})


@bp.get("/<model_id>")
def describe_model(model_id: str) -> ResponseReturnValue:
    """One model: state, classes, profile, current decision, expert heads and distortion classifier."""
    return jsonify(get_node().views.describe(model_id))


@bp.get("/<model_id>/strategies")
def strategies(model_id: str) -> ResponseReturnValue:
    """The current strategy table (JSON rows, or ``?format=csv``; ``?head=`` an expert's) and the chosen row."""
    output_format = request.args.get("format", "json")
    if output_format == "csv":
        csv_text = get_node().views.strategies_csv(model_id)
        return Response(csv_text, mimetype="text/csv",
                        headers={"Content-Disposition": f'attachment; filename="strategies-{model_id[:12]}.csv"'})
    if output_format != "json":
        raise BadRequest(f"format must be 'json' or 'csv', got {output_format[:20]!r}")
    return jsonify(get_node().views.strategies(model_id, deadline_ms=_float_arg("deadline_ms"),
                                            objective=request.args.get("objective") or None,
                                            head=request.args.get("head") or None))
