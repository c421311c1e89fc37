"""Access control on the edge (edge_api.auth): the admin token for writes, an optional client token for reads.

Every write route is tried without a token, with a wrong one, with another
scheme and with the token shared with the cloud: each is a 401 and nothing
changes. Reads are open unless ``client_token`` is set. DELETE removes a
model on the edge and on the cloud (the cloud's half for real).
"""

from __future__ import annotations

import io

import pytest

from conftest import ADMIN_HEADERS, ADMIN_TOKEN, anonymous_client
from edge_api import create_app
from api_common import auth as common_auth
from popex.edge.cloud_types import CloudUnavailable
from popex.edge.fake_cloud import FakeCloud
from popex.errors import ConfigError

CLIENT_TOKEN = "client-token-0123456789"


@pytest.fixture
def config(config):
    return {**config, "default_model_dir": None}


def _upload(files):
    return {name: (io.BytesIO(data), f"{name}.bin") for name, data in files.items()}


def _writes(model_id: str):
    """(method, path, keyword arguments) of every write route."""
    return [("post", "/api/v1/models", {"data": {}, "content_type": "multipart/form-data"}),
            ("delete", f"/api/v1/models/{model_id}", {}),
            ("get", "/api/v1/admin/link", {}),
            ("put", "/api/v1/admin/link", {"json": {"uplink_mbps": 1.0, "rtt_ms": 1.0}})]


def _reads(model_id: str):
    return [("post", "/api/v1/classify", {"data": b"not an image", "content_type": "image/png"}),
            ("get", "/api/v1/status", {}), ("get", "/api/v1/requests", {}), ("get", "/api/v1/models", {}),
            ("get", f"/api/v1/models/{model_id}", {}), ("get", f"/api/v1/models/{model_id}/strategies", {}),
            ("get", f"/api/v1/models/{model_id}/benchmark", {}),
            ("post", "/api/v1/classify/batch", {"data": {}, "content_type": "multipart/form-data"})]


@pytest.mark.parametrize("header", [None, "Bearer wrong-token-0000000", f"Basic {ADMIN_TOKEN}", ADMIN_TOKEN,
                                    "Bearer ", "shared"])
def test_every_write_without_the_admin_token_is_a_401_and_changes_nothing(app, token, lenet_files, header):
    client = anonymous_client(app)
    headers = {} if header is None else {"Authorization": f"Bearer {token}" if header == "shared" else header}
    for method, path, kwargs in _writes(lenet_files["model_id"]):
        response = getattr(client, method)(path, headers=headers, **kwargs)
        assert response.status_code == 401, (method, path, response.json)
        assert response.json["error"]["code"] == "unauthorized"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    response = client.post("/api/v1/models", data=_upload(lenet_files["files"]), headers=headers,
                           content_type="multipart/form-data")
    assert response.status_code == 401
    assert client.get("/api/v1/models").json["models"] == []


def test_with_the_admin_token_a_model_is_registered_and_deleted_on_edge_and_cloud(make_app, config, tmp_path,
                                                                                  lenet_files):
    cloud = FakeCloud(state_dir=tmp_path / "cloud")  # the cloud's half for real: its files are deleted too
    app = make_app(config, cloud=cloud)
    client = anonymous_client(app)
    model_id = lenet_files["model_id"]
    response = client.post("/api/v1/models", data=_upload(lenet_files["files"]), headers=ADMIN_HEADERS,
                           content_type="multipart/form-data")
    assert response.status_code == 202, response.json
    assert app.extensions["popex_edge_node"].preparation.wait_idle(120.0)
    assert cloud.runner.has(model_id)
    cloud_dir = cloud.runner.state_dir / "models" / model_id
    assert cloud_dir.is_dir()

    response = client.delete(f"/api/v1/models/{model_id}", headers=ADMIN_HEADERS)
    assert response.status_code == 200
    assert response.json == {"model_id": model_id, "deleted": True, "cloud": "deleted"}
    assert client.get(f"/api/v1/models/{model_id}").status_code == 404
    assert client.get("/api/v1/models").json["models"] == []
    assert not (tmp_path / "edge" / "models" / model_id).exists()
    assert not cloud.runner.has(model_id) and not cloud_dir.exists()
    assert client.delete(f"/api/v1/models/{model_id}", headers=ADMIN_HEADERS).status_code == 404

    # and it can be registered again, as new
    response = client.post("/api/v1/models", data=_upload(lenet_files["files"]), headers=ADMIN_HEADERS,
                           content_type="multipart/form-data")
    assert response.status_code == 202


def test_delete_while_the_cloud_is_down_removes_the_edge_copy_and_says_so(app, client, fake_cloud, lenet_files,
                                                                          model_actions):
    model_id = model_actions.add(lenet_files["files"])
    fake_cloud.fail("delete_model", CloudUnavailable("connection refused"))
    response = client.delete(f"/api/v1/models/{model_id}")
    assert response.status_code == 200
    assert response.json["cloud"] == "unreachable" and "connection refused" in response.json["cloud_error"]
    assert client.get(f"/api/v1/models/{model_id}").status_code == 404


def test_reads_are_open_without_a_client_token(app):
    client = anonymous_client(app)
    assert client.get("/api/v1/status").status_code == 200
    assert client.get("/api/v1/models").status_code == 200
    assert client.post("/api/v1/classify", data=b"x", content_type="image/png").status_code != 401


def test_with_a_client_token_every_read_needs_it_or_the_admin_token(make_app, config, lenet_files):
    app = make_app({**config, "client_token": CLIENT_TOKEN})
    client = anonymous_client(app)
    for method, path, kwargs in _reads(lenet_files["model_id"]):
        for headers in ({}, {"Authorization": "Bearer wrong-token-0000000"}):
            response = getattr(client, method)(path, headers=headers, **kwargs)
            assert response.status_code == 401, (method, path, response.json)
        for good in (CLIENT_TOKEN, ADMIN_TOKEN):
            response = getattr(client, method)(path, headers={"Authorization": f"Bearer {good}"}, **kwargs)
            assert response.status_code != 401, (method, path, good)
    # the client token is not the admin token
    response = client.post("/api/v1/models", data={}, content_type="multipart/form-data",
                           headers={"Authorization": f"Bearer {CLIENT_TOKEN}"})
    assert response.status_code == 401
    for path in ("/healthz", "/metrics", "/api/v1/openapi.json"):
        assert client.get(path).status_code == 200, path


def test_the_edge_refuses_to_start_with_open_writes_unless_told(config, token, fake_cloud):
    closed = {key: value for key, value in config.items() if key != "admin_token"}
    with pytest.raises(ConfigError, match="open writes.*POPEX_ADMIN_TOKEN.*allow_open_writes"):
        create_app(closed, cloud_client=fake_cloud)
    for name in ("admin_token", "client_token"):
        with pytest.raises(ConfigError, match=f"{name} must differ from the token shared with the cloud"):
            create_app({**config, name: token}, cloud_client=fake_cloud)


def test_allow_open_writes_starts_and_takes_writes_without_a_token(make_app, config, lenet_files):
    config = {key: value for key, value in config.items() if key != "admin_token"}
    app = make_app({**config, "allow_open_writes": True})
    client = anonymous_client(app)
    response = client.post("/api/v1/models", data=_upload(lenet_files["files"]), content_type="multipart/form-data")
    assert response.status_code == 202, response.json


def test_the_config_repr_hides_every_token(config):
    from edge_api.config import EdgeConfig
    text = repr(EdgeConfig.from_mapping({**config, "client_token": CLIENT_TOKEN}))
    assert ADMIN_TOKEN not in text and CLIENT_TOKEN not in text and "client_token='***'" in text
    assert "client_token=None" in repr(EdgeConfig.from_mapping(config))


def test_every_candidate_token_is_compared_in_constant_time(monkeypatch):
    calls = []

    def compare(a, b):
        calls.append((a, b))
        return a == b

    monkeypatch.setattr(common_auth.hmac, "compare_digest", compare)
    assert common_auth.bearer_matches("Bearer first-token", ["first-token", "second-token"])
    assert len(calls) == 2  # no early exit on the first match
    assert not common_auth.bearer_matches("Bearer ", ["first-token"])
