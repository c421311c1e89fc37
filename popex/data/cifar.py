"""CIFAR-10 in its binary distribution (``cifar-10-batches-bin``).

Each batch file is a sequence of 3073-byte records: one label byte, then
the 32x32 image as 1024 red, 1024 green and 1024 blue bytes (CHW, rows
top to bottom).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from popex.data.dataset import Dataset
from popex.errors import DataError

__all__ = ["CIFAR10_CLASSES", "CIFAR10_FILES", "read_cifar_batch", "load_cifar10_binary"]

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

CIFAR10_FILES: dict[str, tuple[str, ...]] = {
    "train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
    "test": ("test_batch.bin",),
}

_SIDE_PX = 32
_N_CHANNELS = 3
_RECORD_BYTES = 1 + _N_CHANNELS * _SIDE_PX * _SIDE_PX
_SUBFOLDER = "cifar-10-batches-bin"
_META_FILE = "batches.meta.txt"


def _resolve_root(root: Path) -> Path:
    """Accept the batches folder itself or the folder the archive was unpacked in."""
    if not (root / CIFAR10_FILES["test"][0]).exists() and (root / _SUBFOLDER).is_dir():
        return root / _SUBFOLDER
    return root


def _class_names(root: Path) -> tuple[str, ...]:
    meta = root / _META_FILE
    if not meta.is_file():
        return CIFAR10_CLASSES
    try:
        names = tuple(line.strip() for line in meta.read_text(encoding="utf-8").splitlines() if line.strip())
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read CIFAR-10 class names from {meta}: {err}") from err
    if len(names) != len(CIFAR10_CLASSES):
        raise DataError(f"CIFAR-10 class names file {meta} lists {len(names)} names, expected 10")
    return names


def read_cifar_batch(path: str | os.PathLike[str]) -> Dataset:
    """Read one CIFAR-10 binary batch file.

    Parameters
    ----------
    path : str or path-like
        e.g. ``data_batch_1.bin`` or ``test_batch.bin``.

    Returns
    -------
    Dataset
        images uint8 (n_samples, 32, 32, 3) RGB (HWC), labels int64,
        class names :data:`CIFAR10_CLASSES`.

    Raises
    ------
    DataError
        If the file is missing or unreadable, empty, not a whole number of
        3073-byte records, or holds a label above 9.
    """
    file_path = Path(path)
    try:
        raw = file_path.read_bytes()
    except FileNotFoundError as err:
        raise DataError(f"CIFAR-10 batch file {file_path} does not exist") from err
    except OSError as err:
        raise DataError(f"cannot read CIFAR-10 batch file {file_path}: {err}") from err
    if not raw or len(raw) % _RECORD_BYTES:
        raise DataError(
            f"CIFAR-10 batch file {file_path} is {len(raw)} bytes long, not a positive multiple of "
            f"the {_RECORD_BYTES}-byte record (1 label byte + 3x32x32 pixels): truncated or not CIFAR-10"
        )
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, _RECORD_BYTES)
    labels = records[:, 0].astype(np.int64)
    if labels.max() >= len(CIFAR10_CLASSES):
        raise DataError(
            f"CIFAR-10 batch file {file_path} has label {int(labels.max())} "
            f"at record {int(labels.argmax())}; labels must lie in 0..9"
        )
    images_chw = records[:, 1:].reshape(-1, _N_CHANNELS, _SIDE_PX, _SIDE_PX)
    images_hwc = np.ascontiguousarray(images_chw.transpose(0, 2, 3, 1))
    return Dataset(images_hwc, labels, CIFAR10_CLASSES)


def load_cifar10_binary(root: str | os.PathLike[str], *, split: str = "train") -> Dataset:
    """Load one split of CIFAR-10 from the binary batch files.

    Parameters
    ----------
    root : str or path-like
        The ``cifar-10-batches-bin`` folder, or the folder containing it.
    split : {"train", "test"}
        ``"train"`` reads ``data_batch_1.bin`` .. ``data_batch_5.bin``
        (50,000 images); ``"test"`` reads ``test_batch.bin`` (10,000).

    Returns
    -------
    Dataset
        images uint8 (n_samples, 32, 32, 3) RGB, labels int64; class names
        from ``batches.meta.txt`` when present, else :data:`CIFAR10_CLASSES`.

    Raises
    ------
    DataError
        If ``split`` is unknown, a batch file is missing or malformed.
    """
    if split not in CIFAR10_FILES:
        raise DataError(f"CIFAR-10 split must be 'train' or 'test', got {split!r}")
    root_path = _resolve_root(Path(root))
    missing = [name for name in CIFAR10_FILES[split] if not (root_path / name).is_file()]
    if missing:
        raise DataError(
            f"CIFAR-10 {split} split not found: {', '.join(missing)} missing in {root_path} "
            "(download the binary version, cifar-10-binary.tar.gz, and pass its folder)"
        )
    batches = [read_cifar_batch(root_path / name) for name in CIFAR10_FILES[split]]
    return Dataset(
        np.concatenate([b.images for b in batches]),
        np.concatenate([b.labels for b in batches]),
        _class_names(root_path),
    )
