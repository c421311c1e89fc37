"""The distortion classifier's input: the standardised log-magnitude Fourier spectrum of an image.

One function for training (torch, :mod:`popex.nets.distortion`) and serving
(ONNX Runtime, :mod:`popex.runtime.distortion`), so both see exactly the same
numbers; numpy and OpenCV only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from popex.data.preprocess import Preprocessing, preprocess
from popex.errors import DataError

__all__ = ["DistortionPrediction", "spectrum", "spectrum_features"]


@dataclass(frozen=True)
class DistortionPrediction:
    """Per-image kind ("pristine" | "blur" | "noise") and its softmax confidence."""

    kinds: tuple[str, ...]
    confidences: np.ndarray  # float32, shape (n,)


def _gray_unit(images: np.ndarray, image_shape_hw: tuple[int, int], is_batch: bool | None) -> np.ndarray:
    """uint8 images -> gray (n, H, W) float32 in [0, 1] at the classifier's size (the model's input size)."""
    unit = Preprocessing((1, *image_shape_hw), mean=(0.0,), std=(1.0,))
    return preprocess(images, unit, is_batch=is_batch)[:, 0]


def spectrum(images: np.ndarray) -> np.ndarray:
    """log(1 + |F|) of the centred 2-D Fourier transform of gray images.

    Parameters
    ----------
    images : np.ndarray of float, shape (H, W) or (n, H, W)
        Gray values, typically in [0, 1].

    Returns
    -------
    np.ndarray of float32, the shape of ``images``
        The zero frequency sits at (H // 2, W // 2).

    Examples
    --------
    >>> s = spectrum(np.ones((4, 4)))
    >>> s.shape, round(float(s[2, 2]), 3), float(s[0, 0])
    ((4, 4), 2.833, 0.0)
    """
    values = np.asarray(images, dtype=np.float64)
    if values.ndim not in (2, 3):
        raise DataError(f"spectrum needs gray images (H, W) or (n, H, W), got shape {values.shape}")
    transformed = np.fft.fftshift(np.fft.fft2(values, axes=(-2, -1)), axes=(-2, -1))
    return np.log1p(np.abs(transformed)).astype(np.float32)


def spectrum_features(images: np.ndarray, spec: dict[str, Any], *, is_batch: bool | None = None) -> np.ndarray:
    """The classifier's input for uint8 images: standardised spectra, (n, 1, H, W) float32.

    Colour images are converted to gray and every image is resized to the
    spec's input size first (as the model itself would see them).

    Parameters
    ----------
    images : np.ndarray of uint8
        One image or a batch, as :func:`popex.data.preprocess.preprocess` accepts.
    spec : dict
        The classifier's spec: ``input_shape`` and the spectrum ``mean`` / ``std``.
    is_batch : bool or None
        For 3-D arrays only, as in ``preprocess``.
    """
    gray = _gray_unit(images, tuple(spec["input_shape"][1:]), is_batch)
    mean, std = float(spec.get("mean", [0.0])[0]), float(spec.get("std", [1.0])[0])
    return ((spectrum(gray) - mean) / std)[:, None].astype(np.float32)
