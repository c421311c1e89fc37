"""ImageFolder datasets: ``root/<class name>/<image>.png|jpg|jpeg|bmp``."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from popex.data.dataset import Dataset
from popex.data.images import DEFAULT_MAX_PIXELS, decode_image
from popex.errors import DataError

__all__ = ["IMAGE_SUFFIXES", "load_image_folder"]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp"})
"""File name endings (compared in lower case) read as images; other files are skipped."""


def _list_images(root: Path) -> tuple[tuple[str, ...], list[tuple[Path, int]]]:
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"image folder {root} has no class subfolders (expected root/<class>/<image>)")
    files: list[tuple[Path, int]] = []
    for label, class_dir in enumerate(class_dirs):
        images = sorted(
            p for p in class_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not images:
            raise DataError(
                f"class folder {class_dir} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})"
            )
        files.extend((path, label) for path in images)
    return tuple(p.name for p in class_dirs), files


def _load_one(path: Path, *, channels: int, size_hw: tuple[int, int] | None) -> np.ndarray:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read image file {path}: {err}") from err
    try:
        image = decode_image(data, max_pixels=DEFAULT_MAX_PIXELS, channels=channels)
    except DataError as err:
        raise DataError(f"image file {path} is unreadable: {err}") from err
    if size_hw is not None and image.shape[:2] != size_hw:
        image = cv2.resize(image, (size_hw[1], size_hw[0]), interpolation=cv2.INTER_AREA)
    return image


def load_image_folder(
    root: str | os.PathLike[str], *, channels: int = 3, size_hw: tuple[int, int] | None = None
) -> Dataset:
    """Load every image under ``root/<class>/``; classes are the sorted subfolder names.

    Parameters
    ----------
    root : str or path-like
        Folder with one subfolder per class. Files whose names do not end in
        .png, .jpg, .jpeg or .bmp (any case) are ignored, as are hidden folders.
    channels : {1, 3}, default 3
        1 decodes to grayscale (n, H, W); 3 to RGB (n, H, W, 3).
    size_hw : (int, int) or None, default None
        Resize every image to (height_px, width_px) with ``cv2.INTER_AREA``.
        None keeps the stored size, which must then be the same for all images.

    Returns
    -------
    Dataset
        Images in class order, files sorted by name within a class.

    Raises
    ------
    DataError
        If ``root`` is not a folder, has no class folders, a class folder
        has no images, an image is unreadable (the message names the file),
        or sizes differ and ``size_hw`` is None.
    """
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels!r}")
    if size_hw is not None:
        size_hw = tuple(int(d) for d in size_hw)
        if len(size_hw) != 2 or min(size_hw) < 1:
            raise DataError(f"size_hw must be (height_px, width_px) with both >= 1, got {size_hw}")
    root_path = Path(root)
    if not root_path.is_dir():
        raise DataError(f"image folder {root_path} does not exist or is not a folder")
    class_names, files = _list_images(root_path)
    images = []
    for path, _ in files:
        image = _load_one(path, channels=channels, size_hw=size_hw)
        if images and image.shape != images[0].shape:
            raise DataError(
                f"image file {path} has shape {image.shape} but {files[0][0]} has {images[0].shape}; "
                "pass size_hw to resize them to one size"
            )
        images.append(image)
    labels = np.array([label for _, label in files], dtype=np.int64)
    return Dataset(np.stack(images), labels, class_names)
