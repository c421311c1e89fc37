"""Metric files of the seed's schema: ``metric_tr, metric_ts, wcost_tr, scost_tr, wcost_ts, scost_ts``.

The schema is the rate-limit seed's (``qiujiaming315/edgeml-dqn``,
``lib/data.py``: the train split fits the policies, the test split makes the
sequences; the reward is wcost - scost). A file is read with
``allow_pickle=False``: an object array is refused, never unpickled.
:func:`metric_data_from_logits` builds one from a weak/strong pair of
logits (a POPEX model's local and final exits, or the synthetic pair of
:func:`synthetic_metric_data`).
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from popex.errors import DataError
from popex.ratelimit.metric import OffloadMetric, answer_cost, true_class_rank

__all__ = ["ARRAY_NAMES", "MetricData", "load_metric_data", "metric_data_from_logits", "synthetic_metric_data"]

ARRAY_NAMES = ("metric_tr", "metric_ts", "wcost_tr", "scost_tr", "wcost_ts", "scost_ts")


@dataclass(frozen=True, eq=False)
class MetricData:
    """The six arrays of a metric file, checked: 1-D, finite floats, matching lengths per split.

    Attributes
    ----------
    metric_tr, wcost_tr, scost_tr : np.ndarray, shape (n_train,)
    metric_ts, wcost_ts, scost_ts : np.ndarray, shape (n_test,)
    """

    metric_tr: np.ndarray
    metric_ts: np.ndarray
    wcost_tr: np.ndarray
    scost_tr: np.ndarray
    wcost_ts: np.ndarray
    scost_ts: np.ndarray

    def __post_init__(self) -> None:
        for name in ARRAY_NAMES:
            value = np.asarray(getattr(self, name))
            if value.dtype.kind not in "fiub":
                raise DataError(f"array {name!r} must hold numbers, got dtype {value.dtype}")
            if value.ndim != 1 or len(value) < 2:
                raise DataError(f"array {name!r} must be 1-D with at least 2 entries, got shape {value.shape}")
            value = value.astype(np.float64)
            if not np.all(np.isfinite(value)):
                raise DataError(f"array {name!r} holds NaN or infinite values")
            value.flags.writeable = False
            object.__setattr__(self, name, value)
        for split in ("tr", "ts"):
            lengths = {f"{kind}_{split}": len(getattr(self, f"{kind}_{split}"))
                       for kind in ("metric", "wcost", "scost")}
            if len(set(lengths.values())) != 1:
                raise DataError(f"the {split} arrays must have one length, got {lengths}")

    @property
    def reward_tr(self) -> np.ndarray:
        """R = wcost - scost on the train split."""
        return self.wcost_tr - self.scost_tr

    @property
    def reward_ts(self) -> np.ndarray:
        """R = wcost - scost on the test split."""
        return self.wcost_ts - self.scost_ts

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the six arrays to ``path`` (.npz, float64)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **{name: getattr(self, name) for name in ARRAY_NAMES})
        return path


def load_metric_data(path: str | os.PathLike[str]) -> MetricData:
    """Read and check a metric file.

    Raises
    ------
    DataError
        If it is missing, not an .npz, holds an object (pickled) array, lacks
        an array or has one of the wrong shape.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"metric file {str(path)!r} not found")
    arrays = {}
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [name for name in ARRAY_NAMES if name not in data.files]
            if missing:
                raise DataError(f"{path.name} lacks the arrays {missing} (it holds {sorted(data.files)}); the "
                                f"schema is {list(ARRAY_NAMES)}")
            for name in ARRAY_NAMES:
                try:
                    arrays[name] = data[name]
                except ValueError as err:  # numpy refuses an object array without allow_pickle
                    raise DataError(f"array {name!r} of {path.name} is an object (pickled) array; only numeric "
                                    "arrays are read, nothing is unpickled") from err
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(f"{path.name} is not a readable .npz: {err}") from err
    return MetricData(**arrays)


def metric_data_from_logits(weak_logits: np.ndarray, strong_logits: np.ndarray, labels: np.ndarray, *,
                            cost: str = "top1", seed: int = 0,
                            train_fraction: float = 0.5) -> tuple[MetricData, OffloadMetric]:
    """A metric file from a weak (local) and a strong (remote) classifier's logits on labelled images.

    The images are split (seeded) into train and test; the metric (inverse
    temperature and kernel table) is fitted on the train split only and
    applied to both.

    Parameters
    ----------
    weak_logits, strong_logits : np.ndarray, shape (n_images, n_classes)
    labels : np.ndarray, shape (n_images,)
    cost : {"top1", "top5", "rank10"}
    seed : int
    train_fraction : float

    Returns
    -------
    (MetricData, OffloadMetric)
    """
    weak_logits = np.asarray(weak_logits, dtype=np.float64)
    strong_logits = np.asarray(strong_logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if weak_logits.shape != strong_logits.shape or weak_logits.ndim != 2 or len(labels) != len(weak_logits):
        raise DataError(f"logits must be two (n, n_classes) arrays with n labels, got {weak_logits.shape}, "
                        f"{strong_logits.shape}, {labels.shape}")
    if len(labels) < 8:
        raise DataError(f"need at least 8 images for a train and a test split, got {len(labels)}")
    wcost = answer_cost(true_class_rank(weak_logits, labels), cost)
    scost = answer_cost(true_class_rank(strong_logits, labels), cost)
    order = np.random.default_rng(seed).permutation(len(labels))
    n_train = int(round(train_fraction * len(labels)))
    train, test = np.sort(order[:n_train]), np.sort(order[n_train:])
    metric = OffloadMetric.fit(weak_logits[train], wcost[train] - scost[train], labels[train])
    data = MetricData(metric_tr=metric(weak_logits[train]), metric_ts=metric(weak_logits[test]),
                      wcost_tr=wcost[train], scost_tr=scost[train], wcost_ts=wcost[test], scost_ts=scost[test])
    return data, metric


def synthetic_metric_data(*, n_images: int = 20_000, n_classes: int = 10, cost: str = "top1",
                          seed: int = 0) -> MetricData:
    """A weak/strong pair on synthetic images of graded difficulty, through the real metric pipeline.

    Each image has a difficulty d ~ U(0, 1); both classifiers see the true
    class with a margin that falls with d (the strong one less steeply) plus
    Gaussian noise, so the weak classifier's entropy says how much the strong
    one would help, as with real exits.

    >>> data = synthetic_metric_data(n_images=400)
    >>> len(data.metric_tr), len(data.metric_ts)
    (200, 200)
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n_images)
    difficulty = rng.random(n_images)
    onehot = np.eye(n_classes)[labels]
    weak = onehot * (6.0 * (1.0 - difficulty))[:, None] + rng.normal(0.0, 1.5, (n_images, n_classes))
    strong = onehot * (6.0 * (1.0 - 0.5 * difficulty))[:, None] + rng.normal(0.0, 1.5, (n_images, n_classes))
    return metric_data_from_logits(weak, strong, labels, cost=cost, seed=seed)[0]
