"""Precision-aware thresholds (popex.decision.precision_aware): the tolerance holds on the data and on a held-out split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popex.decision import load_calibration
from popex.decision.calibration import Calibration
from popex.decision.precision_aware import DEFAULT_TOLERANCE, evaluate_thresholds, precision_aware_thresholds
from popex.errors import ConfigError

MODELS = Path(__file__).resolve().parents[1] / "models"
SHIPPED = sorted(path.parent.name for path in MODELS.glob("*/calibration.npz"))


def _subset(calibration: Calibration, rows: np.ndarray) -> Calibration:
    return Calibration(confidence=calibration.confidence[rows], predicted=calibration.predicted[rows],
                       correct=calibration.correct[rows], labels=calibration.labels[rows],
                       temperature=calibration.temperature, confidence_method=calibration.confidence_method)


@pytest.mark.parametrize("model", SHIPPED)
@pytest.mark.parametrize("seed", range(5))
def test_thresholds_fitted_on_one_half_keep_the_tolerance_on_the_other(model, seed):
    calibration = load_calibration(MODELS / model / "calibration.npz")
    order = np.random.default_rng(seed).permutation(calibration.n_samples)
    fit, held_out = order[: len(order) // 2], order[len(order) // 2:]
    chosen = precision_aware_thresholds(_subset(calibration, fit))
    result = evaluate_thresholds(_subset(calibration, held_out), chosen.thresholds)
    assert result.accuracy >= DEFAULT_TOLERANCE * result.final_accuracy
    assert sum(result.exit_fractions) > 0.3  # it does exit early: the point of the policy


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 10**6), n_samples=st.integers(1, 300), n_branches=st.integers(1, 3),
       tolerance=st.sampled_from([0.9, 0.97, 0.99, 1.0]))
def test_on_the_data_it_is_fitted_on_the_tolerance_always_holds(seed, n_samples, n_branches, tolerance):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n_samples)
    predicted = np.where(rng.random((n_samples, n_branches + 1)) < 0.7, labels[:, None],
                         rng.integers(0, 3, (n_samples, n_branches + 1)))
    calibration = Calibration(confidence=rng.random((n_samples, n_branches + 1)), predicted=predicted,
                              correct=predicted == labels[:, None], labels=labels,
                              temperature=np.ones(n_branches + 1))
    result = precision_aware_thresholds(calibration, tolerance=tolerance, margin_z=0.0)
    assert result.accuracy >= tolerance * result.final_accuracy - 1e-12
    assert result == evaluate_thresholds(calibration, result.thresholds)
    assert len(result.thresholds) == n_branches


@pytest.mark.parametrize("bad", [{"tolerance": 0.0}, {"tolerance": 1.5}, {"margin_z": -1.0},
                                 {"tolerance": float("nan")}])
def test_bad_tolerances_are_refused(bad):
    calibration = load_calibration(MODELS / SHIPPED[0] / "calibration.npz")
    with pytest.raises(ConfigError):
        precision_aware_thresholds(calibration, **bad)
