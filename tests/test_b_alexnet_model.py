"""The shipped default model: a real trained network that meets its card's figures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from popex.decision import load_calibration, sweep_exit_stats
from conftest import shipped_test_calibration
from popex.nets import load_model

MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "b-alexnet"


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
    assert "popex.cli train" in card["command"]


def test_final_exit_reaches_90_percent(test_calibration) -> None:
    assert test_calibration.correct[:, -1].mean() >= 0.90


def test_card_figures_are_reproduced(test_calibration, card: dict) -> None:
    """Per-exit accuracy recomputed here matches the card (exactly on the full test set)."""
    recomputed = test_calibration.correct.mean(axis=0)
    tolerance = 1e-9 if test_calibration.n_samples == card["test"]["n_test_samples"] else 0.03
    np.testing.assert_allclose(recomputed, card["test"]["exit_accuracy"], atol=tolerance)


def test_first_branch_takes_40_percent_within_one_point(test_calibration) -> None:
    """A threshold exists where >= 40% leave at branch 0 and accuracy stays within 1 point of the final exit."""
    stats = sweep_exit_stats(test_calibration, branch_after_stage=(1, 2),
                             thresholds=[np.round(np.arange(0.5, 1.0, 0.01), 2).tolist(), [0.5]])
    level = stats.levels[1]  # branch 0 only
    final_accuracy = test_calibration.correct[:, -1].mean()
    good = (level.exit_probs[:, 0] >= 0.40) & (level.accuracy >= final_accuracy - 0.01)
    assert good.any(), (level.exit_probs[:, 0].max(), final_accuracy)


def test_calibration_file_is_the_validation_split(model) -> None:
    calibration = load_calibration(MODEL_DIR / "calibration.npz")
    assert calibration.n_exits == model.net.n_exits
    assert calibration.n_samples == 6000  # 10% of the training set, held out
    assert np.all(calibration.temperature > 0)
