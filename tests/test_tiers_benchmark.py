"""``popex benchmark`` on a real model, and the edge's and cloud's GET .../benchmark routes."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from popex import cli
from popex.decision import save_calibration
from popex.nets import EarlyExitNet, save_model, zoo_spec
from popex.nets.flops import stage_macs
from popex.nets.train import calibrate
from popex.tiers.benchmark_file import load_benchmark_dir, load_benchmark_file, parse_benchmark
from popex.tiers.network import load_network_csv
from popex.tiers.predict import predict
from popex.tiers.query import Query
from tests.tiers_data import write_network


@pytest.fixture(scope="module")
def lenet(tmp_path_factory):
    """A b-lenet in the spec form, with a calibration (random weights, random inputs)."""
    directory = tmp_path_factory.mktemp("lenet")
    torch.manual_seed(0)
    net = EarlyExitNet(zoo_spec("b-lenet")).eval()
    save_model(net, directory)
    inputs = np.random.default_rng(0).normal(size=(200, *net.input_shape)).astype(np.float32)
    with torch.inference_mode():
        labels = net(torch.from_numpy(inputs))[-1].argmax(1).numpy()
    save_calibration(calibrate(net, inputs, labels), directory / "calibration.npz")
    return {"dir": directory, "net": net}


@pytest.fixture(scope="module")
def benchmarked(lenet, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    for tier, system, slowdown in (("device", "pi emu-1", "5"), ("edge", "vm", "1")):
        status = cli.main(["benchmark", "--tier", tier, "--system", system, "--model", str(lenet["dir"]),
                           "--name", "lenet", "--repeats", "5", "--warmup", "1", "--emulate-slowdown", slowdown,
                           "--out", str(out)])
        assert status == 0
    return out


@pytest.mark.slow
def test_benchmark_writes_a_file_predict_reads_with_bytes_flops_and_params_of_each_stage(lenet, benchmarked):
    net = lenet["net"]
    edge = load_benchmark_file(benchmarked / "edge-vm.json")
    model = edge.models["lenet"]
    assert (edge.tier, edge.system) == ("edge", "vm")
    assert model.layout == tuple((i, i) for i in range(net.n_stages))
    assert [b.name for b in model.blocks] == list(net.stage_names)
    x = torch.zeros(1, *net.input_shape)
    sizes = []
    with torch.inference_mode():
        for i in range(net.n_stages):
            x = net.run_stages(x, start=i, stop=i + 1)
            sizes.append(x.numel() * 4)
    assert [b.output_bytes for b in model.blocks] == sizes
    assert model.input_bytes == 4 * int(np.prod(net.input_shape))
    # FLOPs read from the ONNX graphs = 2 x the torch module's multiply-accumulates, counted independently
    assert [b.flops for b in model.blocks] == [2 * m for m in stage_macs(net)]
    assert sum(b.params for b in model.blocks) + sum(b.params for b in model.branches) == sum(
        p.numel() for p in net.parameters())
    assert [b.after_block for b in model.branches] == [k - 1 for k in net.branch_after_stage]
    assert all(b.time_ms > 0 for b in model.blocks) and model.whole_model_ms > 0
    assert model.additivity_error == pytest.approx(
        (sum(b.time_ms for b in model.blocks) - model.whole_model_ms) / model.whole_model_ms)
    assert (benchmarked / "edge-vm-lenet.png").read_bytes()[:4] == b"\x89PNG"
    device = load_benchmark_file(benchmarked / "device-pi emu-1.json")
    assert "x 5 (emulated)" in device.note
    bench = load_benchmark_dir(benchmarked)
    net_csv = load_network_csv(write_network(benchmarked / "net.csv", [("pi emu-1", "vm", 5, 10)]))
    best = predict(bench, net_csv, Query(model="lenet", n_results=3))
    assert best and best[0].device.system == "pi emu-1"


@pytest.mark.slow
def test_benchmark_adds_a_model_to_an_existing_file_and_refuses_another_systems_file(lenet, benchmarked):
    assert cli.main(["benchmark", "--tier", "edge", "--system", "vm", "--model", str(lenet["dir"]), "--name", "again",
                     "--repeats", "2", "--warmup", "0", "--out", str(benchmarked)]) == 0
    assert set(load_benchmark_file(benchmarked / "edge-vm.json").models) == {"lenet", "again"}
    (benchmarked / "edge-other.json").write_text((benchmarked / "edge-vm.json").read_text())
    assert cli.main(["benchmark", "--tier", "edge", "--system", "other", "--model", str(lenet["dir"]),
                     "--repeats", "1", "--out", str(benchmarked)]) == 2
    (benchmarked / "edge-other.json").unlink()
    assert cli.main(["benchmark", "--tier", "edge", "--system", "vm", "--model", str(lenet["dir"]),
                     "--repeats", "0", "--out", str(benchmarked)]) == 2


def test_the_edge_serves_its_profile_of_a_model_as_a_benchmark(client, model_actions, lenet_files):
    model_id = model_actions.add(lenet_files["files"])
    response = client.get(f"/api/v1/models/{model_id}/benchmark?system=edge-1")
    assert response.status_code == 200, response.get_json()
    bench = parse_benchmark(response.data)
    info = client.get(f"/api/v1/models/{model_id}").get_json()
    model = bench.models[model_id]
    assert (bench.tier, bench.system) == ("edge", "edge-1")
    assert [b.time_ms for b in model.blocks] == pytest.approx([s["edge_ms"] for s in info["profile"]["stages"]])
    assert [b.after_block + 1 for b in model.branches] == info["branch_after_stage"]
    assert client.get("/api/v1/models/nope/benchmark").status_code == 404
    assert client.get(f"/api/v1/models/{model_id}/benchmark?system=a,b").status_code == 400


def test_the_cloud_measures_and_serves_a_benchmark_behind_its_token(tmp_path, lenet_files, token):
    from cloud_api import create_app

    app = create_app({"token": token, "state_dir": str(tmp_path / "cloud"), "profile_n_repeats": 2})
    client = app.test_client()
    auth = {"Authorization": f"Bearer {token}"}
    files = {"spec": (io.BytesIO(lenet_files["files"]["spec"]), "spec.json"),
             "weights": (io.BytesIO(lenet_files["files"]["weights"]), "weights.safetensors")}
    model_id = lenet_files["model_id"]
    assert client.put(f"/api/v1/models/{model_id}", headers=auth, data=files).status_code == 201
    assert client.get(f"/api/v1/models/{model_id}/benchmark").status_code == 401
    response = client.get(f"/api/v1/models/{model_id}/benchmark?system=big%20cloud", headers=auth)
    assert response.status_code == 200, response.get_json()
    bench = parse_benchmark(response.data)
    assert (bench.tier, bench.system) == ("cloud", "big cloud")
    spec = json.loads(lenet_files["files"]["spec"])
    assert len(bench.models[model_id].blocks) == len(spec["stages"])
    assert bench.models[model_id].blocks[-1].output_bytes == 4 * len(spec["class_names"])
