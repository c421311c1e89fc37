"""The distortion classifier: pristine, blurred or noisy, from the image's Fourier spectrum.

Blur removes high spatial frequencies and noise adds a flat floor of them,
whatever the image shows, so the log-magnitude of the centred 2-D Fourier
transform separates the three far better than the pixels do. A small CNN
(two conv blocks with batch norm and ReLU, then two linear layers) reads that
spectrum. It is built from the same JSON spec format as every POPEX model
(an :class:`EarlyExitNet` with no branches) and stored as spec.json +
weights.safetensors, so it ships and registers as safely as the model itself.

The spectrum is standardised with one mean and std measured on the training
spectra, stored as the spec's ``mean`` / ``std``; :func:`spectrum_features`
is the one function both training and serving call, so they see exactly the
same numbers.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from popex.data.distort import DEFAULT_LEVELS, DISTORTION_KINDS, DistortionLevels, distort, distort_mixed
from popex.data.spectrum import DistortionPrediction, _gray_unit, spectrum, spectrum_features
from popex.errors import ConfigError, DataError, SpecError
from popex.nets.early_exit import EarlyExitNet
from popex.nets.io import load_model, load_model_bytes, save_model
from popex.nets.spec import SPEC_FORMAT

__all__ = [
    "CLASSIFIER_DIR",
    "DistortionPrediction",
    "ClassifierScore",
    "ClassifierTrainConfig",
    "DistortionClassifier",
    "spectrum",
    "spectrum_features",
    "distortion_classifier_spec",
    "train_distortion_classifier",
    "evaluate_distortion_classifier",
    "load_classifier_dir",
]

CLASSIFIER_DIR = "distortion-classifier"
"""Sub-directory of a model directory that holds the classifier's spec.json and weights."""


def distortion_classifier_spec(*, image_size_px: int = 28, spectrum_mean: float = 0.0, spectrum_std: float = 1.0,
                               width: int = 8) -> dict[str, Any]:
    """Spec of the classifier CNN: two conv-BN-ReLU-pool blocks, then a 2-layer MLP.

    The MLP (not global pooling) keeps *where* in the spectrum energy sits,
    which is what tells blur (little at high frequencies) from noise (a lot).

    >>> net = EarlyExitNet(distortion_classifier_spec())
    >>> net.class_names, net.n_branches
    (('pristine', 'blur', 'noise'), 0)
    """
    if not 8 <= image_size_px <= 512 or width < 1:
        raise SpecError(f"need 8 <= image_size_px <= 512 and width >= 1, got {image_size_px}, {width}")
    c1, c2 = width, 2 * width
    size = image_size_px // 2 // 2

    def conv(c_in: int, c_out: int, name: str) -> dict[str, Any]:
        return {"type": "conv2d", "in_channels": c_in, "out_channels": c_out, "kernel_size": 3, "padding": 1,
                "name": name}

    pool = {"type": "maxpool2d", "kernel_size": 2}
    return {
        "format": SPEC_FORMAT,
        "name": "distortion-classifier",
        "description": "pristine / blur / noise from the standardised log-magnitude centred Fourier spectrum",
        "input_shape": [1, image_size_px, image_size_px],
        "mean": [round(float(spectrum_mean), 6)],
        "std": [round(float(spectrum_std), 6)],
        "class_names": list(DISTORTION_KINDS),
        "stages": [
            {"name": "features", "layers": [
                conv(1, c1, "features.0"), {"type": "batchnorm2d", "num_features": c1, "name": "features.1"},
                {"type": "relu"}, pool,
                conv(c1, c2, "features.4"), {"type": "batchnorm2d", "num_features": c2, "name": "features.5"},
                {"type": "relu"}, pool]},
            {"name": "classifier", "layers": [
                {"type": "flatten"}, {"type": "dropout", "p": 0.2},
                {"type": "linear", "in_features": c2 * size * size, "out_features": 64, "name": "classifier.2"},
                {"type": "relu"},
                {"type": "linear", "in_features": 64, "out_features": len(DISTORTION_KINDS),
                 "name": "classifier.4"}]},
        ],
    }


# -- the classifier --------------------------------------------------------------


@dataclass(frozen=True)
class ClassifierScore:
    """Held-out accuracy of the classifier on one kind at one level."""

    kind: str
    level: float
    accuracy: float
    n_samples: int


class DistortionClassifier:
    """A trained classifier network and its spec; predicts the distortion of uint8 images.

    Parameters
    ----------
    net : EarlyExitNet
        Built from a :func:`distortion_classifier_spec`-like spec: one gray
        input channel, class names exactly ``("pristine", "blur", "noise")``,
        no branches and no experts.
    model_id : str, default ""
        Its id (sha256 of spec + weights) when it came from files or bytes.

    Raises
    ------
    SpecError
        If the network is not such a classifier.
    """

    def __init__(self, net: EarlyExitNet, *, model_id: str = "") -> None:
        if not isinstance(net, EarlyExitNet):
            raise SpecError(f"a DistortionClassifier needs an EarlyExitNet, got {type(net).__name__}")
        if net.class_names != DISTORTION_KINDS or net.n_branches or net.expert_names or net.input_shape[0] != 1:
            raise SpecError(f"a distortion classifier must have class names {list(DISTORTION_KINDS)}, one input "
                            f"channel, no branches and no experts; got classes {list(net.class_names)}, input "
                            f"{list(net.input_shape)}, {net.n_branches} branches, experts {list(net.expert_names)}")
        self.net = net.eval()
        self.model_id = model_id

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> DistortionClassifier:
        """Load spec.json + weights.safetensors (e.g. ``<model dir>/distortion-classifier``)."""
        loaded = load_model(directory)
        return cls(loaded.net, model_id=loaded.model_id)

    @classmethod
    def from_bytes(cls, spec_bytes: bytes, weights_bytes: bytes) -> DistortionClassifier:
        """Build from spec JSON and safetensors bytes, e.g. received by a registration endpoint."""
        loaded = load_model_bytes(spec_bytes, weights_bytes)
        return cls(loaded.net, model_id=loaded.model_id)

    def save(self, directory: str | os.PathLike[str]) -> str:
        """Write spec.json + weights.safetensors; returns (and records) the model id."""
        self.model_id = save_model(self.net, directory)
        return self.model_id

    def predict(self, images: np.ndarray, *, is_batch: bool | None = None, batch_size: int = 1024
                ) -> DistortionPrediction:
        """Classify uint8 images (one image or a batch, any size, gray or RGB).

        Returns
        -------
        DistortionPrediction
            ``kinds`` (one of "pristine", "blur", "noise" per image) and
            ``confidences`` (max softmax probability, float32 (n,)).

        Raises
        ------
        DataError
            If the images are not uint8 images of a supported shape.
        """
        features = spectrum_features(images, self.net.spec, is_batch=is_batch)
        probabilities = []
        with torch.inference_mode():
            for start in range(0, len(features), batch_size):
                logits = self.net(torch.from_numpy(features[start:start + batch_size]))[-1]
                probabilities.append(torch.softmax(logits.float(), dim=1).numpy())
        probs = np.concatenate(probabilities)
        return DistortionPrediction(kinds=tuple(DISTORTION_KINDS[i] for i in probs.argmax(axis=1)),
                                    confidences=probs.max(axis=1).astype(np.float32))


# -- training ----------------------------------------------------------------------


@dataclass(frozen=True)
class ClassifierTrainConfig:
    """Hyper-parameters of :func:`train_distortion_classifier`."""

    n_epochs: int = 4
    batch_size: int = 128
    learning_rate: float = 3e-3
    width: int = 8
    seed: int = 0
    n_threads: int = 2

    def __post_init__(self) -> None:
        if min(self.n_epochs, self.batch_size, self.width, self.n_threads) < 1 or not self.learning_rate > 0:
            raise ConfigError(f"epochs, batch size, width and threads must be >= 1 and the rate > 0, got {self}")


def _balanced_epoch(images: np.ndarray, levels: DistortionLevels, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Every image once, a third of them pristine, blurred and noisy (levels drawn uniformly), shuffled."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    labels = np.empty(len(images), dtype=np.int64)
    out = np.empty_like(images)
    for k, (kind, rows) in enumerate(zip(DISTORTION_KINDS, np.array_split(order, len(DISTORTION_KINDS)))):
        out[rows] = distort_mixed(images[rows], kind=kind, levels=levels, seed=seed * 10 + k)
        labels[rows] = k
    return out, labels


def train_distortion_classifier(images: np.ndarray, *, levels: DistortionLevels = DEFAULT_LEVELS,
                                config: ClassifierTrainConfig = ClassifierTrainConfig(),
                                progress: bool = True) -> DistortionClassifier:
    """Train the classifier on pristine, blurred and noisy copies of ``images``, balanced.

    Every epoch draws fresh distortions: each image appears once, as one of
    the three kinds (a third each); a blurred or noisy image gets a level
    drawn uniformly from ``levels``, so every default level is trained on.

    Parameters
    ----------
    images : np.ndarray of uint8, shape (n, H, W) or (n, H, W, C)
        Undistorted training images (e.g. Fashion-MNIST's training split).
    levels : DistortionLevels
    config : ClassifierTrainConfig
    progress : bool
        Show a progress bar per epoch.

    Returns
    -------
    DistortionClassifier
        In eval mode, input size that of ``images``.

    Raises
    ------
    DataError
        If ``images`` is not a uint8 batch of at least 30 images.
    """
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim not in (3, 4) or len(images) < 30:
        raise DataError(f"train_distortion_classifier needs a uint8 batch of >= 30 images, got "
                        f"{getattr(images, 'dtype', type(images).__name__)} {getattr(images, 'shape', '')}")
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.n_threads)
    size_px = int(images.shape[1])
    first_images, first_labels = _balanced_epoch(images, levels, config.seed)
    # One mean and std over the whole first epoch: a per-image standardisation would erase the
    # overall energy at high frequencies, which is exactly what separates the three kinds.
    raw = spectrum(_gray_unit(first_images[: min(len(first_images), 6000)], (size_px, size_px), True))
    spec = distortion_classifier_spec(image_size_px=size_px, spectrum_mean=float(raw.mean()),
                                      spectrum_std=float(raw.std()) or 1.0, width=config.width)
    net = EarlyExitNet(spec)
    n_batches = math.ceil(len(images) / config.batch_size)
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.learning_rate, weight_decay=1e-4)
    n_steps = max(10, config.n_epochs * n_batches)  # with fewer, OneCycleLR's warm-up would be 0 steps long
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.learning_rate, total_steps=n_steps,
                                                    pct_start=0.2)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(config.n_epochs):
        epoch_images, labels = (first_images, first_labels) if epoch == 0 else \
            _balanced_epoch(images, levels, config.seed + epoch)
        inputs = torch.from_numpy(spectrum_features(epoch_images, spec, is_batch=True))
        targets = torch.from_numpy(labels)
        net.train()
        total_loss, n_correct = 0.0, 0
        bar = tqdm(range(n_batches), desc=f"distortion classifier {epoch + 1}/{config.n_epochs}",
                   disable=not progress)
        for step in bar:
            rows = slice(step * config.batch_size, (step + 1) * config.batch_size)
            logits = net(inputs[rows])[-1]
            loss = loss_fn(logits, targets[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += float(loss.detach())
            n_correct += int((logits.argmax(1) == targets[rows]).sum())
            if step % 20 == 0:
                bar.set_postfix(loss=f"{total_loss / (step + 1):.3f}",
                                acc=f"{n_correct / min(len(inputs), (step + 1) * config.batch_size):.3f}")
    return DistortionClassifier(net.eval())


def evaluate_distortion_classifier(classifier: DistortionClassifier, images: np.ndarray, *,
                                   levels: DistortionLevels = DEFAULT_LEVELS, seed: int = 0
                                   ) -> list[ClassifierScore]:
    """Accuracy on held-out ``images``: all pristine, then all blurred / noisy at each level in turn.

    Returns one :class:`ClassifierScore` per (kind, level): pristine first,
    then the blur levels, then the noise levels.
    """
    scores = []
    for kind in DISTORTION_KINDS:
        for level in levels.for_kind(kind):
            distorted = distort(images, kind=kind, level=level, seed=seed, is_batch=True)
            predicted = classifier.predict(distorted, is_batch=True).kinds
            accuracy = float(np.mean([p == kind for p in predicted]))
            scores.append(ClassifierScore(kind=kind, level=float(level), accuracy=accuracy, n_samples=len(images)))
    return scores


def load_classifier_dir(model_dir: str | os.PathLike[str]) -> DistortionClassifier:
    """The classifier shipped in ``<model_dir>/distortion-classifier``."""
    return DistortionClassifier.load(Path(model_dir) / CLASSIFIER_DIR)

