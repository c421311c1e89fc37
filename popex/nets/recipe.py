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
import torch

from popex.data.cifar import load_cifar10_binary
from popex.data.dataset import Dataset
from popex.data.idx import DEFAULT_FASHION_MNIST_ROOT, load_fashion_mnist
from popex.data.imagefolder import load_image_folder
from popex.data.preprocess import Preprocessing, preprocess
from popex.decision.calibration import Calibration, save_calibration
from popex.decision.sweep import sweep_exit_stats
from popex.errors import ConfigError
from popex.nets.early_exit import EarlyExitNet
from popex.nets.flops import stage_macs
from popex.nets.io import CALIBRATION_FILE, atomic_write_bytes, save_model
from popex.nets.train import TrainConfig, calibrate, train_early_exit
from popex.nets.zoo import zoo_spec

__all__ = ["CARD_THRESHOLDS", "DATASETS", "TrainRecipe", "load_dataset", "arch_options", "train_model_dir",
           "card_figures", "exit_macs", "write_model_card"]

#: The datasets ``popex train`` reads (``--dataset``); ``--data-root`` is the folder of each.
DATASETS = ("fashion-mnist", "cifar10", "imagefolder")
_DATASET_TITLES = {"fashion-mnist": "Fashion-MNIST", "cifar10": "CIFAR-10", "imagefolder": "an image folder"}
#: Share of an image folder held out as its test split when it has no ``test/`` subfolder.
IMAGEFOLDER_TEST_FRACTION = 1 / 6
#: Base channel count of b-resnet's first layer at width 1.0.
_RESNET_BASE_WIDTH = 16

CARD_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99)
CARD_FILE = "card.json"
CARD_MARKDOWN = "MODEL_CARD.md"


@dataclass(frozen=True)
class TrainRecipe:
    """Everything ``popex train`` needs; recorded in the card so the run can be repeated."""

    arch: str = "b-alexnet"
    width: float = 0.5  # channel multiplier of every architecture (b-resnet: 16 * width base channels)
    data_root: str = DEFAULT_FASHION_MNIST_ROOT
    val_fraction: float = 0.1
    confidence_method: str = "max_softmax"
    train: TrainConfig = TrainConfig()
    dataset: str = "fashion-mnist"
    max_train_images: int | None = None  # None: the whole training part
    image_size: int | None = None  # None: the dataset's own size
    blocks: tuple[int, ...] | None = None  # b-resnet only: residual blocks per layer (default 2,2,2,2)
    depth: float | None = None  # b-mobilenetv2 only: multiplier of each group's repeats (default 1)
    bottleneck: int | None = None  # b-resnet only: channels of a stride-4 bottleneck stem (split computing)
    exit_fractions: tuple[float, ...] | None = None  # b-resnet/b-mobilenetv2: branches at these shares of the MACs

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ConfigError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be strictly between 0 and 1, got {self.val_fraction}")
        if self.max_train_images is not None and self.max_train_images < 1:
            raise ConfigError(f"max_train_images must be >= 1, got {self.max_train_images}")
        if self.image_size is not None and self.image_size < 8:
            raise ConfigError(f"image_size must be >= 8 pixels, got {self.image_size}")
        if self.blocks is not None and self.arch != "b-resnet":
            raise ConfigError(f"blocks (residual blocks per layer) is a b-resnet option, not {self.arch}'s")
        if self.depth is not None and self.arch != "b-mobilenetv2":
            raise ConfigError(f"depth (repeat multiplier) is a b-mobilenetv2 option, not {self.arch}'s")
        if self.bottleneck is not None and self.arch != "b-resnet":
            raise ConfigError(f"bottleneck (channels of the stem's bottleneck) is a b-resnet option, not {self.arch}'s")
        if self.exit_fractions is not None:
            if self.arch not in ("b-resnet", "b-mobilenetv2"):
                raise ConfigError(f"exit fractions are a b-resnet/b-mobilenetv2 option, not {self.arch}'s")
            if not self.exit_fractions or any(not 0 < f < 1 for f in self.exit_fractions) \
                    or list(self.exit_fractions) != sorted(set(self.exit_fractions)):
                raise ConfigError(f"exit fractions must be increasing, each strictly between 0 and 1, "
                                  f"got {list(self.exit_fractions)}")

    def command(self, out_dir: str) -> str:
        parts = ["python", "-m", "popex.cli", "train", "--arch", self.arch, "--width", str(self.width), "--out", out_dir,
                 "--epochs", str(self.train.n_epochs), "--seed", str(self.train.seed),
                 "--val-fraction", str(self.val_fraction), "--confidence", self.confidence_method]
        if self.dataset != "fashion-mnist":
            parts += ["--dataset", self.dataset]
        if self.data_root != DEFAULT_FASHION_MNIST_ROOT:
            parts += ["--data-root", self.data_root]
        if self.max_train_images is not None:
            parts += ["--max-train-images", str(self.max_train_images)]
        if self.image_size is not None:
            parts += ["--image-size", str(self.image_size)]
        if self.blocks is not None:
            parts += ["--blocks", ",".join(str(b) for b in self.blocks)]
        if self.depth is not None:
            parts += ["--depth", str(self.depth)]
        if self.bottleneck is not None:
            parts += ["--bottleneck", str(self.bottleneck)]
        if self.exit_fractions is not None:
            parts += ["--exit-fractions", ",".join(f"{f:g}" for f in self.exit_fractions)]
        defaults = TrainConfig()
        for flag, value, default in (("--batch-size", self.train.batch_size, defaults.batch_size),
                                     ("--learning-rate", self.train.learning_rate, defaults.learning_rate),
                                     ("--threads", self.train.n_threads, defaults.n_threads)):
            if value != default:
                parts += [flag, str(value)]
        return " ".join(shlex.quote(p) for p in parts)


def load_dataset(name: str, root: str | os.PathLike[str], *, seed: int = 0,
                 image_size: int | None = None) -> tuple[Dataset, Dataset]:
    """The (train, test) splits of dataset ``name`` under ``root``.

    An image folder is ``root/train/<class>/`` and ``root/test/<class>/``;
    without ``test/`` (or ``train/``), ``root/<class>/`` is read and
    :data:`IMAGEFOLDER_TEST_FRACTION` of it held out (seeded) as the test split.
    Image folders are decoded at ``image_size`` (square) when given, as RGB.
    """
    if name == "fashion-mnist":
        return load_fashion_mnist(root, split="train"), load_fashion_mnist(root, split="test")
    if name == "cifar10":
        return load_cifar10_binary(root, split="train"), load_cifar10_binary(root, split="test")
    if name != "imagefolder":
        raise ConfigError(f"dataset must be one of {DATASETS}, got {name!r}")
    root_path = Path(root)
    size_hw = (image_size, image_size) if image_size else None
    if (root_path / "train").is_dir() and (root_path / "test").is_dir():
        train = load_image_folder(root_path / "train", size_hw=size_hw)
        test = load_image_folder(root_path / "test", size_hw=size_hw)
        if train.class_names != test.class_names:
            raise ConfigError(f"{root_path}/train and {root_path}/test have different class folders: "
                              f"{list(train.class_names)} vs {list(test.class_names)}")
        return train, test
    parts = load_image_folder(root_path, size_hw=size_hw).split_holdout(IMAGEFOLDER_TEST_FRACTION, seed=seed)
    return parts.train, parts.val


def arch_options(recipe: TrainRecipe) -> dict[str, Any]:
    """The zoo builder's size options for the recipe's width/blocks/depth."""
    options: dict[str, Any] = {}
    if recipe.arch == "b-resnet":
        options["width"] = max(1, round(_RESNET_BASE_WIDTH * recipe.width))
        if recipe.blocks is not None:
            options["blocks_per_layer"] = tuple(recipe.blocks)
        if recipe.bottleneck is not None:
            options["bottleneck_channels"] = recipe.bottleneck
    elif recipe.arch == "b-mobilenetv2":
        options["width_mult"] = recipe.width
        if recipe.depth is not None:
            options["depth_mult"] = recipe.depth
    else:
        options["width"] = recipe.width
    if recipe.exit_fractions is not None:
        options["exit_flop_fractions"] = tuple(recipe.exit_fractions)
    return options


def exit_macs(net: EarlyExitNet) -> list[int]:
    """Multiply-accumulates of one image up to each exit: stages up to the branch plus the branch itself."""
    from popex.nets.flops import _count_macs  # the same counting as stage_macs

    macs = stage_macs(net)
    shapes = net.stage_output_shapes()
    was_training = net.training
    net.eval()
    with torch.inference_mode():
        per_branch = [_count_macs([net.branches[b]], torch.zeros(1, *shapes[k]))[0]
                      for b, k in enumerate(net.branch_after_stage)]
    net.train(was_training)
    exits = [sum(macs[:k]) + per_branch[b] for b, k in enumerate(net.branch_after_stage)]
    return exits + [sum(macs)]


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
                     recipe: TrainRecipe, *, train_seconds: float, val_accuracy: list[float],
                     epoch_seconds: list[float] | None = None, n_train_images: int | None = None) -> None:
    """Write card.json and MODEL_CARD.md next to the weights."""
    macs = stage_macs(net)
    macs_to_exit = exit_macs(net)
    card = {
        "model_id": model_id,
        "name": net.spec.get("name"),
        "arch": recipe.arch,
        "width": recipe.width,
        "dataset": recipe.dataset,
        "n_parameters": int(sum(p.numel() for p in net.parameters())),
        "stage_macs": macs,
        "exit_macs": macs_to_exit,
        "branch_after_stage": list(net.branch_after_stage),
        "temperature_source": "validation split",
        "val_accuracy_per_exit": val_accuracy,
        "test": figures,
        "n_train_images": n_train_images,
        "n_threads": recipe.train.n_threads,
        "epoch_seconds": [round(t, 1) for t in epoch_seconds or []],
        "train_seconds": round(train_seconds, 1),
        "command": recipe.command(str(out_dir)),
    }
    atomic_write_bytes(out_dir / CARD_FILE, (json.dumps(card, indent=2) + "\n").encode())
    exits = [f"branch {b} (after stage {k})" for b, k in enumerate(net.branch_after_stage)] + ["final"]
    title = _DATASET_TITLES[recipe.dataset]
    per_epoch = (f", {np.mean(epoch_seconds) / 60:.1f} min per epoch" if epoch_seconds else "")
    images = f" on {n_train_images:,} training images" if n_train_images else ""
    lines = [
        f"# Model card: {net.spec.get('name')} on {title}",
        "",
        f"- Model id: `{model_id}`",
        f"- Architecture: {recipe.arch} (width {recipe.width}), {net.n_stages} stages, branches after stages "
        f"{list(net.branch_after_stage)}; {card['n_parameters']:,} parameters, "
        f"{sum(macs) / 1e6:.2f} M multiply-accumulates per image",
        f"- Training: {recipe.train.n_epochs} epochs{images}, all exits jointly (equal loss weights), seed "
        f"{recipe.train.seed}, {train_seconds / 60:.1f} min on this machine's CPU with {recipe.train.n_threads} "
        f"torch threads{per_epoch} (the total includes loading, calibration and the test pass)",
        f"- Calibration: per-exit temperatures and `calibration.npz` from a {recipe.val_fraction:.0%} held-out "
        "validation split of the training set (confidence: "
        f"{recipe.confidence_method}); the figures below are on the {figures['n_test_samples']:,}-image test set.",
        "",
        "## Test accuracy and compute of each exit alone",
        "",
        "Compute up to an exit: the stages before it plus the branch itself, multiply-accumulates per image.",
        "",
        "| exit | accuracy | M MACs | share of the full network |",
        "|---|---|---|---|",
        *(f"| {name} | {acc:.2%} | {m / 1e6:.2f} | {m / sum(macs):.0%} |"
          for name, acc, m in zip(exits, figures["exit_accuracy"], macs_to_exit)),
        "",
        "## Stages",
        "",
        "| stage | name | M MACs | cumulative share |",
        "|---|---|---|---|",
        *(f"| {i + 1} | {name} | {m / 1e6:.2f} | {sum(macs[: i + 1]) / sum(macs):.0%} |"
          for i, (name, m) in enumerate(zip(net.stage_names, macs))),
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
    full_train, test = load_dataset(recipe.dataset, recipe.data_root, seed=recipe.train.seed,
                                    image_size=recipe.image_size)
    parts = full_train.split_holdout(recipe.val_fraction, seed=recipe.train.seed)
    train_part = parts.train
    if recipe.max_train_images is not None and recipe.max_train_images < len(train_part):
        keep = np.random.default_rng(recipe.train.seed).permutation(len(train_part))[: recipe.max_train_images]
        train_part = train_part.subset(np.sort(keep))
    in_channels = 1 if full_train.images.ndim == 3 else full_train.images.shape[3]
    pixels = full_train.images.reshape(len(full_train), -1, in_channels).astype(np.float32) / 255.0
    mean = [round(float(m), 4) for m in pixels.mean(axis=(0, 1))]
    std = [round(float(s), 4) for s in pixels.std(axis=(0, 1))]
    spec = zoo_spec(recipe.arch, n_classes=full_train.n_classes, in_channels=in_channels,
                    image_size=recipe.image_size or full_train.image_shape[0],
                    class_names=list(full_train.class_names), mean=mean, std=std, **arch_options(recipe))
    net = EarlyExitNet(spec)
    preprocessing = Preprocessing.from_spec_dict(spec)
    train_inputs = preprocess(train_part.images, preprocessing, is_batch=True)
    val_inputs = preprocess(parts.val.images, preprocessing, is_batch=True)
    test_inputs = preprocess(test.images, preprocessing, is_batch=True)
    result = train_early_exit(net, train_inputs, train_part.labels, val_inputs, parts.val.labels,
                              config=recipe.train, progress=progress)
    val_calibration = calibrate(net, val_inputs, parts.val.labels, method=recipe.confidence_method)
    test_calibration = calibrate(net, test_inputs, test.labels, method=recipe.confidence_method,
                                 temperature=val_calibration.temperature)
    model_id = save_model(net, out_dir)
    save_calibration(val_calibration, out_dir / CALIBRATION_FILE)
    figures = card_figures(test_calibration, branch_after_stage=net.branch_after_stage)
    write_model_card(out_dir, net, model_id, figures, recipe, train_seconds=time.perf_counter() - started,
                     val_accuracy=result.val_accuracy[-1], epoch_seconds=result.epoch_seconds,
                     n_train_images=len(train_part))
    return model_id
