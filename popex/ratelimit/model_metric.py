"""``popex ratelimit metric``: a metric file from a POPEX model's calibration split.

The weak classifier is the model's best local exit at a split s (the most
accurate branch, on the calibration, among those after stages <= s), the
strong one its final exit: the edge/cloud pair of a rate-limited uplink.
The calibration split is rebuilt from the model card's training command
(dataset, seed, validation fraction) and must give the labels that
``calibration.npz`` holds; ``--data`` names labelled images instead. Both
exits run in ONNX Runtime, as the tiers run them.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from popex.decision.calibration import CALIBRATION_FILE, load_calibration
from popex.errors import DataError
from popex.ratelimit.data import MetricData, metric_data_from_logits

__all__ = ["ModelMetric", "best_local_exit", "model_metric_data"]


@dataclass(frozen=True)
class ModelMetric:
    """The file's data and where it came from: the branch used, the split, the number of images."""

    data: MetricData
    branch: int
    split: int
    n_images: int
    inverse_temperature: float


def best_local_exit(accuracy: np.ndarray, branch_after_stage: tuple[int, ...], split: int) -> int:
    """The most accurate branch after a stage <= ``split`` (ties: the earlier one).

    >>> best_local_exit(np.array([0.8, 0.9, 0.95]), (1, 2), 1)
    0

    Raises
    ------
    DataError
        If no branch sits at or before the split.
    """
    candidates = [b for b, k in enumerate(branch_after_stage) if k <= split]
    if not candidates:
        raise DataError(f"no branch sits at or before split {split} (branches after stages {list(branch_after_stage)})")
    return max(candidates, key=lambda b: (float(accuracy[b]), -b))


def _card_split(model_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of the calibration split, rebuilt from the card's training command."""
    from popex.nets.recipe import load_dataset
    from popex.data.idx import DEFAULT_FASHION_MNIST_ROOT

    card_path = model_dir / "card.json"
    if not card_path.is_file():
        raise DataError(f"{model_dir} has no card.json saying how its calibration split was drawn; give --data")
    command = shlex.split(str(json.loads(card_path.read_text()).get("command", "")))
    options = {command[i]: command[i + 1] for i in range(len(command) - 1) if command[i].startswith("--")}
    dataset = options.get("--dataset", "fashion-mnist")
    root = options.get("--data-root", str(DEFAULT_FASHION_MNIST_ROOT))
    seed, fraction = int(options.get("--seed", 0)), float(options.get("--val-fraction", 0.1))
    image_size = int(options["--image-size"]) if "--image-size" in options else None
    full_train, _ = load_dataset(dataset, root, seed=seed, image_size=image_size)
    val = full_train.split_holdout(fraction, seed=seed).val
    return val.images, val.labels


def model_metric_data(model_dir: str | os.PathLike[str], *, split: int | None = None, cost: str = "top1",
                      data: str | os.PathLike[str] | None = None, seed: int = 0) -> ModelMetric:
    """The metric file of a model directory (see the module docstring).

    Parameters
    ----------
    model_dir : path
    split : int, optional
        Stages on the edge (default: the last branch's stage, so every branch is local).
    cost : {"top1", "top5", "rank10"}
    data : path, optional
        Labelled images (``.npz``, ImageFolder, CIFAR-10) instead of the calibration split.
    seed : int
        Seed of the train/test split of the images.

    Returns
    -------
    ModelMetric

    Raises
    ------
    DataError
        If the split cannot be rebuilt or does not match ``calibration.npz``, or the split has no branch.
    """
    from popex.data.preprocess import Preprocessing, preprocess
    from popex.runtime.calibrate import exit_logits, read_dataset
    from popex.runtime.model_files import load_model_dir

    model_dir = Path(model_dir)
    loaded = load_model_dir(model_dir)
    calibration = load_calibration(model_dir / CALIBRATION_FILE)
    after = tuple(loaded.net.branch_after_stage)
    if not after:
        raise DataError(f"the model in {model_dir} has no branch: there is no local exit to rate-limit")
    split = max(after) if split is None else int(split)
    if not 1 <= split < loaded.net.n_stages:
        raise DataError(f"split must be in 1..{loaded.net.n_stages - 1} (stages on the edge), got {split}")
    branch = best_local_exit(calibration.correct.mean(axis=0), after, split)
    preprocessing = Preprocessing.from_spec_dict(loaded.spec)
    if data is None:
        images, labels = _card_split(model_dir)
        if len(labels) != len(calibration.labels) or not np.array_equal(labels, calibration.labels):
            raise DataError(f"the split rebuilt from {model_dir}/card.json does not give the labels of "
                            f"{CALIBRATION_FILE}; give the calibration images with --data")
    else:
        dataset = read_dataset(data, channels=preprocessing.n_channels,
                               size_hw=(preprocessing.height_px, preprocessing.width_px))
        images, labels = dataset.images, dataset.labels
    logits = exit_logits(loaded.net, preprocess(images, preprocessing, is_batch=True))
    metric_data, metric = metric_data_from_logits(logits[branch], logits[-1], labels, cost=cost, seed=seed)
    return ModelMetric(data=metric_data, branch=branch, split=split, n_images=len(labels),
                       inverse_temperature=metric.inverse_temperature)
