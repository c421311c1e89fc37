"""The one FakeCloud (scripted and real answers, records, failures on demand, the gate, probes) and the shared fixtures over it."""

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from popex.data import encode_png
from popex.decision.latency import Link
from popex.edge.cloud_port import CloudPort, CloudRejected, CloudTimeout, CloudUnavailable
from popex.edge.fake_cloud import FakeCloud
from popex.errors import ConfigError
from popex.link.emulation import LinkEmulator
from popex.nets import EarlyExitNet, zoo_spec
from popex.wire import compress_payload, encode_offload

DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "default"


def _payload(model_id, *, split=1, seed=0):
    torch.manual_seed(seed)
    net = EarlyExitNet(zoo_spec("b-lenet")).eval()
    x = torch.randn(1, *net.input_shape)
    with torch.inference_mode():
        h = net.run_stages(x, stop=split)
    return encode_offload(h, model_id=model_id, split=split, request_id=f"r{seed}")


def test_a_scripted_cloud_answers_records_and_keeps_models(lenet_files):
    cloud = FakeCloud(transfer_ms=3.0)
    assert isinstance(cloud, CloudPort) and cloud.runner is None
    files, model_id = lenet_files["files"], lenet_files["model_id"]
    assert not cloud.has_model(model_id, timeout_s=1.0)
    registered = cloud.put_model(model_id, {"spec.json": files["spec"], "weights.safetensors": files["weights"]}, timeout_s=1.0)
    assert (registered.n_stages, registered.created) == (3, True) and model_id in cloud.models
    assert not cloud.put_model(model_id, {"spec.json": files["spec"], "weights.safetensors": files["weights"]}, timeout_s=1.0).created
    assert cloud.profile(model_id, n_repeats=2, timeout_s=1.0) == [0.05, 0.05, 0.05]
    with pytest.raises(CloudRejected, match="unknown_model"):
        cloud.profile("f" * 64, n_repeats=2, timeout_s=1.0)
    assert FakeCloud(stage_cloud_ms=[0.5, 0.2]).profile("any", n_repeats=1, timeout_s=1.0) == [0.5, 0.2]
    payload = compress_payload(_payload(model_id))
    answer = cloud.infer(payload, timeout_s=0.5, content_encoding="deflate")
    assert (answer.label, answer.class_name, answer.confidence) == (4, "class4", 0.9)
    assert (answer.cloud_ms, answer.transfer_ms, answer.round_trip_ms, answer.n_bytes) == (1.0, 3.0, 4.0,
                                                                                            len(payload))
    (offload,) = cloud.offloads
    assert (offload.request.model_id, offload.request.split, offload.timeout_s, offload.n_bytes,
            offload.content_encoding) == (model_id, 1, 0.5, len(payload), "deflate")
    assert cloud.calls == ["has_model", "put_model", "put_model", "profile", "profile", "infer"]
    cloud.close()
    assert cloud.calls[-1] == "close"


def test_a_real_cloud_half_finishes_offloads_and_refuses_unknown_models(tmp_path, lenet_files):
    cloud = FakeCloud(state_dir=tmp_path / "cloud")
    files, model_id = lenet_files["files"], lenet_files["model_id"]
    with pytest.raises(CloudRejected) as info:
        cloud.infer(_payload(model_id), timeout_s=1.0)
    assert (info.value.status, info.value.code) == (409, "unknown_model")
    cloud.put_model(model_id, {"spec.json": files["spec"], "weights.safetensors": files["weights"]}, timeout_s=5.0)
    assert cloud.runner.has(model_id) and FakeCloud(state_dir=tmp_path / "cloud").has_model(model_id, timeout_s=1)
    answer = cloud.infer(_payload(model_id), timeout_s=1.0)
    assert 0 <= answer.label < 10 and answer.class_name == f"class{answer.label}" and answer.cloud_ms > 0
    assert answer.round_trip_ms == answer.cloud_ms  # no wire in this process
    assert len(cloud.profile(model_id, n_repeats=2, timeout_s=5.0)) == 3
    with pytest.raises(CloudRejected) as info:
        cloud.put_model("0" * 64, {"spec.json": files["spec"], "weights.safetensors": files["weights"]}, timeout_s=5.0)
    assert info.value.code == "model_id_mismatch"
    with pytest.raises(CloudRejected, match="bad_tensor"):
        cloud.infer(b"not a tensor", timeout_s=1.0)


def test_failures_on_demand_and_a_cloud_that_is_down(lenet_files):
    cloud = FakeCloud()
    payload = _payload(lenet_files["model_id"])
    cloud.fail("infer", CloudTimeout("late"))
    with pytest.raises(CloudTimeout, match="late"):
        cloud.infer(payload, timeout_s=1.0)
    assert len(cloud.offloads) == 1  # the edge's attempt is recorded
    assert cloud.health(timeout_s=1.0)
    cloud.recover("infer")
    assert cloud.infer(payload, timeout_s=1.0).label == 4
    cloud.down = True
    for call in (lambda: cloud.infer(payload, timeout_s=1.0), lambda: cloud.has_model("m", timeout_s=1.0),
                 lambda: cloud.profile("m", n_repeats=1, timeout_s=1.0), lambda: cloud.probe(0, timeout_s=1.0)):
        with pytest.raises(CloudUnavailable):
            call()
    assert not cloud.health(timeout_s=1.0)
    for bad in (lambda: cloud.fail("upload", CloudTimeout("x")), lambda: cloud.fail("infer", ValueError("x")),
                lambda: cloud.infer(payload, timeout_s=0.0)):
        with pytest.raises(ConfigError):
            bad()


def test_the_gate_holds_the_preparation_calls_but_not_offloads(lenet_files):
    cloud = FakeCloud()
    cloud.gate.clear()
    answered = threading.Event()
    worker = threading.Thread(target=lambda: cloud.has_model("m", timeout_s=1.0) or answered.set())
    worker.start()
    assert cloud.infer(_payload(lenet_files["model_id"]), timeout_s=1.0).label == 4
    assert not answered.is_set()
    cloud.gate.set()
    worker.join(10.0)
    assert answered.is_set()


def test_probes_cross_the_emulated_or_the_computed_link():
    with pytest.raises(CloudTimeout, match="no link"):
        FakeCloud().probe(1000, timeout_s=1.0)
    computed = FakeCloud(uplink=Link(uplink_mbps=8.0, rtt_ms=20.0), probe_overhead_ms=0.5)
    assert computed.link is None
    assert computed.probe(10_000, timeout_s=1.0).round_trip_ms == pytest.approx(20.0 + 10.0 + 0.5)
    clock = {"now_s": 0.0}
    link = LinkEmulator(8.0, 20.0, clock_s=lambda: clock["now_s"],
                        sleep_s=lambda s: clock.__setitem__("now_s", clock["now_s"] + max(0.0, s)))
    emulated = FakeCloud(link=link, probe_overhead_ms=0.0)
    assert emulated.probe(10_000, timeout_s=1.0).round_trip_ms == pytest.approx(30.0)
    with pytest.raises(CloudTimeout, match="emulated link"):
        emulated.probe(10_000_000, timeout_s=1.0)


# -- the shared fixtures of tests/conftest.py, over the fake ----------------------------------


def test_the_default_app_serves_the_default_model_through_the_fake(client, model_actions, fake_cloud):
    (listed,) = client.get("/api/v1/models").json["models"]
    info = model_actions.wait_ready(listed["model_id"])
    assert info["cloud_profile"] == "measured" and listed["model_id"] in fake_cloud.models
    n_offloads = len(fake_cloud.offloads)  # the preparation's, measuring the offload overhead
    assert model_actions.register_directory(DEFAULT_MODEL_DIR).status_code == 200  # known already
    model_actions.force(listed["model_id"], split=0)
    image = encode_png(np.zeros((28, 28), np.uint8))
    body = client.post("/api/v1/classify", data=image, content_type="image/png").json
    assert (body["where"], body["split"], body["label"], body["fallback"]) == ("cloud", 0, 4, False)
    fake_cloud.fail("infer", CloudTimeout("late"))
    body = client.post("/api/v1/classify", data=image, content_type="image/png").json
    assert (body["where"], body["fallback"]) == ("edge", True)
    assert [o.request.split for o in fake_cloud.offloads[n_offloads:]] == [0, 0]


def test_the_config_fixture_is_the_whole_config(tmp_path, monkeypatch, make_app, config):
    """The developer's YAML and environment do not reach an app built from the fixture."""
    leaky = tmp_path / "leaky.yaml"
    leaky.write_text("plan_headroom_fraction: 0.1\ndefault_deadline_ms: 55\n")
    monkeypatch.setenv("POPEX_EDGE_CONFIG", str(leaky))
    monkeypatch.setenv("POPEX_TOKEN", "another-token-0123456789")
    client = make_app({**config, "default_model_dir": None}).test_client()
    assert client.get("/api/v1/status").json["plan_headroom_fraction"] == 0.05
