"""Confidence of an exit (DESIGN.md §2): temperature-scaled max softmax, or normalised entropy.

One formula for calibration (training, on torch logits converted to numpy)
and for every tier at serving time, so a threshold means the same on both.
"""

from __future__ import annotations

import math

import numpy as np

from popex.decision.calibration import CONFIDENCE_METHODS

__all__ = ["CONFIDENCE_METHODS", "exit_confidence"]


def exit_confidence(logits: np.ndarray, *, temperature: float = 1.0,
                    method: str = "max_softmax") -> tuple[np.ndarray, np.ndarray]:
    """Confidence and predicted class of one exit for a batch of logits.

    Parameters
    ----------
    logits : np.ndarray, shape (n, n_classes)
    temperature : float
        Per-exit temperature; logits are divided by it before the softmax.
    method : {"max_softmax", "entropy"}
        ``max_softmax``: the largest probability. ``entropy``: 1 − H(p)/log(n_classes),
        so that higher means more confident for both.

    Returns
    -------
    (confidence, predicted) : np.ndarray (n,) float32, np.ndarray (n,) int64
        A row holding NaN or infinity gets confidence 0 (no threshold takes it)
        and the first class whose logit is +inf (else finite); never NaN.

    Examples
    --------
    >>> conf, pred = exit_confidence(np.array([[0.0, 0.0]]))
    >>> round(float(conf[0]), 3), int(pred[0])
    (0.5, 0)
    >>> exit_confidence(np.array([[np.inf, 1.0]]))[0].tolist()
    [0.0]
    """
    if method not in CONFIDENCE_METHODS:
        raise ValueError(f"method must be one of {CONFIDENCE_METHODS}, got {method!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is handled below
        scaled = np.asarray(logits, dtype=np.float32) / np.float32(temperature)
    # A row with a NaN or an infinity (a model with huge weights) says nothing: confidence 0, so no
    # threshold takes it, and the first class whose logit is +inf (else finite); never NaN in an answer.
    broken = ~np.isfinite(scaled).all(axis=1)
    if broken.any():
        rows = scaled[broken]
        scaled[broken] = np.where(np.isposinf(rows), np.float32(1.0),
                                  np.where(np.isfinite(rows), np.float32(0.0), np.float32(-1.0)))
    scaled = scaled - scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    probs = exp / exp.sum(axis=1, keepdims=True)
    predicted = probs.argmax(axis=1).astype(np.int64)
    if method == "max_softmax":
        confidence = probs.max(axis=1)
    else:
        entropy = -(probs * np.log(np.maximum(probs, np.float32(1e-12)))).sum(axis=1)
        confidence = (1.0 - entropy / np.float32(math.log(probs.shape[1]))).astype(np.float32)
    confidence[broken] = 0.0
    return confidence, predicted
