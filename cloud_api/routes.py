"""The cloud's HTTP API: thin routes over :class:`popex.cloud.runner.CloudRunner`.

Every route under ``/api/v1`` requires the shared token; ``/healthz`` does not.
"""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, Flask, current_app, jsonify, request
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import BadRequest

from api_common.uploads import uploaded_model_files
from cloud_api.auth import CONFIG_KEY, require_token
from cloud_api.config import CloudConfig
from popex.checks import check_int
from popex.cloud.runner import MAX_PROFILE_N_REPEATS, CloudRunner
from popex.errors import ConfigError, DataError, UnknownModelError
from popex.runtime.model_cost import check_model_cost, files_cost
from popex.untrusted import loads_json

__all__ = ["RUNNER_KEY", "bp", "get_runner", "init_routes"]

RUNNER_KEY = "popex_cloud_runner"  # app.extensions key of the CloudRunner
_CHUNK_BYTES = 256 * 1024
_MAX_OPTIONS_BYTES = 4096

bp = Blueprint("cloud_api", __name__, url_prefix="/api/v1")


def get_runner() -> CloudRunner:
    """The app's :class:`CloudRunner`."""
    return current_app.extensions[RUNNER_KEY]


def _config() -> CloudConfig:
    return current_app.extensions[CONFIG_KEY]


_NAMED_FIELDS = {"spec": "spec.json", "weights": "weights.safetensors"}


def _profile_n_repeats() -> int:
    """``n_repeats`` from the optional JSON body, checked and bounded."""
    body = request.get_data(cache=False)
    if not body.strip():
        return _config().profile_n_repeats
    try:
        options = loads_json(body, name='the body (JSON like {"n_repeats": 30})', max_bytes=_MAX_OPTIONS_BYTES)
    except DataError as err:
        raise BadRequest(str(err)) from err
    if not isinstance(options, dict) or set(options) - {"n_repeats"}:
        raise BadRequest('the body must be a JSON object with at most the key "n_repeats"')
    try:
        return check_int(options.get("n_repeats", _config().profile_n_repeats), name="n_repeats",
                         low=1, high=MAX_PROFILE_N_REPEATS)
    except ConfigError as err:
        raise BadRequest(str(err)) from err


def _model_info(model_id: str, n_stages: int) -> dict[str, Any]:
    return {"model_id": model_id, "n_stages": n_stages}


@bp.post("/infer")
@require_token
def infer() -> ResponseReturnValue:
    """Finish one offloaded inference from its safetensors payload (deflated or not)."""
    reply = get_runner().infer_payload(request.get_data(cache=False), max_bytes=_config().max_body_bytes,
                                       content_encoding=request.headers.get("Content-Encoding"))
    return jsonify(reply.to_dict())


@bp.post("/infer/batch")
@require_token
def infer_batch() -> ResponseReturnValue:
    """Finish a batched offload (one payload, a leading batch dimension): ``{"results": [...]}`` in batch order."""
    config = _config()
    replies = get_runner().infer_batch_payload(request.get_data(cache=False), max_bytes=config.max_body_bytes,
                                               content_encoding=request.headers.get("Content-Encoding"),
                                               max_batch_size=config.max_payload_batch_size)
    return jsonify({"results": [reply.to_dict() for reply in replies]})


@bp.put("/models/<model_id>")
@require_token
def put_model(model_id: str) -> ResponseReturnValue:
    """Register a model (201 new, 200 known): its ONNX files or spec + weights, as ``files``, an ``archive``
    or the fields ``spec`` and ``weights``."""
    files = uploaded_model_files(_NAMED_FIELDS, max_bytes=_config().max_body_bytes)
    runner = get_runner()
    existed = runner.has(model_id)
    if not existed:  # what it costs to run, before it is loaded (popex.runtime.model_cost)
        check_model_cost(files_cost(files), max_flops=_config().max_model_flops,
                         max_activation_bytes=_config().max_activation_bytes)
    loaded = runner.register(model_id, files)
    return jsonify(_model_info(loaded.model_id, loaded.net.n_stages)), 200 if existed else 201


@bp.get("/models/<model_id>")
@require_token
def get_model(model_id: str) -> ResponseReturnValue:
    """Whether a model is registered (404 if not), so the edge can skip an upload."""
    loaded = get_runner().get(model_id)
    return jsonify(_model_info(loaded.model_id, loaded.net.n_stages))


@bp.delete("/models/<model_id>")
@require_token
def delete_model(model_id: str) -> ResponseReturnValue:
    """Remove a model (the edge's ``DELETE /api/v1/models/<id>``); 404 if it is not here."""
    if not get_runner().remove(model_id):
        raise UnknownModelError(f"model {model_id[:80]!r} is not registered on this cloud")
    return jsonify({"model_id": model_id, "deleted": True})


@bp.post("/models/<model_id>/profile")
@require_token
def profile_model(model_id: str) -> ResponseReturnValue:
    """Time each stage of a registered model on this machine (median ms per stage)."""
    n_repeats = _profile_n_repeats()
    runner = get_runner()
    stage_names = runner.get(model_id).net.stage_names
    stage_ms = runner.profile(model_id, n_repeats=n_repeats)
    stages = [{"name": name, "cloud_ms": ms} for name, ms in zip(stage_names, stage_ms)]
    return jsonify({"model_id": model_id, "stages": stages})


@bp.post("/probe")
@require_token
def probe() -> ResponseReturnValue:
    """Uplink probe sink: read and discard the body, report its size and the time reading took."""
    start_s = time.perf_counter()
    n_bytes = 0
    while chunk := request.stream.read(_CHUNK_BYTES):
        n_bytes += len(chunk)
    return jsonify({"n_bytes": n_bytes, "server_ms": (time.perf_counter() - start_s) * 1000.0})


def healthz() -> ResponseReturnValue:
    """Liveness: no token needed."""
    return jsonify({"status": "ok", "n_models": get_runner().n_models})


def init_routes(app: Flask) -> None:
    """Register the API blueprint and ``/healthz``."""
    app.register_blueprint(bp)
    app.add_url_rule("/healthz", "healthz", healthz, methods=["GET"])
