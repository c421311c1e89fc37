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

import contextlib
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

from popex.data.preprocess import Preprocessing
from popex.decision.latency import Profile
from popex.edge.model_parts import (
    check_calibration_fits,
    check_expert_parts,
    check_model_files,
    read_calibration,
    read_classifier,
    read_model_directory,
    split_model_files,
)
from popex.edge.stored_model import (
    MODEL_STATES,
    PROFILE_FILE,
    STATE_FILE,
    Registration,
    StoredModel,
    directory_bytes,
    load_stored_model,
    state_record,
)
from popex.errors import ConflictError, PopexError, ProfileError, UnknownModelError
from popex.runtime.distortion import CLASSIFIER_DIR
from popex.runtime.model_files import (
    ONNX_DIR,
    SPEC_FILE,
    WEIGHTS_FILE,
    atomic_write_bytes,
    files_model_id,
    form_files,
    load_model_dir,
    write_files,
)
from popex.edge.model_parts import CALIBRATION_FILE, calibration_file

__all__ = ["MODEL_STATES", "PROFILE_FILE", "STATE_FILE", "UnknownModelError", "StoredModel", "Registration",
           "ModelRegistry"]

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
    n_threads : int
        ONNX Runtime intra-op threads of each session.
    max_n_models, max_store_bytes : int or None
        Most models, and most bytes of their directories, the store holds;
        None: no cap.
    check_stored : callable, optional
        Called with a stored model's files before it is loaded at open (the
        cost caps); whatever PopexError it raises skips the model, logged.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as state_dir:
    ...     ModelRegistry(state_dir).ids()
    []
    """

    def __init__(self, state_dir: str | os.PathLike[str], *, n_threads: int = 1, max_n_models: int | None = None,
                 max_store_bytes: int | None = None,
                 check_stored: Callable[[Mapping[str, bytes]], object] | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.n_threads = n_threads
        self.max_n_models = max_n_models
        self.max_store_bytes = max_store_bytes
        self._check_stored = check_stored
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
                 classifier_weights: bytes | None = None, trusted: bool = False) -> str:
        """Validate and store a spec-form model; return its id (idempotent): :meth:`add` with these files.

        Parameters
        ----------
        spec_bytes, weights_bytes, calibration_bytes : bytes
            spec.json, weights.safetensors (never unpickled), calibration.npz.
        expert_calibrations : mapping of str to bytes, optional
            Expert name -> its calibration .npz.
        classifier_spec, classifier_weights : bytes, optional
            The distortion classifier's spec.json and weights.safetensors.
        trusted : bool
            As for :meth:`add`.

        Returns
        -------
        str
            The model id.

        Raises
        ------
        SpecError, WeightsError, CalibrationError
            As :meth:`add`.
        """
        files = {SPEC_FILE: spec_bytes, WEIGHTS_FILE: weights_bytes, CALIBRATION_FILE: calibration_bytes}
        files.update({calibration_file(e): data for e, data in (expert_calibrations or {}).items()})
        if classifier_spec is not None:
            files[f"{CLASSIFIER_DIR}/{SPEC_FILE}"] = classifier_spec
        if classifier_weights is not None:
            files[f"{CLASSIFIER_DIR}/{WEIGHTS_FILE}"] = classifier_weights
        return self.add(files, trusted=trusted).model_id

    def add(self, files: Mapping[str, bytes], *, trusted: bool = False,
            admit: Callable[[StoredModel], None] | None = None) -> Registration:
        """Validate and store a model given as its directory's files; say whether it was new.

        Parameters
        ----------
        files : mapping of str to bytes
            Path in the model directory -> content (:func:`popex.edge.model_parts.split_model_files`
            says which files a model has): the model in either form, ``calibration.npz``, one
            ``calibration_<expert>.npz`` per expert head set and ``distortion-classifier/``
            for a model with experts.
        trusted : bool
            Registered with the admin token: the model answers to its name,
            which no other model may then take. A known model registered
            again by a trusted caller becomes trusted.
        admit : callable, optional
            Called with the validated model before it becomes visible (the
            preparation plans it there); whatever it raises refuses the model,
            and nothing is stored.

        Returns
        -------
        Registration

        Raises
        ------
        SpecError, WeightsError, CalibrationError, OnnxModelError
            One clear message; nothing is stored in that case.
        ConflictError
            If another model holds the name (a trusted one; any one, for an untrusted caller),
            or the store is full (``max_n_models``, ``max_store_bytes``).
        """
        parts = split_model_files(files)
        model_id = files_model_id(parts.model)
        if model_id in self._models:
            known = self._models[model_id].directory
            sent = {CALIBRATION_FILE: parts.calibration, **{calibration_file(e): data
                                                           for e, data in parts.expert_calibrations.items()}}
            if any(not (known / name).is_file() or (known / name).read_bytes() != data for name, data in sent.items()):
                raise ConflictError(f"model {model_id} is registered with another calibration: DELETE "
                                    "/api/v1/models/<id> it first to register it with this one")
            if trusted and not self._models[model_id].trusted:
                self._trust(self._models[model_id])
            return Registration(model_id, created=False)
        self._check_room(sum(len(data) for data in files.values()))
        incoming = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=self._models_dir))
        try:
            write_files(parts.model, incoming)
            loaded = load_model_dir(incoming, export_to=incoming / ONNX_DIR, n_threads=self.n_threads)
            check_model_files(loaded, parts.model)
            preprocessing = Preprocessing.from_spec_dict(loaded.spec)
            check_expert_parts(loaded, parts.expert_calibrations, has_classifier=bool(parts.classifier))
            classifier = None
            if parts.classifier:
                write_files(parts.classifier, incoming / CLASSIFIER_DIR)
                classifier = read_classifier(incoming / CLASSIFIER_DIR, n_threads=self.n_threads)
            calibration = read_calibration(parts.calibration, incoming)
            check_calibration_fits(calibration, loaded)
            experts = {}
            for expert in loaded.net.expert_names:
                file_name = calibration_file(expert)
                experts[expert] = read_calibration(parts.expert_calibrations[expert], incoming, file_name)
                check_calibration_fits(experts[expert], loaded, file_name)
            model = StoredModel(
                model_id=loaded.model_id,
                loaded=loaded,
                calibration=calibration,
                preprocessing=preprocessing,
                directory=self._models_dir / loaded.model_id,
                expert_calibrations=experts,
                classifier=classifier,
                trusted=trusted,
            )
            (incoming / STATE_FILE).write_text(json.dumps(state_record(model)))
            _fsync_tree(incoming)
            model.stored_bytes = directory_bytes(incoming)
            with self._lock:
                self._check_name_free(model.name, trusted=trusted)
            if admit is not None:
                admit(model)  # outside the lock: planning takes a while
            with self._lock:
                if loaded.model_id in self._models:
                    return Registration(loaded.model_id, created=False)
                self._check_name_free(model.name, trusted=trusted)
                self._check_room(model.stored_bytes, locked=True)
                if model.directory.exists():
                    # On disk but not loaded: it failed validation at start; replace it.
                    _log.warning("replacing unreadable stored copy of model %s", loaded.model_id)
                    shutil.rmtree(model.directory)
                os.rename(incoming, model.directory)
                self._models[loaded.model_id] = model
            return Registration(loaded.model_id, created=True)
        finally:
            shutil.rmtree(incoming, ignore_errors=True)

    def register_directory(self, directory: str | os.PathLike[str], *,
                           admit: Callable[[StoredModel], None] | None = None) -> str:
        """Register the model found in ``directory`` (either form, with its calibrations and experts), trusted:
        the operator configured it.

        Parameters
        ----------
        directory : str or path-like
            The layout ``popex train``, ``popex train-experts`` or ``popex export`` writes.
        admit : callable, optional
            As for :meth:`add`.

        Returns
        -------
        str
            The model id.

        Raises
        ------
        SpecError
            If a file is missing; otherwise as :meth:`add`.
        """
        return self.add(read_model_directory(directory), trusted=True, admit=admit).model_id

    def remove(self, model_id: str) -> StoredModel:
        """Forget a model and delete its directory (renamed aside first, so a crash leaves no half model).

        Parameters
        ----------
        model_id : str

        Returns
        -------
        StoredModel
            The removed record (requests already holding it finish with it).

        Raises
        ------
        UnknownModelError
            If no model with that id is registered.
        """
        model = self.get(model_id)
        with self._lock:
            if self._models.pop(model_id, None) is None:
                raise UnknownModelError(f"no model {model_id!r} is registered on this edge")
            doomed = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=self._models_dir))
            if model.directory.exists():
                os.rename(model.directory, doomed / model_id)
        shutil.rmtree(doomed, ignore_errors=True)
        _log.info("model %s removed", model_id[:12])
        return model

    def set_state(
        self,
        model_id: str,
        state: str,
        *,
        error: str | None = None,
        profile: Profile | None = None,
        cloud_profile: str | None = None,
        profile_edge_slowdown: float = 1.0,
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
        profile_edge_slowdown : float
            The emulated edge slowdown ``profile`` was measured under; a
            start with another one profiles again.

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
                data = {**profile.to_dict(), "cloud_profile": cloud_profile,
                        "edge_slowdown": profile_edge_slowdown}
                atomic_write_bytes(model.directory / PROFILE_FILE, (json.dumps(data, indent=2) + "\n").encode())
                model.profile = profile
                model.cloud_profile = cloud_profile
                model.profile_edge_slowdown = profile_edge_slowdown
            model.error = error
            if model.state != state:
                _log.info("model %s: %s -> %s%s", model_id[:12], model.state, state, f" ({error})" if error else "")
            model.state = state
            atomic_write_bytes(model.directory / STATE_FILE, json.dumps(state_record(model)).encode())
        return model

    # -- private ------------------------------------------------------------------

    def _check_name_free(self, name: str, *, trusted: bool, model_id: str | None = None) -> None:
        """Under the lock: refuse a name another trusted model holds (for an untrusted caller: any model)."""
        for other in self._models.values():
            if other.model_id != model_id and other.name == name and (other.trusted or not trusted):
                raise ConflictError(f"the name {name!r} is taken by model {other.model_id}: give the model "
                                    "another 'name', or DELETE /api/v1/models/<id> the other one first")

    def _check_room(self, n_bytes: int, *, locked: bool = False) -> None:
        """Refuse a model of ``n_bytes`` that the store's caps leave no room for (``locked``: under the lock)."""
        with contextlib.nullcontext() if locked else self._lock:
            n_models, used_bytes = len(self._models), sum(m.stored_bytes for m in self._models.values())
        if self.max_n_models is not None and n_models >= self.max_n_models:
            raise ConflictError(f"the store holds {n_models} models, the most max_n_models allows: "
                                "DELETE /api/v1/models/<id> one first")
        if self.max_store_bytes is not None and used_bytes + n_bytes > self.max_store_bytes:
            raise ConflictError(f"the store holds {used_bytes} bytes of models; this one ({n_bytes} bytes) would "
                                f"pass max_store_bytes ({self.max_store_bytes}): delete a model first")

    def _trust(self, model: StoredModel) -> None:
        with self._lock:
            self._check_name_free(model.name, trusted=True, model_id=model.model_id)
            model.trusted = True
            atomic_write_bytes(model.directory / STATE_FILE, json.dumps(state_record(model)).encode())

    def _load_stored(self) -> None:
        for entry in sorted(self._models_dir.iterdir()):
            if entry.name.startswith(_TMP_PREFIX):
                shutil.rmtree(entry, ignore_errors=True)  # an interrupted registration
                continue
            if not entry.is_dir():
                continue
            try:
                if self._check_stored is not None:
                    self._check_stored(form_files(entry))
                model = load_stored_model(entry, n_threads=self.n_threads)
            except (PopexError, OSError, ValueError) as err:
                _log.error("skipping stored model %s: %s", entry.name, err)
                continue
            self._models[model.model_id] = model
