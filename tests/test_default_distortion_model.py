"""The shipped models/default-distortion (the edge's default): models/default plus blur/noise experts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from popex.data import default_test_set
from popex.data.distort import distort
from popex.data.preprocess import Preprocessing, preprocess
from popex.nets import load_model
from popex.nets.experts import head_exit_logits

MODELS = Path(__file__).resolve().parents[1] / "models"
MODEL_DIR = MODELS / "default-distortion"


@pytest.fixture(scope="module")
def card() -> dict:
    return json.loads((MODEL_DIR / "card.json").read_text())


@pytest.fixture(scope="module")
def model():
    return load_model(MODEL_DIR)


def test_card_describes_these_files(model, card: dict) -> None:
    base_card = json.loads((MODELS / "default" / "card.json").read_text())
    assert card["model_id"] == model.model_id and card["base_model_id"] == base_card["model_id"]
    assert model.net.expert_names == ("blur", "noise") and model.net.n_exits == 4
    assert (MODEL_DIR / "calibration.npz").read_bytes() == (MODELS / "default" / "calibration.npz").read_bytes()
    for name in ("calibration_blur.npz", "calibration_noise.npz", "distortion-classifier/weights.safetensors"):
        assert (MODEL_DIR / name).is_file()


@pytest.mark.slow  # three head sets over the 10,000 test images
def test_card_accuracy_is_reproduced(model, card: dict) -> None:
    """Every head's per-exit accuracy at the strongest blur level, recomputed (exactly on the full test set)."""
    test = default_test_set().dataset
    row = max((r for r in card["test"] if r["kind"] == "blur"), key=lambda r: r["level"])
    images = distort(test.images, kind="blur", level=row["level"], seed=2, is_batch=True)
    inputs = preprocess(images, Preprocessing.from_spec_dict(model.spec), is_batch=True)
    tolerance = 1e-9 if len(test) == card["n_test_samples"] else 0.04
    for head, per_exit in head_exit_logits(model.net, inputs).items():
        recomputed = [float((logits.argmax(1) == test.labels).mean()) for logits in per_exit]
        np.testing.assert_allclose(recomputed, row["exit_accuracy"][head], atol=tolerance, err_msg=head)
