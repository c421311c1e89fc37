"""``popex experiment distortion``: accuracy and edge-exit share under blur and noise.

For each distortion type and level (and pristine images) it scores three
systems on the test set, as in the distortion-robust early-exit paper's table:

- ``pristine``: the model's own heads, whatever the image;
- ``expert``: the head set trained for the image's actual distortion (an
  oracle choice; on pristine images each expert is scored, to show what the
  experts cost on clean images);
- ``classifier``: the head set the distortion classifier picks per image,
  which is what the edge does.

Every system runs as an early-exit network at one fixed setting: every
branch active with threshold 0.9 on its temperature-scaled confidence (each
head with the temperatures of its own calibration file), the rest to the
final exit. A fixed setting, rather than the decision for some link and
deadline, keeps the comparison about the heads alone; 0.9 is a setting the
planner commonly picks for generous deadlines. ``edge_exit_share`` is the
fraction of images that leave at a branch (they need no cloud).

Writes ``<out_dir>/distortion/distortion.csv`` and ``distortion.png`` and
replaces the ``## Distortion`` section of ``docs/results.md``.
"""

from __future__ import annotations

import argparse
import csv
import sys
import json
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from popex.data.distort import DEFAULT_LEVELS, DISTORTION_KINDS, DistortionLevels, distort
from popex.data.preprocess import Preprocessing, preprocess
from popex.errors import ConfigError
from popex.nets.early_exit import PRISTINE_HEAD, exit_confidence
from popex.nets.experts import ExpertModel, head_exit_logits, load_expert_model

__all__ = ["DEFAULT_THRESHOLD", "DistortionRow", "ExitOutcome", "early_exit_outcome", "run_distortion_experiment",
           "add_distortion_experiment_parser"]

DEFAULT_THRESHOLD = 0.9
DEFAULT_DOCS_PATH = Path(__file__).resolve().parents[2] / "docs" / "results.md"
_SECTION = "## Distortion"
_NOISE_SEED = 3


def _row(kind: str, level: float, system: str, head: str, outcome: ExitOutcome, final_predicted: np.ndarray,
         labels: np.ndarray, n_branches: int, classifier_accuracy: float) -> DistortionRow:
    return DistortionRow(kind=kind, level=float(level), system=system, head=head,
                         accuracy=float((outcome.predicted == labels).mean()),
                         edge_exit_share=float((outcome.exit_index < n_branches).mean()),
                         final_accuracy=float((final_predicted == labels).mean()),
                         classifier_accuracy=classifier_accuracy, n_samples=len(labels))


def _score_condition(model: ExpertModel, images: np.ndarray, labels: np.ndarray, kind: str, level: float,
                     threshold: float) -> list[DistortionRow]:
    net = model.net
    distorted = distort(images, kind=kind, level=level, seed=_NOISE_SEED, is_batch=True)
    inputs = preprocess(distorted, Preprocessing.from_spec_dict(net.spec), is_batch=True)
    logits = head_exit_logits(net, inputs)
    outcomes = {h: early_exit_outcome(lg, temperature=model.calibrations[h].temperature, threshold=threshold,
                                      method=model.calibrations[h].confidence_method) for h, lg in logits.items()}
    finals = {h: lg[-1].argmax(1) for h, lg in logits.items()}
    chosen = np.array([k if k in net.expert_names else PRISTINE_HEAD
                       for k in model.classifier.predict(distorted, is_batch=True).kinds])
    classifier_accuracy = float((chosen == kind).mean())
    rows = [_row(kind, level, "pristine", PRISTINE_HEAD, outcomes[PRISTINE_HEAD], finals[PRISTINE_HEAD], labels,
                 net.n_branches, classifier_accuracy)]
    for head in (net.expert_names if kind == PRISTINE_HEAD else (kind,)):
        rows.append(_row(kind, level, "expert", head, outcomes[head], finals[head], labels, net.n_branches,
                         classifier_accuracy))
    picked = {field_.name: np.select([chosen == h for h in net.head_names],
                                     [getattr(outcomes[h], field_.name) for h in net.head_names])
              for field_ in fields(ExitOutcome)}
    final_picked = np.select([chosen == h for h in net.head_names], [finals[h] for h in net.head_names])
    rows.append(_row(kind, level, "classifier", "per-image", ExitOutcome(**picked), final_picked, labels,
                     net.n_branches, classifier_accuracy))
    return rows


def _plot(rows: list[DistortionRow], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(10, 7), sharex="col")
    clean = [r for r in rows if r.kind == PRISTINE_HEAD]
    styles = {"pristine": ("tab:red", "o"), "expert": ("tab:green", "s"), "classifier": ("tab:blue", "^")}
    for column, kind in enumerate(("blur", "noise")):
        for system, (colour, marker) in styles.items():
            start = [r for r in clean if r.system == system and (system != "expert" or r.head == kind)]
            series = start + [r for r in rows if r.kind == kind and r.system == system]
            levels = [r.level for r in series]
            label = {"pristine": "pristine heads", "expert": f"{kind} expert heads",
                     "classifier": "classifier-selected"}[system]
            axes[0, column].plot(levels, [100 * r.accuracy for r in series], marker=marker, color=colour, label=label)
            axes[1, column].plot(levels, [100 * r.edge_exit_share for r in series], marker=marker, color=colour,
                                 label=label)
        unit = "px" if kind == "blur" else "grey levels"
        axes[1, column].set_xlabel(f"{kind} sigma ({unit}); 0 = pristine")
        axes[0, column].set_title(f"{kind}")
        axes[0, column].legend(fontsize=8)
    axes[0, 0].set_ylabel("accuracy (%)")
    axes[1, 0].set_ylabel("edge-exit share (%)")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _summary(rows: list[DistortionRow], levels: DistortionLevels, source: str, threshold: float,
             command: str) -> str:
    def get(kind: str, level: float, system: str, head: str | None = None) -> DistortionRow:
        return next(r for r in rows if r.kind == kind and r.level == level and r.system == system
                    and (head is None or r.head == head))

    lines = [_SECTION, "",
             f"Test set: {source}. Every system runs as an early-exit network with all branches at threshold "
             f"{threshold:g} (each head with its own temperatures); accuracy, then the share of images that exit "
             "on the edge in parentheses. *expert* is the head set of the image's true distortion; "
             "*classifier-selected* is what the edge does (the classifier picks the head per image).", "",
             "| images | level | pristine heads | expert heads | classifier-selected | classifier accuracy |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        if row.system != "pristine":
            continue
        experts = [r for r in rows if r.kind == row.kind and r.level == row.level and r.system == "expert"]
        selected = get(row.kind, row.level, "classifier")
        expert_text = "; ".join(f"{r.head}: {r.accuracy:.2%} ({r.edge_exit_share:.0%})" if row.kind == PRISTINE_HEAD
                                else f"{r.accuracy:.2%} ({r.edge_exit_share:.0%})" for r in experts)
        lines.append(f"| {row.kind} | {row.level:g} | {row.accuracy:.2%} ({row.edge_exit_share:.0%}) | {expert_text} "
                     f"| {selected.accuracy:.2%} ({selected.edge_exit_share:.0%}) | {row.classifier_accuracy:.2%} |")
    clean = get(PRISTINE_HEAD, 0.0, "pristine")
    lines.append("")
    for kind in ("blur", "noise"):
        middle = levels.middle(kind)
        lost = clean.accuracy - get(kind, middle, "pristine").accuracy
        regained = get(kind, middle, "expert").accuracy - get(kind, middle, "pristine").accuracy
        share = regained / lost if lost > 0 else float("nan")
        lines.append(f"- Middle {kind} level ({middle:g}): the pristine heads lose {100 * lost:.2f} points; the "
                     f"{kind} expert heads recover {100 * regained:.2f} of them ({share:.0%}; target >= 50%).")
    selected_clean = get(PRISTINE_HEAD, 0.0, "classifier")
    lines.append(f"- Pristine images: classifier-selected {selected_clean.accuracy:.2%} vs pristine heads "
                 f"{clean.accuracy:.2%} ({100 * (selected_clean.accuracy - clean.accuracy):+.2f} points; "
                 "target within 1 point).")
    lines += ["", f"Reproduce: `{command}` (CSV and plot in `results/distortion/`).", "", ""]
    return "\n".join(lines)


def _replace_section(path: Path, section: str) -> None:
    text = path.read_text() if path.is_file() else "# Results\n\n"
    pattern = re.compile(rf"^{re.escape(_SECTION)}\s*$.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    text = pattern.sub(lambda _: section, text, count=1) if pattern.search(text) else \
        text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip("\n") + "\n")


def _cmd_distortion(args: argparse.Namespace) -> int:
    csv_path = run_distortion_experiment(args.model, args.out, args.quick, threshold=args.threshold,
                                         docs_path=DEFAULT_DOCS_PATH if args.update_docs else None,
                                         progress=not args.quiet and sys.stderr.isatty())
    print(f"wrote {csv_path} and {csv_path.with_suffix('.png')}" + ("" if not args.update_docs else
                                                                     f"; updated {DEFAULT_DOCS_PATH}"))
    return 0


@dataclass(frozen=True)
class ExitOutcome:
    """Where each sample leaves and what it predicts there."""

    exit_index: np.ndarray  # int64 (n,): branch index, or n_branches for the final exit
    predicted: np.ndarray  # int64 (n,)


@dataclass(frozen=True)
class DistortionRow:
    """One system on one kind and level of distortion (a CSV row)."""

    kind: str
    level: float
    system: str
    head: str  # the head set scored; "per-image" for the classifier-selected system
    accuracy: float
    edge_exit_share: float
    final_accuracy: float  # the final exit alone, every sample
    classifier_accuracy: float  # share of images the classifier labels with their true kind
    n_samples: int


def early_exit_outcome(logits: list[np.ndarray], *, temperature: np.ndarray, threshold: float,
                       method: str = "max_softmax") -> ExitOutcome:
    """Exit of each sample when every branch is active at ``threshold``.

    Examples
    --------
    >>> branch = np.array([[4.0, 0.0], [0.0, 0.1]]); final = np.array([[0.0, 1.0], [0.0, 1.0]])
    >>> out = early_exit_outcome([branch, final], temperature=np.ones(2), threshold=0.9)
    >>> out.exit_index.tolist(), out.predicted.tolist()
    ([0, 1], [0, 1])
    """
    n_samples, n_branches = len(logits[-1]), len(logits) - 1
    exit_index = np.full(n_samples, n_branches, dtype=np.int64)
    predicted = np.empty(n_samples, dtype=np.int64)
    for e, lg in enumerate(logits):
        confidence, pred = exit_confidence(torch.from_numpy(lg), temperature=float(temperature[e]), method=method)
        leaving = (exit_index == n_branches) & ((e == n_branches) | (confidence.numpy() >= threshold))
        if e < n_branches:
            exit_index[leaving] = e
        predicted[leaving] = pred.numpy()[leaving]
    return ExitOutcome(exit_index=exit_index, predicted=predicted)


def run_distortion_experiment(model_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str] = "results",
                              quick: bool = False, *, threshold: float = DEFAULT_THRESHOLD,
                              docs_path: str | os.PathLike[str] | None = DEFAULT_DOCS_PATH,
                              progress: bool = True) -> Path:
    """Score the pristine, expert and classifier-selected systems per distortion and level.

    Parameters
    ----------
    model_dir : path
        A model directory written by ``popex train-experts``.
    out_dir : path, default "results"
        The CSV and PNG go to ``<out_dir>/distortion/``.
    quick : bool, default False
        Use the shipped 1,000-image test subset instead of the full test split.
    threshold : float, default 0.9
        Threshold of every branch.
    docs_path : path or None, default docs/results.md
        Where the ``## Distortion`` section is replaced (None: not written).
    progress : bool

    Returns
    -------
    Path
        The CSV file.

    Raises
    ------
    ConfigError
        If the threshold is not in (0, 1].
    SpecError, CalibrationError, DataError
        If the model directory or the test set cannot be read.
    """
    from popex.data.idx import load_fashion_mnist
    from popex.data.subset import SHIPPED_SUBSET_ROOT, default_test_set

    if not 0.0 < threshold <= 1.0:
        raise ConfigError(f"threshold must be in (0, 1], got {threshold}")
    model = load_expert_model(model_dir)
    card_path = Path(model_dir) / "card.json"
    levels = DEFAULT_LEVELS
    if card_path.is_file() and "levels" in json.loads(card_path.read_text()):
        levels = DistortionLevels(**{k: tuple(v) for k, v in json.loads(card_path.read_text())["levels"].items()})
    if quick:
        dataset, source = load_fashion_mnist(SHIPPED_SUBSET_ROOT, split="test"), "shipped 1,000-image subset"
    else:
        found = default_test_set()
        dataset = found.dataset
        source = ("full Fashion-MNIST test split" if found.source == "debian" else "shipped subset") + \
            f" ({len(dataset):,} images)"
    conditions = [(kind, level) for kind in DISTORTION_KINDS for level in levels.for_kind(kind)]
    rows: list[DistortionRow] = []
    for kind, level in tqdm(conditions, desc="distortion experiment", disable=not progress):
        rows += _score_condition(model, dataset.images, dataset.labels, kind, level, threshold)
    target = Path(out_dir) / "distortion"
    target.mkdir(parents=True, exist_ok=True)
    csv_path = target / "distortion.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[f.name for f in fields(DistortionRow)])
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    _plot(rows, target / "distortion.png", f"{Path(model_dir).name}: {source}, all branches at {threshold:g}")
    if docs_path is not None:
        command = f"popex experiment distortion --model {model_dir}" + (" --quick" if quick else "")
        _replace_section(Path(docs_path), _summary(rows, levels, source, threshold, command))
    return csv_path


def add_distortion_experiment_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``distortion`` under the ``popex experiment`` subcommands (sets ``run``)."""
    p = subparsers.add_parser("distortion", help="accuracy and edge-exit share under blur and noise, per level")
    p.add_argument("--model", default="models/default-distortion", help="model directory with expert heads")
    p.add_argument("--out", default="results", help="results folder (CSV and PNG go to OUT/distortion/)")
    p.add_argument("--quick", action="store_true", help="shipped 1,000-image subset instead of the full test split")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="threshold of every branch")
    p.add_argument("--update-docs", action="store_true", help="also rewrite its section of docs/results.md")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_cmd_distortion)
    return p
