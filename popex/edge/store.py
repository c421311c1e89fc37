"""The edge's on-disk model store.

Layout::

    <state_dir>/models/<model_id>/spec.json
                                  weights.safetensors
                                  calibration.npz
                                  calibration_<expert>.npz         (models with expert heads)
                                  distortion-classifier/spec.json  (models with expert heads)
                                  distortion-classifier/weights.safetensors
                                  profile.json      (once profiled)
                                  state.json        (lifecycle state, error)

A model whose spec lists ``"experts"`` (see :mod:`popex.nets.experts`) also
carries one calibration per expert head set and the distortion classifier
that picks the head set per image; a model without experts carries neither.

A registration is validated completely (spec, safetensors weights, every
calibration read with ``allow_pickle=False``, one calibration column per
exit, the classifier's spec and safetensors weights) before anything becomes visible: the files are written into a
temporary directory inside ``state_dir`` and renamed into place in one
``os.rename``, so a crash leaves either no model or a whole one. Every stored
model is loaded again when the registry opens, so models survive a restart.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from popex.data.preprocess import Preprocessing
from popex.decision.calibration import Calibration, load_calibration
from popex.decision.latency import Profile
from popex.errors import CalibrationError, PopexError, ProfileError, SpecError, UnknownModelError
from popex.nets.distortion import CLASSIFIER_DIR, DistortionClassifier
from popex.nets.experts import calibration_file
from popex.nets.io import (
    CALIBRATION_FILE,
    SPEC_FILE,
    WEIGHTS_FILE,
    LoadedModel,
    atomic_write_bytes,
    load_model_bytes,
)
from popex.nets.spec import parse_spec_json

__all__ = [
    "MODEL_STATES",
    "PROFILE_FILE",
    "STATE_FILE",
    "UnknownModelError",
    "StoredModel",
    "Registration",
    "ModelRegistry",
]

_log = logging.getLogger(__name__)

PROFILE_FILE = "profile.json"
STATE_FILE = "state.json"
#: Lifecycle of a model on the edge: stored and classifiable, being profiled,
#: profiled and planned with measured numbers, or profiling failed (it stays
#: classifiable with the assumed plan).
MODEL_STATES = ("registered", "profiling", "ready", "failed")
_MODELS_DIR = "models"
_TMP_PREFIX = ".incoming-"


def _read_calibration(calibration_bytes: bytes, directory: Path, file_name: str = CALIBRATION_FILE) -> Calibration:
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


def _check_calibration_fits(calibration: Calibration, loaded: LoadedModel, what: str = "calibration") -> None:
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


def _check_expert_parts(loaded: LoadedModel, expert_calibrations: Mapping[str, bytes],
                        classifier_spec: bytes | None, classifier_weights: bytes | None) -> None:
    """The expert files sent must be exactly those the spec's ``experts`` call for."""
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


def _read_classifier(spec_bytes: bytes, weights_bytes: bytes) -> DistortionClassifier:
    try:
        return DistortionClassifier.from_bytes(bytes(spec_bytes), bytes(weights_bytes))
    except PopexError as err:
        raise type(err)(f"distortion classifier: {err}") from err


@dataclass
class StoredModel:
    """One registered model: its network, calibration and lifecycle state.

    ``state``, ``error``, ``profile`` and ``cloud_profile`` change while the
    model is prepared; each is replaced by one assignment, so readers on
    other threads see either the old or the new value.

    Attributes
    ----------
    model_id : str
        sha256 of the canonical spec and the weights.
    loaded : LoadedModel
        The built network and its artifacts.
    calibration : Calibration
        The pristine head set's (the backbone's own).
    preprocessing : Preprocessing
        From the spec; used on every uploaded image.
    directory : Path
        Where the artifacts live.
    state : str
        One of :data:`MODEL_STATES`.
    error : str or None
        Why preparation failed (state "failed").
    profile : Profile or None
        The measured profile, once prepared.
    cloud_profile : str or None
        "measured" (the cloud timed its stages) or "assumed" (cloud = edge / speedup).
    registered_at_s : float
        Unix time of the registration.
    expert_calibrations : dict of str to Calibration
        One per expert head set (empty for a model without experts).
    classifier : DistortionClassifier or None
        Picks the head set per image; present exactly when the model has experts.
    """

    model_id: str
    loaded: LoadedModel
    calibration: Calibration
    preprocessing: Preprocessing
    directory: Path
    state: str = "registered"
    error: str | None = None
    profile: Profile | None = None
    cloud_profile: str | None = None
    registered_at_s: float = field(default_factory=time.time)
    expert_calibrations: dict[str, Calibration] = field(default_factory=dict)
    classifier: DistortionClassifier | None = None

    @property
    def expert_names(self) -> tuple[str, ...]:
        """The model's expert head sets (empty without experts)."""
        return tuple(self.loaded.net.expert_names)

    @property
    def has_experts(self) -> bool:
        """Whether the model has expert head sets (and so a distortion classifier)."""
        return bool(self.expert_names)

    def calibration_of(self, head: str | None) -> Calibration:
        """The calibration of head set ``head`` (None or "pristine": the backbone's own).

        Raises
        ------
        UnknownHeadError
            If the model has no such head set.
        """
        expert = self.loaded.net.check_head(head)
        return self.calibration if expert is None else self.expert_calibrations[expert]

    @property
    def name(self) -> str:
        """The spec's ``name`` (the model id's prefix when the spec has none)."""
        return str(self.loaded.spec.get("name") or self.model_id[:12])

    @property
    def class_names(self) -> tuple[str, ...]:
        """Class names, in label order."""
        return tuple(self.loaded.net.class_names)

    def artifact_bytes(self) -> tuple[bytes, bytes]:
        """(spec JSON bytes, weights bytes) as stored, e.g. to push to the cloud."""
        return (self.directory / SPEC_FILE).read_bytes(), self.loaded.weights_bytes


@dataclass(frozen=True)
class Registration:
    """Outcome of :meth:`ModelRegistry.add`.

    Attributes
    ----------
    model_id : str
    created : bool
        False when the same spec and weights were already registered.
    """

    model_id: str
    created: bool


class ModelRegistry:
    """Registered models, stored under ``<state_dir>/models`` and kept in memory.

    Parameters
    ----------
    state_dir : str or path-like
        Created if missing. Opening the registry loads every stored model
        (a directory that no longer validates is logged and skipped) and
        removes leftovers of interrupted registrations. No thread is started.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as state_dir:
    ...     ModelRegistry(state_dir).ids()
    []
    """

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.state_dir = Path(state_dir)
        self._models_dir = self.state_dir / _MODELS_DIR
        self._models_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._models: dict[str, StoredModel] = {}
        self._load_stored()

    # -- reading ------------------------------------------------------------------

    def ids(self) -> list[str]:
        """Registered model ids, oldest registration first."""
        models = list(self._models.values())
        return [m.model_id for m in sorted(models, key=lambda m: m.registered_at_s)]

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._models

    def __len__(self) -> int:
        return len(self._models)

    def get(self, model_id: str) -> StoredModel:
        """The stored model ``model_id``.

        Raises
        ------
        UnknownModelError
            If no model with that id is registered.
        """
        model = self._models.get(model_id) if isinstance(model_id, str) else None
        if model is None:
            raise UnknownModelError(f"no model {model_id!r} is registered on this edge")
        return model

    # -- writing ------------------------------------------------------------------

    def register(self, spec_bytes: bytes, weights_bytes: bytes, calibration_bytes: bytes, *,
                 expert_calibrations: Mapping[str, bytes] | None = None, classifier_spec: bytes | None = None,
                 classifier_weights: bytes | None = None) -> str:
        """Validate and store a model; return its id (idempotent).

        Parameters
        ----------
        spec_bytes : bytes
            spec.json.
        weights_bytes : bytes
            weights.safetensors (never unpickled).
        calibration_bytes : bytes
            calibration.npz (read with ``allow_pickle=False``).
        expert_calibrations : mapping of str to bytes, optional
            Expert name -> its calibration .npz; required, one per expert,
            when the spec lists ``experts``, refused otherwise.
        classifier_spec, classifier_weights : bytes, optional
            The distortion classifier's spec.json and weights.safetensors;
            required with experts, refused without.

        Returns
        -------
        str
            The model id.

        Raises
        ------
        SpecError, WeightsError, CalibrationError
            One clear message; nothing is stored in that case.

        See Also
        --------
        add : the same, also saying whether the model is new.
        """
        return self.add(spec_bytes, weights_bytes, calibration_bytes, expert_calibrations=expert_calibrations,
                        classifier_spec=classifier_spec, classifier_weights=classifier_weights).model_id

    def add(self, spec_bytes: bytes, weights_bytes: bytes, calibration_bytes: bytes, *,
            expert_calibrations: Mapping[str, bytes] | None = None, classifier_spec: bytes | None = None,
            classifier_weights: bytes | None = None) -> Registration:
        """Validate and store a model; say whether it was new.

        See :meth:`register` for parameters and errors.
        """
        for name, data in (("spec", spec_bytes), ("weights", weights_bytes), ("calibration", calibration_bytes)):
            if not isinstance(data, (bytes, bytearray)):
                raise SpecError(f"{name} must be bytes, got {type(data).__name__}")
        expert_calibrations = dict(expert_calibrations or {})
        loaded = load_model_bytes(bytes(spec_bytes), bytes(weights_bytes))
        preprocessing = Preprocessing.from_spec_dict(loaded.spec)
        _check_expert_parts(loaded, expert_calibrations, classifier_spec, classifier_weights)
        if loaded.model_id in self._models:
            return Registration(loaded.model_id, created=False)
        classifier = None
        if loaded.net.expert_names:
            classifier = _read_classifier(classifier_spec, classifier_weights)  # type: ignore[arg-type]
        incoming = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=self._models_dir))
        try:
            calibration = _read_calibration(bytes(calibration_bytes), incoming)
            _check_calibration_fits(calibration, loaded)
            experts = {}
            for expert in loaded.net.expert_names:
                file_name = calibration_file(expert)
                experts[expert] = _read_calibration(bytes(expert_calibrations[expert]), incoming, file_name)
                _check_calibration_fits(experts[expert], loaded, file_name)
            (incoming / SPEC_FILE).write_bytes(bytes(spec_bytes))
            (incoming / WEIGHTS_FILE).write_bytes(loaded.weights_bytes)
            if classifier is not None and classifier_spec is not None and classifier_weights is not None:
                (incoming / CLASSIFIER_DIR).mkdir()
                (incoming / CLASSIFIER_DIR / SPEC_FILE).write_bytes(bytes(classifier_spec))
                (incoming / CLASSIFIER_DIR / WEIGHTS_FILE).write_bytes(bytes(classifier_weights))
            model = StoredModel(
                model_id=loaded.model_id,
                loaded=loaded,
                calibration=calibration,
                preprocessing=preprocessing,
                directory=self._models_dir / loaded.model_id,
                expert_calibrations=experts,
                classifier=classifier,
            )
            (incoming / STATE_FILE).write_text(json.dumps(_state_dict(model)))
            _fsync_tree(incoming)
            with self._lock:
                if loaded.model_id in self._models:
                    return Registration(loaded.model_id, created=False)
                if model.directory.exists():
                    # On disk but not loaded: it failed validation at start; replace it.
                    _log.warning("replacing unreadable stored copy of model %s", loaded.model_id)
                    shutil.rmtree(model.directory)
                os.rename(incoming, model.directory)
                self._models[loaded.model_id] = model
            return Registration(loaded.model_id, created=True)
        finally:
            shutil.rmtree(incoming, ignore_errors=True)

    def register_directory(self, directory: str | os.PathLike[str]) -> str:
        """Register the spec, weights and calibration files found in ``directory``.

        A spec with ``experts`` also needs ``calibration_<expert>.npz`` for
        each and ``distortion-classifier/{spec.json,weights.safetensors}``
        (the layout ``popex train-experts`` writes).

        Raises
        ------
        SpecError
            If a file is missing; otherwise as :meth:`register`.
        """
        directory = Path(directory)
        paths = [directory / name for name in (SPEC_FILE, WEIGHTS_FILE, CALIBRATION_FILE)]
        for path in paths:
            if not path.is_file():
                raise SpecError(f"model directory {str(directory)!r} has no {path.name}")
        spec_bytes, weights_bytes, calibration_bytes = (path.read_bytes() for path in paths)
        experts = parse_spec_json(spec_bytes).get("experts", [])
        extra = [directory / calibration_file(e) for e in experts]
        if experts:
            extra += [directory / CLASSIFIER_DIR / SPEC_FILE, directory / CLASSIFIER_DIR / WEIGHTS_FILE]
        for path in extra:
            if not path.is_file():
                raise SpecError(f"model directory {str(directory)!r} has expert heads {experts} but no "
                                f"{path.relative_to(directory)}")
        classifier_spec = classifier_weights = None
        if experts:
            classifier_spec, classifier_weights = extra[-2].read_bytes(), extra[-1].read_bytes()
        expert_calibrations = {e: (directory / calibration_file(e)).read_bytes() for e in experts}
        return self.register(spec_bytes, weights_bytes, calibration_bytes, expert_calibrations=expert_calibrations,
                             classifier_spec=classifier_spec, classifier_weights=classifier_weights)

    def set_state(
        self,
        model_id: str,
        state: str,
        *,
        error: str | None = None,
        profile: Profile | None = None,
        cloud_profile: str | None = None,
    ) -> StoredModel:
        """Move a model to ``state`` and persist it (profile.json, state.json).

        Parameters
        ----------
        model_id : str
        state : str
            One of :data:`MODEL_STATES`.
        error : str, optional
            Kept with state "failed".
        profile : Profile, optional
            Stored when given (the measured profile).
        cloud_profile : {"measured", "assumed"}, optional
            How the cloud times in ``profile`` were obtained.

        Raises
        ------
        UnknownModelError, ProfileError
        """
        if state not in MODEL_STATES:
            raise ProfileError(f"model state must be one of {MODEL_STATES}, got {state!r}")
        model = self.get(model_id)
        with self._lock:
            if profile is not None:
                data = {**profile.to_dict(), "cloud_profile": cloud_profile}
                atomic_write_bytes(model.directory / PROFILE_FILE, (json.dumps(data, indent=2) + "\n").encode())
                model.profile = profile
                model.cloud_profile = cloud_profile
            model.error = error
            model.state = state
            atomic_write_bytes(model.directory / STATE_FILE, json.dumps(_state_dict(model)).encode())
        return model

    # -- private ------------------------------------------------------------------

    def _load_stored(self) -> None:
        for entry in sorted(self._models_dir.iterdir()):
            if entry.name.startswith(_TMP_PREFIX):
                shutil.rmtree(entry, ignore_errors=True)  # an interrupted registration
                continue
            if not entry.is_dir():
                continue
            try:
                model = _load_directory(entry)
            except (PopexError, OSError, ValueError) as err:
                _log.error("skipping stored model %s: %s", entry.name, err)
                continue
            self._models[model.model_id] = model


def _state_dict(model: StoredModel) -> dict[str, Any]:
    return {
        "state": model.state,
        "error": model.error,
        "registered_at_s": model.registered_at_s,
        "cloud_profile": model.cloud_profile,
    }


def _fsync_tree(directory: Path) -> None:
    for path in directory.iterdir():
        if path.is_dir():
            _fsync_tree(path)  # the distortion classifier's files
            continue
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())


def _load_directory(directory: Path) -> StoredModel:
    loaded = load_model_bytes((directory / SPEC_FILE).read_bytes(), (directory / WEIGHTS_FILE).read_bytes())
    if loaded.model_id != directory.name:
        raise SpecError(f"directory name does not match the model id {loaded.model_id}")
    calibration = load_calibration(directory / CALIBRATION_FILE)
    _check_calibration_fits(calibration, loaded)
    experts = {}
    for expert in loaded.net.expert_names:
        experts[expert] = load_calibration(directory / calibration_file(expert))
        _check_calibration_fits(experts[expert], loaded, calibration_file(expert))
    classifier = None
    if experts:
        classifier = _read_classifier((directory / CLASSIFIER_DIR / SPEC_FILE).read_bytes(),
                                      (directory / CLASSIFIER_DIR / WEIGHTS_FILE).read_bytes())
    model = StoredModel(
        model_id=loaded.model_id,
        loaded=loaded,
        calibration=calibration,
        preprocessing=Preprocessing.from_spec_dict(loaded.spec),
        directory=directory,
        expert_calibrations=experts,
        classifier=classifier,
    )
    state: Mapping[str, Any] = {}
    state_path = directory / STATE_FILE
    if state_path.is_file():
        state = json.loads(state_path.read_text())
    model.registered_at_s = float(state.get("registered_at_s", directory.stat().st_mtime))
    profile_path = directory / PROFILE_FILE
    if state.get("state") == "ready" and profile_path.is_file():
        data = json.loads(profile_path.read_text())
        profile = Profile.from_dict(data)
        if profile.branch_after_stage != tuple(loaded.net.branch_after_stage):
            raise ProfileError("stored profile does not match the model's branches")
        model.profile = profile
        model.cloud_profile = data.get("cloud_profile")
        model.state = "ready"
    # Any other state was interrupted by the restart: the model is prepared again.
    return model
