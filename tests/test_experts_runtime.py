"""Distortion-aware inference through the edge app (Flask test client) and the cloud runner.

The model is the shipped ``models/b-alexnet-distortion`` (B-AlexNet with blur
and noise expert heads and its distortion classifier); the images are real
Fashion-MNIST test images, distorted by :mod:`popex.data.distort` at the
default middle levels. The cloud is a :class:`FakeCloud` over a real
:class:`CloudRunner` in this process, so an offload's head is applied by the
same code the cloud service runs.
"""

from __future__ import annotations

import io
import json
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cloud_api import create_app as create_cloud_app
from cloud_api.config import CloudConfig
from popex.data import Preprocessing, encode_png, load_fashion_mnist, preprocess
from popex.data.distort import DEFAULT_LEVELS, gaussian_blur, gaussian_noise
from popex.data.subset import SHIPPED_SUBSET_ROOT
from popex.decision import load_calibration
from popex.decision.latency import Link
from popex.nets import compute_model_id, load_model
from popex.nets.early_exit import UnknownHeadError, exit_confidence
from popex.cloud.runner import CloudRunner
from popex.edge.fake_cloud import FakeCloud
from popex.edge.overhead import OverheadTracker
from popex.edge.plans import ModelPlan
from popex.wire import encode_offload

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = REPO / "models" / "b-alexnet-distortion"
N_IMAGES = 5  # per kind; the classifier must get at least N_MIN_RIGHT of them
N_MIN_RIGHT = 4
KINDS = ("pristine", "blur", "noise")

pytestmark = pytest.mark.skipif(not (MODEL_DIR / "distortion-classifier" / "weights.safetensors").is_file(),
                                reason="models/b-alexnet-distortion is not in this checkout")


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def config(config):
    """No default model: the registration tests register their own."""
    return {**config, "default_model_dir": None}


@pytest.fixture
def fake_cloud(tmp_path):
    """The cloud's half for real, in this process."""
    return FakeCloud(state_dir=tmp_path / "cloud")


@pytest.fixture(scope="module")
def images():
    """N_IMAGES real test images per kind, as uint8 arrays: pristine, blurred and noisy at the middle levels."""
    pristine = load_fashion_mnist(SHIPPED_SUBSET_ROOT, split="test").images[:N_IMAGES]
    return {"pristine": pristine,
            "blur": gaussian_blur(pristine, sigma=DEFAULT_LEVELS.middle("blur"), is_batch=True),
            "noise": gaussian_noise(pristine, sigma=DEFAULT_LEVELS.middle("noise"), seed=0)}


@pytest.fixture(scope="module")
def expert_net():
    return load_model(MODEL_DIR).net.eval()


@pytest.fixture(scope="module")
def model_files():
    """The multipart files of models/b-alexnet-distortion, by field name."""
    spec = json.loads((MODEL_DIR / "spec.json").read_text())
    files = {"spec": "spec.json", "weights": "weights.safetensors", "calibration": "calibration.npz",
             "calibration_blur": "calibration_blur.npz", "calibration_noise": "calibration_noise.npz",
             "classifier_spec": "distortion-classifier/spec.json",
             "classifier_weights": "distortion-classifier/weights.safetensors"}
    data = {name: (MODEL_DIR / path).read_bytes() for name, path in files.items()}
    return {"files": data, "model_id": compute_model_id(spec, data["weights"])}


@pytest.fixture(scope="module")
def served(tmp_path_factory, make_config, open_edge, edge_internals):
    """One edge app with models/b-alexnet-distortion as its default model, prepared against the real cloud half."""
    root = tmp_path_factory.mktemp("served")
    cloud = FakeCloud(state_dir=root / "cloud")
    with open_edge(make_config(root / "edge", default_model_dir=str(MODEL_DIR)), cloud) as app:
        service, runner = edge_internals(app)
        assert service.wait_idle(120.0)
        yield {"app": app, "client": app.test_client(), "cloud": cloud, "runner": runner,
               "model_id": runner.default_model_id}


def _classify(client, image, **params):
    query = "&".join(f"{key}={value}" for key, value in params.items())
    return client.post(f"/api/v1/classify?{query}", data=encode_png(image), content_type="image/png")


def _error(response, status):
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert set(body) == {"error"} and body["error"]["message"]
    return body["error"]


def _exit_logits(net, image, head):
    """Logits (1, n_classes) of every exit of head set ``head`` for one uint8 image."""
    x = torch.from_numpy(preprocess(image, Preprocessing.from_spec_dict(net.spec)))
    with torch.inference_mode():
        return net(x, head=head)


# -- the classifier picks the head set -------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_of_image_gets_its_expert(served, images, kind):
    answers = []
    for image in images[kind]:
        response = _classify(served["client"], image, deadline_ms=1000)
        assert response.status_code == 200, response.json
        answers.append(response.json)
    assert all(a["model"] == served["model_id"] for a in answers)
    assert all(a["expert"] in KINDS and 0.0 < a["expert_confidence"] <= 1.0 for a in answers)
    n_right = sum(a["expert"] == kind for a in answers)
    assert n_right >= N_MIN_RIGHT, [a["expert"] for a in answers]


def test_the_chosen_heads_branches_and_temperatures_answer(served, images, expert_net):
    """Edge-only on blurred images: the label and confidence are the blur head's at the exit named."""
    temperature = load_calibration(MODEL_DIR / "calibration_blur.npz").temperature
    checked = 0
    for image in images["blur"]:
        answer = _classify(served["client"], image, policy="edge-only", deadline_ms=1000).json
        if answer["expert"] != "blur":
            continue
        assert answer["where"] == "edge" and answer["split"] == expert_net.n_stages
        e = expert_net.n_exits - 1 if answer["exit"] == "final" else int(answer["exit"])
        logits = _exit_logits(expert_net, image, "blur")[e]
        confidence, label = exit_confidence(logits, temperature=float(temperature[e]))
        assert answer["label"] == int(label[0])
        assert answer["confidence"] == pytest.approx(float(confidence[0]), rel=1e-5)
        checked += 1
    assert checked >= N_MIN_RIGHT


def test_the_offload_names_the_head_and_the_cloud_applies_it(served, images, expert_net):
    client, cloud = served["client"], served["cloud"]
    for kind in ("blur", "noise", "pristine"):
        for image in images[kind]:
            answer = _classify(client, image, policy="cloud-only", deadline_ms=5000).json
            if answer["expert"] == kind:
                break
        assert answer["expert"] == kind, "no image of this kind was classified as such"
        assert (answer["where"], answer["split"], answer["fallback"]) == ("cloud", 0, False), answer
        assert cloud.offloads[-1].request.head == (None if kind == "pristine" else kind)  # omitted for pristine
        logits = _exit_logits(expert_net, image, kind)[-1]
        assert answer["label"] == int(logits.argmax())
        assert answer["confidence"] == pytest.approx(float(torch.softmax(logits, 1).max()), rel=1e-5)


def test_the_fallback_runs_the_chosen_heads_final_stage(served, images, expert_net):
    served["cloud"].down = True
    try:
        image = images["blur"][0]
        answer = _classify(served["client"], image, policy="cloud-only", deadline_ms=5000).json
    finally:
        served["cloud"].down = False
    assert answer["expert"] == "blur"
    assert (answer["fallback"], answer["where"], answer["exit"]) == (True, "edge", "final"), answer
    assert answer["label"] == int(_exit_logits(expert_net, image, "blur")[-1].argmax())


@pytest.mark.parametrize("how", ["query", "form"])
@pytest.mark.parametrize("value", ["false", "0", "False"])
def test_distortion_aware_off_uses_the_pristine_heads(served, images, expert_net, how, value):
    image = images["blur"][0]
    if how == "query":
        response = _classify(served["client"], image, distortion_aware=value, policy="edge-only")
    else:
        response = served["client"].post("/api/v1/classify", content_type="multipart/form-data", data={
            "image": (io.BytesIO(encode_png(image)), "x.png"), "distortion_aware": value, "policy": "edge-only"})
    assert response.status_code == 200, response.json
    answer = response.json
    assert answer["expert"] == "pristine" and "expert_confidence" not in answer
    e = expert_net.n_exits - 1 if answer["exit"] == "final" else int(answer["exit"])
    assert answer["label"] == int(_exit_logits(expert_net, image, None)[e].argmax())


@pytest.mark.parametrize("value", ["true", "1", "TRUE"])
def test_distortion_aware_on_is_accepted(served, images, value):
    response = _classify(served["client"], images["noise"][0], distortion_aware=value)
    assert response.status_code == 200 and "expert_confidence" in response.json


@pytest.mark.parametrize("value", ["yes", "2", "on", "truth"])
def test_a_bad_distortion_aware_value_is_400(served, images, value):
    error = _error(_classify(served["client"], images["pristine"][0], distortion_aware=value), 400)
    assert "distortion_aware" in error["message"]


def test_the_model_view_shows_experts_and_classifier(served):
    info = served["client"].get(f"/api/v1/models/{served['model_id']}").json
    assert info["state"] == "ready" and info["cloud_profile"] == "measured"
    assert info["experts"] == ["blur", "noise"] and info["distortion_aware_default"] is True
    classifier = json.loads((MODEL_DIR / "distortion-classifier" / "spec.json").read_text())
    weights = (MODEL_DIR / "distortion-classifier" / "weights.safetensors").read_bytes()
    assert info["distortion_classifier"] == {"model_id": compute_model_id(classifier, weights),
                                             "classes": list(KINDS), "input_shape": [1, 28, 28]}
    assert set(info["expert_strategies"]) == {"blur", "noise"}
    # the classifier's time is a fixed edge cost in the profile
    assert info["profile"]["edge_fixed_ms"] > 0.0
    for head in ("blur", "noise", "pristine"):
        body = served["client"].get(f"/api/v1/models/{served['model_id']}/strategies?head={head}").json
        assert body["head"] == head and body["n_rows"] > 1
    assert _error(served["client"].get(f"/api/v1/models/{served['model_id']}/strategies?head=fog"),
                  400)["code"] == "unknown_head"


# -- plans: one table per head set ---------------------------------------------------------------


def test_each_head_set_has_its_own_table_swapped_together(served):
    model = served["runner"].registry.get(served["model_id"])
    current = served["runner"].plans.get(served["model_id"])
    plan = ModelPlan(model.calibration, profile=current.profile, link=current.link,
                     expert_calibrations=model.expert_calibrations)
    plain = ModelPlan(model.calibration, profile=current.profile, link=current.link)
    assert plan.head_names == ("pristine", "blur", "noise") and plain.head_names == ("pristine",)
    # the pristine head is planned exactly as a model without experts
    assert plan.table_of("pristine").to_rows() == plain.table_of().to_rows()
    for deadline_ms in (0.5, 5.0, 50.0):
        assert plan.strategy(deadline_ms) == plain.strategy(deadline_ms) == plan.strategy(deadline_ms, head=None)
    accuracies = {head: [row["accuracy"] for row in plan.table_of(head).to_rows()] for head in plan.head_names}
    assert accuracies["blur"] != accuracies["pristine"] != accuracies["noise"]
    chosen = plan.strategy(50.0, head="blur")
    assert chosen.accuracy == plan.table_of("blur").row(chosen.row)["accuracy"]
    with pytest.raises(UnknownHeadError):
        plan.strategy(50.0, head="fog")
    with pytest.raises(UnknownHeadError):
        plain.strategy(50.0, head="blur")
    link = Link(uplink_mbps=1.5, rtt_ms=80.0)
    plan.set_link(link)
    assert all(plan.table_of(head).link == link for head in plan.head_names)
    plan.update_profile(edge_fixed_ms=7.0)
    assert all(plan.table_of(head).link == link for head in plan.head_names)
    assert plan.strategy(50.0, head="noise").latency_ms >= 7.0


# -- the cloud applies the head -------------------------------------------------------------------


@pytest.fixture(scope="module")
def cloud_runner(tmp_path_factory, model_files):
    runner = CloudRunner(tmp_path_factory.mktemp("cloud-runner"))
    runner.register(model_files["model_id"], {"spec.json": model_files["files"]["spec"],
                                               "weights.safetensors": model_files["files"]["weights"]})
    return runner


@pytest.mark.parametrize("split", [0, 3, 5])
def test_the_cloud_answer_with_a_head_is_that_heads_local_answer(cloud_runner, model_files, expert_net, images,
                                                               split):
    x = torch.from_numpy(preprocess(images["blur"][1], Preprocessing.from_spec_dict(expert_net.spec)))
    with torch.inference_mode():
        h = expert_net.run_stages(x, stop=split)
        expected = {head: torch.softmax(expert_net.run_stages(h, start=split, head=head), 1)[0]
                    for head in ("blur", None)}
    replies = {}
    for head in ("blur", None):
        payload = encode_offload(h, model_id=model_files["model_id"], split=split, request_id="r1", head=head)
        replies[head] = cloud_runner.infer_payload(payload)
        assert replies[head].label == int(expected[head].argmax())
        assert replies[head].confidence == pytest.approx(float(expected[head].max()), rel=1e-5)
    assert not torch.allclose(expected["blur"], expected[None])  # the head made a difference
    fog = encode_offload(h, model_id=model_files["model_id"], split=split, request_id="r2", head="fog")
    with pytest.raises(UnknownHeadError, match="fog"):
        cloud_runner.infer_payload(fog)


def test_the_cloud_service_takes_expert_models_and_refuses_unknown_heads(tmp_path, token, model_files, expert_net):
    config = CloudConfig.from_mapping({"token": token, "state_dir": str(tmp_path / "cloud")})
    client = create_cloud_app(config).test_client()
    auth = {"Authorization": f"Bearer {token}"}
    files = model_files["files"]
    response = client.put(f"/api/v1/models/{model_files['model_id']}", headers=auth, data={
        "spec": (io.BytesIO(files["spec"]), "spec.json"), "weights": (io.BytesIO(files["weights"]), "w")})
    assert response.status_code == 201, response.json
    h = torch.randn(1, *expert_net.input_shape)
    for head, status in (("noise", 200), ("fog", 400)):
        payload = encode_offload(h, model_id=model_files["model_id"], split=0, request_id="r", head=head)
        response = client.post("/api/v1/infer", data=payload, headers=auth, content_type="application/octet-stream")
        assert response.status_code == status, response.json
    assert response.json["error"]["code"] == "unknown_head"


# -- registration through REST ---------------------------------------------------------------------


def test_an_expert_model_registers_through_rest_and_survives_a_restart(client, model_actions, fake_cloud, config,
                                                                     make_app, model_files, images):
    response = model_actions.register_directory(MODEL_DIR)
    assert response.status_code == 202, response.json
    model_id = response.json["model_id"]
    assert model_id == model_files["model_id"]
    info = model_actions.wait_ready(model_id)
    assert info["experts"] == ["blur", "noise"]
    assert info["distortion_classifier"]["classes"] == list(KINDS)
    assert fake_cloud.runner.has(model_id)  # pushed with every head set in its weights
    stored = Path(config["state_dir"]) / "models" / model_id
    assert {"calibration_blur.npz", "calibration_noise.npz", "distortion-classifier"} <= \
        {p.name for p in stored.iterdir()}
    assert _classify(client, images["blur"][0], deadline_ms=1000).json["expert"] == "blur"
    assert model_actions.register(model_files["files"]).status_code == 200  # known

    again = make_app(config).test_client()  # a restart on the same state dir and cloud
    info = again.get(f"/api/v1/models/{model_id}").json
    assert info["state"] == "ready" and info["experts"] == ["blur", "noise"]
    assert info["distortion_classifier"] is not None
    assert _classify(again, images["noise"][0], deadline_ms=1000).json["expert"] == "noise"


def _small_calibration(n_exits, n_samples=50):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, n_samples)
    predicted = rng.integers(0, 10, (n_samples, n_exits))
    buffer = io.BytesIO()
    np.savez(buffer, confidence=rng.random((n_samples, n_exits)), predicted=predicted,
             correct=predicted == labels[:, None], labels=labels, temperature=np.ones(n_exits),
             confidence_method=np.array("max_softmax"))
    return buffer.getvalue()


@pytest.mark.parametrize("change, pattern", [
    ({"calibration_noise": None}, "calibration_noise.npz"),
    ({"calibration_blur": _small_calibration(n_exits=2)}, "exits"),
    ({"calibration_blur": pickle.dumps({"a": 1})}, "calibration_blur"),
    ({"calibration_fog": _small_calibration(n_exits=3)}, "fog"),
    ({"classifier_spec": None}, "classifier_spec"),
    ({"classifier_weights": None}, "classifier_weights"),
    ({"classifier_weights": pickle.dumps({"a": 1})}, "pickle"),
    ({"classifier_spec": b"[1, 2"}, "distortion classifier"),
    ({"classifier_spec": (MODEL_DIR / "spec.json").read_bytes()}, "distortion classifier"),
])
def test_bad_expert_files_are_400_and_store_nothing(client, model_actions, config, model_files, change, pattern):
    error = _error(model_actions.register({**model_files["files"], **change}), 400)
    assert pattern in error["message"]
    assert client.get("/api/v1/models").json["models"] == []
    leftovers = [p.name for p in (Path(config["state_dir"]) / "models").iterdir()]
    assert leftovers == []


def test_a_model_without_experts_takes_no_expert_files_and_is_never_distortion_aware(client, model_actions,
                                                                                    lenet_files, model_files, images):
    lenet = lenet_files["files"]
    for extra in ({"calibration_blur": lenet["calibration"]},
                  {"classifier_spec": model_files["files"]["classifier_spec"],
                   "classifier_weights": model_files["files"]["classifier_weights"]}):
        assert "no 'experts'" in _error(model_actions.register({**lenet, **extra}), 400)["message"]
    response = model_actions.register(lenet)
    assert response.status_code == 202, response.json
    model_id = response.json["model_id"]
    info = client.get(f"/api/v1/models/{model_id}").json
    assert info["experts"] == [] and info["distortion_classifier"] is None
    assert info["distortion_aware_default"] is False
    for params in ({}, {"distortion_aware": "false"}):
        answer = _classify(client, images["blur"][0], model=model_id, **params).json
        assert answer["expert"] == "pristine" and "expert_confidence" not in answer
    error = _error(_classify(client, images["blur"][0], model=model_id, distortion_aware="true"), 400)
    assert "no expert heads" in error["message"]
    assert model_actions.wait_idle()


def test_the_default_can_be_off(make_app, config, edge_internals, images):
    app = make_app({**config, "default_model_dir": str(MODEL_DIR), "distortion_aware_default": False})
    client = app.test_client()
    assert _classify(client, images["blur"][0]).json["expert"] == "pristine"
    assert _classify(client, images["blur"][0], distortion_aware="true").json["expert"] == "blur"
    assert edge_internals(app)[0].wait_idle(120.0)


# -- the classifier's time is in the fixed edge time ------------------------------------------------


def test_the_classifier_runs_inside_the_measured_fixed_edge_time(served, images, monkeypatch):
    """Runs last in this module: it leaves the served plans with a large fixed edge time."""
    runner = served["runner"]
    classifier = runner.registry.get(served["model_id"]).classifier
    predict = classifier.predict
    delay_s = 0.05

    def slow_predict(*args, **kwargs):
        time.sleep(delay_s)
        return predict(*args, **kwargs)

    monkeypatch.setattr(classifier, "predict", slow_predict)
    assert runner.planner.drain()  # earlier requests' measurements go to the old tracker
    monkeypatch.setattr(runner.planner, "edge_fixed", OverheadTracker(initial_ms=0.0))
    monkeypatch.setitem(runner.planner.edge_fixed_by_model, served["model_id"], OverheadTracker(initial_ms=0.0))
    for image in images["noise"][:3]:
        assert _classify(served["client"], image, deadline_ms=1000).status_code == 200
    assert runner.planner.drain()  # the measurements re-plan on the planner, not on the request
    assert runner.planner.edge_fixed.n_samples == 3
    assert runner.planner.edge_fixed.current_ms >= delay_s * 1000.0
    assert runner.plans.get(served["model_id"]).profile.edge_fixed_ms >= delay_s * 1000.0  # re-planned
