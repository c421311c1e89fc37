"""The ONNX form of a model: the stage executor, its checks, and registration over REST.

The graphs here are built with ``onnx.helper`` (no torch), so they are the
kind of file a user sends: each bad one must be a 4xx with one message and
leave nothing stored, and a good one must classify through edge and cloud.
"""

from __future__ import annotations

import io
import json
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from popex.decision.calibration import Calibration, save_calibration
from popex.data.images import encode_png
from popex.edge.fake_cloud import FakeCloud
from popex.runtime.model_files import load_model_dir
from popex.runtime.onnx_model import OnnxModelError, compute_onnx_model_id, load_onnx_dir

N_CLASSES = 3
RNG = np.random.default_rng(0)
W1 = RNG.normal(size=(16, 8)).astype(np.float32)
W_BRANCH = RNG.normal(size=(8, N_CLASSES)).astype(np.float32)
W2 = RNG.normal(size=(8, N_CLASSES)).astype(np.float32)


def _graph(nodes, initializers, in_shape, out_shape, *, opset=17):
    graph = helper.make_graph(
        nodes, "piece",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *in_shape])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", *out_shape])],
        initializer=[numpy_helper.from_array(array, name) for name, array in initializers.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _stage1(opset=17):
    return _graph([helper.make_node("Flatten", ["input"], ["flat"], axis=1),
                   helper.make_node("MatMul", ["flat", "w1"], ["h"]),
                   helper.make_node("Relu", ["h"], ["output"])], {"w1": W1}, [1, 4, 4], [8], opset=opset)


def _head(weights, in_features=8):
    return _graph([helper.make_node("MatMul", ["input", "w"], ["output"])], {"w": weights}, [in_features],
                  [N_CLASSES])


def _reference(x):
    h = np.maximum(x.reshape(len(x), -1) @ W1, 0)
    return h @ W_BRANCH, h @ W2


def _calibration_bytes(tmp_path):
    n = 20
    labels = RNG.integers(0, N_CLASSES, n)
    predicted = RNG.integers(0, N_CLASSES, (n, 2))
    calibration = Calibration(
        confidence=RNG.uniform(0.4, 1.0, size=(n, 2)).astype(np.float32), predicted=predicted,
        correct=predicted == labels[:, None], labels=labels, temperature=np.ones(2, np.float32),
        confidence_method="max_softmax")
    path = tmp_path / "calibration.npz"
    save_calibration(calibration, path)
    return path.read_bytes()


def write_onnx_model(directory: Path, *, stage1=None, stage2=None, manifest_changes=None) -> Path:
    """A two-stage model with one branch after stage 1, in the ONNX form."""
    (directory / "stages").mkdir(parents=True, exist_ok=True)
    (directory / "branches").mkdir(exist_ok=True)
    onnx.save(stage1 or _stage1(), directory / "stages" / "1.onnx")
    onnx.save(stage2 or _head(W2), directory / "stages" / "2.onnx")
    onnx.save(_head(W_BRANCH), directory / "branches" / "0.onnx")
    manifest = {"format": "popex-onnx/1", "name": "tiny-onnx", "input_shape": [1, 4, 4], "mean": [0.5],
                "std": [0.25], "class_names": ["a", "b", "c"], "stages": ["stages/1.onnx", "stages/2.onnx"],
                "branches": [{"after_stage": 1, "file": "branches/0.onnx"}], **(manifest_changes or {})}
    (directory / "model.json").write_text(json.dumps(manifest))
    return directory


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# -- the executor ---------------------------------------------------------------------------


def test_an_onnx_model_runs_its_stages_and_branch_like_the_reference(tmp_path):
    net, model_id = load_onnx_dir(write_onnx_model(tmp_path / "m"))
    x = RNG.normal(size=(5, 1, 4, 4)).astype(np.float32)
    branch, final = _reference(x)
    logits = net.forward(x)
    np.testing.assert_allclose(logits[0], branch, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits[1], final, rtol=1e-5, atol=1e-5)
    h = net.run_stages(x, stop=1)
    np.testing.assert_allclose(net.run_stages(h, start=1), final, rtol=1e-5, atol=1e-5)
    assert net.stage_output_shapes() == [(1, 4, 4), (8,), (N_CLASSES,)]
    assert (net.n_stages, net.n_branches, net.branch_after_stage) == (2, 1, (1,))
    files = _files(tmp_path / "m")
    manifest = json.loads(files.pop("model.json"))
    assert model_id == compute_onnx_model_id(manifest, files)


def test_the_model_id_changes_with_any_graph_byte(tmp_path):
    _, first = load_onnx_dir(write_onnx_model(tmp_path / "a"))
    other_w2 = W2.copy()
    other_w2[0, 0] += 1.0
    _, second = load_onnx_dir(write_onnx_model(tmp_path / "b", stage2=_head(other_w2)))
    assert first != second


def _external(tmp_path, location):
    model = _stage1()
    tensor = model.graph.initializer[0]
    tensor.data_location = TensorProto.EXTERNAL
    tensor.ClearField("raw_data")
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location
    return model


def _torch_zip():
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"w": [1, 2]}))
    return buffer.getvalue()


BAD_MODELS = {
    "a pickle renamed .onnx": ({"stage1": pickle.dumps({"w": 1})}, "pickle"),
    "a torch zip": ({"stage1": _torch_zip()}, "torch.save"),
    "stage shapes that do not chain": ({"stage2": _head(W2[:4], in_features=4)}, "do not chain"),
    "external data outside the directory": ({"stage1": "external:../../../etc/passwd"}, "outside the model"),
    "an absolute external path": ({"stage1": "external:/etc/passwd"}, "relative path"),
    "an unsupported opset": ({"stage1": _stage1(opset=7)}, "opset 7"),
}


def _bad_model_dir(tmp_path, change):
    directory = write_onnx_model(tmp_path / "bad")
    for piece, content in change.items():
        path = directory / "stages" / ("1.onnx" if piece == "stage1" else "2.onnx")
        if isinstance(content, str) and content.startswith("external:"):
            onnx.save(_external(tmp_path, content.removeprefix("external:")), path)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            onnx.save(content, path)
    return directory


@pytest.mark.parametrize("case", sorted(BAD_MODELS))
def test_bad_onnx_files_fail_with_one_clear_message(tmp_path, case):
    change, pattern = BAD_MODELS[case]
    with pytest.raises(OnnxModelError) as raised:
        load_model_dir(_bad_model_dir(tmp_path, change))
    assert pattern in str(raised.value) and "\n" not in str(raised.value)


def test_a_manifest_naming_a_path_outside_the_directory_is_refused(tmp_path):
    directory = write_onnx_model(tmp_path / "m", manifest_changes={"stages": ["../1.onnx", "stages/2.onnx"]})
    with pytest.raises(OnnxModelError, match="inside the model directory"):
        load_onnx_dir(directory)


# -- over REST ------------------------------------------------------------------------------


@pytest.fixture
def config(config):
    return {**config, "default_model_dir": None}


@pytest.fixture
def fake_cloud(tmp_path):
    return FakeCloud(state_dir=tmp_path / "cloud")  # the cloud's half for real


def _post(client, files: dict[str, bytes]):
    data = {"files": [(io.BytesIO(content), path) for path, content in files.items()]}
    return client.post("/api/v1/models", data=data, content_type="multipart/form-data")


def _stored(app_config) -> list[str]:
    models = Path(app_config["state_dir"]) / "models"
    return sorted(p.name for p in models.iterdir()) if models.is_dir() else []


@pytest.mark.parametrize("case", sorted(BAD_MODELS))
def test_bad_onnx_uploads_are_4xx_and_store_nothing(tmp_path, client, config, case):
    change, pattern = BAD_MODELS[case]
    files = {**_files(_bad_model_dir(tmp_path, change)), "calibration.npz": _calibration_bytes(tmp_path)}
    response = _post(client, files)
    assert 400 <= response.status_code < 500, response.get_json()
    assert pattern in response.get_json()["error"]["message"]
    assert _stored(config) == []
    assert client.get("/healthz").status_code == 200


def test_an_oversized_upload_is_413_and_stores_nothing(tmp_path, make_app, config):
    app = make_app({**config, "max_model_bytes": 2048})
    files = {**_files(write_onnx_model(tmp_path / "m")), "calibration.npz": _calibration_bytes(tmp_path)}
    response = _post(app.test_client(), files)
    assert response.status_code == 413 and _stored(config) == []


def _image():
    return encode_png(RNG.integers(0, 256, (4, 4), dtype=np.uint8))


def test_an_onnx_model_registers_and_classifies_through_edge_and_cloud(tmp_path, client, model_actions,
                                                                       fake_cloud):
    directory = write_onnx_model(tmp_path / "m")
    files = {**_files(directory), "calibration.npz": _calibration_bytes(tmp_path)}
    response = _post(client, files)
    assert response.status_code == 202, response.get_json()
    model_id = response.get_json()["model_id"]
    model_actions.wait_ready(model_id)
    assert fake_cloud.runner.has(model_id)  # the edge pushed the ONNX form, the cloud checked its id
    model_actions.force(model_id, split=1, thresholds=[None])
    image = _image()
    answer = client.post(f"/api/v1/classify?model={model_id}", data=image, content_type="image/png").get_json()
    assert answer["where"] == "cloud" and answer["split"] == 1
    from popex.data.images import decode_image
    from popex.data.preprocess import Preprocessing, preprocess
    x = preprocess(decode_image(image), Preprocessing.from_spec_dict(json.loads(files["model.json"])))
    _, final = _reference(x)
    probs = np.exp(final[0] - final[0].max())
    probs /= probs.sum()
    assert answer["label"] == int(final[0].argmax())
    assert abs(answer["confidence"] - float(probs.max())) < 1e-4


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_one_archive_of_the_model_directory_registers(tmp_path, client, kind):
    directory = write_onnx_model(tmp_path / "m")
    (directory / "calibration.npz").write_bytes(_calibration_bytes(tmp_path))
    buffer = io.BytesIO()
    if kind == "zip":
        with zipfile.ZipFile(buffer, "w") as archive:
            for path, content in _files(directory).items():
                archive.writestr(f"my-model/{path}", content)
    else:
        with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
            archive.add(directory, arcname="my-model")
    response = client.post("/api/v1/models", data={"archive": (io.BytesIO(buffer.getvalue()), f"m.{kind}")},
                           content_type="multipart/form-data")
    assert response.status_code == 202, response.get_json()


def test_an_archive_with_a_link_is_refused(tmp_path, client, config):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info = tarfile.TarInfo("model.json")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(info)
    response = client.post("/api/v1/models", data={"archive": (io.BytesIO(buffer.getvalue()), "m.tar")},
                           content_type="multipart/form-data")
    assert response.status_code == 400 and "link" in response.get_json()["error"]["message"]
    assert _stored(config) == []


def test_a_stray_file_in_an_upload_is_refused(tmp_path, client, config):
    files = {**_files(write_onnx_model(tmp_path / "m")), "calibration.npz": _calibration_bytes(tmp_path),
             "notes/evil.py": b"import os"}
    response = _post(client, files)
    assert response.status_code == 400 and "notes/evil.py" in response.get_json()["error"]["message"]
    assert _stored(config) == []
