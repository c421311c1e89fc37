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

A registration is validated completely (spec, safetensors weights, and the
parts checked by :mod:`popex.edge.model_parts`) before anything becomes
visible: the files are written into a temporary directory inside
``state_dir`` and renamed into place in one ``os.rename``, so a crash
leaves either no model or a whole one. Every stored model is loaded again
(:func:`popex.edge.stored_model.load_stored_model`) when the registry
opens, so models survive a restart.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path

from popex.data.preprocess import Preprocessing
from popex.decision.latency import Profile
from popex.edge.model_parts import check_calibration_fits, check_expert_parts, read_calibration, read_classifier
from popex.edge.stored_model import (
    MODEL_STATES,
    PROFILE_FILE,
    STATE_FILE,
    Registration,
    StoredModel,
    load_stored_model,
    state_record,
)
from popex.errors import PopexError, ProfileError, SpecError, UnknownModelError
from popex.nets.distortion import CLASSIFIER_DIR
from popex.nets.experts import calibration_file
from popex.nets.io import CALIBRATION_FILE, SPEC_FILE, WEIGHTS_FILE, atomic_write_bytes, load_model_bytes
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

_MODELS_DIR = "models"
_TMP_PREFIX = ".incoming-"


def _fsync_tree(directory: Path) -> None:
    for path in directory.iterdir():
        if path.is_dir():
            _fsync_tree(path)  # the distortion classifier's files
            continue
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())


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
        """Registered model ids, oldest registration first.

        Returns
        -------
        list of str
        """
        models = list(self._models.values())
        return [m.model_id for m in sorted(models, key=lambda m: m.registered_at_s)]

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._models

    def __len__(self) -> int:
        return len(self._models)

    def get(self, model_id: str) -> StoredModel:
        """The stored model ``model_id``.

        Parameters
        ----------
        model_id : str
            As the registration answered it.

        Returns
        -------
        StoredModel

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

        Parameters
        ----------
        spec_bytes, weights_bytes, calibration_bytes : bytes
        expert_calibrations : mapping of str to bytes, optional
        classifier_spec, classifier_weights : bytes, optional
            As for :meth:`register`.

        Returns
        -------
        Registration

        Raises
        ------
        SpecError, WeightsError, CalibrationError
            As for :meth:`register`; nothing is stored in that case.
        """
        for name, data in (("spec", spec_bytes), ("weights", weights_bytes), ("calibration", calibration_bytes)):
            if not isinstance(data, (bytes, bytearray)):
                raise SpecError(f"{name} must be bytes, got {type(data).__name__}")
        expert_calibrations = dict(expert_calibrations or {})
        loaded = load_model_bytes(bytes(spec_bytes), bytes(weights_bytes))
        preprocessing = Preprocessing.from_spec_dict(loaded.spec)
        check_expert_parts(loaded, expert_calibrations, classifier_spec, classifier_weights)
        if loaded.model_id in self._models:
            return Registration(loaded.model_id, created=False)
        classifier = None
        if loaded.net.expert_names:
            classifier = read_classifier(classifier_spec, classifier_weights)  # type: ignore[arg-type]
        incoming = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=self._models_dir))
        try:
            calibration = read_calibration(bytes(calibration_bytes), incoming)
            check_calibration_fits(calibration, loaded)
            experts = {}
            for expert in loaded.net.expert_names:
                file_name = calibration_file(expert)
                experts[expert] = read_calibration(bytes(expert_calibrations[expert]), incoming, file_name)
                check_calibration_fits(experts[expert], loaded, file_name)
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
            (incoming / STATE_FILE).write_text(json.dumps(state_record(model)))
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

        Parameters
        ----------
        directory : str or path-like

        Returns
        -------
        str
            The model id.

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

        Returns
        -------
        StoredModel
            The model, changed in place.

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
            if model.state != state:
                _log.info("model %s: %s -> %s%s", model_id[:12], model.state, state, f" ({error})" if error else "")
            model.state = state
            atomic_write_bytes(model.directory / STATE_FILE, json.dumps(state_record(model)).encode())
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
                model = load_stored_model(entry)
            except (PopexError, OSError, ValueError) as err:
                _log.error("skipping stored model %s: %s", entry.name, err)
                continue
            self._models[model.model_id] = model
