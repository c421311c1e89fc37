"""``?model=<name>``: names resolve only among models registered with the admin token; a taken name is a 409.

The squatting of the audit: a look-alike registered under a name someone
else's clients use. With the admin token it is refused (409); through open
writes it is stored but never answers to the name.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from conftest import anonymous_client
from popex.data import encode_png
from popex.edge.store import ModelRegistry
from popex.errors import ConflictError
from popex.nets import EarlyExitNet, weights_to_bytes, zoo_spec

IMAGE = encode_png(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8))


@pytest.fixture
def config(config):
    return {**config, "default_model_dir": None}


def _look_alike(lenet_files, seed: int = 1, name: str = "b-lenet") -> dict[str, bytes]:
    """Another b-lenet (other weights, so another id) under ``name``."""
    torch.manual_seed(seed)
    spec = {**zoo_spec("b-lenet"), "name": name}
    return {**lenet_files["files"], "spec": json.dumps(spec).encode(), "weights": weights_to_bytes(EarlyExitNet(spec))}


def _classify(client, model: str):
    return client.post(f"/api/v1/classify?model={model}&deadline_ms=1000", data=IMAGE, content_type="image/png")


def _upload(files):
    return {name: (io.BytesIO(data), f"{name}.bin") for name, data in files.items()}


def test_a_second_model_with_a_taken_name_is_a_409_and_stores_nothing(client, model_actions, lenet_files):
    model_id = model_actions.add(lenet_files["files"])
    assert _classify(client, "b-lenet").json["model"] == model_id
    response = model_actions.register(_look_alike(lenet_files))
    assert response.status_code == 409, response.json
    assert response.json["error"]["code"] == "conflict" and model_id in response.json["error"]["message"]
    assert [m["model_id"] for m in client.get("/api/v1/models").json["models"]] == [model_id]
    assert _classify(client, "b-lenet").json["model"] == model_id
    # another name is fine; after a DELETE the name is free again
    other = model_actions.add(_look_alike(lenet_files, name="b-lenet-2"))
    assert _classify(client, "b-lenet-2").json["model"] == other
    assert client.delete(f"/api/v1/models/{model_id}").status_code == 200
    assert model_actions.register(_look_alike(lenet_files)).status_code == 202


def test_through_open_writes_a_model_never_answers_to_its_name(make_app, config, lenet_files, edge_internals):
    config = {key: value for key, value in config.items() if key != "admin_token"}
    app = make_app({**config, "allow_open_writes": True})
    client = anonymous_client(app)
    response = client.post("/api/v1/models", data=_upload(lenet_files["files"]), content_type="multipart/form-data")
    assert response.status_code == 202
    model_id = response.json["model_id"]
    assert edge_internals(app)[0].wait_idle(120.0)
    error = _classify(client, "b-lenet")
    assert error.status_code == 404 and "admin token" in error.json["error"]["message"]
    assert _classify(client, model_id).status_code == 200  # by its id it serves
    # and an open registration cannot take a name another open one holds either
    assert client.post("/api/v1/models", data=_upload(_look_alike(lenet_files)),
                       content_type="multipart/form-data").status_code == 409


def test_a_trusted_registration_is_not_blocked_by_an_untrusted_squatter_and_trust_survives_a_restart(
        tmp_path, lenet_files):
    registry = ModelRegistry(tmp_path / "edge")
    squatter = registry.add({"spec.json": _look_alike(lenet_files)["spec"],
                             "weights.safetensors": _look_alike(lenet_files)["weights"],
                             "calibration.npz": lenet_files["files"]["calibration"]}).model_id
    files = {"spec.json": lenet_files["files"]["spec"], "weights.safetensors": lenet_files["files"]["weights"],
             "calibration.npz": lenet_files["files"]["calibration"]}
    real = registry.add(files, trusted=True).model_id
    assert (registry.get(squatter).trusted, registry.get(real).trusted) == (False, True)
    with pytest.raises(ConflictError):  # the squatter cannot be promoted onto a trusted name
        registry.add({"spec.json": _look_alike(lenet_files)["spec"],
                      "weights.safetensors": _look_alike(lenet_files)["weights"],
                      "calibration.npz": lenet_files["files"]["calibration"]}, trusted=True)
    reopened = ModelRegistry(tmp_path / "edge")
    assert (reopened.get(squatter).trusted, reopened.get(real).trusted) == (False, True)


def test_the_default_model_answers_to_its_name(make_app, config, edge_internals):
    from conftest import DEFAULT_MODEL_DIR
    app = make_app({**config, "default_model_dir": str(DEFAULT_MODEL_DIR)})
    _, runner = edge_internals(app)
    model = runner.registry.get(runner.default_model_id)
    assert model.trusted
    assert runner.resolve_model(model.name).model_id == model.model_id
