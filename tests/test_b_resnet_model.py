"""The shipped B-ResNet (models/b-resnet): three exits that trade accuracy for compute, as its card says."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from popex.decision import load_calibration
from conftest import shipped_test_calibration
from popex.nets import load_model
from popex.nets.flops import stage_macs
from popex.nets.recipe import exit_macs

MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "b-resnet"


@pytest.fixture(scope="module")
def model():
    return load_model(MODEL_DIR)


@pytest.fixture(scope="module")
def card() -> dict:
    return json.loads((MODEL_DIR / "card.json").read_text())


@pytest.fixture(scope="module")
def test_calibration(model):
    return shipped_test_calibration(model, MODEL_DIR)


def test_card_describes_these_weights(model, card: dict) -> None:
    assert card["model_id"] == model.model_id
    assert card["branch_after_stage"] == list(model.net.branch_after_stage)
    assert card["arch"] == "b-resnet" and "popex.cli train --arch b-resnet" in card["command"]
    assert card["n_parameters"] == sum(p.numel() for p in model.net.parameters())


def test_compute_figures_are_reproduced(model, card: dict) -> None:
    """Three branches at about 25/50/75% of the backbone; 20-60 M MACs; compute grows from exit to exit."""
    macs = stage_macs(model.net)
    assert macs == card["stage_macs"] and exit_macs(model.net) == card["exit_macs"]
    assert model.net.n_branches == 3 and 20e6 <= sum(macs) <= 60e6
    shares = [sum(macs[:k]) / sum(macs) for k in model.net.branch_after_stage]
    np.testing.assert_allclose(shares, [0.25, 0.5, 0.75], atol=0.05)
    assert all(a < b for a, b in zip(card["exit_macs"], card["exit_macs"][1:]))


@pytest.mark.slow  # a pass over the 10,000 test images
def test_card_accuracy_is_reproduced(test_calibration, card: dict) -> None:
    """Per-exit accuracy recomputed here matches the card (exactly on the full test set) and MODEL_CARD.md."""
    recomputed = test_calibration.correct.mean(axis=0)
    tolerance = 1e-9 if test_calibration.n_samples == card["test"]["n_test_samples"] else 0.03
    np.testing.assert_allclose(recomputed, card["test"]["exit_accuracy"], atol=tolerance)
    markdown = (MODEL_DIR / "MODEL_CARD.md").read_text()
    for accuracy in card["test"]["exit_accuracy"]:
        assert f"| {accuracy:.2%} |" in markdown


@pytest.mark.slow  # a pass over the 10,000 test images
def test_exits_trade_accuracy_for_compute(test_calibration, card: dict) -> None:
    """The first exit is at least 3 points below the final one, on the card and recomputed."""
    for accuracy in (card["test"]["exit_accuracy"], test_calibration.correct.mean(axis=0)):
        assert accuracy[0] <= accuracy[-1] - 0.03
        assert accuracy[0] < accuracy[1] and accuracy[-1] == max(accuracy)


def test_calibration_file_is_the_validation_split(model) -> None:
    calibration = load_calibration(MODEL_DIR / "calibration.npz")
    assert calibration.n_exits == model.net.n_exits == 4
    assert calibration.n_samples == 6000  # 10% of the training set, held out
    assert np.all(calibration.temperature > 0)
