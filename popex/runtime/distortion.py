"""The distortion classifier as a tier runs it (ONNX Runtime), and the head set it picks per image.

Trained with torch (:mod:`popex.nets.distortion`), it ships as a
``distortion-classifier/`` ONNX directory inside the model that has expert
heads; :func:`choose_head` is the one place that turns its answer into the
head set a request uses.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from popex.data.distort import DISTORTION_KINDS
from popex.data.spectrum import DistortionPrediction, spectrum_features
from popex.errors import ConfigError, DataError
from popex.runtime.exits import exit_confidence
from popex.runtime.onnx_model import PRISTINE_HEAD, OnnxModel, OnnxModelError

__all__ = ["CLASSIFIER_DIR", "OnnxDistortionClassifier", "HeadChoice", "choose_head"]

CLASSIFIER_DIR = "distortion-classifier"


class OnnxDistortionClassifier:
    """The classifier network (pristine, blur, noise from the spectrum), run by ONNX Runtime.

    Parameters
    ----------
    net : OnnxModel
        Class names exactly ("pristine", "blur", "noise"), one gray channel, no branches.
    model_id : str

    Raises
    ------
    OnnxModelError
        If the network is not such a classifier.
    """

    def __init__(self, net: OnnxModel, *, model_id: str = "") -> None:
        if net.class_names != DISTORTION_KINDS or net.n_branches or net.expert_names or net.input_shape[0] != 1:
            raise OnnxModelError(f"a distortion classifier must have class names {list(DISTORTION_KINDS)}, one "
                                 f"input channel, no branches and no experts; got classes {list(net.class_names)}, "
                                 f"input {list(net.input_shape)}, {net.n_branches} branches")
        self.net = net
        self.model_id = model_id

    def predict(self, images: np.ndarray, *, is_batch: bool | None = None, batch_size: int = 1024
                ) -> DistortionPrediction:
        """Classify uint8 images (one or a batch, any size, gray or RGB).

        Raises
        ------
        DataError
            If the images are not uint8 images of a supported shape.
        """
        features = spectrum_features(images, self.net.spec, is_batch=is_batch)
        logits = np.concatenate([self.net.run_stages(features[start:start + batch_size])
                                 for start in range(0, len(features), batch_size)])
        confidences, predicted = exit_confidence(logits)
        return DistortionPrediction(kinds=tuple(DISTORTION_KINDS[i] for i in predicted),
                                    confidences=confidences.astype(np.float32))

    def time_one_image_ms(self, *, n_repeats: int = 50, n_warmup: int = 5) -> float:
        """Median time of :meth:`predict` on one image of the classifier's size, ms (the edge's fixed cost)."""
        if n_repeats < 1 or n_warmup < 0:
            raise ConfigError(f"need n_repeats >= 1 and n_warmup >= 0, got {n_repeats}, {n_warmup}")
        image = np.random.default_rng(0).integers(0, 256, tuple(self.net.input_shape[1:]), dtype=np.uint8)
        timings_ms = []
        for i in range(n_warmup + n_repeats):
            started = time.perf_counter()
            self.predict(image, is_batch=False)
            if i >= n_warmup:
                timings_ms.append((time.perf_counter() - started) * 1000.0)
        return float(np.median(timings_ms))


@dataclass(frozen=True)
class HeadChoice:
    """Which head set serves one image, and what choosing cost.

    ``expert`` is what a response reports ("pristine" | "blur" | "noise");
    ``head`` is what the runtime passes to ``run_branch`` / ``run_stages`` and
    puts in the wire payload's ``head`` metadata (None for pristine: omit it).
    """

    expert: str
    head: str | None
    confidence: float
    classifier_ms: float


def choose_head(classifier: Any, net: Any, image: np.ndarray) -> HeadChoice:
    """Classify one uint8 image (any size, gray or RGB) and pick the head set of ``net`` for it.

    ``classifier`` has ``predict`` (either classifier class); ``net`` has
    ``expert_names``. A kind without an expert in ``net`` falls back to the
    pristine heads.

    Raises
    ------
    DataError
        If ``image`` is not one uint8 image.
    """
    started = time.perf_counter()
    prediction = classifier.predict(image, is_batch=False)
    classifier_ms = (time.perf_counter() - started) * 1000.0
    if len(prediction.kinds) != 1:
        raise DataError(f"choose_head needs one image, got {len(prediction.kinds)}")
    kind = prediction.kinds[0]
    expert = kind if kind in net.expert_names else PRISTINE_HEAD
    return HeadChoice(expert=expert, head=None if expert == PRISTINE_HEAD else expert,
                      confidence=float(prediction.confidences[0]), classifier_ms=classifier_ms)
