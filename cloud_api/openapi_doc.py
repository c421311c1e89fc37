"""The cloud's OpenAPI description: what each route takes and answers (``api_common.openapi`` builds it).

Keyed by Flask endpoint and method; ``tests/test_openapi.py`` fails when a
route has no entry here. Every ``/api/v1`` route needs the shared token.
"""

from __future__ import annotations

from typing import Any

from flask import Flask

from cloud_api.benchmark import OPERATIONS as BENCHMARK_OPERATIONS
from api_common.openapi import init_openapi, json_body

__all__ = ["CLOUD_OPERATIONS", "CLOUD_SCHEMAS", "init_cloud_openapi"]

_BEARER = [{"bearer": []}]
_BINARY = {"type": "string", "format": "binary"}
_MODEL = {"type": "object", "required": ["model_id", "n_stages"],
          "properties": {"model_id": {"type": "string"}, "n_stages": {"type": "integer"}}}

CLOUD_SCHEMAS: dict[str, dict[str, Any]] = {
    "Model": _MODEL,
    "OffloadReply": {"type": "object", "required": ["label", "confidence"],
                     "properties": {"label": {"type": "integer"}, "confidence": {"type": "number"},
                                    "class_name": {"type": "string"}, "cloud_ms": {"type": "number"}}},
    "Profile": {"type": "object", "required": ["model_id", "stages"], "properties": {
        "model_id": {"type": "string"}, "stages": {"type": "array", "items": {
            "type": "object", "required": ["name", "cloud_ms"],
            "properties": {"name": {"type": "string"}, "cloud_ms": {"type": "number"}}}}}},
    "Probe": {"type": "object", "required": ["n_bytes", "server_ms"],
              "properties": {"n_bytes": {"type": "integer"}, "server_ms": {"type": "number"}}},
    "Health": {"type": "object", "required": ["status"],
               "properties": {"status": {"type": "string"}, "n_models": {"type": "integer"}}},
    "Readiness": {"type": "object", "required": ["ready"],
                  "properties": {"ready": {"type": "boolean"}, "n_models": {"type": "integer"}}},
}

CLOUD_OPERATIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("cloud_api.infer", "POST"): {
        "security": _BEARER,
        "parameters": [{"name": "Content-Encoding", "in": "header", "required": False,
                        "schema": {"type": "string", "enum": ["deflate"]}}],
        "requestBody": {"required": True, "content": {"application/octet-stream": {"schema": _BINARY}}},
        "responses": {"200": json_body("OffloadReply")}},
    ("cloud_api.infer_batch", "POST"): {
        "security": _BEARER,
        "parameters": [{"name": "Content-Encoding", "in": "header", "required": False,
                        "schema": {"type": "string", "enum": ["deflate"]}}],
        "requestBody": {"required": True, "content": {"application/octet-stream": {"schema": _BINARY}}},
        "responses": {"200": json_body({"type": "object", "required": ["results"], "properties": {
            "results": {"type": "array", "items": {"$ref": "#/components/schemas/OffloadReply"}}}})}},
    ("cloud_api.put_model", "PUT"): {
        "security": _BEARER,
        # "files" parts (repeated, named by their paths), or the spec form's two fields
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
            "type": "object", "properties": {"files": _BINARY, "spec": _BINARY, "weights": _BINARY}}}}},
        "responses": {"200": json_body("Model", "Known"), "201": json_body("Model", "Registered")}},
    ("cloud_api.get_model", "GET"): {"security": _BEARER, "responses": {"200": json_body("Model")}},
    ("cloud_api.delete_model", "DELETE"): {"security": _BEARER, "responses": {"200": json_body(
        {"type": "object", "required": ["model_id", "deleted"],
         "properties": {"model_id": {"type": "string"}, "deleted": {"type": "boolean"}}})}},
    ("cloud_api.profile_model", "POST"): {
        "security": _BEARER,
        "requestBody": {"required": False, "content": {"application/json": {"schema": {
            "type": "object", "properties": {"n_repeats": {"type": "integer", "minimum": 1, "maximum": 1000}},
            "additionalProperties": False}}}},
        "responses": {"200": json_body("Profile")}},
    ("cloud_api.probe", "POST"): {
        "security": _BEARER,
        "requestBody": {"required": False, "content": {"application/octet-stream": {"schema": _BINARY}}},
        "responses": {"200": json_body("Probe")}},
    ("healthz", "GET"): {"responses": {"200": json_body("Health")}},
    ("readyz", "GET"): {"responses": {"200": json_body("Readiness"), "503": json_body("Readiness", "Not ready")}},
    ("metrics", "GET"): {"responses": {"200": {"description": "Prometheus text format",
                                               "content": {"text/plain": {"schema": {"type": "string"}}}}}},
    ("openapi", "GET"): {"responses": {"200": json_body({"type": "object"}, "This document")}},
    **BENCHMARK_OPERATIONS,  # popex.tiers (its route module holds its entry)
}


def init_cloud_openapi(app: Flask) -> None:
    """Serve the cloud's OpenAPI document at ``/api/v1/openapi.json``."""
    init_openapi(app, title="POPEX cloud", version="1", operations=CLOUD_OPERATIONS, schemas=CLOUD_SCHEMAS,
                 description="Finishes the inferences the edge offloads (safetensors payloads); holds the "
                             "models the edge registers. Errors are the DESIGN §6 body.")
