"""One model in the edge's store: its record (network, calibrations, lifecycle state) and its files.

The record is what the request pipeline and the preparation read;
:func:`load_stored_model` reads one back from the directory the store
(:class:`popex.edge.store.ModelRegistry`) wrote, and :func:`state_record`
is what that store persists of the lifecycle.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from popex.data.preprocess import Preprocessing
from popex.decision.calibration import Calibration, load_calibration
from popex.decision.latency import Profile
from popex.errors import ProfileError, SpecError
from popex.edge.model_parts import CALIBRATION_FILE, calibration_file, check_calibration_fits, read_classifier
from popex.runtime.distortion import CLASSIFIER_DIR, OnnxDistortionClassifier
from popex.runtime.model_files import ONNX_DIR, LoadedModel, load_model_dir

__all__ = [
    "MODEL_STATES",
    "PROFILE_FILE",
    "STATE_FILE",
    "StoredModel",
    "Registration",
    "state_record",
    "directory_bytes",
    "load_stored_model",
]

PROFILE_FILE = "profile.json"
STATE_FILE = "state.json"
#: Lifecycle of a model on the edge: stored and classifiable, being profiled,
#: profiled and planned with measured numbers, or profiling failed (it stays
#: classifiable with the assumed plan).
MODEL_STATES = ("registered", "profiling", "ready", "failed")


@dataclass
class StoredModel:
    """One registered model: its network, calibration and lifecycle state.

    ``state``, ``error``, ``profile`` and ``cloud_profile`` change while the
    model is prepared; each is replaced by one assignment, so readers on
    other threads see either the old or the new value.

    Attributes
    ----------
    model_id : str
        The hash of the registered files (either form).
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
    classifier : OnnxDistortionClassifier or None
        Picks the head set per image; present exactly when the model has experts.
    profile_edge_slowdown : float
        The emulated edge slowdown its stored profile was measured under.
    trusted : bool
        Registered with the admin token (or from the default model directory):
        only such models answer to their name in ``?model=``.
    stored_bytes : int
        Bytes of its directory (what the store's cap counts).
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
    classifier: OnnxDistortionClassifier | None = None
    profile_edge_slowdown: float = 1.0
    trusted: bool = False
    stored_bytes: int = 0

    @property
    def expert_names(self) -> tuple[str, ...]:
        """The model's expert head sets (empty without experts)."""
        return tuple(self.loaded.net.expert_names)

    @property
    def has_experts(self) -> bool:
        """Whether the model has expert head sets (and so a distortion classifier)."""
        return bool(self.expert_names)

    def calibration_of(self, head: str | None) -> Calibration:
        """The calibration of head set ``head``.

        Parameters
        ----------
        head : str or None
            An expert's name; None or "pristine" is the backbone's own.

        Returns
        -------
        Calibration

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


@dataclass(frozen=True)
class Registration:
    """Outcome of :meth:`popex.edge.store.ModelRegistry.add`.

    Attributes
    ----------
    model_id : str
    created : bool
        False when the same spec and weights were already registered.
    """

    model_id: str
    created: bool


def directory_bytes(directory: Path) -> int:
    """Bytes of every file under ``directory``.

    Parameters
    ----------
    directory : Path

    Returns
    -------
    int
    """
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def state_record(model: StoredModel) -> dict[str, Any]:
    """What ``state.json`` holds of a model: its lifecycle state, error, registration time, cloud profile, trust.

    Parameters
    ----------
    model : StoredModel

    Returns
    -------
    dict
        JSON-serialisable.
    """
    return {
        "state": model.state,
        "error": model.error,
        "registered_at_s": model.registered_at_s,
        "cloud_profile": model.cloud_profile,
        "trusted": model.trusted,
    }


def load_stored_model(directory: Path, *, n_threads: int = 1) -> StoredModel:
    """Read a model the store wrote back from ``directory``, checked as at its registration.

    A model whose state was "ready" keeps its stored profile; any other state
    was interrupted by the restart, and the model comes back "registered",
    to be prepared again.

    Parameters
    ----------
    directory : Path
        ``<state_dir>/models/<model_id>``.

    Returns
    -------
    StoredModel

    Raises
    ------
    SpecError, WeightsError, CalibrationError, ProfileError
        If a file no longer validates or the directory is not named by the model's id.
    OSError, ValueError
        If a file cannot be read or its JSON parsed.
    """
    loaded = load_model_dir(directory, n_threads=n_threads, export_to=directory / ONNX_DIR)
    if loaded.model_id != directory.name:
        raise SpecError(f"directory name does not match the model id {loaded.model_id}")
    calibration = load_calibration(directory / CALIBRATION_FILE)
    check_calibration_fits(calibration, loaded)
    experts = {}
    for expert in loaded.net.expert_names:
        experts[expert] = load_calibration(directory / calibration_file(expert))
        check_calibration_fits(experts[expert], loaded, calibration_file(expert))
    classifier = None
    if experts:
        classifier = read_classifier(directory / CLASSIFIER_DIR, n_threads=n_threads)
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
    model.trusted = state.get("trusted") is True
    model.stored_bytes = directory_bytes(directory)
    profile_path = directory / PROFILE_FILE
    if state.get("state") == "ready" and profile_path.is_file():
        data = json.loads(profile_path.read_text())
        profile = Profile.from_dict(data)
        if profile.branch_after_stage != tuple(loaded.net.branch_after_stage):
            raise ProfileError("stored profile does not match the model's branches")
        model.profile = profile
        model.cloud_profile = data.get("cloud_profile")
        model.profile_edge_slowdown = float(data.get("edge_slowdown", 1.0))
        model.state = "ready"
    # Any other state was interrupted by the restart: the model is prepared again.
    return model
