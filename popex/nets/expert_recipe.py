"""The recipe behind ``popex train-experts``: expert heads, their calibrations, the classifier.

From a trained model directory (e.g. ``models/default``) it writes a NEW
directory (e.g. ``models/default-distortion``; the source is never touched):

- ``spec.json`` (the source spec plus ``"experts": ["blur", "noise"]``) and
  ``weights.safetensors``: one backbone, three head sets;
- ``calibration.npz`` (the source's, copied: the pristine head is
  bit-identical), ``calibration_blur.npz`` and ``calibration_noise.npz`` (the
  same validation split as the source's, distorted that head's way);
- ``distortion-classifier/`` (spec.json, weights.safetensors);
- ``card.json`` and ``MODEL_CARD.md`` with per-expert test accuracies and
  the classifier's per-level held-out accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from popex.data.distort import DEFAULT_LEVELS, DISTORTION_KINDS, DistortionLevels, distort, distort_mixed
from popex.data.idx import DEFAULT_FASHION_MNIST_ROOT, load_fashion_mnist
from popex.data.preprocess import Preprocessing, preprocess
from popex.decision.calibration import load_calibration, save_calibration
from popex.errors import ConfigError
from popex.nets.distortion import (
    CLASSIFIER_DIR,
    ClassifierTrainConfig,
    evaluate_distortion_classifier,
    train_distortion_classifier,
)
from popex.nets.experts import (
    EXPERT_KINDS,
    ExpertTrainConfig,
    add_expert_heads,
    calibrate_head,
    calibration_file,
    finetune_expert,
    head_exit_logits,
)
from popex.nets.io import CALIBRATION_FILE, atomic_write_bytes, load_model, save_model

__all__ = ["ExpertRecipe", "train_expert_model_dir", "add_train_experts_parser"]

_CARD_FILE = "card.json"
_CARD_MARKDOWN = "MODEL_CARD.md"


@dataclass(frozen=True)
class ExpertRecipe:
    """Everything ``popex train-experts`` needs; recorded in the card so the run can be repeated.

    ``val_fraction`` and ``split_seed`` must be those the source model was
    trained with (``popex train`` defaults: 0.1 and 0), so that the expert
    calibrations use images the backbone never trained on.
    """

    data_root: str = str(DEFAULT_FASHION_MNIST_ROOT)
    val_fraction: float = 0.1
    split_seed: int = 0
    levels: DistortionLevels = DEFAULT_LEVELS
    experts: ExpertTrainConfig = ExpertTrainConfig()
    classifier: ClassifierTrainConfig = ClassifierTrainConfig()
    n_classifier_images: int | None = None  # None: every training image, once per epoch

    def command(self, model_dir: str, out_dir: str) -> str:
        parts = ["popex", "train-experts", "--model", model_dir, "--out", out_dir,
                 "--epochs", str(self.experts.n_epochs), "--classifier-epochs", str(self.classifier.n_epochs),
                 "--seed", str(self.experts.seed)]
        if self.experts.n_images_per_epoch != ExpertTrainConfig.n_images_per_epoch:
            parts += ["--images-per-epoch", str(self.experts.n_images_per_epoch)]
        if self.n_classifier_images is not None:
            parts += ["--classifier-images", str(self.n_classifier_images)]
        if self.experts.n_threads != ExpertTrainConfig.n_threads:
            parts += ["--threads", str(self.experts.n_threads)]
        if self.data_root != str(DEFAULT_FASHION_MNIST_ROOT):
            parts += ["--data-root", self.data_root]
        return " ".join(shlex.quote(p) for p in parts)


def _test_figures(net: Any, images: np.ndarray, labels: np.ndarray, levels: DistortionLevels,
                  seed: int) -> list[dict[str, Any]]:
    """Per-exit test accuracy of every head on pristine images and at every level."""
    preprocessing = Preprocessing.from_spec_dict(net.spec)
    rows = []
    for kind in DISTORTION_KINDS:
        for level in levels.for_kind(kind):
            inputs = preprocess(distort(images, kind=kind, level=level, seed=seed, is_batch=True), preprocessing,
                                is_batch=True)
            logits = head_exit_logits(net, inputs)
            rows.append({"kind": kind, "level": float(level), "exit_accuracy": {
                head: [float((lg.argmax(1) == labels).mean()) for lg in per_exit] for head, per_exit in logits.items()
            }})
    return rows


def _write_card(out_dir: Path, source_dir: Path, card: dict[str, Any]) -> None:
    atomic_write_bytes(out_dir / _CARD_FILE, (json.dumps(card, indent=2) + "\n").encode())
    experts = card["experts"]
    lines = [
        f"# Model card: {card['name']} with distortion expert heads",
        "",
        f"- Model id: `{card['model_id']}`; base model `{card['base_model_id']}` ({source_dir}), whose backbone and "
        "pristine heads are unchanged (its card follows below).",
        f"- Expert head sets: {', '.join(experts)}; each is a copy of every side branch and of the final stage, "
        f"fine-tuned for {card['expert_config']['n_epochs']} epochs ({card['expert_config']['n_images_per_epoch']} "
        "images per epoch, each distorted at a level drawn from the defaults) with the backbone frozen.",
        f"- Default levels: blur sigma {card['levels']['blur_sigmas_px']} px, noise sigma "
        f"{card['levels']['noise_sigmas_grey']} grey levels (see `popex.data.distort.DistortionLevels`).",
        f"- Calibration: `calibration.npz` (pristine, copied from the base model), "
        + ", ".join(f"`{calibration_file(e)}`" for e in experts)
        + " on the same validation split distorted at random default levels.",
        f"- Built in {card['train_seconds'] / 60:.1f} min on this machine's CPU.",
        "",
        f"## Test accuracy per head ({card['n_test_samples']:,} test images; final exit, then each branch)",
        "",
        "| images | level | pristine head | " + " | ".join(f"{e} head" for e in experts) + " |",
        "|---|---|---|" + "---|" * len(experts),
    ]
    for row in card["test"]:
        cells = []
        for head in ("pristine", *experts):
            accuracy = row["exit_accuracy"][head]
            cells.append(f"{accuracy[-1]:.2%} ({', '.join(f'{a:.1%}' for a in accuracy[:-1])})")
        lines.append(f"| {row['kind']} | {row['level']:g} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Distortion classifier (held-out test images)",
        "",
        f"Model id `{card['classifier']['model_id']}`, in `{CLASSIFIER_DIR}/`; trained on "
        f"{card['classifier']['n_train_images']:,} training images per epoch (a third each pristine, blurred, noisy) "
        f"for {card['classifier']['n_epochs']} epochs.",
        "",
        "| images | level | accuracy |",
        "|---|---|---|",
        *(f"| {s['kind']} | {s['level']:g} | {s['accuracy']:.2%} |" for s in card["classifier"]["scores"]),
        "",
        "## Reproduce",
        "",
        "```",
        card["command"],
        "```",
        "",
    ]
    base_card = source_dir / _CARD_MARKDOWN
    if base_card.is_file():
        lines += ["---", "", "The base model's card:", "", base_card.read_text()]
    atomic_write_bytes(out_dir / _CARD_MARKDOWN, "\n".join(lines).encode())


def train_expert_model_dir(model_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                           recipe: ExpertRecipe = ExpertRecipe(), *, progress: bool = True) -> dict[str, Any]:
    """Fine-tune blur and noise experts and train the classifier; write a new model directory.

    Parameters
    ----------
    model_dir : path
        A trained model without experts, with ``calibration.npz``.
    out_dir : path
        The new directory; must differ from ``model_dir``.
    recipe : ExpertRecipe
    progress : bool

    Returns
    -------
    dict
        The card (also written as ``card.json``).

    Raises
    ------
    ConfigError
        If ``out_dir`` is ``model_dir``.
    SpecError, WeightsError, CalibrationError, DataError
        If the source model or the data cannot be read.
    """
    source, out_dir = Path(model_dir), Path(out_dir)
    if source.resolve() == out_dir.resolve():
        raise ConfigError(f"the output directory must differ from the source model {source}; it is never modified")
    started = time.perf_counter()
    base = load_model(source)
    base_calibration = load_calibration(source / CALIBRATION_FILE)
    net = add_expert_heads(base.net, EXPERT_KINDS)
    full_train = load_fashion_mnist(recipe.data_root, split="train")
    test = load_fashion_mnist(recipe.data_root, split="test")
    parts = full_train.split_holdout(recipe.val_fraction, seed=recipe.split_seed)
    preprocessing = Preprocessing.from_spec_dict(net.spec)
    calibrations = {}
    for index, kind in enumerate(EXPERT_KINDS):
        finetune_expert(net, kind, parts.train.images, parts.train.labels, levels=recipe.levels,
                        config=recipe.experts, progress=progress)
        val_images = distort_mixed(parts.val.images, kind=kind, levels=recipe.levels, seed=10_000 + index)
        calibrations[kind] = calibrate_head(net, preprocess(val_images, preprocessing, is_batch=True),
                                            parts.val.labels, head=kind, method=base_calibration.confidence_method)
    n_classifier = len(parts.train) if recipe.n_classifier_images is None else \
        min(len(parts.train), recipe.n_classifier_images)
    rows = np.random.default_rng(recipe.classifier.seed).permutation(len(parts.train))[:n_classifier]
    classifier = train_distortion_classifier(parts.train.images[rows], levels=recipe.levels,
                                             config=recipe.classifier, progress=progress)
    scores = evaluate_distortion_classifier(classifier, test.images, levels=recipe.levels, seed=1)
    figures = _test_figures(net, test.images, test.labels, recipe.levels, seed=2)

    model_id = save_model(net, out_dir)
    save_calibration(base_calibration, out_dir / CALIBRATION_FILE)
    for kind, calibration in calibrations.items():
        save_calibration(calibration, out_dir / calibration_file(kind))
    classifier_id = classifier.save(out_dir / CLASSIFIER_DIR)
    card = {
        "model_id": model_id,
        "base_model_id": base.model_id,
        "name": net.spec.get("name"),
        "experts": list(net.expert_names),
        "levels": recipe.levels.to_dict(),
        "expert_config": asdict(recipe.experts),
        "expert_temperatures": {kind: [float(t) for t in c.temperature] for kind, c in calibrations.items()},
        "n_test_samples": len(test),
        "test": figures,
        "classifier": {"model_id": classifier_id, "n_train_images": n_classifier,
                       "n_epochs": recipe.classifier.n_epochs, "scores": [asdict(s) for s in scores]},
        "train_seconds": round(time.perf_counter() - started, 1),
        "command": recipe.command(str(source), str(out_dir)),
    }
    _write_card(out_dir, source, card)
    return card


def _cmd_train_experts(args: argparse.Namespace) -> int:
    recipe = ExpertRecipe(
        data_root=args.data_root,
        val_fraction=args.val_fraction,
        split_seed=args.split_seed,
        experts=ExpertTrainConfig(n_epochs=args.epochs, seed=args.seed, n_threads=args.threads,
                                  n_images_per_epoch=args.images_per_epoch),
        classifier=ClassifierTrainConfig(n_epochs=args.classifier_epochs, seed=args.seed, n_threads=args.threads),
        n_classifier_images=args.classifier_images,
    )
    card = train_expert_model_dir(args.model, args.out, recipe, progress=not args.quiet)
    for score in card["classifier"]["scores"]:
        print(f"classifier accuracy on {score['kind']} (level {score['level']:g}): {score['accuracy']:.2%}")
    print(f"model {card['model_id']} with experts {card['experts']} written to {args.out} "
          f"(see {args.out}/{_CARD_MARKDOWN})")
    return 0


def add_train_experts_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``popex train-experts`` (sets ``run`` like the other subcommands)."""
    p = subparsers.add_parser("train-experts",
                              help="add blur/noise expert heads and a distortion classifier to a trained model")
    p.add_argument("--model", required=True, help="trained model directory (not modified)")
    p.add_argument("--out", required=True, help="new model directory to write, e.g. models/default-distortion")
    p.add_argument("--data-root", default=str(DEFAULT_FASHION_MNIST_ROOT),
                   help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--epochs", type=int, default=ExpertTrainConfig.n_epochs, help="fine-tuning epochs per expert")
    p.add_argument("--images-per-epoch", type=int, default=ExpertTrainConfig.n_images_per_epoch,
                   help="training images drawn per expert epoch")
    p.add_argument("--classifier-epochs", type=int, default=ClassifierTrainConfig.n_epochs)
    p.add_argument("--classifier-images", type=int, default=None,
                   help="train the distortion classifier on a seeded subset of this many images (default: all)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="as the model was trained with (default 0.1)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of that validation split (default 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_cmd_train_experts)
    return p
