"""Checks of the parts of an uploaded model, before the model store keeps any of it.

A model is its files in either form (ONNX graphs + model.json, or spec +
weights; checked by :func:`popex.runtime.model_files.load_model_dir`), one
calibration per head set, and, when the model has expert head sets (see
:mod:`popex.nets.experts`), the distortion classifier that picks the head set
per image. :func:`split_model_files` sorts an upload's files into those parts. The checks here say, in one message each, which part is wrong:
a calibration that is not a pickle-free npz, has the wrong number of exits
or classes outside the model's; expert files sent to a model without
experts, or missing from one with them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from popex.decision.calibration import CALIBRATION_FILE, Calibration, calibration_file, load_calibration
from popex.errors import CalibrationError, PopexError, SpecError
from popex.runtime.distortion import CLASSIFIER_DIR, OnnxDistortionClassifier
from popex.runtime.model_files import (
    MANIFEST_FILE,
    ONNX_DIR,
    SPEC_FILE,
    WEIGHTS_FILE,
    LoadedModel,
    check_file_path,
    form_files,
    load_model_dir,
)

__all__ = [
    "CALIBRATION_FILE",
    "calibration_file",
    "ModelFiles",
    "split_model_files",
    "check_model_files",
    "read_model_directory",
    "read_calibration",
    "check_calibration_fits",
    "check_expert_parts",
    "read_classifier",
]

_EXPERT_CALIBRATION = re.compile(r"calibration_([A-Za-z_][A-Za-z0-9_]{0,31})\.npz")
#: External data of an ONNX graph: the only files besides those model.json names.
_EXTERNAL_DATA_SUFFIXES = (".data", ".bin")


@dataclass(frozen=True)
class ModelFiles:
    """An upload's files sorted into the model's parts (paths relative to each part's directory)."""

    model: dict[str, bytes]
    calibration: bytes
    expert_calibrations: dict[str, bytes] = field(default_factory=dict)
    classifier: dict[str, bytes] = field(default_factory=dict)


def split_model_files(files: Mapping[str, bytes]) -> ModelFiles:
    """Sort a model directory's files: the model, calibrations, the distortion classifier.

    Parameters
    ----------
    files : mapping of str to bytes
        Path -> content, as uploaded or read from a directory.

    Returns
    -------
    ModelFiles

    Raises
    ------
    SpecError
        If a path is unsafe or a content is not bytes.
    CalibrationError
        If ``calibration.npz`` is missing.
    """
    model: dict[str, bytes] = {}
    experts: dict[str, bytes] = {}
    classifier: dict[str, bytes] = {}
    calibration = None
    for path, data in files.items():
        check_file_path(path)
        if not isinstance(data, (bytes, bytearray)):
            raise SpecError(f"{path} must be bytes, got {type(data).__name__}")
        data = bytes(data)
        match = _EXPERT_CALIBRATION.fullmatch(path)
        if path == CALIBRATION_FILE:
            calibration = data
        elif match is not None:
            experts[match.group(1)] = data
        elif path.startswith(CLASSIFIER_DIR + "/"):
            classifier[path[len(CLASSIFIER_DIR) + 1:]] = data
        else:
            model[path] = data
    if calibration is None:
        raise CalibrationError(f"the model has no {CALIBRATION_FILE}: send the calibration of its exits "
                               "(popex calibrate writes it)")
    return ModelFiles(model=model, calibration=calibration, expert_calibrations=experts, classifier=classifier)


def check_model_files(loaded: LoadedModel, model_files: Mapping[str, bytes]) -> None:
    """Refuse files that are not part of the model's form (a stray upload is an error, not ignored).

    Parameters
    ----------
    loaded : LoadedModel
        The model as loaded from those files.
    model_files : mapping of str to bytes
        What was sent for the model itself (:attr:`ModelFiles.model`).

    Raises
    ------
    SpecError
        Naming the first such file.
    """
    extra = sorted(path for path in model_files if path not in loaded.files
                   and not (loaded.form == "onnx" and path.endswith(_EXTERNAL_DATA_SUFFIXES)))
    if extra:
        wanted = "model.json and the graphs it names" if loaded.form == "onnx" else "spec.json and weights.safetensors"
        raise SpecError(f"file {extra[0][:80]!r} is not part of the model ({wanted}, calibration.npz, "
                        f"calibration_<expert>.npz, {CLASSIFIER_DIR}/)")


def read_model_directory(directory: str | os.PathLike[str]) -> dict[str, bytes]:
    """The files of a model directory that a registration needs (either form), by relative path.

    Cards, profiles and a spec model's ``onnx/`` export are left out; the
    registration makes its own.

    Parameters
    ----------
    directory : path

    Returns
    -------
    dict of str to bytes

    Raises
    ------
    SpecError
        If the model files or calibration.npz are missing.
    """
    directory = Path(directory)
    files = form_files(directory)
    if not (directory / CALIBRATION_FILE).is_file():
        raise SpecError(f"model directory {str(directory)!r} has no {CALIBRATION_FILE}")
    files[CALIBRATION_FILE] = (directory / CALIBRATION_FILE).read_bytes()
    for path in sorted(directory.glob("calibration_*.npz")):
        files[path.name] = path.read_bytes()
    if (directory / CLASSIFIER_DIR).is_dir():
        for path, data in form_files(directory / CLASSIFIER_DIR).items():
            files[f"{CLASSIFIER_DIR}/{path}"] = data
    return files


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


def check_expert_parts(loaded: LoadedModel, expert_calibrations: Mapping[str, bytes], *,
                       has_classifier: bool) -> None:
    """Check that the expert files sent are exactly those the model's expert head sets call for.

    Parameters
    ----------
    loaded : LoadedModel
    expert_calibrations : mapping of str to bytes
        Expert name -> its calibration .npz, as sent.
    has_classifier : bool
        Whether distortion classifier files were sent.

    Raises
    ------
    SpecError
        If expert files come with a model without experts, or the
        classifier is missing for a model with them.
    CalibrationError
        If a calibration names an unknown expert or one expert has none.
    """
    experts = loaded.net.expert_names
    if not experts:
        sent = [f"calibration_{e}" for e in expert_calibrations] + (["the distortion classifier"]
                                                                    if has_classifier else [])
        if sent:
            raise SpecError(f"the model lists no 'experts' (expert head sets), so it takes no expert files; "
                           f"got {sent}")
        return
    unknown = sorted(set(expert_calibrations) - set(experts))
    if unknown:
        raise CalibrationError(f"the model has no expert head set {unknown[0][:32]!r} (its experts are "
                               f"{list(experts)}); drop calibration_{unknown[0][:32]}")
    missing = [calibration_file(e) for e in experts if e not in expert_calibrations]
    if missing:
        raise CalibrationError(f"the model has expert heads {list(experts)} but no calibration for "
                               f"{', '.join(missing)}: send each as the file calibration_<expert>")
    if not has_classifier:
        raise SpecError(f"the model has expert heads {list(experts)}, which need the distortion classifier "
                        f"that chooses them: send its files under {CLASSIFIER_DIR}/ (classifier_spec and "
                        "classifier_weights for a spec-form classifier)")


def read_classifier(directory: Path, *, n_threads: int = 1) -> OnnxDistortionClassifier:
    """Load the distortion classifier from its directory (either form; a spec one is converted).

    Parameters
    ----------
    directory : Path
        ``<model>/distortion-classifier``; a spec one's export is written into its ``onnx/``.
    n_threads : int

    Returns
    -------
    OnnxDistortionClassifier

    Raises
    ------
    PopexError
        Of the kind the load raised, its message prefixed with "distortion classifier".
    """
    if not (directory / MANIFEST_FILE).is_file():
        for name, field_name in ((SPEC_FILE, "classifier_spec"), (WEIGHTS_FILE, "classifier_weights")):
            if not (directory / name).is_file():
                raise SpecError(f"distortion classifier: {CLASSIFIER_DIR}/{name} (multipart field {field_name}) "
                                f"is missing, or send its ONNX form ({CLASSIFIER_DIR}/{MANIFEST_FILE})")
    try:
        loaded = load_model_dir(directory, n_threads=n_threads, export_to=directory / ONNX_DIR)
        return OnnxDistortionClassifier(loaded.net, model_id=loaded.model_id)
    except PopexError as err:
        raise type(err)(f"distortion classifier: {err}") from err
