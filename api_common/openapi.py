"""OpenAPI 3 documents of both services, generated from the app's URL map with apispec.

Why apispec (core only): it builds the document from plain dicts and checks
its structure, without asking the views to change. spectree (or
flask-smorest) would validate requests through pydantic / marshmallow models
decorating each view, a second validation layer beside the one the routes
already have (DESIGN: a value is validated once, at the boundary); the
routes stay as they are.

What comes from the code: every rule of ``app.url_map`` and each of its
methods (a route added without a description fails the test), the path
parameters from the rule's converters, the summary from the view's
docstring. What each service adds: an operation table by endpoint (its
query parameters, request body, responses) and the schemas of its bodies
(``edge_api.openapi_doc``, ``cloud_api.openapi_doc``). Every error is the
DESIGN §6 body, one shared ``Error`` schema.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from apispec import APISpec
from flask import Flask, Response, jsonify

__all__ = ["ERROR_SCHEMA", "OPENAPI_PATH", "build_openapi", "error_responses", "init_openapi", "json_body",
           "undocumented"]

OPENAPI_PATH = "/api/v1/openapi.json"
_SKIPPED_METHODS = {"HEAD", "OPTIONS"}
_SKIPPED_ENDPOINTS = {"static"}  # Flask's own static files (the dashboard's scripts), not an API
_CONVERTER = re.compile(r"<(?:[a-z_]+:)?([A-Za-z_][A-Za-z0-9_]*)>")
_REASONS = {400: "Bad request", 401: "Missing or wrong token", 404: "Not found", 405: "Method not allowed",
            409: "Conflict", 413: "Body too large", 415: "Unsupported media type", 422: "Cannot be processed",
            500: "Internal error", 503: "Unavailable"}

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["code", "message"],
                             "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}},
}


_ANY_ERROR = {"description": "An error (DESIGN §6 body)",
              "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def error_responses(*statuses: int) -> dict[str, Any]:
    """``responses`` entries for error statuses, each the DESIGN §6 ``Error`` body."""
    return {str(status): {"description": _REASONS.get(status, "Error"),
                          "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
            for status in statuses}


def json_body(schema: Mapping[str, Any] | str, description: str = "OK") -> dict[str, Any]:
    """A ``responses`` entry with a JSON body: a schema, or the name of a component schema."""
    ref = {"$ref": f"#/components/schemas/{schema}"} if isinstance(schema, str) else dict(schema)
    return {"description": description, "content": {"application/json": {"schema": ref}}}


def _summary(view: Any) -> str:
    doc = (getattr(view, "__doc__", None) or "").strip()
    return doc.splitlines()[0].rstrip(".") if doc else ""


def build_openapi(app: Flask, *, title: str, version: str, description: str,
                  operations: Mapping[tuple[str, str], Mapping[str, Any]],
                  schemas: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The OpenAPI 3.0.3 document of ``app``.

    Parameters
    ----------
    app : Flask
    title, version, description : str
    operations : mapping
        ``(endpoint, METHOD)`` -> the operation's parameters, requestBody,
        responses, security. A rule without one gets only its summary and
        path parameters (:func:`undocumented` lists them).
    schemas : mapping
        Component schemas by name; ``Error`` is added.

    Returns
    -------
    dict
        JSON-ready.
    """
    spec = APISpec(title=title, version=version, openapi_version="3.0.3", info={"description": description})
    spec.components.schema("Error", ERROR_SCHEMA)
    for name, schema in schemas.items():
        spec.components.schema(name, dict(schema))
    spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer"})
    paths: dict[str, dict[str, Any]] = {}
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        if rule.endpoint in _SKIPPED_ENDPOINTS:
            continue
        path = _CONVERTER.sub(r"{\1}", rule.rule)
        view = app.view_functions[rule.endpoint]
        for method in sorted((rule.methods or set()) - _SKIPPED_METHODS):
            operation = dict(operations.get((rule.endpoint, method), {}))
            parameters = [{"name": name, "in": "path", "required": True, "schema": {"type": "string",
                                                                                     "minLength": 1}}
                          for name in rule.arguments]
            operation["parameters"] = parameters + list(operation.get("parameters", []))
            responses = dict(operation.get("responses", {"200": {"description": "OK"}}))
            responses.setdefault("default", _ANY_ERROR)  # any other status: the DESIGN §6 body
            operation["responses"] = responses
            operation.setdefault("summary", _summary(view))
            operation["operationId"] = f"{rule.endpoint}.{method.lower()}"
            paths.setdefault(path, {})[method.lower()] = operation
    for path, operations_of_path in paths.items():
        spec.path(path=path, operations=operations_of_path)
    return spec.to_dict()


def undocumented(app: Flask, operations: Mapping[tuple[str, str], Any]) -> list[str]:
    """``endpoint METHOD`` of every route without an entry in ``operations`` (the test wants none)."""
    return sorted(f"{rule.endpoint} {method}" for rule in app.url_map.iter_rules()
                  if rule.endpoint not in _SKIPPED_ENDPOINTS
                  for method in (rule.methods or set()) - _SKIPPED_METHODS
                  if (rule.endpoint, method) not in operations)


def init_openapi(app: Flask, **document: Any) -> None:
    """Serve ``GET /api/v1/openapi.json``: :func:`build_openapi` of ``app``, built on first request."""
    built: dict[str, Any] = {}

    def openapi() -> Response:
        """This service's OpenAPI 3 document."""
        if not built:
            built.update(build_openapi(app, **document))
        return jsonify(built)

    app.add_url_rule(OPENAPI_PATH, "openapi", openapi, methods=["GET"])
