"""Joint training of all exits, temperature scaling, and the calibration arrays.

BranchyNet trains every exit at once on a weighted sum of the exits' losses;
we do the same, then fit one temperature per exit on a held-out split
(Guo et al.'s temperature scaling) so that branch confidences are comparable
with thresholds, and record each validation sample's confidence and
correctness at every exit: the Decision Maker's only source of accuracy
and exit probabilities (DESIGN.md §2).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from popex.decision.calibration import Calibration
from popex.errors import ConfigError
from popex.nets.early_exit import CONFIDENCE_METHODS, EarlyExitNet
from popex.runtime.calibrate import calibration_from_logits, fit_temperature

__all__ = ["TrainConfig", "TrainResult", "train_early_exit", "exit_logits", "fit_temperature", "calibrate"]


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of :func:`train_early_exit` (defaults train B-AlexNet on Fashion-MNIST)."""

    n_epochs: int = 12
    batch_size: int = 128
    learning_rate: float = 2e-3
    weight_decay: float = 5e-4
    exit_weights: tuple[float, ...] | None = None  # None: 1.0 for every exit
    augment: bool = True
    seed: int = 0
    n_threads: int = 2

    def __post_init__(self) -> None:
        if self.n_epochs < 1 or self.batch_size < 1 or self.n_threads < 1:
            raise ConfigError(f"n_epochs, batch_size and n_threads must be >= 1, got {self}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate}")


@dataclass
class TrainResult:
    """What one training run learned, per epoch."""

    train_loss: list[float] = field(default_factory=list)
    val_accuracy: list[list[float]] = field(default_factory=list)  # per epoch, per exit
    epoch_seconds: list[float] = field(default_factory=list)  # wall time of each epoch, validation included


def _augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and shifts of up to 2 pixels (zero padded)."""
    n, _, height, width = batch.shape
    flip = torch.rand(n, generator=generator) < 0.5
    batch = torch.where(flip[:, None, None, None], batch.flip(3), batch)
    padded = nn.functional.pad(batch, (2, 2, 2, 2))
    dy, dx = (int(v) for v in torch.randint(0, 5, (2,), generator=generator))
    return padded[:, :, dy : dy + height, dx : dx + width]


def exit_logits(net: EarlyExitNet, inputs: np.ndarray, *, batch_size: int = 512) -> list[np.ndarray]:
    """Logits of every exit for preprocessed inputs (n, C, H, W): one (n, n_classes) array per exit."""
    net.eval()
    chunks: list[list[np.ndarray]] = [[] for _ in range(net.n_exits)]
    with torch.inference_mode():
        for start in range(0, len(inputs), batch_size):
            outputs = net(torch.from_numpy(inputs[start : start + batch_size]))
            for e, logits in enumerate(outputs):
                chunks[e].append(logits.numpy())
    return [np.concatenate(c) for c in chunks]


def train_early_exit(
    net: EarlyExitNet,
    train_inputs: np.ndarray,
    train_labels: np.ndarray,
    val_inputs: np.ndarray,
    val_labels: np.ndarray,
    *,
    config: TrainConfig = TrainConfig(),
    progress: bool = True,
) -> TrainResult:
    """Train all exits jointly (weighted sum of cross-entropies), AdamW with a cosine schedule.

    Parameters
    ----------
    net : EarlyExitNet
        Trained in place.
    train_inputs, val_inputs : np.ndarray float32, shape (n, C, H, W)
        Preprocessed images.
    train_labels, val_labels : np.ndarray int64, shape (n,)
    config : TrainConfig
    progress : bool
        Show a progress bar per epoch.
    """
    weights = config.exit_weights or (1.0,) * net.n_exits
    if len(weights) != net.n_exits:
        raise ConfigError(f"exit_weights has {len(weights)} values, the network has {net.n_exits} exits")
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.n_threads)
    generator = torch.Generator().manual_seed(config.seed)
    inputs = torch.from_numpy(np.ascontiguousarray(train_inputs))
    labels = torch.from_numpy(np.asarray(train_labels, dtype=np.int64))
    n_batches = math.ceil(len(inputs) / config.batch_size)
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.learning_rate, total_steps=config.n_epochs * n_batches, pct_start=0.2
    )
    loss_fn = nn.CrossEntropyLoss()
    result = TrainResult()
    for epoch in range(config.n_epochs):
        net.train()
        epoch_started = time.perf_counter()
        order = torch.randperm(len(inputs), generator=generator)
        total_loss = 0.0
        bar = tqdm(range(n_batches), desc=f"epoch {epoch + 1}/{config.n_epochs}", disable=not progress, leave=True)
        for step in bar:
            index = order[step * config.batch_size : (step + 1) * config.batch_size]
            batch = inputs[index]
            if config.augment:
                batch = _augment(batch, generator)
            outputs = net(batch)
            loss = sum(w * loss_fn(out, labels[index]) for w, out in zip(weights, outputs))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += float(loss.detach())
            if step % 20 == 0:
                bar.set_postfix(loss=f"{total_loss / (step + 1):.3f}")
        logits = exit_logits(net, val_inputs)
        accuracy = [float((lg.argmax(1) == val_labels).mean()) for lg in logits]
        result.train_loss.append(total_loss / n_batches)
        result.val_accuracy.append(accuracy)
        result.epoch_seconds.append(time.perf_counter() - epoch_started)
        if progress:
            tqdm.write(f"epoch {epoch + 1}: {result.epoch_seconds[-1]:.1f} s, loss {total_loss / n_batches:.4f}, "
                       f"val accuracy per exit {', '.join(f'{a:.4f}' for a in accuracy)}")
    net.eval()
    return result


def calibrate(
    net: EarlyExitNet,
    inputs: np.ndarray,
    labels: np.ndarray,
    *,
    method: str = "max_softmax",
    temperature: np.ndarray | None = None,
) -> Calibration:
    """Per-sample confidence, prediction and correctness at every exit.

    Parameters
    ----------
    net : EarlyExitNet
    inputs : np.ndarray float32, shape (n_samples, C, H, W)
        Preprocessed held-out images (not used for training).
    labels : np.ndarray int64, shape (n_samples,)
    method : {"max_softmax", "entropy"}
    temperature : np.ndarray, shape (n_exits,), optional
        Use these temperatures; by default fit one per exit on these samples.

    Returns
    -------
    Calibration
    """
    if method not in CONFIDENCE_METHODS:
        raise ConfigError(f"confidence method must be one of {CONFIDENCE_METHODS}, got {method!r}")
    return calibration_from_logits(exit_logits(net, inputs), labels, method=method, temperature=temperature)
