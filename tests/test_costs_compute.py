"""Compute and memory bombs (popex.runtime.model_cost, popex.edge.vetting): refused before anything runs.

The audit of issue 15: four 750 KB specs of wide convolutions passed every
check (only parameters were capped), their dry runs held the four request
threads for 122 s and 16 of 16 classify requests timed out meanwhile. Now
FLOPs and activation bytes are computed from the files and capped (edge and
cloud), an upload is vetted in its own process with memory and time limits,
one at a time, and classify requests go on being answered.
"""

from __future__ import annotations

import io
import json
import threading
import time
import uuid

import numpy as np
import pytest
import requests

from conftest import calibration_bytes
from popex.data import encode_png
from popex.errors import TooLargeError
from popex.nets import EarlyExitNet, weights_to_bytes, zoo_spec
from popex.runtime.model_cost import DEFAULT_MAX_ACTIVATION_BYTES, DEFAULT_MAX_MODEL_FLOPS, files_cost, spec_cost

IMAGE = encode_png(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8))


def conv_spec_files(*, side: int, out_channels: int, kernel: int, name: str = "conv-bomb",
                    seed: int = 0) -> dict[str, bytes]:
    """One wide convolution on a ``side`` x ``side`` RGB input, pooled into 10 classes (spec-form fields)."""
    spec = {"format": "popex-spec/1", "name": name, "input_shape": [3, side, side], "mean": [0.5] * 3,
            "std": [0.25] * 3, "class_names": [f"c{i}" for i in range(10)],
            "stages": [{"layers": [{"type": "conv2d", "in_channels": 3, "out_channels": out_channels,
                                    "kernel_size": kernel}, {"type": "relu"},
                                   {"type": "adaptiveavgpool2d", "output_size": 1}, {"type": "flatten"},
                                   {"type": "linear", "in_features": out_channels, "out_features": 10}]}]}
    import torch
    torch.manual_seed(seed)
    return {"spec": json.dumps(spec).encode(), "weights": weights_to_bytes(EarlyExitNet(spec)),
            "calibration": calibration_bytes(n_exits=1)}


#: 28.9 GFLOPs and 2.1 GB of activations per sample in 5.4 KB of weights.
COMPUTE_BOMB = {"side": 1024, "out_channels": 512, "kernel": 3}
#: 0.4 GFLOPs, but one ReLU holds 537 MB (its input and output).
MEMORY_BOMB = {"side": 1024, "out_channels": 64, "kernel": 1}


@pytest.fixture
def config(config):
    return {**config, "default_model_dir": None}


def _upload(files):
    return {name: (io.BytesIO(data), f"{name}.bin") for name, data in files.items()}


# -- the estimate -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["b-lenet", "b-alexnet", "b-resnet", "b-mobilenetv2"])
def test_the_spec_estimate_is_the_torch_count_and_the_onnx_count(arch, tmp_path):
    """Three counts, one answer: arithmetic on the spec, hooks on the torch module, shape inference on the export."""
    from popex.nets.export_spec import export_early_exit_net
    from popex.nets.flops import stage_macs
    from popex.runtime.model_files import onnx_form_files

    spec = zoo_spec(arch)
    net = EarlyExitNet(spec)
    backbone = {**spec, "branches": [], "experts": []}
    assert spec_cost(backbone).flops == 2 * sum(stage_macs(net))
    export_early_exit_net(net, tmp_path / "onnx")
    assert files_cost(onnx_form_files(tmp_path / "onnx")) == spec_cost(spec)


def test_the_estimate_refuses_what_it_cannot_cost_as_a_bad_spec():
    from popex.errors import SpecError
    good = json.loads(conv_spec_files(side=8, out_channels=4, kernel=3)["spec"])
    for change in ({"input_shape": [3, 8]}, {"stages": []}):
        with pytest.raises(SpecError):
            spec_cost({**good, **change})
    bad_stride = json.loads(json.dumps(good))
    bad_stride["stages"][0]["layers"][0]["stride"] = 0
    with pytest.raises(SpecError, match="stride must be an integer >= 1"):
        spec_cost(bad_stride)
    too_big = json.loads(json.dumps(good))
    too_big["stages"][0]["layers"][0]["kernel_size"] = 9
    with pytest.raises(SpecError, match="does not fit the 8x8 input"):
        spec_cost(too_big)


# -- the edge's gates -----------------------------------------------------------------------------------------------


def test_the_compute_bomb_is_a_400_naming_its_flops_before_anything_runs(client, model_actions, monkeypatch):
    from popex.edge.vetting import ModelVetting

    def never(*args, **kwargs):
        raise AssertionError("the bomb reached the vetting process")

    monkeypatch.setattr(ModelVetting, "_run", never)
    files = conv_spec_files(**COMPUTE_BOMB)
    flops = spec_cost(json.loads(files["spec"])).flops
    response = model_actions.register(files)
    assert response.status_code == 400, response.json
    error = response.json["error"]
    assert error["code"] == "too_costly"
    assert f"{flops:,} FLOPs" in error["message"] and f"{DEFAULT_MAX_MODEL_FLOPS:,}" in error["message"]
    assert client.get("/api/v1/models").json["models"] == []


def test_the_memory_bomb_is_a_400_naming_its_activation_bytes(client, model_actions):
    files = conv_spec_files(**MEMORY_BOMB)
    cost = spec_cost(json.loads(files["spec"]))
    assert cost.flops < DEFAULT_MAX_MODEL_FLOPS  # only the activations are over
    response = model_actions.register(files)
    assert response.status_code == 400 and response.json["error"]["code"] == "too_costly"
    assert f"{cost.peak_activation_bytes:,} bytes" in response.json["error"]["message"]
    assert f"{DEFAULT_MAX_ACTIVATION_BYTES:,}" in response.json["error"]["message"]


def test_an_onnx_model_over_the_flops_cap_is_refused_by_the_vetting_process(make_app, config, tmp_path):
    from test_onnx_models import _calibration_bytes, _files, write_onnx_model
    files = {**_files(write_onnx_model(tmp_path / "m")), "calibration.npz": _calibration_bytes(tmp_path)}
    flops = files_cost(files).flops
    client = make_app({**config, "max_model_flops": flops - 1}).test_client()
    response = client.post("/api/v1/models", content_type="multipart/form-data",
                           data={"files": [(io.BytesIO(data), path) for path, data in files.items()]})
    assert response.status_code == 400 and f"{flops:,} FLOPs" in response.json["error"]["message"]
    client = make_app({**config, "max_model_flops": flops}).test_client()
    response = client.post("/api/v1/models", content_type="multipart/form-data",
                           data={"files": [(io.BytesIO(data), path) for path, data in files.items()]})
    assert response.status_code == 202, response.json


@pytest.mark.parametrize("limits, words", [({"registration_memory_bytes": 256 * 2**20}, "registration_memory_bytes"),
                                           ({"registration_timeout_s": 0.1}, "took over 0.1 s")])
def test_the_vetting_process_is_held_to_its_memory_and_time(make_app, config, lenet_files, limits, words):
    """256 MiB of address space is less than ONNX Runtime needs to load; 0.1 s less than starting the vetting process takes."""
    client = make_app({**config, **limits}).test_client()
    response = client.post("/api/v1/models", data=_upload(lenet_files["files"]), content_type="multipart/form-data")
    assert response.status_code == 400, response.json
    assert response.json["error"]["code"] == "too_costly" and words in response.json["error"]["message"]
    assert client.get("/api/v1/models").json["models"] == []


def _as_paths(files: dict[str, bytes]) -> dict[str, bytes]:
    return {"spec.json": files["spec"], "weights.safetensors": files["weights"],
            "calibration.npz": files["calibration"]}


def test_one_upload_is_vetted_at_a_time_the_next_is_a_429(app, client, lenet_files):
    vetting = app.extensions["popex_edge_node"].preparation.vetting
    other = _as_paths(conv_spec_files(side=8, out_channels=4, kernel=3))
    with vetting.gate(other, known=lambda model_id: False):  # vetted for real; the slot is held until the end
        response = client.post("/api/v1/models", data=_upload(lenet_files["files"]),
                               content_type="multipart/form-data")
        assert response.status_code == 429 and response.json["error"]["code"] == "busy"
    response = client.post("/api/v1/models", data=_upload(lenet_files["files"]), content_type="multipart/form-data")
    assert response.status_code == 202
    # a known model is not vetted again, even while another upload holds the slot
    with vetting.gate(other, known=lambda model_id: False):
        response = client.post("/api/v1/models", data=_upload(lenet_files["files"]),
                               content_type="multipart/form-data")
        assert response.status_code == 200


def test_a_stored_model_over_the_caps_is_skipped_at_start(make_app, config, tmp_path, lenet_files):
    from popex.edge.store import ModelRegistry
    registry = ModelRegistry(tmp_path / "edge")  # what an older edge stored without costing it
    files = conv_spec_files(side=64, out_channels=16, kernel=3)
    bomb = registry.register(files["spec"], files["weights"], files["calibration"])
    good = registry.register(*(lenet_files["files"][k] for k in ("spec", "weights", "calibration")))
    client = make_app({**config, "max_model_flops": spec_cost(json.loads(files["spec"])).flops - 1}).test_client()
    listed = {m["model_id"] for m in client.get("/api/v1/models").json["models"]}
    assert good in listed and bomb not in listed
    assert client.post(f"/api/v1/classify?model={good}", data=IMAGE, content_type="image/png").status_code == 200


# -- the edge and the cloud agree --------------------------------------------------------------------------------


def test_the_edge_caps_are_at_most_the_clouds():
    from cloud_api.config import CloudConfig
    from edge_api.config import EdgeConfig
    edge = EdgeConfig.from_mapping({"token": "t" * 16})
    cloud = CloudConfig.from_mapping({"token": "t" * 16})
    assert edge.max_model_bytes <= cloud.max_body_bytes
    assert edge.max_model_flops <= cloud.max_model_flops
    assert edge.max_activation_bytes <= cloud.max_activation_bytes


def test_a_model_the_edge_would_push_fits_the_clouds_body_limit_and_one_byte_less_is_refused(tmp_path, token,
                                                                                               lenet_files):
    """The edge's push estimate bounds the real multipart body its client sends: at the estimate, the cloud's
    body limit takes it; an edge whose max_model_bytes is one byte less refuses it itself (413)."""
    from requests.models import RequestEncodingMixin

    from cloud_api import create_app as create_cloud_app
    from popex.edge.vetting import ModelVetting
    push = {"spec.json": lenet_files["files"]["spec"], "weights.safetensors": lenet_files["files"]["weights"]}
    vetting = ModelVetting(scratch_dir=tmp_path, max_model_flops=DEFAULT_MAX_MODEL_FLOPS,
                           max_activation_bytes=DEFAULT_MAX_ACTIVATION_BYTES, max_strategy_configurations=100_000,
                           max_push_bytes=10**9, memory_bytes=2**32, timeout_s=60.0)
    estimate = sum(len(data) + len(path) + 512 for path, data in push.items())
    vetting.max_push_bytes = estimate
    vetting.check_cheap(push)
    vetting.max_push_bytes = estimate - 1
    with pytest.raises(TooLargeError, match=f"{estimate:,}-byte upload"):
        vetting.check_cheap(push)
    parts = [("files", (path, data, "application/octet-stream")) for path, data in sorted(push.items())]
    body, content_type = RequestEncodingMixin._encode_files(parts, {})  # what CloudClient.put_model sends
    assert len(body) <= estimate
    cloud = create_cloud_app({"token": token, "state_dir": str(tmp_path / "cloud"), "max_body_bytes": estimate})
    response = cloud.test_client().put(f"/api/v1/models/{lenet_files['model_id']}", data=body,
                                       content_type=content_type, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 201, response.json


def test_the_cloud_refuses_a_model_over_its_caps_before_loading_it(tmp_path, token):
    from cloud_api import create_app as create_cloud_app
    from popex.runtime.model_files import spec_model_id
    files = conv_spec_files(**COMPUTE_BOMB)
    cloud = create_cloud_app({"token": token, "state_dir": str(tmp_path / "cloud")}).test_client()
    model_id = spec_model_id(files["spec"], files["weights"])
    response = cloud.put(f"/api/v1/models/{model_id}", headers={"Authorization": f"Bearer {token}"},
                         data=_upload({"spec": files["spec"], "weights": files["weights"]}))
    assert response.status_code == 400 and "FLOPs per sample" in response.json["error"]["message"]


# -- real processes: classify keeps being answered while bombs and uploads arrive ---------------------------------


@pytest.mark.slow
def test_over_http_bombs_are_refused_and_classify_is_answered_meanwhile(tmp_path, token):
    from popex.testbed.services import start_cloud, start_edge
    with start_cloud(token=token, state_dir=tmp_path / "cloud", log_path=tmp_path / "cloud.log") as cloud:
        cloud.wait_ready()
        with start_edge(token=token, cloud_url=cloud.url, state_dir=tmp_path / "edge", n_threads=4,
                        log_path=tmp_path / "edge.log") as edge:
            edge.wait_ready(timeout_s=180)
            uploads: list[tuple[str, int, str]] = []
            answers: list[int | str] = []
            stop = threading.Event()

            def upload(kind: str, n: int) -> None:
                for i in range(n):
                    files = (conv_spec_files(**(COMPUTE_BOMB if kind == "compute" else MEMORY_BOMB)) if kind != "good"
                             else conv_spec_files(side=16, out_channels=8, kernel=3, seed=i,
                                                  name=f"good-{i}-{uuid.uuid4().hex[:8]}"))
                    response = requests.post(edge.url + "/api/v1/models", headers=edge.admin_headers(), timeout=200,
                                             files={k: (k, v) for k, v in files.items()})
                    uploads.append((kind, response.status_code, response.json()["error"]["code"]
                                    if response.status_code >= 400 else ""))

            def classify() -> None:
                while not stop.is_set():
                    try:
                        answers.append(requests.post(edge.url + "/api/v1/classify", data=IMAGE, timeout=10,
                                                     headers={"Content-Type": "image/png"}).status_code)
                    except requests.RequestException as err:
                        answers.append(type(err).__name__)

            clients = [threading.Thread(target=classify) for _ in range(2)]
            uploaders = [threading.Thread(target=upload, args=(kind, 4))
                         for kind in ("compute", "memory", "good", "good")]
            for thread in clients + uploaders:
                thread.start()
            for thread in uploaders:
                thread.join(timeout=600)
            time.sleep(1.0)
            stop.set()
            for thread in clients:
                thread.join(timeout=30)
            bombs = [(status, code) for kind, status, code in uploads if kind != "good"]
            assert bombs and all(entry == (400, "too_costly") for entry in bombs), uploads
            good = [status for kind, status, _ in uploads if kind == "good"]
            assert set(good) <= {202, 429} and 202 in good, uploads
            assert answers and all(status == 200 for status in answers), answers[:20]
            print(f"uploads {uploads}; classify answered {len(answers)}")
