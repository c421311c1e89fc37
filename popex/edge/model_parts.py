"""Checks of the parts of an uploaded model, before the model store keeps any of it.

A model is its spec and weights (checked by :func:`popex.nets.io.load_model_bytes`),
one calibration per head set, and, when the spec lists ``"experts"`` (see
:mod:`popex.nets.experts`), the distortion classifier that picks the head set
per image. The checks here say, in one message each, which part is wrong:
a calibration that is not a pickle-free npz, has the wrong number of exits
or classes outside the model's; expert files sent to a model without
experts, or missing from one with them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from popex.decision.calibration import Calibration, load_calibration
from popex.errors import CalibrationError, PopexError, SpecError
from popex.nets.distortion import DistortionClassifier
from popex.nets.experts import calibration_file
from popex.nets.io import CALIBRATION_FILE, LoadedModel

__all__ = ["read_calibration", "check_calibration_fits", "check_expert_parts", "read_classifier"]


def read_calibration(calibration_bytes: bytes, directory: Path, file_name: str = CALIBRATION_FILE) -> Calibration:
    """Write an uploaded calibration into ``directory`` and read it back (``allow_pickle=False``).

    Parameters
    ----------
    calibration_bytes : bytes
        The uploaded .npz.
    directory : Path
        A scratch directory (the registration's temporary one).
    file_name : str
        Its name there, e.g. ``calibration_blur.npz``; named in errors.

    Returns
    -------
    Calibration

    Raises
    ------
    CalibrationError
        If the file is empty or not a valid calibration; the message names
        ``file_name``, not the temporary path.
    """
    what = "calibration" if file_name == CALIBRATION_FILE else file_name
    if not calibration_bytes:
        raise CalibrationError(f"{what} file is empty")
    path = directory / file_name
    path.write_bytes(calibration_bytes)
    try:
        return load_calibration(path)
    except CalibrationError as err:
        # The temporary path means nothing to the sender; name the upload instead.
        raise CalibrationError(str(err).replace(str(path), file_name)) from err


def check_calibration_fits(calibration: Calibration, loaded: LoadedModel, what: str = "calibration") -> None:
    """Check that a calibration has one column per exit of the model and only its classes.

    Parameters
    ----------
    calibration : Calibration
    loaded : LoadedModel
    what : str
        The file named in the message.

    Raises
    ------
    CalibrationError
        On another number of exits, or a label or prediction outside
        ``0..n_classes - 1``.
    """
    net = loaded.net
    if calibration.n_exits != net.n_exits:
        raise CalibrationError(
            f"{what} has {calibration.n_exits} exits (columns) but the model has "
            f"{net.n_exits} ({net.n_branches} branches + the final exit)"
        )
    n_classes = net.n_classes
    for name, array in (("labels", calibration.labels), ("predicted", calibration.predicted)):
        if array.size and (int(array.min()) < 0 or int(array.max()) >= n_classes):
            raise CalibrationError(
                f"{what} {name!r} holds classes outside 0..{n_classes - 1} "
                f"(found {int(array.min())}..{int(array.max())})"
            )


def check_expert_parts(loaded: LoadedModel, expert_calibrations: Mapping[str, bytes],
                       classifier_spec: bytes | None, classifier_weights: bytes | None) -> None:
    """Check that the expert files sent are exactly those the spec's ``experts`` call for.

    Parameters
    ----------
    loaded : LoadedModel
        The checked spec and weights.
    expert_calibrations : mapping of str to bytes
        Expert name -> its calibration .npz, as sent.
    classifier_spec, classifier_weights : bytes or None
        The distortion classifier's files, as sent.

    Raises
    ------
    SpecError
        If a part is not bytes, expert files come with a model without
        experts, or the classifier is missing for a model with them.
    CalibrationError
        If a calibration names an unknown expert or one expert has none.
    """
    experts = loaded.net.expert_names
    sent = [(f"calibration_{e}", b) for e, b in expert_calibrations.items()]
    for name, data in (*sent, ("classifier_spec", classifier_spec), ("classifier_weights", classifier_weights)):
        if data is not None and not isinstance(data, (bytes, bytearray)):
            raise SpecError(f"{name} must be bytes, got {type(data).__name__}")
    has_classifier = classifier_spec is not None or classifier_weights is not None
    if not experts:
        sent = [f"calibration_{e}" for e in expert_calibrations] + (["the distortion classifier"]
                                                                    if has_classifier else [])
        if sent:
            raise SpecError(f"the spec lists no 'experts', so the model takes no expert files; got {sent}")
        return
    unknown = sorted(set(expert_calibrations) - set(experts))
    if unknown:
        raise CalibrationError(f"the model has no expert head set {unknown[0][:32]!r} (its experts are "
                               f"{list(experts)}); drop calibration_{unknown[0][:32]}")
    missing = [calibration_file(e) for e in experts if e not in expert_calibrations]
    if missing:
        raise CalibrationError(f"the model has expert heads {list(experts)} but no calibration for "
                               f"{', '.join(missing)}: send each as the file calibration_<expert>")
    if classifier_spec is None or classifier_weights is None:
        raise SpecError(f"the model has expert heads {list(experts)}, which need the distortion classifier "
                        "that chooses them: send its files classifier_spec and classifier_weights")


def read_classifier(spec_bytes: bytes, weights_bytes: bytes) -> DistortionClassifier:
    """Build the distortion classifier from its spec JSON and safetensors weights.

    Parameters
    ----------
    spec_bytes, weights_bytes : bytes

    Returns
    -------
    DistortionClassifier

    Raises
    ------
    PopexError
        Of the same kind as :meth:`DistortionClassifier.from_bytes` raised,
        its message prefixed with "distortion classifier".
    """
    try:
        return DistortionClassifier.from_bytes(bytes(spec_bytes), bytes(weights_bytes))
    except PopexError as err:
        raise type(err)(f"distortion classifier: {err}") from err
