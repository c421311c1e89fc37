"""Blur and noise: kernel rule, clipping (never wrap-around), levels, dataset copies, the CLI."""

from __future__ import annotations

import argparse

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from popex.data import Dataset, load_fashion_mnist, load_image_folder
from popex.data.distort import (
    DEFAULT_LEVELS,
    DistortionLevels,
    add_distort_parser,
    blur_kernel_size_px,
    distort,
    distort_dataset,
    distort_mixed,
    gaussian_blur,
    gaussian_noise,
    write_distorted_copy,
)
from popex.data.images import encode_png
from popex.data.subset import SHIPPED_SUBSET_ROOT
from popex.errors import DataError


@pytest.fixture(scope="module")
def fashion() -> Dataset:
    return load_fashion_mnist(SHIPPED_SUBSET_ROOT, split="test")


def _reference_noise(images: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    """What correct noise is: float sum, rounded, clipped to the pixel range."""
    noise = np.random.default_rng(seed).normal(0.0, sigma, images.shape)
    return np.clip(np.rint(images.astype(np.float64) + noise), 0, 255).astype(np.uint8)


# -- noise never wraps around ------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(images=arrays(np.uint8, st.tuples(st.integers(1, 3), st.integers(1, 12), st.integers(1, 12))),
       sigma=st.floats(0.0, 255.0), seed=st.integers(0, 2**32 - 1))
def test_noise_equals_clipped_float_reference(images: np.ndarray, sigma: float, seed: int) -> None:
    assert np.array_equal(gaussian_noise(images, sigma=sigma, seed=seed), _reference_noise(images, sigma, seed))


@settings(max_examples=40, deadline=None)
@given(value=st.sampled_from([0, 1, 5, 250, 254, 255]), sigma=st.floats(20.0, 255.0), seed=st.integers(0, 10**6))
def test_noise_on_extreme_images_saturates_instead_of_wrapping(value: int, sigma: float, seed: int) -> None:
    image = np.full((16, 16), value, np.uint8)
    noise = np.random.default_rng(seed).normal(0.0, sigma, image.shape)
    noisy = gaussian_noise(image, sigma=sigma, seed=seed).astype(int)
    shifted = value + np.rint(noise)
    # Where the true value is above the range the pixel is white, below it black: a white pixel pushed
    # up never turns dark and a black one pushed down never turns bright (as uint8 wrap-around would do).
    assert np.all(noisy[shifted >= 255] == 255)
    assert np.all(noisy[shifted <= 0] == 0)
    inside = (shifted > 0) & (shifted < 255)
    assert np.array_equal(noisy[inside], shifted[inside])


def test_white_fashion_image_stays_bright_under_noise(fashion: Dataset) -> None:
    white = np.full((4, 28, 28), 255, np.uint8)
    noisy = gaussian_noise(white, sigma=40.0, seed=0)
    assert noisy.min() > 255 - 6 * 40  # a wrap-around would give values near 0
    real = gaussian_noise(fashion.images[:50], sigma=40.0, seed=1)
    background = fashion.images[:50] == 0
    # On the black background noise can only brighten (clipped), never produce 200+ from -56.
    assert np.percentile(real[background], 99) < 6 * 40 / 2 + 1


def test_noise_is_reproducible_and_seeded(fashion: Dataset) -> None:
    a = gaussian_noise(fashion.images[:5], sigma=20.0, seed=3)
    assert np.array_equal(a, gaussian_noise(fashion.images[:5], sigma=20.0, seed=3))
    assert not np.array_equal(a, gaussian_noise(fashion.images[:5], sigma=20.0, seed=4))
    measured = a.astype(float) - fashion.images[:5]
    mid = (fashion.images[:5] > 60) & (fashion.images[:5] < 195)  # far from clipping
    assert abs(measured[mid].std() - 20.0) < 2.0


# -- blur ------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma, size", [(0.2, 1), (0.25, 3), (0.5, 3), (0.6, 3), (0.75, 5), (1.0, 5), (1.2, 5),
                                         (1.5, 7), (2.0, 9), (2.6, 11), (3.0, 13)])
def test_blur_kernel_is_4_sigma_plus_1_rounded_to_odd(sigma: float, size: int) -> None:
    assert blur_kernel_size_px(sigma) == size
    assert size % 2 == 1


def test_blur_matches_cv2_with_that_kernel_on_real_images(fashion: Dataset) -> None:
    images = fashion.images[:20]
    blurred = gaussian_blur(images, sigma=1.5)
    for image, out in zip(images, blurred):
        assert np.array_equal(out, cv2.GaussianBlur(image, (7, 7), 1.5))
    # Blur removes detail: the mean absolute Laplacian drops on every image.
    def detail(batch: np.ndarray) -> np.ndarray:
        return np.array([np.abs(cv2.Laplacian(i.astype(np.float32), cv2.CV_32F)).mean() for i in batch])

    assert np.all(detail(blurred) < detail(images))


def test_blur_keeps_shape_for_single_gray_colour_and_batches() -> None:
    rng = np.random.default_rng(0)
    for shape, is_batch in (((28, 28), None), ((28, 28, 3), None), ((5, 28, 28), None), ((5, 28, 28, 3), None),
                            ((3, 28, 28), True)):
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        assert gaussian_blur(image, sigma=1.0, is_batch=is_batch).shape == shape
    colour = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    assert np.array_equal(gaussian_blur(colour, sigma=1.0)[1], cv2.GaussianBlur(colour[1], (5, 5), 1.0))
    assert np.array_equal(gaussian_blur(colour[0], sigma=0.0), colour[0])


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.float32), np.zeros((0, 4), np.uint8), [[1, 2]]])
def test_bad_images_are_refused(bad) -> None:
    with pytest.raises(DataError):
        gaussian_blur(bad, sigma=1.0)
    with pytest.raises(DataError):
        gaussian_noise(bad, sigma=1.0, seed=0)


@pytest.mark.parametrize("sigma", [-1.0, float("nan"), 1e6, "2", True])
def test_bad_sigma_is_refused(sigma) -> None:
    with pytest.raises(DataError, match="sigma"):
        gaussian_blur(np.zeros((4, 4), np.uint8), sigma=sigma)


# -- levels, datasets, mixed batches ----------------------------------------------------


def test_default_levels_and_middle() -> None:
    assert DEFAULT_LEVELS.middle("blur") == DEFAULT_LEVELS.blur_sigmas_px[1]
    assert DEFAULT_LEVELS.middle("noise") == DEFAULT_LEVELS.noise_sigmas_grey[1]
    assert DistortionLevels(blur_sigmas_px=(1.0, 2.0)).middle("blur") == 1.0
    for bad in ((), (2.0, 1.0), (0.0, 1.0), (1.0, 1.0)):
        with pytest.raises(DataError):
            DistortionLevels(blur_sigmas_px=bad)
    with pytest.raises(DataError, match="kind"):
        DEFAULT_LEVELS.for_kind("fog")


def test_distort_dataset_keeps_labels_and_changes_pixels(fashion: Dataset) -> None:
    small = fashion.subset(np.arange(30))
    for kind, level in (("blur", 1.0), ("noise", 20.0)):
        out = distort_dataset(small, kind, level, seed=0)
        assert out.class_names == small.class_names and np.array_equal(out.labels, small.labels)
        assert out.images.dtype == np.uint8 and out.images.shape == small.images.shape
        assert not np.array_equal(out.images, small.images)
    assert np.array_equal(distort_dataset(small, "pristine", 0.0).images, small.images)


def test_distort_mixed_uses_every_level(fashion: Dataset) -> None:
    images = np.repeat(fashion.images[:1], 300, axis=0)
    mixed = distort_mixed(images, kind="blur", seed=0)
    singles = {level: gaussian_blur(images[:1], sigma=level)[0] for level in DEFAULT_LEVELS.blur_sigmas_px}
    matches = [next(level for level, ref in singles.items() if np.array_equal(ref, m)) for m in mixed]
    counts = np.array([matches.count(level) for level in DEFAULT_LEVELS.blur_sigmas_px])
    assert counts.sum() == 300 and counts.min() > 70


# -- popex distort ---------------------------------------------------------------------


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="popex")
    add_distort_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli_writes_a_noisy_idx_copy(tmp_path, capsys) -> None:
    args = _parse(["distort", "--data", str(SHIPPED_SUBSET_ROOT), "--out", str(tmp_path / "noisy"),
                   "--kind", "noise", "--level", "20", "--seed", "5", "--quiet"])
    assert args.run(args) == 0
    assert "wrote 1000 images" in capsys.readouterr().out
    original = load_fashion_mnist(SHIPPED_SUBSET_ROOT, split="test")
    copy = load_fashion_mnist(tmp_path / "noisy", split="test")
    assert np.array_equal(copy.labels, original.labels)
    assert np.array_equal(copy.images, gaussian_noise(original.images, sigma=20.0, seed=5))


def test_cli_writes_a_blurred_image_folder_copy(tmp_path, fashion: Dataset) -> None:
    source = tmp_path / "folder"
    for i in range(6):
        class_dir = source / fashion.class_names[int(fashion.labels[i])].replace("/", "-")
        class_dir.mkdir(parents=True, exist_ok=True)
        (class_dir / f"{i}.png").write_bytes(encode_png(fashion.images[i]))
    n_written = write_distorted_copy(source, tmp_path / "blurred", kind="blur", level=1.0,
                                     data_format="imagefolder", progress=False)
    assert n_written == 6
    original = load_image_folder(source, channels=1)
    blurred = load_image_folder(tmp_path / "blurred", channels=1)
    assert blurred.class_names == original.class_names
    assert np.array_equal(blurred.images, gaussian_blur(original.images, sigma=1.0))
    with pytest.raises(DataError, match="differ"):
        write_distorted_copy(source, source, kind="blur", level=1.0, data_format="imagefolder")


def test_distort_rejects_unknown_kind(fashion: Dataset) -> None:
    with pytest.raises(DataError, match="kind"):
        distort(fashion.images[:2], kind="fog", level=1.0)
