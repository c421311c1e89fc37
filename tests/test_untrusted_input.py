"""No 5xx and no NaN: deep JSON, lying .npz headers, huge weights, int8 overflow (popex.untrusted, api_common).

Every body is read back with ``json.loads(..., parse_constant=...)`` raising,
so a NaN or an Infinity anywhere in an answer fails the test.
"""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
import torch
from flask import Flask

from api_common.errors import init_errors
from cloud_api import create_app as create_cloud_app
from popex.data import encode_png
from popex.errors import DataError, SpecError
from popex.nets import EarlyExitNet, compute_model_id, weights_to_bytes, zoo_spec
from popex.untrusted import MAX_JSON_DEPTH, check_npz_headers, json_depth, loads_json
from popex.wire import decode_offload, encode_offload

DEEP = b"[" * 100_000 + b"]" * 100_000


def _strict(response) -> dict:
    """The body as JSON; a NaN or an Infinity anywhere raises."""

    def refuse(name):
        raise AssertionError(f"{name} in a response body: {response.data[:200]!r}")

    return json.loads(response.data, parse_constant=refuse)


def _error(response, status: int) -> dict:
    assert response.status_code == status, response.data[:300]
    return _strict(response)["error"]


def _upload(files):
    return {name: (io.BytesIO(data), f"{name}.bin") for name, data in files.items()}


def _huge_header_npz() -> bytes:
    """An .npz whose 'confidence' member declares (2**40, 3) float64 in 48 bytes of data."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (2**40, 3)})
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("confidence.npy", header.getvalue() + bytes(48))
    return buffer.getvalue()


@pytest.fixture
def config(config):
    return {**config, "default_model_dir": None}


@pytest.fixture
def fake_cloud(tmp_path):
    from popex.edge.fake_cloud import FakeCloud
    return FakeCloud(state_dir=tmp_path / "cloud")  # the cloud's half for real: its exits too


# -- the readers themselves ---------------------------------------------------------------------------------


def test_depth_is_measured_without_recursing_and_strings_do_not_count():
    assert json_depth(DEEP) == 100_000
    assert json_depth(b'["[[[[", {"k": "\\"]]]"}]') == 2
    with pytest.raises(DataError, match="nests 100000 levels deep"):
        loads_json(DEEP, name="the body", max_bytes=len(DEEP))
    assert loads_json(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH, name="x", max_bytes=1000)


@pytest.mark.parametrize("text", [b"[NaN]", b'{"a": Infinity}', b"-Infinity", b'{"a": 1', b"\xff\xfe"])
def test_nan_infinity_and_broken_json_are_refused_as_the_callers_error(text):
    with pytest.raises(SpecError):
        loads_json(text, name="spec", max_bytes=100, error=SpecError)


def test_a_too_large_document_is_refused_before_parsing():
    with pytest.raises(DataError, match="at most 10 are taken"):
        loads_json(b'"' + b"x" * 20 + b'"', name="the body", max_bytes=10)


def test_npz_headers_are_checked_before_numpy_allocates():
    from popex.errors import CalibrationError
    with pytest.raises(CalibrationError, match=r"declares shape \(1099511627776, 3\)"):
        check_npz_headers(_huge_header_npz(), what="calibration")
    buffer = io.BytesIO()
    np.savez(buffer, a=np.zeros((1000, 1000)))  # 8 MB declared and held
    with pytest.raises(CalibrationError, match="more than 1000000 bytes"):
        check_npz_headers(buffer.getvalue(), what="calibration", max_bytes=1_000_000)


# -- the edge and the cloud, through their routes --------------------------------------------------------------


def test_deeply_nested_json_is_a_400_on_every_json_route(app, client, tmp_path, token, lenet_files):
    deep_small = b"[" * 2000 + b"]" * 2000  # under the route's 4 KB body limit
    error = _error(client.put("/api/v1/admin/link", data=deep_small, content_type="application/json"), 400)
    assert "levels deep" in error["message"]
    spec = b'{"format": "popex-spec/1", "stages": ' + DEEP + b"}"
    files = {**lenet_files["files"], "spec": spec}
    error = _error(client.post("/api/v1/models", data=_upload(files), content_type="multipart/form-data"), 400)
    assert error["code"] == "bad_spec" and "levels deep" in error["message"]
    model_json = {"files": [(io.BytesIO(b'{"format": ' + DEEP + b"}"), "model.json"),
                            (io.BytesIO(lenet_files["files"]["calibration"]), "calibration.npz")]}
    error = _error(client.post("/api/v1/models", data=model_json, content_type="multipart/form-data"), 400)
    assert "levels deep" in error["message"]

    cloud = create_cloud_app({"token": token, "state_dir": str(tmp_path / "cloud")}).test_client()
    auth = {"Authorization": f"Bearer {token}"}
    files = lenet_files["files"]
    assert cloud.put(f"/api/v1/models/{lenet_files['model_id']}", headers=auth, data=_upload(
        {"spec": files["spec"], "weights": files["weights"]})).status_code == 201
    error = _error(cloud.post(f"/api/v1/models/{lenet_files['model_id']}/profile", headers=auth, data=deep_small,
                              content_type="application/json"), 400)
    assert "levels deep" in error["message"]
    assert client.get("/api/v1/models").status_code == 200  # still serving


def test_a_calibration_declaring_2_to_the_40_rows_is_a_400_and_nothing_is_stored(client, lenet_files):
    files = {**lenet_files["files"], "calibration": _huge_header_npz()}
    error = _error(client.post("/api/v1/models", data=_upload(files), content_type="multipart/form-data"), 400)
    assert error["code"] == "bad_calibration" and "1099511627776" in error["message"]
    assert _strict(client.get("/api/v1/models"))["models"] == []


def test_a_model_with_huge_finite_weights_answers_finite_confidences(tmp_path, model_actions, client):
    """Weights of 1e30: finite, and the registration's dry run on zeros passes, but on an image the logits
    overflow to inf (and inf - inf to NaN). The answer says confidence 0, never NaN."""
    from onnx import helper
    import onnx
    from test_onnx_models import W1, W2, W_BRANCH, _calibration_bytes, _files, _graph, _head, _image, write_onnx_model
    stage1 = _graph([helper.make_node("Flatten", ["input"], ["flat"], axis=1),
                     helper.make_node("MatMul", ["flat", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["output"])],
                    {"w1": W1 * np.float32(1e30)}, [1, 4, 4], [8])
    directory = write_onnx_model(tmp_path / "m", stage1=stage1, stage2=_head(W2 * np.float32(1e30)))
    onnx.save(_head(W_BRANCH * np.float32(1e30)), directory / "branches" / "0.onnx")
    files = {**_files(directory), "calibration.npz": _calibration_bytes(tmp_path)}
    response = client.post("/api/v1/models", content_type="multipart/form-data",
                           data={"files": [(io.BytesIO(data), path) for path, data in files.items()]})
    assert response.status_code == 202, response.json
    model_id = response.json["model_id"]
    model_actions.wait_ready(model_id)
    for policy in ("edge-only", "adaptive", "cloud-only"):
        response = client.post(f"/api/v1/classify?model={model_id}&policy={policy}&deadline_ms=1000",
                               data=_image(), content_type="image/png")
        answer = _strict(response)
        assert response.status_code == 200, answer
        assert answer["confidence"] == 0.0, answer  # no confidence at all, said as a number
    for path in (f"/api/v1/models/{model_id}", f"/api/v1/models/{model_id}/strategies", "/api/v1/status",
                 "/api/v1/requests"):
        assert client.get(path).status_code == 200
        _strict(client.get(path))


def test_an_int8_payload_whose_scale_overflows_is_refused(monkeypatch):
    """A sender's scale of 1e38 (finite) makes q * scale infinite in float32: refused, not passed on."""
    import popex.wire as wire
    monkeypatch.setattr(wire, "_quantise_int8", lambda x: (np.full(x.shape, 127, np.int8), 1e38))
    payload = encode_offload(np.ones((1, 4), np.float32), model_id="m" * 64, split=0, request_id="r",
                             wire_dtype="int8")
    with pytest.raises(wire.WireError, match="NaN or infinity once dequantised"):
        decode_offload(payload)


def test_recursion_and_memory_errors_never_reach_a_user_as_a_500():
    app = Flask(__name__)
    init_errors(app, service_name="test")

    @app.get("/deep")
    def deep():
        raise RecursionError("maximum recursion depth exceeded")

    @app.get("/big")
    def big():
        raise MemoryError

    client = app.test_client()
    assert _error(client.get("/deep"), 400)["code"] == "too_deep"
    assert _error(client.get("/big"), 413)["code"] == "too_large"
