"""Calibration of any model from its served form: ``popex calibrate --model DIR --data PATH``.

The Decision Maker's accuracies and exit probabilities come only from the
calibration (DESIGN.md §2), so it is measured on exactly what the tiers run:
the ONNX form executed by ONNX Runtime (a spec model is converted first),
never the torch module it was exported from. One temperature per exit is
fitted on the validation images (Guo et al.'s temperature scaling) and every
image's confidence and correctness at every exit is written to
``calibration.npz``.

Data: an ImageFolder directory (``root/<class>/*.png``), a CIFAR-10 binary
directory, or an ``.npz`` with ``images`` (N, H, W[, C] uint8) and
``labels`` (N,); ``allow_pickle`` is never set.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import numpy as np

from popex.data.dataset import Dataset
from popex.data.preprocess import Preprocessing, preprocess
from popex.decision.calibration import CALIBRATION_FILE, CONFIDENCE_METHODS, Calibration, save_calibration
from popex.errors import DataError
from popex.runtime.exits import exit_confidence
from popex.runtime.model_files import load_model_dir
from popex.runtime.onnx_model import OnnxModel

__all__ = ["fit_temperature", "calibration_from_logits", "read_dataset", "exit_logits", "calibrate_model_dir",
           "add_calibrate_parser"]


def _nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    scaled = logits / temperature
    scaled = scaled - scaled.max(axis=1, keepdims=True)
    log_probs = scaled - np.log(np.exp(scaled).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T > 0 minimising the negative log-likelihood of softmax(logits / T).

    A golden-section search on log T over [1/20, 20]: the NLL is unimodal in T
    and one scalar does not need a gradient method.

    >>> rng = np.random.default_rng(0)
    >>> labels = rng.integers(0, 3, 500)
    >>> logits = 8.0 * np.eye(3)[labels] + rng.normal(0, 3, (500, 3))  # overconfident logits
    >>> fit_temperature(logits, labels) > 1.0
    True
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)

    def nll(log_t: float) -> float:
        return _nll(logits, labels, math.exp(log_t))

    low, high = math.log(1 / 20), math.log(20)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    f_a, f_b = nll(a), nll(b)
    for _ in range(60):
        if f_a < f_b:
            high, b, f_b = b, a, f_a
            a = high - ratio * (high - low)
            f_a = nll(a)
        else:
            low, a, f_a = a, b, f_b
            b = low + ratio * (high - low)
            f_b = nll(b)
    return math.exp((low + high) / 2)


def calibration_from_logits(logits: list[np.ndarray], labels: np.ndarray, *, method: str = "max_softmax",
                            temperature: np.ndarray | None = None) -> Calibration:
    """Per-sample confidence, prediction and correctness at every exit, from each exit's logits.

    Parameters
    ----------
    logits : list of np.ndarray, one (n_samples, n_classes) per exit
    labels : np.ndarray int64, shape (n_samples,)
    method : {"max_softmax", "entropy"}
    temperature : np.ndarray, shape (n_exits,), optional
        Use these; by default fit one per exit on these samples.

    Returns
    -------
    Calibration
    """
    if method not in CONFIDENCE_METHODS:
        raise DataError(f"confidence method must be one of {CONFIDENCE_METHODS}, got {method!r}")
    labels = np.asarray(labels, dtype=np.int64)
    if temperature is None:
        temperature = np.array([fit_temperature(lg, labels) for lg in logits], dtype=np.float32)
    confidence, predicted = [], []
    for lg, t in zip(logits, temperature):
        conf, pred = exit_confidence(lg, temperature=float(t), method=method)
        confidence.append(conf)
        predicted.append(pred)
    predicted_arr = np.stack(predicted, axis=1).astype(np.int64)
    return Calibration(confidence=np.clip(np.stack(confidence, axis=1), 0.0, 1.0).astype(np.float32),
                       predicted=predicted_arr, correct=predicted_arr == labels[:, None], labels=labels,
                       temperature=np.asarray(temperature, dtype=np.float32), confidence_method=method)


def read_dataset(path: str | os.PathLike[str], *, channels: int, size_hw: tuple[int, int]) -> Dataset:
    """Labelled images from an ``.npz``, a CIFAR-10 binary directory or an ImageFolder directory.

    Raises
    ------
    DataError
        If the path is none of them, or the arrays are malformed.
    """
    from popex.data.cifar import load_cifar10_binary
    from popex.data.imagefolder import load_image_folder

    path = Path(path)
    if path.is_file() and path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                if "images" not in data or "labels" not in data:
                    raise DataError(f"{path.name} must hold the arrays 'images' and 'labels', it holds "
                                    f"{sorted(data.files)}")
                images, labels = data["images"], data["labels"]
        except (OSError, ValueError) as err:
            raise DataError(f"{path.name} is not a readable .npz without pickles: {err}") from err
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise DataError(f"'images' must be uint8 (N, H, W) or (N, H, W, C), got {images.dtype} {images.shape}")
        labels = np.asarray(labels).astype(np.int64)
        n_classes = int(labels.max()) + 1 if labels.size else 0
        return Dataset(images, labels, tuple(str(i) for i in range(n_classes)))
    if path.is_dir() and (any(path.glob("*batch*.bin")) or (path / "cifar-10-batches-bin").is_dir()):
        return load_cifar10_binary(path, split="test")
    if path.is_dir():
        return load_image_folder(path, channels=channels, size_hw=size_hw)
    raise DataError(f"{str(path)!r} is neither an .npz, a CIFAR-10 binary folder nor an ImageFolder folder")


def exit_logits(net: OnnxModel, inputs: np.ndarray, *, batch_size: int = 256) -> list[np.ndarray]:
    """Every exit's logits for preprocessed inputs, run in batches by ONNX Runtime."""
    chunks: list[list[np.ndarray]] = [[] for _ in range(net.n_exits)]
    for start in range(0, len(inputs), batch_size):
        for i, logits in enumerate(net.forward(inputs[start:start + batch_size])):
            chunks[i].append(logits)
    return [np.concatenate(c) for c in chunks]


def calibrate_model_dir(model_dir: str | os.PathLike[str], data: str | os.PathLike[str], *,
                        out: str | os.PathLike[str] | None = None, max_images: int | None = None,
                        method: str = "max_softmax", seed: int = 0) -> tuple[Calibration, Path]:
    """Calibrate the model in ``model_dir`` on ``data``; write ``calibration.npz``.

    Parameters
    ----------
    model_dir : path
        Either form.
    data : path
        See :func:`read_dataset`. Its labels must index the model's classes.
    out : path, optional
        Where to write (default ``model_dir/calibration.npz``).
    max_images : int, optional
        A random subset of this many images (seeded).
    method : {"max_softmax", "entropy"}
    seed : int

    Returns
    -------
    (Calibration, Path)
    """
    loaded = load_model_dir(model_dir)
    preprocessing = Preprocessing.from_spec_dict(loaded.spec)
    dataset = read_dataset(data, channels=preprocessing.n_channels,
                           size_hw=(preprocessing.height_px, preprocessing.width_px))
    images, labels = dataset.images, dataset.labels
    if len(labels) == 0:
        raise DataError("the data holds no images")
    if int(labels.max()) >= loaded.net.n_classes or int(labels.min()) < 0:
        raise DataError(f"labels run {int(labels.min())}..{int(labels.max())} but the model has "
                        f"{loaded.net.n_classes} classes")
    if max_images is not None and max_images < len(labels):
        keep = np.sort(np.random.default_rng(seed).choice(len(labels), max_images, replace=False))
        images, labels = images[keep], labels[keep]
    inputs = preprocess(images, preprocessing, is_batch=True)
    calibration = calibration_from_logits(exit_logits(loaded.net, inputs), labels, method=method)
    path = Path(out) if out is not None else Path(model_dir) / CALIBRATION_FILE
    save_calibration(calibration, path)
    return calibration, path


def _cmd_calibrate(args: argparse.Namespace) -> int:
    calibration, path = calibrate_model_dir(args.model, args.data, out=args.out, max_images=args.max_images,
                                            method=args.confidence, seed=args.seed)
    accuracy = calibration.correct.mean(axis=0)
    print(f"calibrated on {len(calibration.labels)} images ({calibration.confidence_method}); wrote {path}")
    for i, (acc, t) in enumerate(zip(accuracy, calibration.temperature)):
        name = "final" if i == len(accuracy) - 1 else f"branch {i}"
        print(f"  {name:>8}: accuracy {acc:.2%}, temperature {t:.3f}")
    return 0


def add_calibrate_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``popex calibrate``: see the module docstring."""
    p = subparsers.add_parser("calibrate", help="measure a model's exits on labelled images (calibration.npz)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model directory (ONNX form, or spec + weights)")
    p.add_argument("--data", required=True, help="ImageFolder dir, CIFAR-10 binary dir, or .npz (images, labels)")
    p.add_argument("--out", help="where to write (default: MODEL/calibration.npz)")
    p.add_argument("--max-images", type=int, help="a seeded random subset of this many images")
    p.add_argument("--confidence", choices=CONFIDENCE_METHODS, default="max_softmax")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_cmd_calibrate)
    return p
