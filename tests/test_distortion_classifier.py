"""The distortion classifier: spectrum features, the spec-built CNN, a tiny real training run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from popex.data import load_fashion_mnist
from popex.data.distort import DEFAULT_LEVELS, DISTORTION_KINDS, distort, gaussian_blur, gaussian_noise
from popex.data.subset import SHIPPED_SUBSET_ROOT
from popex.errors import DataError, SpecError
from popex.nets import EarlyExitNet, zoo_spec
from popex.nets.distortion import (
    ClassifierTrainConfig,
    DistortionClassifier,
    distortion_classifier_spec,
    evaluate_distortion_classifier,
    spectrum,
    spectrum_features,
    train_distortion_classifier,
)
from popex.nets.experts import load_expert_model


def _high_frequency_energy(images: np.ndarray) -> np.ndarray:
    """Mean log-magnitude outside the central disc of radius H/4 (the upper half of the frequencies)."""
    s = spectrum(images.astype(np.float64) / 255.0)
    n = s.shape[-1]
    y, x = np.mgrid[:n, :n] - n // 2
    return s[:, np.hypot(x, y) >= n / 4].mean(axis=1)


def _synthetic_scenes(n_images: int, seed: int) -> np.ndarray:
    """Sharp-edged random rectangles on black, 28 x 28, like clothes on Fashion-MNIST's background."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n_images, 28, 28), np.uint8)
    for image in images:
        for _ in range(3):
            top, left = rng.integers(0, 20, 2)
            height, width = rng.integers(4, 12, 2)
            image[top:top + height, left:left + width] = rng.integers(80, 256)
    return images


def test_spectrum_is_centred_log_magnitude() -> None:
    image = np.zeros((8, 8))
    image[:, ::2] = 1.0  # vertical stripes: energy at DC and at the horizontal Nyquist frequency only
    s = spectrum(image)
    assert s.shape == (8, 8) and s.dtype == np.float32
    assert s[4, 4] == pytest.approx(np.log1p(32.0))  # DC in the centre: |sum| = 32
    assert s[4, 0] == pytest.approx(np.log1p(32.0))
    assert np.count_nonzero(s > 1e-6) == 2
    assert spectrum(np.stack([image, image])).shape == (2, 8, 8)
    with pytest.raises(DataError):
        spectrum(np.zeros(5))


def test_spectrum_separates_blur_from_noise_on_synthetic_images() -> None:
    scenes = _synthetic_scenes(200, seed=0)
    pristine = _high_frequency_energy(scenes)
    blurred = _high_frequency_energy(gaussian_blur(scenes, sigma=1.0))
    noisy = _high_frequency_energy(gaussian_noise(scenes, sigma=20.0, seed=0))
    # Blur empties the high frequencies and noise fills them, image by image and with no overlap.
    assert np.all(blurred < pristine) and np.all(noisy > pristine)
    assert blurred.max() < noisy.min()


def test_features_standardise_with_the_spec_and_convert_colour() -> None:
    spec = distortion_classifier_spec(spectrum_mean=0.5, spectrum_std=2.0)
    gray = _synthetic_scenes(3, seed=1)
    features = spectrum_features(gray, spec, is_batch=True)
    assert features.shape == (3, 1, 28, 28) and features.dtype == np.float32
    np.testing.assert_allclose(features[:, 0], (spectrum(gray / 255.0) - 0.5) / 2.0, atol=1e-5)
    colour = np.repeat(gray[0][:, :, None], 3, axis=2)
    np.testing.assert_allclose(spectrum_features(colour, spec)[0], features[0], atol=1e-5)
    big = np.kron(gray[0], np.ones((2, 2), np.uint8))  # 56 x 56: resized to the classifier's input first
    assert spectrum_features(big, spec).shape == (1, 1, 28, 28)


def test_classifier_wraps_only_a_classifier_spec() -> None:
    with pytest.raises(SpecError, match="class names"):
        DistortionClassifier(EarlyExitNet(zoo_spec("b-lenet")))
    net = EarlyExitNet(distortion_classifier_spec())
    assert net.n_branches == 0 and any(isinstance(m, torch.nn.ReLU) for m in net.modules())
    prediction = DistortionClassifier(net).predict(_synthetic_scenes(4, seed=2), is_batch=True)
    assert len(prediction.kinds) == 4 and set(prediction.kinds) <= set(DISTORTION_KINDS)
    assert prediction.confidences.shape == (4,) and np.all(prediction.confidences >= 1 / 3 - 1e-6)


@pytest.fixture(scope="module")
def trained() -> DistortionClassifier:
    """Three epochs on 600 real Fashion-MNIST images (the shipped subset), about 10 s."""
    images = load_fashion_mnist(SHIPPED_SUBSET_ROOT, split="test").images[:600]
    return train_distortion_classifier(images, config=ClassifierTrainConfig(n_epochs=3, n_threads=2), progress=False)


def test_tiny_training_run_beats_chance_clearly(trained) -> None:
    held_out = load_fashion_mnist(SHIPPED_SUBSET_ROOT, split="test").images[600:]
    scores = evaluate_distortion_classifier(trained, held_out, seed=0)
    by_level = {(s.kind, s.level): s.accuracy for s in scores}
    balanced = np.mean([by_level[("pristine", 0.0)], np.mean([a for (k, _), a in by_level.items() if k == "blur"]),
                        np.mean([a for (k, _), a in by_level.items() if k == "noise"])])
    assert balanced > 0.6, by_level  # chance is 1/3
    assert by_level[("blur", 1.5)] > 0.8 and by_level[("noise", 40.0)] > 0.8, by_level


def test_save_load_round_trip_gives_the_same_predictions(trained, tmp_path) -> None:
    model_id = trained.save(tmp_path)
    loaded = DistortionClassifier.load(tmp_path)
    assert loaded.model_id == model_id
    images = distort(_synthetic_scenes(8, seed=3), kind="noise", level=20.0, seed=0)
    a, b = trained.predict(images, is_batch=True), loaded.predict(images, is_batch=True)
    assert a.kinds == b.kinds and np.array_equal(a.confidences, b.confidences)
    from_bytes = DistortionClassifier.from_bytes((tmp_path / "spec.json").read_bytes(),
                                                 (tmp_path / "weights.safetensors").read_bytes())
    assert from_bytes.model_id == model_id


SHIPPED_EXPERTS = Path(__file__).resolve().parents[1] / "models" / "b-alexnet-distortion"


@pytest.mark.skipif(not (SHIPPED_EXPERTS / "spec.json").is_file(), reason="models/b-alexnet-distortion not built")
def test_shipped_classifier_picks_the_right_expert_on_real_images() -> None:
    model = load_expert_model(SHIPPED_EXPERTS)
    images = load_fashion_mnist(SHIPPED_SUBSET_ROOT, split="test").images[:60]
    for kind in DISTORTION_KINDS:
        level = DEFAULT_LEVELS.middle(kind) if kind != "pristine" else 0.0
        distorted = distort(images, kind=kind, level=level, seed=0, is_batch=True)
        choices = [model.choose(image) for image in distorted]
        assert np.mean([c.expert == kind for c in choices]) >= 0.9, kind
        assert all((c.head is None) == (c.expert == "pristine") for c in choices)
