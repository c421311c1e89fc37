"""The cloud Flask app through its test client, and a scan of the transport code for unsafe patterns."""

import io
import json
import pickle
import re
from pathlib import Path

import zlib

import pytest
import torch

from cloud_api import create_app
from cloud_api.config import CloudConfig, load_config
from popex.errors import ConfigError
from popex.nets import EarlyExitNet, compute_model_id, weights_to_bytes, zoo_spec
from popex.cloud.runner import CloudRunner
from popex.runtime.model_files import spec_model_id
from popex.wire import encode_offload

TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    spec = zoo_spec("b-lenet")
    net = EarlyExitNet(spec).eval()
    weights_bytes = weights_to_bytes(net)
    spec_bytes = json.dumps(spec).encode()
    return {"net": net, "spec": spec, "spec_bytes": spec_bytes, "weights_bytes": weights_bytes,
            "model_id": compute_model_id(spec, weights_bytes)}


@pytest.fixture
def app(tmp_path):
    return create_app({"token": TOKEN, "state_dir": str(tmp_path / "cloud")})


@pytest.fixture
def client(app):
    return app.test_client()


def _put(client, model_id, spec_bytes, weights_bytes, headers=AUTH):
    files = {"spec": (io.BytesIO(spec_bytes), "spec.json"), "weights": (io.BytesIO(weights_bytes), "weights.safetensors")}
    return client.put(f"/api/v1/models/{model_id}", headers=headers, data=files)


@pytest.fixture
def registered(client, model):
    response = _put(client, model["model_id"], model["spec_bytes"], model["weights_bytes"])
    assert response.status_code == 201, response.json
    return model


def _offload(model, split, *, wire_dtype="float32", seed=1):
    torch.manual_seed(seed)
    x = torch.randn(1, *model["net"].input_shape)
    with torch.inference_mode():
        h = model["net"].run_stages(x, stop=split)
        expected_label = int(model["net"](x)[-1].argmax(dim=1))
    payload = encode_offload(h, model_id=model["model_id"], split=split, request_id=f"r{seed}",
                             wire_dtype=wire_dtype)
    return payload, expected_label


def _error(response, status, code):
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert set(body) == {"error"} and body["error"]["code"] == code and body["error"]["message"]
    return body["error"]["message"]


def _assert_still_works(client, model):
    payload, expected_label = _offload(model, 1)
    response = client.post("/api/v1/infer", headers=AUTH, data=payload)
    assert response.status_code == 200 and response.json["label"] == expected_label


# -- infer ---------------------------------------------------------------------------


@pytest.mark.parametrize("split", [0, 1, 2])
def test_infer_matches_the_full_local_network(client, registered, split):
    for seed in range(3):
        payload, expected_label = _offload(registered, split, seed=seed)
        response = client.post("/api/v1/infer", headers=AUTH, data=payload,
                               content_type="application/octet-stream")
        assert response.status_code == 200, response.json
        body = response.json
        assert set(body) == {"label", "class_name", "confidence", "cloud_ms", "request_id", "model_id"}
        assert body["label"] == expected_label
        assert body["class_name"] == registered["spec"]["class_names"][expected_label]
        assert 0 < body["confidence"] <= 1 and body["cloud_ms"] > 0
        assert (body["request_id"], body["model_id"]) == (f"r{seed}", registered["model_id"])


def test_infer_accepts_a_deflated_payload(client, registered):
    payload, expected_label = _offload(registered, 1)
    body = zlib.compress(payload, 1)
    assert len(body) < len(payload)
    response = client.post("/api/v1/infer", headers={**AUTH, "Content-Encoding": "deflate"}, data=body)
    assert response.status_code == 200 and response.json["label"] == expected_label


def test_bad_content_encodings_are_4xx(tmp_path, model):
    app = create_app({"token": TOKEN, "state_dir": str(tmp_path / "small"), "max_body_bytes": 65536})
    client = app.test_client()
    payload, _ = _offload(model, 1)
    deflate = {**AUTH, "Content-Encoding": "deflate"}
    _error(client.post("/api/v1/infer", headers={**AUTH, "Content-Encoding": "br"}, data=payload),
           415, "unsupported_media_type")
    _error(client.post("/api/v1/infer", headers=deflate, data=payload), 400, "bad_tensor")  # not zlib
    _error(client.post("/api/v1/infer", headers=deflate, data=zlib.compress(payload)[:-9]), 400, "bad_tensor")
    # 1 KB that inflates to 1 MB: refused at the 64 KB limit, never inflated in full
    bomb = zlib.compress(bytes(2**20), 9)
    assert len(bomb) < 65536
    assert "limit" in _error(client.post("/api/v1/infer", headers=deflate, data=bomb), 400, "bad_tensor")


@pytest.mark.parametrize("wire_dtype", ["float16", "int8"])
def test_infer_reduced_precision(client, registered, wire_dtype):
    payload, _ = _offload(registered, 1, wire_dtype=wire_dtype)
    assert client.post("/api/v1/infer", headers=AUTH, data=payload).status_code == 200


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-token-0000"}, {"Authorization": TOKEN},
                                     {"Authorization": f"Basic {TOKEN}"}])
def test_token_required(client, registered, headers):
    payload, _ = _offload(registered, 1)
    _error(client.post("/api/v1/infer", headers=headers, data=payload), 401, "unauthorized")
    _error(client.get(f"/api/v1/models/{registered['model_id']}", headers=headers), 401, "unauthorized")
    _error(client.post("/api/v1/probe", headers=headers, data=b"x"), 401, "unauthorized")
    _assert_still_works(client, registered)


def test_bad_tensors_are_400(client, registered):
    net, model_id = registered["net"], registered["model_id"]
    cases = {
        "shape": encode_offload(torch.ones(1, 6, 14, 13), model_id=model_id, split=1, request_id="r"),
        "batch of 2": encode_offload(torch.ones(2, 6, 14, 14), model_id=model_id, split=1, request_id="r"),
        "split = N": encode_offload(torch.ones(1, 10), model_id=model_id, split=net.n_stages, request_id="r"),
    }
    message = _error(client.post("/api/v1/infer", headers=AUTH, data=cases["shape"]), 400, "bad_tensor")
    assert "[1, 6, 14, 13]" in message and "[1, 6, 14, 14]" in message
    _error(client.post("/api/v1/infer", headers=AUTH, data=cases["batch of 2"]), 400, "bad_tensor")
    _error(client.post("/api/v1/infer", headers=AUTH, data=cases["split = N"]), 400, "bad_tensor")
    fp16_as_fp32 = bytearray(encode_offload(torch.ones(1, 16, 5, 5), model_id=model_id, split=2, request_id="r",
                                            wire_dtype="float16"))
    fp16_as_fp32 = bytes(fp16_as_fp32).replace(b'"wire_dtype":"float16"', b'"wire_dtype":"float32"')
    assert _error(client.post("/api/v1/infer", headers=AUTH, data=fp16_as_fp32), 400, "bad_tensor")
    for body in (b"", b"garbage", pickle.dumps(torch.ones(1, 6, 14, 14)), json.dumps([[1.0]]).encode()):
        _error(client.post("/api/v1/infer", headers=AUTH, data=body), 400, "bad_tensor")
    _assert_still_works(client, registered)


def test_unknown_model_is_404_and_an_offload_for_it_409(client, registered):
    payload = encode_offload(torch.ones(1, 6, 14, 14), model_id="f" * 64, split=1, request_id="r")
    _error(client.post("/api/v1/infer", headers=AUTH, data=payload), 409, "unknown_model")  # the edge pushes it
    _error(client.get(f"/api/v1/models/{'f' * 64}", headers=AUTH), 404, "unknown_model")
    _error(client.get("/api/v1/models/..", headers=AUTH), 404, "unknown_model")
    assert client.get("/api/v1/models/..%2F..%2Fetc", headers=AUTH).status_code == 404
    _error(client.post(f"/api/v1/models/{'f' * 64}/profile", headers=AUTH), 404, "unknown_model")
    _assert_still_works(client, registered)


def test_too_large_body_is_413(tmp_path, model):
    app = create_app({"token": TOKEN, "state_dir": str(tmp_path / "small"), "max_body_bytes": 4096})
    client = app.test_client()
    _error(client.post("/api/v1/probe", headers=AUTH, data=bytes(5000)), 413, "too_large")
    _error(client.post("/api/v1/infer", headers=AUTH, data=bytes(5000)), 413, "too_large")
    assert client.post("/api/v1/probe", headers=AUTH, data=bytes(4000)).json["n_bytes"] == 4000


# -- models --------------------------------------------------------------------------


def test_put_is_idempotent_and_get_reports(client, registered):
    model_id = registered["model_id"]
    response = _put(client, model_id, registered["spec_bytes"], registered["weights_bytes"])
    assert response.status_code == 200 and response.json == {"model_id": model_id, "n_stages": 3}
    assert client.get(f"/api/v1/models/{model_id}", headers=AUTH).json == {"model_id": model_id, "n_stages": 3}


def test_delete_needs_the_token_and_removes_the_model_and_its_files(client, registered):
    model_id = registered["model_id"]
    directory = Path(client.application.extensions["popex_cloud_config"].state_dir) / "models" / model_id
    assert directory.is_dir()
    _error(client.delete(f"/api/v1/models/{model_id}"), 401, "unauthorized")
    assert client.delete(f"/api/v1/models/{model_id}", headers=AUTH).json == {"model_id": model_id, "deleted": True}
    assert not directory.exists() and not list(directory.parent.iterdir())  # nothing set aside is left either
    _error(client.get(f"/api/v1/models/{model_id}", headers=AUTH), 404, "unknown_model")
    _error(client.delete(f"/api/v1/models/{model_id}", headers=AUTH), 404, "unknown_model")
    _error(client.delete("/api/v1/models/..", headers=AUTH), 404, "unknown_model")


def _put_own(client, spec_bytes, weights_bytes):
    """PUT under the id the content hashes to, so the content itself is what is judged."""
    return _put(client, spec_model_id(spec_bytes, weights_bytes), spec_bytes, weights_bytes)


def test_put_rejects_bad_models(client, model):
    model_id = model["model_id"]
    buffer = io.BytesIO()
    torch.save(model["net"].state_dict(), buffer)
    message = _error(_put_own(client, model["spec_bytes"], buffer.getvalue()), 400, "bad_weights")
    assert "pickle" in message
    message = _error(_put_own(client, model["spec_bytes"], pickle.dumps({"a": 1})), 400, "bad_weights")
    assert "pickle" in message
    evil_spec = json.loads(model["spec_bytes"])
    evil_spec["stages"][0]["layers"][0]["type"] = "os.system"
    _error(_put_own(client, json.dumps(evil_spec).encode(), model["weights_bytes"]), 400, "bad_spec")
    assert not list((Path(client.application.extensions["popex_cloud_config"].state_dir) / "models").glob("*"))
    _error(_put(client, model_id, model["spec_bytes"], pickle.dumps({"a": 1})), 400, "model_id_mismatch")
    message = _error(_put(client, "0" * 64, model["spec_bytes"], model["weights_bytes"]), 400, "model_id_mismatch")
    assert model_id in message
    _error(client.put(f"/api/v1/models/{model_id}", headers=AUTH, data={}), 400, "bad_request")
    _error(client.get(f"/api/v1/models/{model_id}", headers=AUTH), 404, "unknown_model")
    assert client.get("/healthz").json["n_models"] == 0
    assert _put(client, model_id, model["spec_bytes"], model["weights_bytes"]).status_code == 201
    _assert_still_works(client, model)


def test_models_survive_a_restart(tmp_path, model):
    config = {"token": TOKEN, "state_dir": str(tmp_path / "state")}
    first = create_app(config).test_client()
    assert _put(first, model["model_id"], model["spec_bytes"], model["weights_bytes"]).status_code == 201
    second = create_app(config).test_client()
    assert second.get("/healthz").json == {"status": "ok", "n_models": 1}
    _assert_still_works(second, model)


def test_a_model_stored_by_another_worker_is_found(tmp_path, model):
    config = {"token": TOKEN, "state_dir": str(tmp_path / "shared")}
    worker_a, worker_b = create_app(config).test_client(), create_app(config).test_client()
    assert _put(worker_a, model["model_id"], model["spec_bytes"], model["weights_bytes"]).status_code == 201
    _assert_still_works(worker_b, model)


# -- probe, profile, health, routing ---------------------------------------------------


def test_probe(client):
    body = client.post("/api/v1/probe", headers=AUTH, data=bytes(100_000)).json
    assert body["n_bytes"] == 100_000 and body["server_ms"] >= 0
    assert client.post("/api/v1/probe", headers=AUTH).json["n_bytes"] == 0


def test_profile(client, registered):
    url = f"/api/v1/models/{registered['model_id']}/profile"
    body = client.post(url, headers=AUTH, json={"n_repeats": 3}).json
    assert body["model_id"] == registered["model_id"]
    assert [stage["name"] for stage in body["stages"]] == list(registered["net"].stage_names)
    assert all(stage["cloud_ms"] > 0 for stage in body["stages"])
    assert len(client.post(url, headers=AUTH).json["stages"]) == 3  # the body is optional
    for bad in ({"n_repeats": 0}, {"n_repeats": 10**6}, {"n_repeats": "3"}, {"n_repeats": True}, {"other": 1}, [3]):
        _error(client.post(url, headers=AUTH, json=bad), 400, "bad_request")
    _error(client.post(url, headers=AUTH, data=b"{not json", content_type="application/json"), 400, "bad_request")
    _assert_still_works(client, registered)


def test_healthz_needs_no_token(client, registered):
    assert client.get("/healthz").json == {"status": "ok", "n_models": 1}


def test_routing_errors_are_json(client, registered):
    _error(client.get("/nope"), 404, "not_found")
    _error(client.get("/api/v1/nope", headers=AUTH), 404, "not_found")
    response = client.get("/api/v1/infer", headers=AUTH)
    _error(response, 405, "method_not_allowed")
    assert "POST" in response.headers["Allow"]
    _assert_still_works(client, registered)


def test_unexpected_exception_is_a_json_500(app, client, monkeypatch, caplog):
    runner = app.extensions["popex_cloud_runner"]

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(runner, "infer_payload", broken)
    message = _error(client.post("/api/v1/infer", headers=AUTH, data=b"x"), 500, "internal_error")
    assert "boom" not in message
    assert "boom" in caplog.text  # logged with its traceback on the server


# -- config --------------------------------------------------------------------------


@pytest.mark.parametrize("token", ["", "   ", "short", "has space 123"])
def test_refuses_to_start_without_a_real_token(tmp_path, token):
    with pytest.raises(ConfigError, match="token"):
        create_app({"token": token, "state_dir": str(tmp_path)})


def test_config_layers_and_checks(tmp_path):
    environ = {"POPEX_TOKEN": "env-token-123", "POPEX_CLOUD_STATE_DIR": str(tmp_path / "env")}
    config = load_config({"profile_n_repeats": 5}, environ=environ)
    assert (config.token, config.state_dir, config.profile_n_repeats) == ("env-token-123", tmp_path / "env", 5)
    assert "env-token-123" not in repr(config)
    with pytest.raises(ConfigError, match="POPEX_TOKEN"):
        load_config({}, environ={})
    with pytest.raises(ConfigError, match="unknown cloud config keys"):
        load_config({"token": TOKEN, "timeout": 3}, environ={})
    for key, value in (("max_body_bytes", 0), ("n_threads", 0), ("profile_n_repeats", 10**6), ("n_threads", "2")):
        with pytest.raises(ConfigError, match=key):
            load_config({"token": TOKEN, key: value}, environ={})
    yaml_path = tmp_path / "cloud.yaml"
    yaml_path.write_text("state_dir: from-yaml\nprofile_n_repeats: 7\nn_threads:\n")
    config = load_config({"token": TOKEN}, environ={"POPEX_CLOUD_CONFIG": str(yaml_path)})
    assert (config.state_dir, config.profile_n_repeats, config.n_threads) == (Path("from-yaml"), 7, None)
    assert isinstance(create_app(CloudConfig(token=TOKEN, state_dir=tmp_path / "x")).extensions["popex_cloud_runner"],
                      CloudRunner)


# -- source scan ---------------------------------------------------------------------

FORBIDDEN = {
    "pickle import": re.compile(r"^\s*(import|from)\s+(c?pickle|dill|joblib|marshal|shelve)\b", re.M),
    "pickle call": re.compile(r"\b(c?[pP]ickle|dill|joblib|marshal)\.(loads?|Unpickler)\b"),
    "torch.load without weights_only=True": re.compile(r"torch\.load\((?![^)]*weights_only\s*=\s*True)"),
    "allow_pickle=True": re.compile(r"allow_pickle\s*=\s*True"),
    "eval/exec": re.compile(r"(?<![\w.])(eval|exec)\("),
    "tensor as JSON list": re.compile(r"json\s*=.*\.tolist\(\)|\.tolist\(\).*\bjson\.dumps|"
                                      r"json\.dumps\(.*\.tolist\(\)"),
    "tensor from a request body": re.compile(r"torch\.tensor\(\s*(request|flask\.request)\.(json|get_json)"),
}


def _scan(text):
    return sorted(name for name, pattern in FORBIDDEN.items() if pattern.search(text))


def test_scanner_finds_each_forbidden_pattern():
    bad = "\n".join([
        "import pickle",
        "x = cPickle.loads(data)",
        "state = torch.load(path)",
        "arr = np.load(f, allow_pickle=True)",
        "value = eval(text)",
        "requests.post(url, json={'tensor': h.tolist()})",
        "t = torch.tensor(request.get_json()['tensor'])",
    ])
    assert _scan(bad) == sorted(FORBIDDEN)
    fine = "net.eval()\nstate = torch.load(path, weights_only=True)\nnp.load(f, allow_pickle=False)\n" \
           "# never pickle\nlabels = probs.tolist()\n"
    assert _scan(fine) == []


def test_transport_code_has_no_unsafe_deserialisation():
    roots = [REPO / "popex" / tier for tier in ("runtime", "edge", "cloud", "link")] + [REPO / "cloud_api",
                                                                                         REPO / "edge_api"]
    files = [path for root in roots if root.is_dir() for path in sorted(root.rglob("*.py"))]
    files += sorted((REPO / "popex").glob("*wire*.py"))
    assert {"wire.py", "_wire_bytes.py", "runner.py", "store.py"} <= {path.name for path in files}
    found = {str(path.relative_to(REPO)): _scan(path.read_text()) for path in files}
    assert {path: names for path, names in found.items() if names} == {}


def test_concurrent_registration_of_one_model(tmp_path, model):
    from concurrent.futures import ThreadPoolExecutor

    runner = CloudRunner(tmp_path / "state")
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: runner.register(model["model_id"], {
            "spec.json": model["spec_bytes"], "weights.safetensors": model["weights_bytes"]}), range(4)))
    assert len({id(loaded) for loaded in results}) == 1 and runner.n_models == 1
    assert sorted(path.name for path in (tmp_path / "state" / "models").iterdir()) == [model["model_id"]]
    assert CloudRunner(tmp_path / "state").has(model["model_id"])
