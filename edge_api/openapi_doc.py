"""The edge's OpenAPI description: what each route takes and answers (``api_common.openapi`` builds it).

Keyed by Flask endpoint and method; ``tests/test_openapi.py`` fails when a
route has no entry here, and schemathesis checks the live answers against it.
"""

from __future__ import annotations

from typing import Any

from flask import Flask

from edge_api.benchmark import OPERATIONS as BENCHMARK_OPERATIONS
from edge_api.rate_limit import OPERATIONS as RATE_LIMIT_OPERATIONS
from edge_api.device import OPERATIONS as DEVICE_OPERATIONS
from api_common.openapi import init_openapi, json_body

__all__ = ["EDGE_OPERATIONS", "EDGE_SCHEMAS", "init_edge_openapi"]

_NUMBER = {"type": "number"}
_NULLABLE_NUMBER = {"type": "number", "nullable": True}
_STRING = {"type": "string"}
_BEARER = [{"bearer": []}]  # the admin token
_MAYBE_BEARER = [{}, {"bearer": []}]  # the client token, when the edge has one (edge_api.auth)
_THRESHOLDS = {"type": "array", "items": {"type": "number", "nullable": True}}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


def _object(required: list[str], **properties: Any) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": properties}


_STRATEGY = _object(["split", "thresholds", "predicted_latency_ms", "accuracy", "feasible"],
                    split={"type": "integer"}, thresholds=_THRESHOLDS, predicted_latency_ms=_NUMBER,
                    worst_latency_ms=_NUMBER, accuracy=_NUMBER, offload_prob=_NUMBER, feasible={"type": "boolean"},
                    objective=_STRING, deadline_ms=_NUMBER, policy=_STRING)
_LINK = _object(["uplink_mbps", "rtt_ms"], uplink_mbps=_NULLABLE_NUMBER, rtt_ms=_NULLABLE_NUMBER)
_MODEL_SUMMARY = _object(["model_id", "name", "state"], model_id=_STRING, name=_STRING, state=_STRING)

EDGE_SCHEMAS: dict[str, dict[str, Any]] = {
    "Strategy": _STRATEGY,
    "Classification": _object(
        ["label", "class_name", "confidence", "exit", "where", "split", "thresholds", "fallback", "fallback_reason",
         "latency_ms", "predicted_latency_ms", "model", "feasible", "deadline_ms", "request_id", "policy"],
        label={"type": "integer"}, class_name=_STRING, confidence=_NUMBER,
        exit={"oneOf": [{"type": "integer"}, {"type": "string", "enum": ["final"]}]},
        where={"type": "string", "enum": ["edge", "cloud"]}, split={"type": "integer"}, thresholds=_THRESHOLDS,
        fallback={"type": "boolean"}, fallback_reason={"type": "string", "nullable": True},
        latency_ms=_object(["edge", "transfer", "cloud", "total"], edge=_NUMBER, transfer=_NUMBER, cloud=_NUMBER,
                           total=_NUMBER),
        predicted_latency_ms=_NUMBER, model=_STRING, feasible={"type": "boolean"}, deadline_ms=_NUMBER,
        request_id=_STRING, policy=_STRING, expert=_STRING, expert_confidence=_NUMBER),
    "ModelSummary": _MODEL_SUMMARY,
    "ModelView": _object(["model_id", "name", "state", "strategy"], model_id=_STRING, name=_STRING, state=_STRING,
                         error={"type": "string", "nullable": True}, n_stages={"type": "integer"},
                         strategy={"oneOf": [{"$ref": "#/components/schemas/Strategy"}], "nullable": True}),
    "Strategies": _object(["model_id", "head", "link", "n_rows", "chosen", "rows"], model_id=_STRING, head=_STRING,
                          link=_LINK, n_rows={"type": "integer"}, chosen={"$ref": "#/components/schemas/Strategy"},
                          rows={"type": "array", "items": {"type": "object"}}),
    "Link": _object(["mode", "uplink_mbps", "rtt_ms"], mode=_STRING, uplink_mbps=_NULLABLE_NUMBER,
                    rtt_ms=_NULLABLE_NUMBER, profile={"type": "string", "nullable": True}),
    "Status": _object(["uplink", "cloud", "models", "requests"],
                      uplink=_object(["uplink_mbps", "rtt_ms"], uplink_mbps=_NUMBER, rtt_ms=_NUMBER,
                                     source=_STRING, history={"type": "array"}),
                      cloud=_object(["url", "healthy"], url=_STRING, healthy={"type": "boolean"}),
                      models={"type": "array", "items": _MODEL_SUMMARY},
                      requests={"type": "object", "additionalProperties": {"type": "integer"}}),
    "Health": _object(["status"], status=_STRING, n_models={"type": "integer"}),
    "Readiness": _object(["ready", "checks"], ready={"type": "boolean"}, checks={"type": "object"}),
    "RecentRequests": _object(["requests"], requests={"type": "array", "items": _object(
        ["request_id", "where", "exit", "fallback", "total_ms", "deadline_ms"], request_id=_STRING, where=_STRING,
        exit={"oneOf": [{"type": "integer"}, {"type": "string"}]}, fallback={"type": "boolean"},
        total_ms=_NUMBER, deadline_ms=_NUMBER, predicted_latency_ms=_NUMBER)}),
}

_IMAGE = {"type": "string", "format": "binary"}
_CLASSIFY_BODY = {"required": True, "content": {
    "image/png": {"schema": _IMAGE}, "image/jpeg": {"schema": _IMAGE}, "image/bmp": {"schema": _IMAGE},
    "application/octet-stream": {"schema": _IMAGE},
    "multipart/form-data": {"schema": _object(["image"], image=_IMAGE)},
}}
# Either form of a model: one "archive" of its directory, "files" parts (repeated) named by their paths in
# it, or the spec form's fields. Which parts make a model is checked by the route, so none is required here.
_MODEL_FILES = {"required": True, "content": {"multipart/form-data": {"schema": {"type": "object", "properties": {
    name: _IMAGE for name in ("archive", "files", "spec", "weights", "calibration", "classifier_spec",
                              "classifier_weights")}}}}}
_LINK_BODY = {"required": True, "content": {"application/json": {"schema": {"oneOf": [
    _object(["uplink_mbps", "rtt_ms"], uplink_mbps=_NUMBER, rtt_ms=_NUMBER),
    _object(["profile"], profile=_STRING)]}}}}
_REGISTERED = _object(["model_id", "state"], model_id=_STRING, state=_STRING)

EDGE_OPERATIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("classify.classify", "POST"): {
        "security": _MAYBE_BEARER,
        "parameters": [
            _query("deadline_ms", {"type": "number", "minimum": 0}, "Latency requirement, ms (default: config)"),
            _query("model", _STRING, "Model id or unique name (default: the default model)"),
            _query("policy", _STRING, "adaptive (POPEX), edge-only, cloud-only, neurosurgeon, edgent, ..."),
            _query("distortion_aware", {"type": "string", "enum": ["true", "false", "1", "0"]},
                   "Use the distortion classifier's expert heads"),
        ],
        "requestBody": _CLASSIFY_BODY,
        "responses": {"200": json_body("Classification")},
    },
    ("classify_batch.classify_batch", "POST"): {
        "parameters": [
            _query("deadline_ms", {"type": "number", "minimum": 0}, "Latency requirement, ms (default: config)"),
            _query("model", _STRING, "Model id or unique name (default: the default model)"),
            _query("policy", _STRING, "adaptive (POPEX), edge-only, cloud-only, neurosurgeon, edgent, ..."),
            _query("distortion_aware", {"type": "string", "enum": ["true", "false", "1", "0"]},
                   "Use the distortion classifier's expert heads"),
        ],
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["images"],
            "properties": {"images": {"type": "array", "items": {"type": "string", "format": "binary"}}}}}}},
        "responses": {"200": json_body({"type": "object", "required": ["results"], "properties": {
            "results": {"type": "array", "items": {"$ref": "#/components/schemas/Classification"}}}})}},
    ("models.register_model", "POST"): {
        "security": _BEARER,
        "requestBody": _MODEL_FILES,
        "responses": {"200": json_body(_REGISTERED, "Already registered"),
                      "202": json_body(_REGISTERED, "Registered; preparing in the background")},
    },
    ("models.list_models", "GET"): {
        "security": _MAYBE_BEARER,
        "responses": {"200": json_body(_object(["models"], models={"type": "array", "items": {
            "$ref": "#/components/schemas/ModelSummary"}}))}},
    ("models.describe_model", "GET"): {"security": _MAYBE_BEARER, "responses": {"200": json_body("ModelView")}},
    ("models.delete_model", "DELETE"): {"security": _BEARER, "responses": {"200": json_body(_object(
        ["model_id", "deleted", "cloud"], model_id=_STRING, deleted={"type": "boolean"},
        cloud={"type": "string", "enum": ["deleted", "absent", "unreachable"]}, cloud_error=_STRING))}},
    ("models.strategies", "GET"): {
        "security": _MAYBE_BEARER,
        "parameters": [_query("format", {"type": "string", "enum": ["json", "csv"]}, "json (default) or csv"),
                       _query("deadline_ms", _NUMBER, "Requirement of the chosen row, ms"),
                       _query("objective", {"type": "string", "enum": ["mean", "tail"]}, "mean or tail"),
                       _query("head", _STRING, "pristine or an expert head set"),
                       _query("offset", {"type": "integer", "minimum": 0}, "First row of the page (default 0)"),
                       _query("limit", {"type": "integer", "minimum": 0, "maximum": 10_000},
                              "Rows in the page (default 1000)")],
        "responses": {"200": {"description": "The table", "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/Strategies"}},
            "text/csv": {"schema": _STRING}}}},
    },
    ("admin.get_link", "GET"): {"security": _BEARER, "responses": {"200": json_body("Link")}},
    ("admin.put_link", "PUT"): {"security": _BEARER, "requestBody": _LINK_BODY,
                                "responses": {"200": json_body("Link")}},
    ("status.status", "GET"): {"security": _MAYBE_BEARER, "responses": {"200": json_body("Status")}},
    ("healthz", "GET"): {"responses": {"200": json_body("Health")}},
    ("readyz", "GET"): {"responses": {"200": json_body("Readiness"), "503": json_body("Readiness", "Not ready")}},
    ("metrics", "GET"): {"responses": {"200": {"description": "Prometheus text format",
                                               "content": {"text/plain": {"schema": _STRING}}}}},
    ("telemetry.recent_requests", "GET"): {"security": _MAYBE_BEARER, "responses": {"200": json_body("RecentRequests")}},
    ("openapi", "GET"): {"responses": {"200": json_body({"type": "object"}, "This document")}},
    ("dashboard.index", "GET"): {"responses": {"200": {"description": "The dashboard (HTML)",
                                                       "content": {"text/html": {"schema": _STRING}}}}},
    **BENCHMARK_OPERATIONS,  # popex.tiers (its route module holds its entry)
    **RATE_LIMIT_OPERATIONS,  # per-stream buckets (edge_api.rate_limit)
    **DEVICE_OPERATIONS,  # the device tier's routes
}


def init_edge_openapi(app: Flask) -> None:
    """Serve the edge's OpenAPI document at ``/api/v1/openapi.json``."""
    init_openapi(app, title="POPEX edge", version="1", operations=EDGE_OPERATIONS, schemas=EDGE_SCHEMAS,
                 description="Early-exit inference split between this edge and a cloud: classify, models, "
                             "strategies, status, readiness, metrics. Errors are the DESIGN §6 body.")
