"""Turn uint8 images into the normalised float32 NCHW tensor a model expects.

The same function serves training (a batch of 60,000 images) and the edge
(one uploaded image), so both see exactly the same pixels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from popex.errors import DataError, SpecError

__all__ = ["CHANNEL_MISMATCH_POLICIES", "Preprocessing", "preprocess"]

CHANNEL_MISMATCH_POLICIES = ("convert", "error")
"""``"convert"``: colour -> gray (cv2 weights) or gray -> colour (repeat);
``"error"``: raise DataError when the image's channels differ from the model's."""

_SPEC_KEYS = ("input_shape", "mean", "std")
_POLICY_KEY = "on_channel_mismatch"
_DEFAULT_POLICY = "convert"


def _as_nhwc(images: np.ndarray, is_batch: bool | None) -> np.ndarray:
    """View ``images`` as (n, H, W, C) without copying."""
    if images.ndim == 2:
        return images[None, :, :, None]
    if images.ndim == 4:
        return images
    if images.ndim == 3:
        # (H, W, C) and (n, H, W) share a rank; a last axis of 1, 3 or 4 means
        # channels, since no real batch of gray images is 1, 3 or 4 pixels wide.
        single = images.shape[-1] in (1, 3, 4) if is_batch is None else not is_batch
        return images[None] if single else images[..., None]
    raise DataError(
        f"images must have shape (H, W), (H, W, C), (n, H, W) or (n, H, W, C), got {images.shape}"
    )


def _resize_nhwc(images: np.ndarray, height_px: int, width_px: int) -> np.ndarray:
    # One cv2.resize per image: stacking images as channels is faster but
    # rounds differently for some scale factors, and training and serving
    # must produce identical pixels.
    n_channels = images.shape[-1]
    out = np.empty((images.shape[0], height_px, width_px, n_channels), dtype=np.uint8)
    for i, image in enumerate(images):
        resized = cv2.resize(image, (width_px, height_px), interpolation=cv2.INTER_AREA)
        out[i] = resized.reshape(height_px, width_px, n_channels)
    return out


@dataclass(frozen=True)
class Preprocessing:
    """What a model expects as input, as stored in its JSON spec.

    Parameters
    ----------
    input_shape : (int, int, int)
        (C, H, W) of one input; C is 1 (grayscale) or 3 (RGB).
    mean, std : tuple of float, one per channel
        ``x = (pixel / 255 - mean[c]) / std[c]``; every std > 0.
    on_channel_mismatch : {"convert", "error"}, default "convert"
        What :func:`preprocess` does with an image whose channel count
        differs from C: convert it, or raise DataError.

    Raises
    ------
    SpecError
        If a value is out of range or the lengths do not match C.

    Examples
    --------
    >>> p = Preprocessing.from_spec_dict({"input_shape": [1, 28, 28], "mean": [0.5], "std": [0.5]})
    >>> p.n_channels, p.height_px, p.width_px
    (1, 28, 28)
    >>> p.to_dict()
    {'input_shape': [1, 28, 28], 'mean': [0.5], 'std': [0.5]}
    """

    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    on_channel_mismatch: str = _DEFAULT_POLICY

    def __post_init__(self) -> None:
        try:
            shape = tuple(int(d) for d in self.input_shape)
            mean = tuple(float(m) for m in self.mean)
            std = tuple(float(s) for s in self.std)
        except (TypeError, ValueError) as err:
            raise SpecError(
                f"preprocessing needs numeric input_shape, mean and std, got "
                f"{self.input_shape!r}, {self.mean!r}, {self.std!r}"
            ) from err
        if len(shape) != 3 or shape[0] not in (1, 3) or min(shape[1:]) < 1:
            raise SpecError(f"input_shape must be (C, H, W) with C in {{1, 3}} and H, W >= 1, got {shape}")
        if len(mean) != shape[0] or len(std) != shape[0]:
            raise SpecError(
                f"mean and std need one value per channel ({shape[0]}), got {len(mean)} and {len(std)}"
            )
        if not all(np.isfinite(mean)) or not all(np.isfinite(s) and s > 0 for s in std):
            raise SpecError(f"mean must be finite and std finite and > 0, got mean {mean}, std {std}")
        if self.on_channel_mismatch not in CHANNEL_MISMATCH_POLICIES:
            raise SpecError(
                f"on_channel_mismatch must be one of {CHANNEL_MISMATCH_POLICIES}, got {self.on_channel_mismatch!r}"
            )
        object.__setattr__(self, "input_shape", shape)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @property
    def n_channels(self) -> int:
        """C of ``input_shape``."""
        return self.input_shape[0]

    @property
    def height_px(self) -> int:
        """H of ``input_shape``."""
        return self.input_shape[1]

    @property
    def width_px(self) -> int:
        """W of ``input_shape``."""
        return self.input_shape[2]

    @classmethod
    def from_spec_dict(cls, spec: Mapping[str, Any]) -> Preprocessing:
        """Build from a model spec mapping; keys other than ours are ignored.

        Parameters
        ----------
        spec : mapping
            Needs ``"input_shape"``, ``"mean"``, ``"std"``; may have
            ``"on_channel_mismatch"`` (default ``"convert"``).

        Returns
        -------
        Preprocessing

        Raises
        ------
        SpecError
            If a key is missing or a value is invalid.
        """
        if not isinstance(spec, Mapping):
            raise SpecError(f"preprocessing spec must be a JSON object, got {type(spec).__name__}")
        missing = [key for key in _SPEC_KEYS if key not in spec]
        if missing:
            raise SpecError(f"model spec lacks preprocessing keys: {', '.join(missing)}")
        for key in _SPEC_KEYS:
            if isinstance(spec[key], (str, bytes)) or not isinstance(spec[key], Sequence):
                raise SpecError(f"model spec key {key!r} must be a list, got {spec[key]!r}")
        return cls(
            input_shape=tuple(spec["input_shape"]),
            mean=tuple(spec["mean"]),
            std=tuple(spec["std"]),
            on_channel_mismatch=spec.get(_POLICY_KEY, _DEFAULT_POLICY),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict for the model spec.

        ``"on_channel_mismatch"`` is written only when it is not the default,
        so a default spec holds exactly ``input_shape``, ``mean``, ``std``.
        """
        out: dict[str, Any] = {
            "input_shape": list(self.input_shape),
            "mean": list(self.mean),
            "std": list(self.std),
        }
        if self.on_channel_mismatch != _DEFAULT_POLICY:
            out[_POLICY_KEY] = self.on_channel_mismatch
        return out


def preprocess(
    images: np.ndarray | Sequence[np.ndarray],
    preprocessing: Preprocessing,
    *,
    is_batch: bool | None = None,
) -> np.ndarray:
    """Convert uint8 images to the model's normalised float32 input.

    Steps: drop an alpha channel; match channels (RGB -> gray with
    ``cv2.COLOR_RGB2GRAY`` weights, gray -> RGB by repetition); resize to
    H x W with ``cv2.INTER_AREA`` if the size differs; scale to [0, 1];
    subtract ``mean`` and divide by ``std`` per channel.

    Parameters
    ----------
    images : numpy.ndarray of uint8, or a sequence of them
        One image (H, W) or (H, W, C), or a batch (n, H, W) or (n, H, W, C),
        C in {1, 3, 4}, colour as RGB(A). A sequence may mix sizes.
    preprocessing : Preprocessing
        Target shape and normalisation.
    is_batch : bool or None, default None
        Only for 3-D arrays, which are ambiguous: None treats a last axis of
        1, 3 or 4 as channels (one image) and anything else as a gray batch.

    Returns
    -------
    numpy.ndarray of float32, shape (n, C, H, W)
        n is 1 for a single image.

    Raises
    ------
    DataError
        If the dtype is not uint8, the shape is not one of the above, or the
        channels differ and the policy is ``"error"``.

    Examples
    --------
    >>> import numpy as np
    >>> p = Preprocessing((3, 2, 2), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    >>> x = preprocess(np.full((4, 4), 255, np.uint8), p)
    >>> x.shape, x.dtype, float(x.min()), float(x.max())
    ((1, 3, 2, 2), dtype('float32'), 1.0, 1.0)
    """
    if not isinstance(preprocessing, Preprocessing):
        raise DataError(f"preprocessing must be a Preprocessing, got {type(preprocessing).__name__}")
    if not isinstance(images, np.ndarray):
        if not isinstance(images, Sequence) or len(images) == 0:
            raise DataError("images must be a uint8 array or a non-empty sequence of them")
        return np.concatenate([preprocess(np.asarray(im), preprocessing, is_batch=False) for im in images])
    if images.dtype != np.uint8:
        raise DataError(f"images must be uint8 (0..255), got {images.dtype}")
    batch = _as_nhwc(images, is_batch)
    n_images, height_px, width_px, n_channels_in = batch.shape
    if n_channels_in not in (1, 3, 4):
        raise DataError(f"images must have 1, 3 or 4 channels, got {n_channels_in} (shape {images.shape})")
    if n_images == 0 or height_px == 0 or width_px == 0:
        raise DataError(f"images must not be empty, got shape {images.shape}")
    if n_channels_in == 4:
        batch = batch[..., :3]
        n_channels_in = 3
    target_channels = preprocessing.n_channels
    if n_channels_in != target_channels and preprocessing.on_channel_mismatch == "error":
        raise DataError(
            f"images have {n_channels_in} channel(s) but the model takes {target_channels} "
            "and this model's preprocessing does not convert"
        )
    if n_channels_in == 3 and target_channels == 1:
        # cvtColor works pixel by pixel, so the whole batch goes through as one tall image.
        tall = np.ascontiguousarray(batch).reshape(n_images * height_px, width_px, 3)
        batch = cv2.cvtColor(tall, cv2.COLOR_RGB2GRAY).reshape(n_images, height_px, width_px, 1)
    if (height_px, width_px) != (preprocessing.height_px, preprocessing.width_px):
        batch = _resize_nhwc(np.ascontiguousarray(batch), preprocessing.height_px, preprocessing.width_px)
    # (pixel / 255 - mean) / std == pixel * scale - offset, written straight into
    # the NCHW output (one multiply and one subtract per value, no temporaries);
    # a gray source feeds every output channel, which is the gray -> colour repeat.
    out = np.empty(
        (n_images, target_channels, preprocessing.height_px, preprocessing.width_px), dtype=np.float32
    )
    for c in range(target_channels):
        scale = np.float32(1.0 / (255.0 * preprocessing.std[c]))
        offset = np.float32(preprocessing.mean[c] / preprocessing.std[c])
        source = batch[..., c if batch.shape[-1] == target_channels else 0]
        np.multiply(source, scale, out=out[:, c], dtype=np.float32)
        out[:, c] -= offset
    return out
