"""Both services' OpenAPI documents: served, valid OpenAPI 3 (openapi-spec-validator), every route described."""

from __future__ import annotations

import pytest
from openapi_spec_validator import validate

from api_common.openapi import undocumented
from cloud_api import create_app as create_cloud_app
from cloud_api.openapi_doc import CLOUD_OPERATIONS
from edge_api.openapi_doc import EDGE_OPERATIONS


@pytest.fixture
def cloud_app(tmp_path, token):
    return create_cloud_app({"token": token, "state_dir": str(tmp_path / "cloud")})


def _check(app, operations):
    response = app.test_client().get("/api/v1/openapi.json")
    assert response.status_code == 200
    document = response.get_json()
    validate(document)  # raises on an invalid OpenAPI 3 document
    assert document["openapi"].startswith("3.")
    assert undocumented(app, operations) == []
    paths = {rule.rule.replace("<", "{").replace(">", "}") for rule in app.url_map.iter_rules()
             if rule.endpoint != "static"}
    assert paths == set(document["paths"])
    for path, item in document["paths"].items():
        for method, operation in item.items():
            assert operation["summary"], f"{method} {path} has no summary (the view's docstring)"
            assert "default" in operation["responses"]  # every error: the §6 body
    return document


def test_the_edge_serves_a_valid_openapi_document_of_every_route(app):
    document = _check(app, EDGE_OPERATIONS)
    classify = document["paths"]["/api/v1/classify"]["post"]
    assert {p["name"] for p in classify["parameters"]} >= {"deadline_ms", "model", "policy"}
    assert document["paths"]["/api/v1/models/{model_id}"]["get"]["parameters"][0]["in"] == "path"


def test_the_cloud_serves_a_valid_openapi_document_of_every_route(cloud_app):
    document = _check(cloud_app, CLOUD_OPERATIONS)
    assert document["paths"]["/api/v1/infer"]["post"]["security"] == [{"bearer": []}]
