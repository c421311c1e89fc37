"""Real-process integration tests: cloud and edge started by run_cloud.sh / run_edge.sh.

No HTTP mocks: one cloud and one edge (gunicorn, 127.0.0.1) serve the whole
module, started through :mod:`popex.testbed.services` exactly as the demo
and a user start them. The tests cover issue 3's acceptance: accuracy of the
default model over HTTP with offloading, a model registered through REST
becoming classifiable, bad input answered with 4xx JSON errors while both
services keep serving, the cloud killed mid-stream (every request still
answered, as a fallback) and restarted (offloading resumes), no 5xx or
traceback in either service's log, and (issue 5, with a cloud and edge of its
own) distortion-aware inference: a blurred image gets the blur expert, a
noisy one the noise expert.

Every wait is bounded; nothing asserts on latency (the machine is shared).
"""

from __future__ import annotations

import functools
import io
import json
import os
import pickle
import re
import secrets
import signal
import struct
import threading
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import cv2
import numpy as np
import pytest
import requests
import torch
from safetensors.numpy import save as safetensors_save

from popex.data import Preprocessing, default_test_set, encode_png, load_fashion_mnist, preprocess
from popex.data.subset import SHIPPED_SUBSET_ROOT
from popex.data.distort import DEFAULT_LEVELS, gaussian_blur, gaussian_noise
from popex.decision import save_calibration
from popex.testbed.services import REPO_ROOT, ServiceProcess, start_cloud, start_edge
from popex.nets import EarlyExitNet, load_model, save_model, zoo_spec
from popex.nets.train import calibrate
from popex.wire import encode_offload

pytestmark = pytest.mark.slow  # real processes; the fast lane is -m "not slow"

DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "b-alexnet"
_MODEL_FILES = ("spec.json", "weights.safetensors", "calibration.npz")
HTTP_TIMEOUT_S = 30.0  # per request; a request that takes longer is a hang, not slowness
READY_TIMEOUT_S = 120.0  # a model's background preparation (push, profiles, overhead)
# The issue asks for >= 90% of 200 test images. A random 200 drawn from a
# 90.6%-accurate model clears that only ~68% of the time (seed 0: 177/200),
# so the check streams the whole 1,000-image stratified subset shipped in
# data/ (fixed before the model was trained, the same on every machine).
CLOUD_ONLY_DEADLINE_MS = 5000.0  # so that a busy machine does not turn offloads into fallbacks
KILL_DEADLINE_MS = 2000.0


# -- services -------------------------------------------------------------------------


@dataclass
class Services:
    """The running services, and everything needed to restart the cloud like a user would."""

    token: str
    cloud: ServiceProcess
    edge: ServiceProcess
    cloud_state_dir: Path
    cloud_log_path: Path
    cloud_port: int
    default_model_id: str
    started: list[ServiceProcess] = field(default_factory=list)
    session: requests.Session = field(default_factory=requests.Session)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} {p.log_path}\n{p.log_tail(40)}" for p in (self.cloud, self.edge))

    def classify(self, image: bytes, *, multipart: bool = False, **params: Any) -> requests.Response:
        """POST /api/v1/classify with a raw PNG body and query parameters, or as multipart form."""
        url = self.edge.url + "/api/v1/classify"
        if multipart:
            return self.session.post(url, files={"image": ("image.png", image, "image/png")},
                                     data={k: str(v) for k, v in params.items()}, timeout=HTTP_TIMEOUT_S)
        return self.session.post(url, data=image, params=params, headers={"Content-Type": "image/png"},
                                 timeout=HTTP_TIMEOUT_S)

    def cloud_infer(self, body: bytes, *, token: str | None = "") -> requests.Response:
        """POST /api/v1/infer on the cloud; token "" means the right one, None means no header."""
        headers = {"Content-Type": "application/octet-stream"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token or self.token}"
        return requests.post(self.cloud.url + "/api/v1/infer", data=body, headers=headers, timeout=HTTP_TIMEOUT_S)


def _wait_model_ready(edge_url: str, model_id: str, *, timeout_s: float = READY_TIMEOUT_S) -> dict[str, Any]:
    """Poll GET /api/v1/models/<id> until its state is "ready"; fail on "failed" or after timeout_s."""
    deadline_s = time.monotonic() + timeout_s
    info: dict[str, Any] = {}
    while time.monotonic() < deadline_s:
        response = requests.get(f"{edge_url}/api/v1/models/{model_id}", timeout=HTTP_TIMEOUT_S)
        assert response.status_code == 200, response.text
        info = response.json()
        assert info["state"] != "failed", f"preparing model {model_id} failed: {info.get('error')}"
        if info["state"] == "ready":
            return info
        time.sleep(0.5)
    raise AssertionError(f"model {model_id} not ready after {timeout_s:.0f} s (state {info.get('state')!r})")


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    """One cloud, then one edge pointed at it, with the default model prepared (pushed and profiled)."""
    missing = [name for name in _MODEL_FILES if not (DEFAULT_MODEL_DIR / name).is_file()]
    if missing:
        pytest.skip(f"the default model is missing ({', '.join(missing)} not in {DEFAULT_MODEL_DIR}); "
                    "train it with the command in models/b-alexnet/MODEL_CARD.md")
    root = tmp_path_factory.mktemp("services")
    token = secrets.token_hex(16)
    started: list[ServiceProcess] = []
    try:
        cloud_state_dir = root / "cloud-state"
        cloud_log_path = root / "cloud.log"
        cloud = start_cloud(token=token, state_dir=cloud_state_dir, log_path=cloud_log_path)
        started.append(cloud)
        cloud.wait_ready()
        edge = start_edge(token=token, cloud_url=cloud.url, state_dir=root / "edge-state",
                          log_path=root / "edge.log", config={"profile_n_repeats": 10})
        started.append(edge)
        edge.wait_ready()
        listed = requests.get(edge.url + "/api/v1/models", timeout=HTTP_TIMEOUT_S).json()["models"]
        assert len(listed) == 1, f"the edge should start with the default model only: {listed}"
        default_model_id = listed[0]["model_id"]
        info = _wait_model_ready(edge.url, default_model_id)
        assert info["cloud_profile"] == "measured", f"the default model was not pushed to the cloud: {info}"
        services = Services(token=token, cloud=cloud, edge=edge, cloud_state_dir=cloud_state_dir,
                            cloud_log_path=cloud_log_path, cloud_port=int(cloud.url.rsplit(":", 1)[1]),
                            default_model_id=default_model_id, started=started)
        yield services
        services.session.close()
    finally:
        for process in reversed(started):
            process.stop()


@functools.lru_cache(maxsize=1)
def _dataset():
    return default_test_set().dataset


@functools.lru_cache(maxsize=1)
def _accuracy_dataset():
    return load_fashion_mnist(SHIPPED_SUBSET_ROOT, split="test")


def _png(image: np.ndarray) -> bytes:
    return encode_png(image)


@functools.lru_cache(maxsize=1)
def _good_png() -> bytes:
    return _png(_dataset().images[0])


def _assert_error(response: requests.Response, status: int) -> dict[str, Any]:
    """The response is ``status`` with the DESIGN.md §6 body {"error": {"code", "message"}}."""
    assert response.status_code == status, f"expected {status}, got {response.status_code}: {response.text[:500]}"
    assert response.headers.get("Content-Type", "").startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error.get("code"), str) and error["code"], body
    assert isinstance(error.get("message"), str) and error["message"], body
    return error


# -- 1. accuracy over HTTP, with offloading -------------------------------------------------------


@dataclass(frozen=True)
class StreamedImages:
    """The shipped subset's 1,000 test images, their labels, and the edge's answers (index i: request i)."""

    images: np.ndarray
    labels: np.ndarray
    answers: list[dict[str, Any]]
    cloud_only: list[bool]


@pytest.fixture(scope="module")
def streamed(services: Services) -> StreamedImages:
    """Send the images once: a quarter with policy cloud-only, the rest adaptive; half as multipart."""
    dataset = _accuracy_dataset()
    images, labels = dataset.images, dataset.labels
    answers, cloud_only = [], []
    for i, image in enumerate(images):
        offload = i % 4 == 0  # a quarter offloaded at split 0, the rest as the planner decides
        params = ({"policy": "cloud-only", "deadline_ms": CLOUD_ONLY_DEADLINE_MS} if offload
                  else {"deadline_ms": 1000})
        response = services.classify(_png(image), multipart=i % 2 == 1, **params)
        assert response.status_code == 200, f"image {i}: {response.status_code} {response.text[:300]}"
        answers.append(response.json())
        cloud_only.append(offload)
    return StreamedImages(images=images, labels=labels, answers=answers, cloud_only=cloud_only)


@pytest.fixture(scope="module")
def network_logits(streamed: StreamedImages) -> list[np.ndarray]:
    """Logits of every exit of the default model for the streamed images, shape (n_images, n_classes) each."""
    return _network_logits(streamed.images)


def _network_logits(images: np.ndarray) -> list[np.ndarray]:
    """Logits of every exit of the default model, computed in this process one image at a time."""
    net = load_model(DEFAULT_MODEL_DIR).net.eval()
    preprocessing = Preprocessing.from_spec_dict(json.loads((DEFAULT_MODEL_DIR / "spec.json").read_text()))
    per_image = []
    with torch.inference_mode():
        for image in images:
            per_image.append([logits[0].numpy() for logits in net(torch.from_numpy(preprocess(image, preprocessing)))])
    return [np.stack([exits[e] for exits in per_image]) for e in range(len(per_image[0]))]


def test_answers_over_http_are_the_networks_and_cloud_only_offloads(services: Services, streamed: StreamedImages,
                                                                   network_logits: list[np.ndarray]) -> None:
    class_names = json.loads((DEFAULT_MODEL_DIR / "spec.json").read_text())["class_names"]
    logits = network_logits
    for i, (answer, cloud_only) in enumerate(zip(streamed.answers, streamed.cloud_only)):
        assert answer["model"] == services.default_model_id
        assert answer["class_name"] == class_names[answer["label"]]
        assert answer["policy"] == ("cloud-only" if cloud_only else "adaptive")
        if cloud_only:
            assert (answer["where"], answer["fallback"], answer["split"], answer["exit"]) == \
                ("cloud", False, 0, "final"), f"image {i}: {answer}\n{services.logs()}"
        # The label is what the network computes at the exit the answer names, wherever it ran.
        exit_logits = logits[-1][i] if answer["exit"] == "final" else logits[int(answer["exit"])][i]
        top2 = np.sort(exit_logits)[-2:]
        if top2[1] - top2[0] > 1e-3:  # not a near-tie that float rounding could flip
            assert answer["label"] == int(exit_logits.argmax()), f"image {i}: {answer}"


def test_at_least_90_percent_of_the_test_images_right_over_http(streamed: StreamedImages,
                                                           network_logits: list[np.ndarray]) -> None:
    answers = streamed.answers
    n_correct = sum(answer["label"] == int(label) for answer, label in zip(answers, streamed.labels))
    n_images = len(streamed.labels)
    assert n_images >= 200
    if n_correct < 0.9 * n_images:
        final_right = int((network_logits[-1].argmax(1) == streamed.labels).sum())
        pytest.fail(f"{n_correct}/{n_images} right over HTTP ("
                    f"{sum(a['where'] == 'cloud' for a in answers)} answered by the cloud, "
                    f"{sum(a['fallback'] for a in answers)} fallbacks); the model's final exit alone gets "
                    f"{final_right}/{n_images} of these images in this process")


# -- 2. a model registered through REST --------------------------------------------------------


@pytest.fixture(scope="module")
def lenet_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """A B-LeNet (random weights, seed 7) with a calibration computed on 200 real test images."""
    directory = tmp_path_factory.mktemp("lenet")
    torch.manual_seed(7)
    net = EarlyExitNet(zoo_spec("b-lenet")).eval()
    save_model(net, directory)
    dataset = _dataset()
    inputs = preprocess(dataset.images[-200:], Preprocessing.from_spec_dict(net.spec), is_batch=True)
    save_calibration(calibrate(net, inputs, dataset.labels[-200:]), directory / "calibration.npz")
    return {name: (directory / filename).read_bytes()
            for name, filename in zip(("spec", "weights", "calibration"), _MODEL_FILES)}


def _register(services: Services, files: dict[str, bytes]) -> requests.Response:
    multipart = {name: (filename, files[name], "application/octet-stream")
                 for name, filename in zip(("spec", "weights", "calibration"), _MODEL_FILES)}
    return requests.post(services.edge.url + "/api/v1/models", files=multipart, headers=services.edge.admin_headers(),
                         timeout=HTTP_TIMEOUT_S)


def test_model_registered_through_rest_becomes_classifiable(services: Services,
                                                           lenet_files: dict[str, bytes]) -> None:
    response = _register(services, lenet_files)
    assert response.status_code == 202, response.text
    body = response.json()
    model_id = body["model_id"]
    assert body["state"] == "registered"
    assert model_id != services.default_model_id

    # classifiable at once (with an assumed plan), whatever its preparation is doing
    answer = services.classify(_good_png(), model=model_id, deadline_ms=1000)
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == model_id

    info = _wait_model_ready(services.edge.url, model_id)
    assert info["name"] == "b-lenet"
    assert info["cloud_profile"] == "measured", info  # pushed to the cloud and profiled there
    listed = requests.get(services.edge.url + "/api/v1/models", timeout=HTTP_TIMEOUT_S).json()["models"]
    assert {m["model_id"]: m["state"] for m in listed}[model_id] == "ready"
    strategies = requests.get(f"{services.edge.url}/api/v1/models/{model_id}/strategies", timeout=HTTP_TIMEOUT_S)
    assert strategies.status_code == 200 and strategies.json()["n_rows"] > 0

    class_names = json.loads(lenet_files["spec"])["class_names"]
    for params in ({"deadline_ms": 1000}, {"policy": "cloud-only", "deadline_ms": CLOUD_ONLY_DEADLINE_MS},
                   {"policy": "edge-only", "deadline_ms": 1000}):
        response = services.classify(_good_png(), model=model_id, **params)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["model"] == model_id
        assert answer["class_name"] == class_names[answer["label"]]
        if params.get("policy") == "cloud-only":
            assert (answer["where"], answer["fallback"]) == ("cloud", False), f"{answer}\n{services.logs()}"
        if params.get("policy") == "edge-only":
            assert answer["where"] == "edge"

    # the same files again: known, 200, same id
    again = _register(services, lenet_files)
    assert again.status_code == 200, again.text
    assert again.json()["model_id"] == model_id

    # deleted with the admin token: gone on the edge and on the cloud
    deleted = requests.delete(f"{services.edge.url}/api/v1/models/{model_id}", headers=services.edge.admin_headers(),
                              timeout=HTTP_TIMEOUT_S)
    assert deleted.status_code == 200 and deleted.json() == {"model_id": model_id, "deleted": True,
                                                             "cloud": "deleted"}, deleted.text
    _assert_error(requests.get(f"{services.edge.url}/api/v1/models/{model_id}", timeout=HTTP_TIMEOUT_S), 404)
    _assert_error(services.classify(_good_png(), model=model_id), 404)
    _assert_error(requests.get(f"{services.cloud.url}/api/v1/models/{model_id}", timeout=HTTP_TIMEOUT_S,
                               headers={"Authorization": f"Bearer {services.token}"}), 404)


# -- 3. bad input against the real processes -----------------------------------------------------


def _png_declaring(width_px: int, height_px: int) -> bytes:
    """A PNG whose IHDR (with a correct CRC) declares width x height, with a tiny IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width_px, height_px, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def _truncated_png() -> bytes:
    data = _good_png()
    return data[: len(data) // 2]


def _truncated_jpeg() -> bytes:
    ok, encoded = cv2.imencode(".jpg", _dataset().images[0])
    assert ok
    data = encoded.tobytes()
    return data[: len(data) // 2]


def _npz_declaring(shape: tuple[int, ...]) -> bytes:
    """An .npz whose 'confidence' member declares ``shape`` float64 and holds 48 bytes of data."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": shape})
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("confidence.npy", header.getvalue() + bytes(48))
    return buffer.getvalue()


def _lenet_with(lenet_files: dict[str, bytes], **changes: bytes) -> dict[str, bytes]:
    return {**lenet_files, **changes}


def _spec_with_unknown_layer(lenet_files: dict[str, bytes]) -> bytes:
    spec = json.loads(lenet_files["spec"])
    spec["stages"][0]["layers"][1] = {"type": "os_system", "command": "touch /tmp/popex-pwned"}
    return json.dumps(spec).encode()


def _split0_payload(services: Services, array: np.ndarray, *, wire_dtype: str = "float32") -> bytes:
    """A hand-made safetensors payload at split 0 of the default model (any dtype, any shape)."""
    metadata = {"popex_wire": "1", "model_id": services.default_model_id, "split": "0",
                "wire_dtype": wire_dtype, "request_id": secrets.token_hex(8)}
    return safetensors_save({"tensor": array}, metadata=metadata)


def _good_cloud_payload(services: Services) -> bytes:
    return encode_offload(torch.zeros(1, 1, 28, 28), model_id=services.default_model_id, split=0,
                          request_id=secrets.token_hex(8))


@dataclass(frozen=True)
class BadCase:
    """One bad request: which service it goes to, how it is sent, and the 4xx it must get."""

    target: str  # "edge" or "cloud"
    send: Callable[[Services, dict[str, bytes]], requests.Response]
    status: int


def _edge_raw(body: Callable[[], bytes], content_type: str = "application/octet-stream"):
    """Send ``body()`` (built when the test runs, not at import) raw to /classify."""
    return lambda s, _files: s.session.post(s.edge.url + "/api/v1/classify", data=body(),
                                            headers={"Content-Type": content_type}, timeout=HTTP_TIMEOUT_S)


BAD_CASES = {
    "not-an-image": BadCase("edge", _edge_raw(lambda: np.random.default_rng(1).bytes(2000)), 400),
    "truncated-png": BadCase("edge", lambda s, _f: s.classify(_truncated_png()), 400),
    "truncated-jpeg": BadCase("edge", _edge_raw(_truncated_jpeg, "image/jpeg"), 400),
    "empty-body": BadCase("edge", _edge_raw(lambda: b"", "image/png"), 400),
    "empty-multipart-image": BadCase("edge", lambda s, _f: s.session.post(
        s.edge.url + "/api/v1/classify", files={"image": ("x.png", b"", "image/png")}, timeout=HTTP_TIMEOUT_S), 400),
    "multipart-without-image": BadCase("edge", lambda s, _f: s.session.post(
        s.edge.url + "/api/v1/classify", files={"picture": ("x.png", _good_png(), "image/png")},
        timeout=HTTP_TIMEOUT_S), 400),
    "png-declaring-20000x20000": BadCase("edge", lambda s, _f: s.classify(_png_declaring(20000, 20000)), 400),
    "json-body": BadCase("edge", lambda s, _f: s.session.post(
        s.edge.url + "/api/v1/classify", json={"image": [[0, 1], [2, 3]]}, timeout=HTTP_TIMEOUT_S), 415),
    "unknown-model": BadCase("edge", lambda s, _f: s.classify(_good_png(), model="no-such-model"), 404),
    "deadline-negative": BadCase("edge", lambda s, _f: s.classify(_good_png(), deadline_ms=-5), 400),
    "deadline-not-a-number": BadCase("edge", lambda s, _f: s.classify(_good_png(), deadline_ms="abc"), 400),
    "deadline-nan-multipart": BadCase("edge", lambda s, _f: s.classify(_good_png(), multipart=True,
                                                                       deadline_ms="nan"), 400),
    "unknown-policy": BadCase("edge", lambda s, _f: s.classify(_good_png(), policy="fastest"), 400),
    "spec-with-unknown-layer": BadCase("edge", lambda s, f: _register(
        s, _lenet_with(f, spec=_spec_with_unknown_layer(f))), 400),
    "weights-as-pickle": BadCase("edge", lambda s, f: _register(s, _lenet_with(
        f, weights=pickle.dumps({"conv1.weight": np.zeros((6, 1, 5, 5), np.float32)}))), 400),
    "edge-model-upload-without-token": BadCase("edge", lambda s, f: requests.post(
        s.edge.url + "/api/v1/models", files={"spec": ("spec.json", f["spec"])}, timeout=HTTP_TIMEOUT_S), 401),
    "edge-model-upload-with-the-cloud-token": BadCase("edge", lambda s, f: requests.post(
        s.edge.url + "/api/v1/models", files={"spec": ("spec.json", f["spec"])},
        headers={"Authorization": f"Bearer {s.token}"}, timeout=HTTP_TIMEOUT_S), 401),
    "edge-delete-without-token": BadCase("edge", lambda s, _f: requests.delete(
        s.edge.url + "/api/v1/models/" + s.default_model_id, timeout=HTTP_TIMEOUT_S), 401),
    "edge-admin-link-without-token": BadCase("edge", lambda s, _f: requests.put(
        s.edge.url + "/api/v1/admin/link", json={"uplink_mbps": 1.0, "rtt_ms": 1.0}, timeout=HTTP_TIMEOUT_S), 401),
    "edge-admin-link-nested-json": BadCase("edge", lambda s, _f: requests.put(
        s.edge.url + "/api/v1/admin/link", data=b"[" * 2000 + b"]" * 2000, timeout=HTTP_TIMEOUT_S,
        headers={**s.edge.admin_headers(), "Content-Type": "application/json"}), 400),
    "spec-nested-100000-deep": BadCase("edge", lambda s, f: _register(s, _lenet_with(
        f, spec=b'{"stages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")), 400),
    "calibration-declaring-2^40x3": BadCase("edge", lambda s, f: _register(s, _lenet_with(
        f, calibration=_npz_declaring((2**40, 3)))), 400),
    "unknown-model-strategies": BadCase("edge", lambda s, _f: requests.get(
        s.edge.url + "/api/v1/models/" + "0" * 64 + "/strategies", timeout=HTTP_TIMEOUT_S), 404),
    "cloud-tensor-wrong-shape": BadCase("cloud", lambda s, _f: s.cloud_infer(
        _split0_payload(s, np.zeros((1, 1, 32, 32), np.float32))), 400),
    "cloud-tensor-batch-of-2": BadCase("cloud", lambda s, _f: s.cloud_infer(
        _split0_payload(s, np.zeros((2, 1, 28, 28), np.float32))), 400),
    "cloud-tensor-float64": BadCase("cloud", lambda s, _f: s.cloud_infer(
        _split0_payload(s, np.zeros((1, 1, 28, 28), np.float64))), 400),
    "cloud-tensor-int32-claimed": BadCase("cloud", lambda s, _f: s.cloud_infer(
        _split0_payload(s, np.zeros((1, 1, 28, 28), np.int32), wire_dtype="int32")), 400),
    "cloud-pickle-body": BadCase("cloud", lambda s, _f: s.cloud_infer(
        pickle.dumps({"tensor": np.zeros((1, 1, 28, 28), np.float32)})), 400),
    "cloud-unknown-model": BadCase("cloud", lambda s, _f: s.cloud_infer(encode_offload(
        torch.zeros(1, 1, 28, 28), model_id="f" * 64, split=0, request_id="r")), 409),
    "cloud-without-token": BadCase("cloud", lambda s, _f: s.cloud_infer(_good_cloud_payload(s), token=None), 401),
    "cloud-wrong-token": BadCase("cloud", lambda s, _f: s.cloud_infer(
        _good_cloud_payload(s), token=secrets.token_hex(16)), 401),
    "cloud-profile-nested-json": BadCase("cloud", lambda s, _f: requests.post(
        f"{s.cloud.url}/api/v1/models/{s.default_model_id}/profile", data=b"[" * 2000 + b"]" * 2000,
        headers={"Authorization": f"Bearer {s.token}", "Content-Type": "application/json"},
        timeout=HTTP_TIMEOUT_S), 400),
    "cloud-model-upload-without-token": BadCase("cloud", lambda s, f: requests.put(
        s.cloud.url + "/api/v1/models/" + "0" * 64, timeout=HTTP_TIMEOUT_S,
        files={"spec": ("spec.json", f["spec"]), "weights": ("weights.safetensors", f["weights"])}), 401),
}


@pytest.mark.parametrize("case", list(BAD_CASES.values()), ids=list(BAD_CASES))
def test_bad_input_gets_a_4xx_json_error_and_service_keeps_serving(services: Services,
                                                                   lenet_files: dict[str, bytes],
                                                                   case: BadCase) -> None:
    n_models_before = len(requests.get(services.edge.url + "/api/v1/models", timeout=HTTP_TIMEOUT_S).json()["models"])
    _assert_error(case.send(services, lenet_files), case.status)
    if case.target == "edge":
        good = services.classify(_good_png(), deadline_ms=1000)
        assert good.status_code == 200, good.text
        assert good.json()["model"] == services.default_model_id
        models = requests.get(services.edge.url + "/api/v1/models", timeout=HTTP_TIMEOUT_S).json()["models"]
        assert len(models) == n_models_before, "a refused registration left a model behind"
    else:
        good = services.cloud_infer(_good_cloud_payload(services))
        assert good.status_code == 200, good.text
        assert set(good.json()) >= {"label", "class_name", "confidence", "cloud_ms"}
    assert services.cloud.process.poll() is None and services.edge.process.poll() is None


# -- 4. the cloud killed mid-stream, then back ------------------------------------------------------


@dataclass
class _Streamed:
    started_s: float
    status: int
    answer: dict[str, Any]


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_cloud_killed_mid_stream_falls_back_then_offloading_resumes(services: Services, how: str) -> None:
    """Stop the cloud (SIGTERM: gunicorn's graceful stop; SIGKILL: a crash) while requests stream in."""
    images = _dataset().images[:50]
    streamed: list[_Streamed] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def stream() -> None:
        session = requests.Session()
        try:
            i = 0
            while not stop.is_set():
                started_s = time.monotonic()
                response = session.post(services.edge.url + "/api/v1/classify", data=_png(images[i % len(images)]),
                                        params={"policy": "cloud-only", "deadline_ms": KILL_DEADLINE_MS},
                                        headers={"Content-Type": "image/png"}, timeout=HTTP_TIMEOUT_S)
                body = response.json() if response.headers.get("Content-Type", "").startswith("application/json") \
                    else {"text": response.text[:300]}
                streamed.append(_Streamed(started_s, response.status_code, body))
                i += 1
                time.sleep(0.02)
        except BaseException as err:  # reported by the main thread
            errors.append(err)
        finally:
            session.close()

    def wait_for(predicate: Callable[[], bool], what: str, timeout_s: float) -> None:
        deadline_s = time.monotonic() + timeout_s
        while time.monotonic() < deadline_s:
            assert not errors, f"the stream failed: {errors[0]!r}"
            if predicate():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{services.logs()}")

    def answered_after(t_s: float) -> list[_Streamed]:
        return [s for s in list(streamed) if s.started_s >= t_s]

    thread = threading.Thread(target=stream, name="integration-stream", daemon=True)
    thread.start()
    try:
        wait_for(lambda: sum(s.answer.get("where") == "cloud" for s in list(streamed)) >= 5,
                 "5 offloaded answers", 60.0)
        if how == "sigkill":
            os.killpg(services.cloud.process.pid, signal.SIGKILL)  # gunicorn master and worker at once
        services.cloud.stop()  # sigterm: graceful; sigkill: reaps the dead process
        killed_s = time.monotonic()
        wait_for(lambda: len(answered_after(killed_s)) >= 10, "10 answers after the kill", 60.0)

        restarting_s = time.monotonic()
        cloud = start_cloud(token=services.token, state_dir=services.cloud_state_dir,
                            log_path=services.cloud_log_path, port=services.cloud_port)
        services.started.append(cloud)
        services.cloud = cloud
        cloud.wait_ready()
        back_s = time.monotonic()
        wait_for(lambda: sum(s.answer.get("where") == "cloud" for s in answered_after(back_s)) >= 5,
                 "5 offloaded answers after the restart", 60.0)
    finally:
        stop.set()
        thread.join(HTTP_TIMEOUT_S + 5.0)
    assert not thread.is_alive()
    assert not errors, f"the stream failed: {errors[0]!r}"

    bad = [s for s in streamed if s.status != 200]
    assert not bad, f"{len(bad)} of {len(streamed)} requests not answered 200, e.g. {bad[0]}"
    for s in streamed:
        answer = s.answer
        assert answer["policy"] == "cloud-only"
        # cloud-only: every answer is the cloud's, or explicitly the edge's fallback
        if answer["fallback"]:
            assert answer["where"] == "edge" and answer["fallback_reason"], answer
        else:
            assert answer["where"] == "cloud" and answer["fallback_reason"] is None, answer
    while_down = [s.answer for s in streamed if killed_s <= s.started_s < restarting_s]
    assert len(while_down) >= 10
    assert all(a["fallback"] and a["where"] == "edge" for a in while_down), \
        [a for a in while_down if not a["fallback"]][:3]
    after = [s.answer for s in streamed if s.started_s >= back_s]
    first_cloud = next(i for i, a in enumerate(after) if a["where"] == "cloud")
    assert all(a["where"] == "cloud" and not a["fallback"] for a in after[first_cloud:]), \
        "offloading resumed, then fell back again: " + str([a for a in after[first_cloud:] if a["fallback"]][:3])

    status = requests.get(services.edge.url + "/api/v1/status", timeout=HTTP_TIMEOUT_S).json()
    assert status["cloud"]["healthy"] is True
    assert status["requests"]["n_fallback"] >= len(while_down)


# -- 5. no 5xx and no traceback anywhere ---------------------------------------------------------------

_SERVER_ERROR = re.compile(r'" 5\d\d ')  # gunicorn access line: "METHOD /path HTTP/1.1" STATUS BYTES


def test_no_server_error_or_traceback_in_either_log(services: Services) -> None:
    problems = []
    for path in sorted({p.log_path for p in services.started}):
        for line in path.read_text(errors="replace").splitlines():
            if _SERVER_ERROR.search(line) or "Traceback" in line or "WORKER TIMEOUT" in line:
                problems.append(f"{path.name}: {line}")
    assert not problems, "\n".join(problems[:40])


def _mapped_libraries(pid: int) -> set[str]:
    """File names of the shared libraries process ``pid`` has mapped."""
    names = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 6 and ".so" in parts[-1]:
            names.add(Path(parts[-1]).name)
    return names


def test_edge_and_cloud_serve_without_torch(services: Services, streamed: StreamedImages) -> None:
    """After serving the stream, no process of either service has libtorch mapped; ONNX Runtime serves."""
    for service in (services.edge, services.cloud):
        libraries = {pid: _mapped_libraries(pid) for pid in service.pids()}
        serving = [pid for pid, names in libraries.items() if any("onnxruntime" in n for n in names)]
        assert serving, f"no {service.name} process runs ONNX Runtime: {libraries}"
        with_torch = {pid: sorted(n for n in names if "torch" in n) for pid, names in libraries.items()
                      if any("libtorch" in n for n in names)}
        assert not with_torch, f"{service.name} processes with torch loaded: {with_torch}"


# -- 6. distortion-aware inference end to end (its own cloud and edge) ------------------------------

DISTORTION_MODEL_DIR = REPO_ROOT / "models" / "b-alexnet-distortion"
N_DISTORTED_IMAGES = 5  # per kind; the classifier must name at least 4 of them right


def test_blurred_image_gets_the_blur_expert_and_noisy_one_noise_over_http(tmp_path: Path) -> None:
    """An edge whose default model has expert heads, against a real cloud; half the requests offloaded."""
    if not (DISTORTION_MODEL_DIR / "distortion-classifier" / "weights.safetensors").is_file():
        pytest.skip(f"{DISTORTION_MODEL_DIR} is missing; build it with the command in its MODEL_CARD.md")
    token = secrets.token_hex(16)
    started: list[ServiceProcess] = []
    try:
        cloud = start_cloud(token=token, state_dir=tmp_path / "cloud-state", log_path=tmp_path / "cloud.log")
        started.append(cloud)
        cloud.wait_ready()
        edge = start_edge(token=token, cloud_url=cloud.url, state_dir=tmp_path / "edge-state",
                          log_path=tmp_path / "edge.log",
                          config={"default_model_dir": str(DISTORTION_MODEL_DIR), "profile_n_repeats": 5})
        started.append(edge)
        edge.wait_ready()
        (listed,) = requests.get(edge.url + "/api/v1/models", timeout=HTTP_TIMEOUT_S).json()["models"]
        info = _wait_model_ready(edge.url, listed["model_id"])
        assert info["experts"] == ["blur", "noise"] and info["distortion_classifier"] is not None, info
        assert info["cloud_profile"] == "measured", info  # the expert model was pushed to the cloud

        net = load_model(DISTORTION_MODEL_DIR).net.eval()
        preprocessing = Preprocessing.from_spec_dict(net.spec)
        images = _dataset().images[:N_DISTORTED_IMAGES]
        distorted = {"blur": gaussian_blur(images, sigma=DEFAULT_LEVELS.middle("blur"), is_batch=True),
                     "noise": gaussian_noise(images, sigma=DEFAULT_LEVELS.middle("noise"), seed=0)}
        with requests.Session() as session:
            for kind, batch in distorted.items():
                answers = []
                for i, image in enumerate(batch):
                    params = ({"policy": "cloud-only", "deadline_ms": CLOUD_ONLY_DEADLINE_MS} if i % 2 == 0
                              else {"deadline_ms": 1000})
                    response = session.post(edge.url + "/api/v1/classify", data=_png(image), params=params,
                                            headers={"Content-Type": "image/png"}, timeout=HTTP_TIMEOUT_S)
                    assert response.status_code == 200, response.text
                    answer = response.json()
                    answers.append(answer)
                    assert answer["expert"] in ("pristine", "blur", "noise") and "expert_confidence" in answer
                    if params.get("policy") != "cloud-only" or answer["expert"] != kind:
                        continue
                    assert (answer["where"], answer["fallback"]) == ("cloud", False), \
                        f"{answer}\n{edge.log_tail(40)}\n{cloud.log_tail(40)}"
                    # the cloud ran the chosen expert's final stage
                    with torch.inference_mode():
                        logits = net(torch.from_numpy(preprocess(image, preprocessing)), head=kind)[-1][0].numpy()
                    top2 = np.sort(logits)[-2:]
                    if top2[1] - top2[0] > 1e-3:
                        assert answer["label"] == int(logits.argmax()), answer
                n_right = sum(answer["expert"] == kind for answer in answers)
                assert n_right >= N_DISTORTED_IMAGES - 1, [answer["expert"] for answer in answers]
    finally:
        for process in reversed(started):
            process.stop()
    problems = [line for process in started for line in process.log_path.read_text(errors="replace").splitlines()
                if _SERVER_ERROR.search(line) or "Traceback" in line]
    assert not problems, "\n".join(problems[:20])
