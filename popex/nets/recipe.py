"""The recipe behind ``popex train``: data, training, calibration, model card.

It writes a complete model directory: ``spec.json``, ``weights.safetensors``,
``calibration.npz`` (validation split, used by the Decision Maker),
``card.json`` and ``MODEL_CARD.md`` (test-set figures for people).
"""

from __future__ import annotations

import json
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from popex.data.idx import DEFAULT_FASHION_MNIST_ROOT, load_fashion_mnist
from popex.data.preprocess import Preprocessing, preprocess
from popex.decision.calibration import Calibration, save_calibration
from popex.decision.sweep import sweep_exit_stats
from popex.nets.early_exit import EarlyExitNet
from popex.nets.flops import stage_macs
from popex.nets.io import CALIBRATION_FILE, atomic_write_bytes, save_model
from popex.nets.train import TrainConfig, calibrate, train_early_exit
from popex.nets.zoo import zoo_spec

__all__ = ["CARD_THRESHOLDS", "TrainRecipe", "train_model_dir", "card_figures", "write_model_card"]

CARD_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99)
CARD_FILE = "card.json"
CARD_MARKDOWN = "MODEL_CARD.md"


@dataclass(frozen=True)
class TrainRecipe:
    """Everything ``popex train`` needs; recorded in the card so the run can be repeated."""

    arch: str = "b-alexnet"
    width: float = 0.5
    data_root: str = DEFAULT_FASHION_MNIST_ROOT
    val_fraction: float = 0.1
    confidence_method: str = "max_softmax"
    train: TrainConfig = TrainConfig()

    def command(self, out_dir: str) -> str:
        parts = ["python", "-m", "popex.cli", "train", "--arch", self.arch, "--width", str(self.width), "--out", out_dir,
                 "--epochs", str(self.train.n_epochs), "--seed", str(self.train.seed),
                 "--val-fraction", str(self.val_fraction), "--confidence", self.confidence_method]
        if self.data_root != DEFAULT_FASHION_MNIST_ROOT:
            parts += ["--data-root", self.data_root]
        return " ".join(shlex.quote(p) for p in parts)


def card_figures(calibration: Calibration, *, branch_after_stage: tuple[int, ...]) -> dict[str, Any]:
    """Test-set figures for the card: accuracy per exit, exit rates at a few thresholds.

    Each row of ``thresholds`` applies one threshold to every branch (through
    the same sweep the Decision Maker uses); ``first_branch`` rows turn only
    the first branch on, which is the card's headline trade-off.
    """
    n_branches = len(branch_after_stage)
    figures: dict[str, Any] = {
        "n_test_samples": calibration.n_samples,
        "exit_accuracy": [float(a) for a in calibration.correct.mean(axis=0)],
        "final_accuracy": float(calibration.correct[:, -1].mean()),
        "rows": [],
    }
    if n_branches == 0:
        return figures
    grids = [list(CARD_THRESHOLDS)] * n_branches
    stats = sweep_exit_stats(calibration, branch_after_stage=branch_after_stage, thresholds=grids)
    top = stats.levels[n_branches]
    for row in range(top.n_configs):
        thresholds = top.thresholds[row]
        on = ~np.isnan(thresholds)
        all_same = on.all() and np.all(thresholds == thresholds[0])
        first_only = on[0] and not on[1:].any()
        if all_same or first_only:
            figures["rows"].append({
                "scope": "all branches" if all_same and n_branches > 1 else "first branch",
                "threshold": float(thresholds[0]),
                "exit_rates": [float(q) for q in top.exit_probs[row]],
                "accuracy": float(top.accuracy[row]),
            })
    return figures


def write_model_card(out_dir: Path, net: EarlyExitNet, model_id: str, figures: dict[str, Any],
                     recipe: TrainRecipe, *, train_seconds: float, val_accuracy: list[float]) -> None:
    """Write card.json and MODEL_CARD.md next to the weights."""
    macs = stage_macs(net)
    card = {
        "model_id": model_id,
        "name": net.spec.get("name"),
        "arch": recipe.arch,
        "width": recipe.width,
        "n_parameters": int(sum(p.numel() for p in net.parameters())),
        "stage_macs": macs,
        "branch_after_stage": list(net.branch_after_stage),
        "temperature_source": "validation split",
        "val_accuracy_per_exit": val_accuracy,
        "test": figures,
        "train_seconds": round(train_seconds, 1),
        "command": recipe.command(str(out_dir)),
    }
    atomic_write_bytes(out_dir / CARD_FILE, (json.dumps(card, indent=2) + "\n").encode())
    exits = [f"branch {b} (after stage {k})" for b, k in enumerate(net.branch_after_stage)] + ["final"]
    lines = [
        f"# Model card: {net.spec.get('name')} on Fashion-MNIST",
        "",
        f"- Model id: `{model_id}`",
        f"- Architecture: {recipe.arch} (width {recipe.width}), {net.n_stages} stages, branches after stages "
        f"{list(net.branch_after_stage)}; {card['n_parameters']:,} parameters, "
        f"{sum(macs) / 1e6:.2f} M multiply-accumulates per image",
        f"- Training: {recipe.train.n_epochs} epochs, all exits jointly (equal loss weights), seed "
        f"{recipe.train.seed}, {train_seconds / 60:.1f} min on this machine's CPU",
        f"- Calibration: per-exit temperatures and `calibration.npz` from a {recipe.val_fraction:.0%} held-out "
        "validation split of the training set (confidence: "
        f"{recipe.confidence_method}); the figures below are on the {figures['n_test_samples']:,}-image test set.",
        "",
        "## Test accuracy of each exit alone",
        "",
        "| exit | accuracy |",
        "|---|---|",
        *(f"| {name} | {acc:.2%} |" for name, acc in zip(exits, figures["exit_accuracy"])),
        "",
        "## Exit rates and overall accuracy at a few thresholds",
        "",
        "A sample leaves at the first active branch whose confidence reaches the threshold; the rest run to "
        f"the final exit (alone: {figures['final_accuracy']:.2%}).",
        "",
        "| branches on | threshold | " + " | ".join(f"exit rate {e}" for e in exits[:-1]) + " | overall accuracy |",
        "|---|---|" + "---|" * (len(exits) - 1) + "---|",
    ]
    for row in figures["rows"]:
        rates = " | ".join(f"{q:.1%}" for q in row["exit_rates"])
        lines.append(f"| {row['scope']} | {row['threshold']:.2f} | {rates} | {row['accuracy']:.2%} |")
    lines += ["", "## Reproduce", "", "```", card["command"], "```", ""]
    atomic_write_bytes(out_dir / CARD_MARKDOWN, "\n".join(lines).encode())


def train_model_dir(out_dir: str | os.PathLike[str], recipe: TrainRecipe = TrainRecipe(), *,
                    progress: bool = True) -> str:
    """Train a zoo architecture on Fashion-MNIST and write a complete model directory.

    Returns
    -------
    str
        The model id.
    """
    out_dir = Path(out_dir)
    started = time.perf_counter()
    full_train = load_fashion_mnist(recipe.data_root, split="train")
    test = load_fashion_mnist(recipe.data_root, split="test")
    parts = full_train.split_holdout(recipe.val_fraction, seed=recipe.train.seed)
    pixels = full_train.images.astype(np.float32) / 255.0
    mean, std = float(pixels.mean()), float(pixels.std())
    spec = zoo_spec(recipe.arch, n_classes=full_train.n_classes, in_channels=1,
                    image_size=full_train.image_shape[0], class_names=list(full_train.class_names),
                    mean=[round(mean, 4)], std=[round(std, 4)],
                    **({"width": recipe.width} if recipe.arch == "b-alexnet" else {}))
    net = EarlyExitNet(spec)
    preprocessing = Preprocessing.from_spec_dict(spec)
    train_inputs = preprocess(parts.train.images, preprocessing, is_batch=True)
    val_inputs = preprocess(parts.val.images, preprocessing, is_batch=True)
    test_inputs = preprocess(test.images, preprocessing, is_batch=True)
    result = train_early_exit(net, train_inputs, parts.train.labels, val_inputs, parts.val.labels,
                              config=recipe.train, progress=progress)
    val_calibration = calibrate(net, val_inputs, parts.val.labels, method=recipe.confidence_method)
    test_calibration = calibrate(net, test_inputs, test.labels, method=recipe.confidence_method,
                                 temperature=val_calibration.temperature)
    model_id = save_model(net, out_dir)
    save_calibration(val_calibration, out_dir / CALIBRATION_FILE)
    figures = card_figures(test_calibration, branch_after_stage=net.branch_after_stage)
    write_model_card(out_dir, net, model_id, figures, recipe, train_seconds=time.perf_counter() - started,
                     val_accuracy=result.val_accuracy[-1])
    return model_id
