"""An in-memory labelled image dataset, as every reader in popex.data returns it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from popex.errors import DataError

__all__ = ["Dataset", "HoldoutSplit"]


@dataclass(frozen=True)
class Dataset:
    """Images with integer labels and the names of their classes.

    Parameters
    ----------
    images : numpy.ndarray of uint8, shape (n_samples, H, W) or (n_samples, H, W, C)
        Pixel values 0..255; colour images are RGB, channels last.
    labels : numpy.ndarray of int64, shape (n_samples,)
        Class index of every image, ``0 <= label < len(class_names)``.
    class_names : tuple of str
        Name of class ``i`` at position ``i``.

    Raises
    ------
    DataError
        If the dtypes, shapes, or label range do not hold.

    Examples
    --------
    >>> import numpy as np
    >>> ds = Dataset(np.zeros((4, 2, 2), np.uint8), np.array([0, 1, 0, 1]), ("a", "b"))
    >>> len(ds), ds.n_classes, ds.image_shape
    (4, 2, (2, 2))
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        images, labels = self.images, self.labels
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise DataError(
                "Dataset images must be a uint8 array of shape (n, H, W) or (n, H, W, C), got "
                f"{type(images).__name__} {getattr(images, 'dtype', '')} {getattr(images, 'shape', '')}"
            )
        if not isinstance(labels, np.ndarray) or labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise DataError(
                "Dataset labels must be a 1-D integer array, got "
                f"{type(labels).__name__} {getattr(labels, 'dtype', '')} {getattr(labels, 'shape', '')}"
            )
        if labels.shape[0] != images.shape[0]:
            raise DataError(f"Dataset has {images.shape[0]} images but {labels.shape[0]} labels")
        names = tuple(self.class_names)
        if not names or not all(isinstance(name, str) for name in names):
            raise DataError(f"Dataset class_names must be a non-empty tuple of str, got {self.class_names!r}")
        if labels.size and (labels.min() < 0 or labels.max() >= len(names)):
            raise DataError(
                f"Dataset labels must lie in 0..{len(names) - 1} ({len(names)} classes), "
                f"found {int(labels.min())}..{int(labels.max())}"
            )
        # Normalise once here so every consumer can trust int64 labels and a tuple.
        if labels.dtype != np.int64:
            object.__setattr__(self, "labels", labels.astype(np.int64))
        object.__setattr__(self, "class_names", names)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def n_classes(self) -> int:
        """Number of classes, ``len(class_names)``."""
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, ...]:
        """Shape of one image: (H, W) or (H, W, C)."""
        return tuple(int(d) for d in self.images.shape[1:])

    def subset(self, indices: np.ndarray | list[int]) -> Dataset:
        """Return the samples at ``indices``, in that order (copies the arrays).

        Parameters
        ----------
        indices : array-like of int, shape (n_selected,), or bool mask of shape (n_samples,)
            Positions to keep; negative positions are not allowed.

        Returns
        -------
        Dataset
            A new dataset with the same class names.

        Raises
        ------
        DataError
            If an index is out of range or the mask has the wrong length.

        Examples
        --------
        >>> import numpy as np
        >>> ds = Dataset(np.arange(12, dtype=np.uint8).reshape(3, 2, 2), np.array([0, 1, 2]), ("a", "b", "c"))
        >>> ds.subset([2, 0]).labels.tolist()
        [2, 0]
        """
        idx = np.asarray(indices)
        if idx.dtype == np.bool_:
            if idx.shape != (len(self),):
                raise DataError(f"subset mask must have shape ({len(self)},), got {idx.shape}")
            idx = np.flatnonzero(idx)
        elif idx.size == 0:
            idx = np.zeros(0, dtype=np.int64)
        elif idx.ndim != 1 or idx.dtype.kind not in "iu":
            raise DataError(f"subset indices must be a 1-D integer array, got {idx.dtype} {idx.shape}")
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise DataError(
                f"subset indices must lie in 0..{len(self) - 1}, found {int(idx.min())}..{int(idx.max())}"
            )
        return Dataset(self.images[idx], self.labels[idx], self.class_names)

    def split_holdout(self, fraction: float, *, seed: int) -> HoldoutSplit:
        """Split off a random held-out part, e.g. for validation or calibration.

        The same ``seed`` always gives the same split. Both parts keep the
        original sample order.

        Parameters
        ----------
        fraction : float
            Share of samples that go to ``val``, strictly between 0 and 1;
            ``round(fraction * n_samples)`` samples are held out.
        seed : int
            Seed of the permutation (``numpy.random.default_rng``).

        Returns
        -------
        HoldoutSplit
            ``train`` and ``val``, disjoint and together all samples.

        Raises
        ------
        DataError
            If ``fraction`` is not in (0, 1) or one part would be empty.

        Examples
        --------
        >>> import numpy as np
        >>> ds = Dataset(np.zeros((10, 2, 2), np.uint8), np.arange(10) % 2, ("a", "b"))
        >>> split = ds.split_holdout(0.2, seed=0)
        >>> len(split.train), len(split.val)
        (8, 2)
        """
        if not 0.0 < float(fraction) < 1.0:
            raise DataError(f"holdout fraction must be strictly between 0 and 1, got {fraction}")
        n_val = int(round(float(fraction) * len(self)))
        if n_val == 0 or n_val == len(self):
            raise DataError(
                f"holdout fraction {fraction} of {len(self)} samples leaves an empty part "
                f"({len(self) - n_val} train, {n_val} val)"
            )
        order = np.random.default_rng(seed).permutation(len(self))
        val_idx = np.sort(order[:n_val])
        train_idx = np.sort(order[n_val:])
        return HoldoutSplit(train=self.subset(train_idx), val=self.subset(val_idx))


@dataclass(frozen=True)
class HoldoutSplit:
    """The two parts of :meth:`Dataset.split_holdout`."""

    train: Dataset
    val: Dataset
