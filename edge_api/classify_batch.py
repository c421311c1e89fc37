"""``POST /api/v1/classify/batch``: up to ``max_batch_images`` images in, ``{"results": [...]}`` out, in upload order.

The images are the repeated multipart file field ``images``; ``model``,
``deadline_ms``, ``policy`` and ``distortion_aware`` apply to all of them, as
for ``POST /api/v1/classify``. The batch runs through the same batched path
as the micro-batcher (:mod:`popex.edge.batch_run`): stage by stage, exited
samples answered and removed, the rest to the cloud as one payload. Each
result is what ``/api/v1/classify`` answers for that image.
"""

from __future__ import annotations

import time

from flask import Blueprint, current_app, jsonify, request
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import BadRequest, RequestEntityTooLarge, UnsupportedMediaType

from edge_api.classify import _deadline_ms, _distortion_aware, _parameter
from edge_api.auth import require_client
from edge_api.node import get_node
from popex.edge.batch_run import run_prepared
from popex.errors import DataError
from popex.ratelimit.streams import request_stream

__all__ = ["bp"]

bp = Blueprint("classify_batch", __name__, url_prefix="/api/v1")


def _images(max_images: int) -> list[bytes]:
    if request.mimetype != "multipart/form-data":
        raise UnsupportedMediaType("send the images as the repeated multipart file field 'images'")
    files = request.files.getlist("images")
    if not files:
        raise BadRequest("multipart field 'images' is missing: send each picture as a file 'images'")
    if len(files) > max_images:
        raise RequestEntityTooLarge(f"{len(files)} images in one batch; at most {max_images} are accepted")
    images = [file.read() for file in files]
    empty = [index for index, data in enumerate(images) if not data]
    if empty:
        raise DataError(f"image {empty[0]} of the batch is empty: 0 bytes received")
    return images


def _model() -> str | None:
    names = set(request.form.getlist("model")) | set(request.args.getlist("model"))
    if len(names) > 1:
        raise BadRequest(f"one batch runs one model; this one names {len(names)}: {sorted(names)[:4]}")
    return _parameter("model")


@bp.post("/classify/batch")
@require_client
def classify_batch() -> ResponseReturnValue:
    """Classify a batch of images (repeated multipart file 'images') under deadline_ms, policy, distortion_aware."""
    arrival_s = time.perf_counter()
    node = get_node()
    # the whole upload may be max_batch_images images of max_image_bytes each (never past the app's limit)
    request.max_content_length = min(node.config.max_image_bytes * node.config.max_batch_images,
                                     current_app.config["MAX_CONTENT_LENGTH"])
    images = _images(node.config.max_batch_images)
    runner = node.runner
    options = {"model_id": _model(), "deadline_ms": _deadline_ms(), "policy": _parameter("policy") or "adaptive",
               "distortion_aware": _distortion_aware()}
    prepared = []
    with request_stream(request.headers.get("X-Popex-Stream") or _parameter("stream")):  # each keeps its stream
        for index, image in enumerate(images):
            try:
                prepared.append(runner.prepare(image, arrival_s=arrival_s, **options))
            except DataError as err:
                runner.count("rejected")
                raise DataError(f"image {index} of the batch: {err}") from err
    return jsonify({"results": [result.to_dict() for result in run_prepared(runner, prepared)]})
