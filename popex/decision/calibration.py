"""Calibration data: each validation sample's confidence and correctness at every exit.

Every accuracy and exit probability in the strategy table comes from these
arrays (DESIGN.md §2). Exits are ordered as branches ``0..B-1`` followed by
the final exit (index ``B``). The file format is a plain ``.npz`` archive
read with ``allow_pickle=False``: nothing in it is ever unpickled.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np

from popex.errors import CalibrationError, ConfigError
from popex.untrusted import check_npz_headers

__all__ = [
    "CONFIDENCE_METHODS",
    "Calibration",
    "save_calibration",
    "load_calibration",
    "CALIBRATION_FILE",
    "calibration_file",
]

CONFIDENCE_METHODS = ("max_softmax", "entropy")

_ARRAY_KEYS = ("confidence", "predicted", "correct", "labels", "temperature")
_REQUIRED_KEYS = _ARRAY_KEYS + ("confidence_method",)


def _frozen(array: np.ndarray) -> np.ndarray:
    """Return a private read-only copy, so a frozen Calibration stays frozen."""
    array = np.array(array, copy=True)
    array.flags.writeable = False
    return array


def _as_integer(name: str, value: object) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.kind not in "iu":
        raise CalibrationError(
            f"calibration {name!r} must hold integers, got dtype {array.dtype}"
        )
    return array.astype(np.int64)


def _as_bool(name: str, value: object) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.kind == "b":
        return array
    if array.dtype.kind in "iu" and np.all((array == 0) | (array == 1)):
        return array.astype(bool)
    raise CalibrationError(
        f"calibration {name!r} must be boolean (or 0/1 integers), got dtype {array.dtype}"
    )


def _as_float32(name: str, value: object) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.kind not in "fiu":
        raise CalibrationError(
            f"calibration {name!r} must hold real numbers, got dtype {array.dtype}"
        )
    array = array.astype(np.float32)
    if not np.all(np.isfinite(array)):
        raise CalibrationError(f"calibration {name!r} contains NaN or infinite values")
    return array


@dataclass(frozen=True, eq=False)
class Calibration:
    """Per-sample, per-exit confidence and correctness on a validation split.

    Arrays are cast (``float32`` / ``int64`` / ``bool``), copied and made
    read-only on construction; every check lives in ``__post_init__``.
    ``eq=False`` because numpy arrays have no single truth value.

    Parameters
    ----------
    confidence : np.ndarray, shape (n_samples, n_exits), float32
        Confidence of each exit, already temperature-scaled, in [0, 1]. For
        ``"entropy"`` it is ``1 - normalised entropy`` so higher is more
        confident either way.
    predicted : np.ndarray, shape (n_samples, n_exits), int64
        Class predicted by each exit.
    correct : np.ndarray, shape (n_samples, n_exits), bool
        ``predicted == labels[:, None]``; checked.
    labels : np.ndarray, shape (n_samples,), int64
        True class of each sample.
    temperature : np.ndarray, shape (n_exits,), float32
        Temperature used for each exit (> 0).
    confidence_method : str
        ``"max_softmax"`` (default) or ``"entropy"``.

    Raises
    ------
    CalibrationError
        On a wrong dtype, inconsistent shapes, confidences outside [0, 1],
        ``correct`` disagreeing with ``predicted``/``labels``, a
        non-positive temperature or an unknown confidence method.

    Examples
    --------
    >>> cal = Calibration(
    ...     confidence=np.array([[0.9, 0.8], [0.4, 0.7]]),
    ...     predicted=np.array([[1, 1], [0, 2]]),
    ...     correct=np.array([[True, True], [False, True]]),
    ...     labels=np.array([1, 2]),
    ...     temperature=np.ones(2),
    ... )
    >>> cal.n_samples, cal.n_exits, cal.n_branches
    (2, 2, 1)
    """

    confidence: np.ndarray
    predicted: np.ndarray
    correct: np.ndarray
    labels: np.ndarray
    temperature: np.ndarray
    confidence_method: str = "max_softmax"

    def __post_init__(self) -> None:
        confidence = _as_float32("confidence", self.confidence)
        predicted = _as_integer("predicted", self.predicted)
        correct = _as_bool("correct", self.correct)
        labels = _as_integer("labels", self.labels)
        temperature = _as_float32("temperature", self.temperature)

        if confidence.ndim != 2 or confidence.shape[0] < 1 or confidence.shape[1] < 1:
            raise CalibrationError(
                "calibration 'confidence' must have shape (n_samples, n_exits) with "
                f"n_samples >= 1 and n_exits >= 1, got shape {confidence.shape}"
            )
        n_samples, n_exits = confidence.shape
        expected = {
            "predicted": (predicted, (n_samples, n_exits)),
            "correct": (correct, (n_samples, n_exits)),
            "labels": (labels, (n_samples,)),
            "temperature": (temperature, (n_exits,)),
        }
        for name, (array, shape) in expected.items():
            if array.shape != shape:
                raise CalibrationError(
                    f"calibration {name!r} has shape {array.shape} but 'confidence' has "
                    f"shape {confidence.shape}, so {shape} was expected"
                )
        low, high = float(confidence.min()), float(confidence.max())
        if low < 0.0 or high > 1.0:
            raise CalibrationError(
                f"calibration 'confidence' must lie in [0, 1], found values in [{low}, {high}]"
            )
        if not np.all(temperature > 0):
            raise CalibrationError(
                f"calibration 'temperature' must be > 0, got {temperature.tolist()}"
            )
        mismatch = np.flatnonzero(np.any(correct != (predicted == labels[:, None]), axis=1))
        if mismatch.size:
            raise CalibrationError(
                "calibration 'correct' disagrees with predicted == labels for "
                f"{mismatch.size} samples (first: sample {int(mismatch[0])})"
            )
        method = self.confidence_method
        if not isinstance(method, str) or method not in CONFIDENCE_METHODS:
            raise CalibrationError(
                f"calibration confidence_method must be one of {CONFIDENCE_METHODS}, "
                f"got {method!r}"
            )
        for name, array in (
            ("confidence", confidence),
            ("predicted", predicted),
            ("correct", correct),
            ("labels", labels),
            ("temperature", temperature),
        ):
            object.__setattr__(self, name, _frozen(array))

    @property
    def n_samples(self) -> int:
        """Number of validation samples."""
        return int(self.confidence.shape[0])

    @property
    def n_exits(self) -> int:
        """Number of exits, branches plus the final exit."""
        return int(self.confidence.shape[1])

    @property
    def n_branches(self) -> int:
        """Number of side branches (``n_exits - 1``)."""
        return self.n_exits - 1


def save_calibration(calibration: Calibration, path: str | PathLike[str]) -> None:
    """Write a calibration as an uncompressed ``.npz`` archive at exactly ``path``.

    ``confidence_method`` is stored as a 0-d unicode array so that the file
    loads with ``allow_pickle=False``.

    Parameters
    ----------
    calibration : Calibration
        The data to write.
    path : str or path-like
        Destination file; no ``.npz`` suffix is appended.

    Raises
    ------
    CalibrationError
        If ``calibration`` is not a :class:`Calibration`.
    """
    if not isinstance(calibration, Calibration):
        raise CalibrationError(
            f"save_calibration expects a Calibration, got {type(calibration).__name__}"
        )
    # Writing through a file object keeps np.savez from appending ".npz".
    with open(path, "wb") as handle:
        np.savez(
            handle,
            confidence=calibration.confidence,
            predicted=calibration.predicted,
            correct=calibration.correct,
            labels=calibration.labels,
            temperature=calibration.temperature,
            confidence_method=np.array(calibration.confidence_method, dtype=np.str_),
        )


def load_calibration(path: str | PathLike[str]) -> Calibration:
    """Read and validate a calibration ``.npz`` written by :func:`save_calibration`.

    The archive is opened with ``np.load(path, allow_pickle=False)`` only,
    after :func:`popex.untrusted.check_npz_headers` has checked what each
    member declares.

    Parameters
    ----------
    path : str or path-like
        An ``.npz`` archive with the keys ``confidence``, ``predicted``,
        ``correct``, ``labels``, ``temperature`` and ``confidence_method``.

    Returns
    -------
    Calibration
        The validated data.

    Raises
    ------
    CalibrationError
        If the file is missing, not an ``.npz`` archive, holds pickled or
        object arrays, misses a key, or fails :class:`Calibration` checks.
    """
    if not Path(path).is_file():
        raise CalibrationError(f"calibration file not found: {path}")
    # Every member's header first: np.load would allocate whatever a header declares.
    check_npz_headers(path, what=f"calibration file {path}")
    try:
        archive = np.load(path, allow_pickle=False)
    except FileNotFoundError as err:
        raise CalibrationError(f"calibration file not found: {path}") from err
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise CalibrationError(
            f"calibration file {path} is not a readable .npz archive without "
            f"pickled data: {err}"
        ) from err
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise CalibrationError(
            f"calibration file {path} holds a single array, not an .npz archive"
        )
    with archive:
        missing = [key for key in _REQUIRED_KEYS if key not in archive.files]
        if missing:
            raise CalibrationError(
                f"calibration file {path} misses keys {missing}; found {sorted(archive.files)}"
            )
        try:
            arrays = {key: archive[key] for key in _REQUIRED_KEYS}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise CalibrationError(
                f"calibration file {path} holds an unreadable or object (pickled) array: {err}"
            ) from err
    method = arrays.pop("confidence_method")
    if method.ndim != 0 or method.dtype.kind != "U":
        raise CalibrationError(
            f"calibration file {path}: 'confidence_method' must be a 0-d string array, "
            f"got dtype {method.dtype} and shape {method.shape}"
        )
    return Calibration(**arrays, confidence_method=str(method[()]))


CALIBRATION_FILE = "calibration.npz"
"""A model directory's calibration of its pristine heads."""


def calibration_file(head: str) -> str:
    """File name of a head set's calibration in a model directory.

    >>> calibration_file("pristine"), calibration_file("blur")
    ('calibration.npz', 'calibration_blur.npz')
    """
    if not isinstance(head, str) or not head:
        raise ConfigError(f"head must be a non-empty name, got {head!r}")
    return CALIBRATION_FILE if head == "pristine" else f"calibration_{head}.npz"
