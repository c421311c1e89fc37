"""Expert head sets: side branches and final stage fine-tuned per distortion, one shared backbone.

A blurred or noisy image reaches the same frozen backbone as a clean one,
but its features differ in ways the clean heads never saw. Following the
distortion-robust early-exit work, each distortion type gets its own copy of
every side branch and of the last stage (the final classifier), fine-tuned on
images distorted that way while the shared stages stay frozen. A per-image
distortion classifier picks the head set at run time.

Model format: the spec lists ``"experts": ["blur", "noise"]`` and the one
weights file holds the backbone once plus, per expert, ``experts.<name>.
branches.<b>.*`` and ``experts.<name>.final.<j>.*`` (see
:mod:`popex.nets.early_exit`). Each head set has its own calibration file,
validation images distorted that head's way, so each has its own
temperatures and strategy table:

==========  ==========================
head        calibration file
==========  ==========================
pristine    ``calibration.npz``
blur        ``calibration_blur.npz``
noise       ``calibration_noise.npz``
==========  ==========================

The distortion classifier is shipped in ``<model dir>/distortion-classifier/``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from popex.data.distort import DEFAULT_LEVELS, DistortionLevels, distort_mixed
from popex.data.preprocess import Preprocessing, preprocess
from popex.decision.calibration import Calibration, calibration_file, load_calibration
from popex.errors import CalibrationError, ConfigError, DataError, SpecError
from popex.nets.distortion import CLASSIFIER_DIR, DistortionClassifier
from popex.nets.early_exit import PRISTINE_HEAD, EarlyExitNet, exit_confidence
from popex.nets.io import LoadedModel, load_model
from popex.nets.train import fit_temperature
from popex.runtime.distortion import HeadChoice, choose_head

__all__ = [
    "EXPERT_KINDS",
    "ExpertTrainConfig",
    "HeadChoice",
    "ExpertModel",
    "calibration_file",
    "add_expert_heads",
    "head_exit_logits",
    "finetune_expert",
    "calibrate_head",
    "choose_head",
    "load_expert_model",
]

EXPERT_KINDS = ("blur", "noise")
"""The distortion types that get an expert head set (the classifier's other class is "pristine")."""


def _shared_features(net: EarlyExitNet, batch: torch.Tensor) -> list[torch.Tensor]:
    """Outputs of the shared stages the heads read: after each branch's stage, then after stage N-1."""
    outputs, start = [], 0
    for after_stage in (*net.branch_after_stage, net.n_stages - 1):
        batch = net.run_stages(batch, start=start, stop=after_stage)
        outputs.append(batch)
        start = after_stage
    return outputs


def _head_logits(net: EarlyExitNet, features: list[torch.Tensor], head: str) -> list[torch.Tensor]:
    logits = [net.run_branch(b, f, head=head) for b, f in enumerate(features[:-1])]
    logits.append(net.run_stages(features[-1], start=net.n_stages - 1, head=head))
    return logits


# -- building and running head sets ------------------------------------------------


def add_expert_heads(net: EarlyExitNet, experts: tuple[str, ...] = EXPERT_KINDS) -> EarlyExitNet:
    """A copy of ``net`` with expert head sets, each starting as a copy of the pristine heads.

    The backbone and the pristine heads keep their weights exactly, so the
    pristine head's outputs (and its calibration) are unchanged.

    Parameters
    ----------
    net : EarlyExitNet
        A trained model without experts.
    experts : tuple of str, default ("blur", "noise")

    Returns
    -------
    EarlyExitNet
        In eval mode; its spec is ``net.spec`` plus ``"experts"``.

    Raises
    ------
    SpecError
        If ``net`` already has experts or a name is invalid.

    Examples
    --------
    >>> from popex.nets.zoo import zoo_spec
    >>> both = add_expert_heads(EarlyExitNet(zoo_spec("b-lenet")))
    >>> both.head_names
    ('pristine', 'blur', 'noise')
    """
    if net.expert_names:
        raise SpecError(f"the model already has expert heads {list(net.expert_names)}")
    combined = EarlyExitNet({**net.spec, "experts": list(experts)})
    state = net.state_dict()
    for name in experts:
        for key, tensor in net.branches.state_dict().items():
            state[f"experts.{name}.branches.{key}"] = tensor
        last_stage = net._stages[-1]
        for j, module in enumerate(last_stage):
            for key, tensor in module.state_dict().items():
                state[f"experts.{name}.final.{j}.{key}"] = tensor
    combined.load_state_dict({k: v.clone() for k, v in state.items()}, strict=True)
    return combined.eval()


def head_exit_logits(net: EarlyExitNet, inputs: np.ndarray, *, heads: tuple[str, ...] | None = None,
                     batch_size: int = 512) -> dict[str, list[np.ndarray]]:
    """Logits of every exit of several head sets, running the shared stages once.

    Parameters
    ----------
    net : EarlyExitNet
    inputs : np.ndarray float32, shape (n, C, H, W)
        Preprocessed images.
    heads : tuple of str, optional
        Head names (default: every head of ``net``).
    batch_size : int

    Returns
    -------
    dict
        head name -> one (n, n_classes) array per exit (branches, then final).

    Raises
    ------
    UnknownHeadError
        If a head is not one of the model's.
    """
    heads = net.head_names if heads is None else tuple(heads)
    for head in heads:
        net.check_head(head)
    net.eval()
    chunks: dict[str, list[list[np.ndarray]]] = {h: [[] for _ in range(net.n_exits)] for h in heads}
    with torch.inference_mode():
        for start in range(0, len(inputs), batch_size):
            features = _shared_features(net, torch.from_numpy(np.ascontiguousarray(inputs[start:start + batch_size])))
            for head in heads:
                for e, logits in enumerate(_head_logits(net, features, head)):
                    chunks[head][e].append(logits.numpy())
    return {h: [np.concatenate(c) for c in per_exit] for h, per_exit in chunks.items()}


# -- fine-tuning -----------------------------------------------------------------


@dataclass(frozen=True)
class ExpertTrainConfig:
    """Hyper-parameters of :func:`finetune_expert`.

    ``n_images_per_epoch`` draws a fresh random subset of the training images
    each epoch (None: all of them); with the backbone frozen the heads
    converge on far fewer images than the backbone needed.
    """

    n_epochs: int = 3
    n_images_per_epoch: int | None = 20_000
    batch_size: int = 128
    learning_rate: float = 2e-3
    weight_decay: float = 5e-4
    seed: int = 0
    n_threads: int = 2

    def __post_init__(self) -> None:
        if min(self.n_epochs, self.batch_size, self.n_threads) < 1 or not self.learning_rate > 0:
            raise ConfigError(f"epochs, batch size and threads must be >= 1 and the rate > 0, got {self}")
        if self.n_images_per_epoch is not None and self.n_images_per_epoch < 1:
            raise ConfigError(f"n_images_per_epoch must be >= 1 or None, got {self.n_images_per_epoch}")


def finetune_expert(net: EarlyExitNet, head: str, images: np.ndarray, labels: np.ndarray, *, kind: str | None = None,
                    levels: DistortionLevels = DEFAULT_LEVELS, config: ExpertTrainConfig = ExpertTrainConfig(),
                    progress: bool = True) -> list[float]:
    """Fine-tune one expert head set on images distorted at random default levels; backbone frozen.

    Only ``net.experts[head]`` is updated: the shared stages run in eval mode
    under ``no_grad`` (their batch-norm statistics stay as trained), so the
    pristine head and every other expert are bit-for-bit unchanged. All exits
    of the head set are trained jointly on the sum of their cross-entropies.

    Parameters
    ----------
    net : EarlyExitNet
        With ``head`` among its experts; updated in place.
    head : str
    images : np.ndarray of uint8, shape (n, H, W) or (n, H, W, C)
        Undistorted training images.
    labels : np.ndarray of int, shape (n,)
    kind : {"blur", "noise", "pristine"}, optional
        How to distort; defaults to ``head``.
    levels : DistortionLevels
    config : ExpertTrainConfig
    progress : bool

    Returns
    -------
    list of float
        Mean training loss of each epoch.

    Raises
    ------
    UnknownHeadError
        If ``head`` is not one of the model's experts.
    ConfigError
        If ``head`` is the pristine head set (the trained model's own).
    DataError
        If the images are not a uint8 batch with one label each.
    """
    if net.check_head(head) is None:
        raise ConfigError("the pristine heads are the trained model's own; fine-tune an expert head set")
    kind = head if kind is None else kind
    labels = np.asarray(labels, dtype=np.int64)
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim not in (3, 4) \
            or len(images) != len(labels) or len(images) == 0:
        raise DataError(f"finetune_expert needs a uint8 batch and one label per image, got "
                        f"{getattr(images, 'shape', type(images).__name__)} and {labels.shape}")
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.n_threads)
    rng = np.random.default_rng(config.seed)
    preprocessing = Preprocessing.from_spec_dict(net.spec)
    n_per_epoch = len(images) if config.n_images_per_epoch is None else min(len(images), config.n_images_per_epoch)
    n_batches = math.ceil(n_per_epoch / config.batch_size)
    for parameter in net.parameters():
        parameter.requires_grad_(False)
    parameters = list(net.experts[head].parameters())
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    n_steps = max(10, config.n_epochs * n_batches)  # with fewer, OneCycleLR's warm-up would be 0 steps long
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.learning_rate, total_steps=n_steps,
                                                    pct_start=0.2)
    loss_fn = nn.CrossEntropyLoss()
    losses = []
    try:
        for epoch in range(config.n_epochs):
            rows = rng.permutation(len(images))[:n_per_epoch]
            distorted = distort_mixed(images[rows], kind=kind, levels=levels, seed=config.seed * 1000 + epoch)
            flip = rng.random(n_per_epoch) < 0.5  # the backbone was trained with flips; keep the heads' view alike
            distorted[flip] = distorted[flip][:, :, ::-1]
            inputs = torch.from_numpy(preprocess(distorted, preprocessing, is_batch=True))
            targets = torch.from_numpy(labels[rows])
            net.eval()
            net.experts[head].train()
            total = 0.0
            bar = tqdm(range(n_batches), desc=f"expert {head} {epoch + 1}/{config.n_epochs}", disable=not progress)
            for step in bar:
                batch = slice(step * config.batch_size, (step + 1) * config.batch_size)
                with torch.no_grad():
                    features = _shared_features(net, inputs[batch])
                loss = sum(loss_fn(lg, targets[batch]) for lg in _head_logits(net, features, head))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                total += float(loss.detach())
                if step % 20 == 0:
                    bar.set_postfix(loss=f"{total / (step + 1):.3f}")
            losses.append(total / n_batches)
    finally:
        for parameter in net.parameters():
            parameter.requires_grad_(True)
        net.eval()
    return losses


def calibrate_head(net: EarlyExitNet, inputs: np.ndarray, labels: np.ndarray, *, head: str | None = None,
                   method: str = "max_softmax", temperature: np.ndarray | None = None) -> Calibration:
    """Calibration arrays of one head set (as :func:`popex.nets.train.calibrate` does for the pristine one).

    Parameters
    ----------
    net : EarlyExitNet
    inputs : np.ndarray float32, shape (n, C, H, W)
        Preprocessed held-out images, distorted the way ``head`` expects.
    labels : np.ndarray int, shape (n,)
    head : str, optional
        None or "pristine" for the backbone's heads.
    method : {"max_softmax", "entropy"}
    temperature : np.ndarray (n_exits,), optional
        Fixed temperatures (e.g. from the validation split, to score a test
        split); by default one is fitted per exit on these samples.

    Returns
    -------
    Calibration
    """
    name = net.check_head(head) or PRISTINE_HEAD
    labels = np.asarray(labels, dtype=np.int64)
    logits = head_exit_logits(net, inputs, heads=(name,))[name]
    if temperature is None:
        temperature = np.array([fit_temperature(lg, labels) for lg in logits], dtype=np.float32)
    confidence, predicted = [], []
    for lg, t in zip(logits, temperature):
        conf, pred = exit_confidence(torch.from_numpy(lg), temperature=float(t), method=method)
        confidence.append(conf.numpy())
        predicted.append(pred.numpy())
    predicted_arr = np.stack(predicted, axis=1).astype(np.int64)
    return Calibration(confidence=np.clip(np.stack(confidence, axis=1), 0.0, 1.0), predicted=predicted_arr,
                       correct=predicted_arr == labels[:, None], labels=labels,
                       temperature=np.asarray(temperature, dtype=np.float32), confidence_method=method)


# -- a model directory with experts, as the edge uses it ---------------------------


@dataclass(frozen=True)
class ExpertModel:
    """A model directory with expert heads: the network, one calibration per head, the classifier."""

    loaded: LoadedModel
    calibrations: dict[str, Calibration]
    classifier: DistortionClassifier
    directory: Path

    @property
    def net(self) -> EarlyExitNet:
        return self.loaded.net

    def choose(self, image: np.ndarray) -> HeadChoice:
        """Run the classifier on one uint8 image and pick the head set for it (see :func:`choose_head`)."""
        return choose_head(self.classifier, self.net, image)


def load_expert_model(directory: str | os.PathLike[str]) -> ExpertModel:
    """Load a model directory written by ``popex train-experts``.

    Raises
    ------
    SpecError
        If the model has no experts or the classifier is missing.
    CalibrationError
        If a head's calibration file is missing or does not fit the model.
    """
    directory = Path(directory)
    loaded = load_model(directory)
    if not loaded.net.expert_names:
        raise SpecError(f"model {str(directory)!r} has no expert heads (its spec lists no 'experts')")
    calibrations = {}
    for head in loaded.net.head_names:
        calibration = load_calibration(directory / calibration_file(head))
        if calibration.n_exits != loaded.net.n_exits:
            raise CalibrationError(f"{calibration_file(head)} has {calibration.n_exits} exits, the model "
                                   f"{loaded.net.n_exits}")
        calibrations[head] = calibration
    if not (directory / CLASSIFIER_DIR).is_dir():
        raise SpecError(f"model {str(directory)!r} has expert heads but no {CLASSIFIER_DIR}/ to choose them")
    classifier = DistortionClassifier.load(directory / CLASSIFIER_DIR)
    return ExpertModel(loaded=loaded, calibrations=calibrations, classifier=classifier, directory=directory)
