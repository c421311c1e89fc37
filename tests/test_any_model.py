"""Any model in, end to end: export an ordinary torch module, calibrate it, register it over REST, serve it.

For each of three modules the old whitelist could not express (GELU +
LayerNorm, concat, attention) the test runs what the README tells a user
to run: ``popex.export``, ``popex calibrate`` (the command, on the exported
files), then ``POST /api/v1/models`` on the edge app, which pushes the ONNX
form to a real cloud process over HTTP. Every test image is then
classified at a split in the middle (the edge runs stages 1..2, the cloud
the rest): the label must be the torch module's argmax and the confidence
its softmax maximum within 1e-4.
"""

from __future__ import annotations

import io
import secrets
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from any_modules import CLASSES, INPUT_SHAPE, NORM, cases
from popex import export
from popex.data.images import decode_image, encode_png
from popex.data.preprocess import Preprocessing, preprocess
from popex.edge.cloud_client import CloudClient
from popex.testbed.services import start_cloud

pytestmark = pytest.mark.slow  # a real cloud process, three exports
REPO = Path(__file__).resolve().parents[1]
N_IMAGES = 12
SPLIT = 2  # the edge runs stages 1..2, the cloud the rest


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    root = tmp_path_factory.mktemp("any-model-cloud")
    token = secrets.token_hex(16)
    with start_cloud(token=token, state_dir=root / "state", log_path=root / "cloud.log") as process:
        process.wait_ready()
        yield process, token


@pytest.fixture
def config(config, cloud):
    process, token = cloud
    return {**config, "default_model_dir": None, "token": token, "cloud_url": process.url}


@pytest.fixture
def fake_cloud(cloud):
    """Not a fake here: the HTTP client of the real cloud process."""
    process, token = cloud
    return CloudClient(process.url, token=token)


def _torch_exits(stages, branches, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Final logits and the branch's, by running the modules themselves."""
    with torch.inference_mode():
        h = x
        for module in stages[:SPLIT]:
            h = module(h)
        branch = branches[SPLIT](h)
        for module in stages[SPLIT:]:
            h = module(h)
    return h.numpy(), branch.numpy()


@pytest.mark.parametrize("case", list(cases()), ids=lambda case: case[0])
def test_an_exported_module_is_calibrated_registered_and_served_through_edge_and_cloud(
        tmp_path, case, client, model_actions, fake_cloud):
    name, stages, branches = case
    for module in [*stages, *branches.values()]:
        module.eval()
    model_dir = tmp_path / name
    export(stages=stages, branches=branches, example_input=torch.randn(1, *INPUT_SHAPE), out=model_dir,
           class_names=CLASSES, normalisation=NORM)

    images = np.random.default_rng(1).integers(0, 256, (N_IMAGES, 16, 16, 3), dtype=np.uint8)
    preprocessing = Preprocessing.from_spec_dict({"input_shape": list(INPUT_SHAPE), **NORM})
    inputs = preprocess(images, preprocessing, is_batch=True)
    final_logits, _ = _torch_exits(stages, branches, torch.from_numpy(inputs))
    np.savez(tmp_path / "val.npz", images=images, labels=final_logits.argmax(1))
    done = subprocess.run([sys.executable, "-m", "popex.cli", "calibrate", "--model", str(model_dir),
                           "--data", str(tmp_path / "val.npz")], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert (model_dir / "calibration.npz").is_file() and "final: accuracy 100.00%" in done.stdout

    files = {str(p.relative_to(model_dir)): p.read_bytes() for p in model_dir.rglob("*") if p.is_file()}
    response = client.post("/api/v1/models", content_type="multipart/form-data",
                           data={"files": [(io.BytesIO(data), path) for path, data in files.items()]})
    assert response.status_code == 202, response.get_json()
    model_id = response.get_json()["model_id"]
    info = model_actions.wait_ready(model_id)
    assert info["cloud_profile"] == "measured", info  # pushed to the real cloud, which profiled it
    model_actions.force(model_id, split=SPLIT, thresholds=[None])

    for i, image in enumerate(images):
        png = encode_png(image)
        answer = client.post(f"/api/v1/classify?model={model_id}", data=png, content_type="image/png").get_json()
        assert (answer["where"], answer["split"], answer["fallback"]) == ("cloud", SPLIT, False), answer
        x = preprocess(decode_image(png), preprocessing)
        logits, _ = _torch_exits(stages, branches, torch.from_numpy(x))
        probs = torch.softmax(torch.from_numpy(logits), 1).numpy()[0]
        assert answer["label"] == int(logits[0].argmax()), f"image {i}: {answer}"
        assert abs(answer["confidence"] - float(probs.max())) < 1e-4, f"image {i}: {answer}"
