"""A small stratified Fashion-MNIST test subset shipped with the repository.

Machines without the Debian package ``dataset-fashion-mnist`` (CI, a fresh
container) use it for the demo and the tests. It is regenerated with::

    python -m popex.data.subset --out data/fashion-mnist-test-subset --n 1000 --seed 0

and holds ``t10k-images-idx3-ubyte.gz`` and ``t10k-labels-idx1-ubyte.gz``
(readable by ``load_fashion_mnist(root=..., split="test")``) plus
``t10k-indices-idx1-ubyte.gz``, the rows of the full test split it took.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from popex.data.dataset import Dataset
from popex.data.idx import (
    DEFAULT_FASHION_MNIST_ROOT,
    FASHION_MNIST_FILES,
    load_fashion_mnist,
    read_idx,
    write_idx,
)
from popex.errors import DataError

__all__ = [
    "SHIPPED_SUBSET_ROOT",
    "SUBSET_INDICES_FILE",
    "TestSet",
    "stratified_indices",
    "write_fashion_mnist_subset",
    "load_subset_indices",
    "default_test_set",
    "main",
]

_log = logging.getLogger(__name__)

SHIPPED_SUBSET_ROOT = Path(__file__).resolve().parents[2] / "data" / "fashion-mnist-test-subset"
"""``data/fashion-mnist-test-subset`` at the repository root."""

SUBSET_INDICES_FILE = "t10k-indices-idx1-ubyte.gz"
"""Provenance: int32 row numbers in the full test split, one per subset sample."""


@dataclass(frozen=True)
class TestSet:
    """The test split :func:`default_test_set` found, and where it came from."""

    __test__ = False  # not a pytest test class, despite the name

    dataset: Dataset
    source: str
    """``"debian"`` (the full split) or ``"shipped-subset"``."""
    root: Path


def stratified_indices(labels: np.ndarray, *, n_samples: int, seed: int) -> np.ndarray:
    """Pick ``n_samples`` positions with the same number from every class.

    Parameters
    ----------
    labels : numpy.ndarray of int, shape (n_total,)
        Class of every sample; the classes are the distinct values present.
    n_samples : int
        How many to pick; must be a multiple of the number of classes.
    seed : int
        Seed of ``numpy.random.default_rng``; the same seed gives the same pick.

    Returns
    -------
    numpy.ndarray of int64, shape (n_samples,)
        Sorted positions into ``labels``.

    Raises
    ------
    DataError
        If ``n_samples`` is not a positive multiple of the number of
        classes, or a class has too few samples.

    Examples
    --------
    >>> import numpy as np
    >>> idx = stratified_indices(np.array([0, 0, 0, 1, 1, 1]), n_samples=4, seed=0)
    >>> np.bincount(np.array([0, 0, 0, 1, 1, 1])[idx]).tolist()
    [2, 2]
    """
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    if n_samples < 1 or n_samples % classes.size:
        raise DataError(
            f"a stratified subset of {classes.size} classes needs n_samples to be a positive multiple "
            f"of {classes.size}, got {n_samples}"
        )
    n_per_class = n_samples // classes.size
    if counts.min() < n_per_class:
        scarce = classes[counts.argmin()]
        raise DataError(f"class {scarce} has {counts.min()} samples, fewer than the {n_per_class} requested")
    rng = np.random.default_rng(seed)
    picked = [rng.choice(np.flatnonzero(labels == c), size=n_per_class, replace=False) for c in classes]
    return np.sort(np.concatenate(picked)).astype(np.int64)


def write_fashion_mnist_subset(
    out_dir: str | os.PathLike[str],
    *,
    n_samples: int = 1000,
    seed: int = 0,
    source_root: str | os.PathLike[str] = DEFAULT_FASHION_MNIST_ROOT,
) -> Path:
    """Write a stratified random subset of the Fashion-MNIST test split as IDX files.

    Parameters
    ----------
    out_dir : str or path-like
        Folder to write into (created if needed).
    n_samples : int, default 1000
        Subset size, a multiple of 10 (equal count per class).
    seed : int, default 0
        Seed of the pick; the files are byte-identical for the same inputs.
    source_root : str or path-like
        Folder with the full test split.

    Returns
    -------
    pathlib.Path
        ``out_dir``.

    Raises
    ------
    DataError
        If the source is missing or malformed, or ``n_samples`` is invalid.
    """
    test = load_fashion_mnist(source_root, split="test")
    indices = stratified_indices(test.labels, n_samples=n_samples, seed=seed)
    out_path = Path(out_dir)
    try:
        out_path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot create subset folder {out_path}: {err}") from err
    images_name, labels_name = FASHION_MNIST_FILES["test"]
    write_idx(out_path / images_name, test.images[indices])
    write_idx(out_path / labels_name, test.labels[indices].astype(np.uint8))
    write_idx(out_path / SUBSET_INDICES_FILE, indices.astype(np.int32))
    return out_path


def load_subset_indices(root: str | os.PathLike[str] = SHIPPED_SUBSET_ROOT) -> np.ndarray:
    """Rows of the full Fashion-MNIST test split that a subset folder holds.

    Parameters
    ----------
    root : str or path-like, default the shipped subset

    Returns
    -------
    numpy.ndarray of int64, shape (n_samples,)

    Raises
    ------
    DataError
        If the indices file is missing or malformed.
    """
    indices = read_idx(Path(root) / SUBSET_INDICES_FILE)
    if indices.ndim != 1 or indices.dtype.kind != "i":
        raise DataError(f"subset indices file in {root} must hold 1-D integers, got {indices.dtype} {indices.shape}")
    return indices.astype(np.int64)


def default_test_set(
    *,
    debian_root: str | os.PathLike[str] = DEFAULT_FASHION_MNIST_ROOT,
    subset_root: str | os.PathLike[str] = SHIPPED_SUBSET_ROOT,
) -> TestSet:
    """The full Fashion-MNIST test split if installed, else the shipped 1,000-image subset.

    Parameters
    ----------
    debian_root : str or path-like, default ``/usr/share/datasets/fashion-mnist``
    subset_root : str or path-like, default ``data/fashion-mnist-test-subset``

    Returns
    -------
    TestSet
        ``dataset``, ``source`` (``"debian"`` or ``"shipped-subset"``) and
        ``root``; the choice is also logged at INFO level.

    Raises
    ------
    DataError
        If neither is available, or the one found is malformed.
    """
    images_name, labels_name = FASHION_MNIST_FILES["test"]
    debian_path = Path(debian_root)
    if (debian_path / images_name).is_file() and (debian_path / labels_name).is_file():
        dataset = load_fashion_mnist(debian_path, split="test")
        _log.info("test set: full Fashion-MNIST test split (%d images) from %s", len(dataset), debian_path)
        return TestSet(dataset, "debian", debian_path)
    subset_path = Path(subset_root)
    try:
        dataset = load_fashion_mnist(subset_path, split="test")
    except DataError as err:
        raise DataError(
            f"no Fashion-MNIST test set: neither {debian_path} (apt-get install dataset-fashion-mnist) "
            f"nor the shipped subset {subset_path} can be read"
        ) from err
    _log.info("test set: shipped Fashion-MNIST subset (%d images) from %s", len(dataset), subset_path)
    return TestSet(dataset, "shipped-subset", subset_path)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: write the stratified test subset; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m popex.data.subset",
        description="Write a stratified random subset of the Fashion-MNIST test split as IDX files.",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--n", type=int, default=1000, help="number of images, a multiple of 10 (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--data-root", default=str(DEFAULT_FASHION_MNIST_ROOT), help="folder with the full Fashion-MNIST files"
    )
    args = parser.parse_args(argv)
    try:
        out_path = write_fashion_mnist_subset(args.out, n_samples=args.n, seed=args.seed, source_root=args.data_root)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.n} images to {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
