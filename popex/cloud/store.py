"""The cloud's model store: models registered by the edge, in memory and on disk.

Models are registered by the edge (spec JSON + safetensors weights, never a
pickle) and stored under ``<state_dir>/models/<model_id>/``, so they survive
a restart and are shared by every worker process on the same state dir: a
model missing from memory is looked up on disk before it is called unknown.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path

from popex.errors import PopexError, UnknownModelError
from popex.nets.io import SPEC_FILE, WEIGHTS_FILE, LoadedModel, compute_model_id, load_model, load_model_bytes
from popex.nets.spec import parse_spec_json

__all__ = ["MODELS_DIR", "ModelIdMismatchError", "ModelStore"]

log = logging.getLogger(__name__)

MODELS_DIR = "models"
_MODEL_ID_RE = re.compile(r"[0-9a-f]{64}")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; durability is best effort there
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _check_id(model_id: str, computed: str) -> None:
    if model_id != computed:
        raise ModelIdMismatchError(
            f"model id {str(model_id)[:80]!r} does not match its content: spec + weights hash to {computed}; "
            "upload the model under the id popex.nets.io.compute_model_id gives"
        )


class ModelIdMismatchError(PopexError):
    """The id a model was uploaded under is not the sha256 of its spec and weights."""

    code = "model_id_mismatch"


class ModelStore:
    """Registered models and the tensor shape at each of their splits.

    Parameters
    ----------
    state_dir : path
        Directory holding ``models/<model_id>/{spec.json,weights.safetensors}``;
        created if missing. Every model found there is loaded now.

    Notes
    -----
    Thread-safe: registration and lookups take a lock; a model's files are
    written into a temporary directory and renamed into place, so another
    worker never sees half a model.
    """

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.state_dir = Path(state_dir)
        self._models_dir = self.state_dir / MODELS_DIR
        self._models_dir.mkdir(parents=True, exist_ok=True)
        self._models: dict[str, LoadedModel] = {}
        self._shapes: dict[str, list[tuple[int, ...]]] = {}  # per model: shape after each split 0..N
        self._lock = threading.Lock()
        self._store_lock = threading.Lock()
        for directory in sorted(self._models_dir.iterdir()):
            if directory.is_dir() and _MODEL_ID_RE.fullmatch(directory.name):
                self._load_from_disk(directory.name)

    @property
    def n_models(self) -> int:
        """Number of models loaded in this process."""
        with self._lock:
            return len(self._models)

    def _load_from_disk(self, model_id: str) -> LoadedModel | None:
        """Load a stored model; a broken directory is logged and skipped, not fatal."""
        directory = self._models_dir / model_id
        if not (directory / SPEC_FILE).is_file():
            return None
        try:
            loaded = load_model(directory)
        except PopexError as err:
            log.warning("skipping stored model %s: %s", directory, err)
            return None
        if loaded.model_id != model_id:
            log.warning("skipping stored model %s: its content hashes to %s", directory, loaded.model_id)
            return None
        return self._add(loaded)

    def _add(self, loaded: LoadedModel) -> LoadedModel:
        """Make a checked model visible; the first of two concurrent adds wins."""
        shapes = loaded.net.stage_output_shapes()  # a forward pass: done once, outside the lock
        with self._lock:
            if loaded.model_id not in self._models:
                self._shapes[loaded.model_id] = shapes
                self._models[loaded.model_id] = loaded
            return self._models[loaded.model_id]

    def _store(self, model_id: str, spec_bytes: bytes, weights_bytes: bytes) -> None:
        """Write both files into a temporary directory, then rename it into place (atomic)."""
        final = self._models_dir / model_id
        with self._store_lock:
            if (final / SPEC_FILE).is_file():
                return  # stored already, e.g. by another worker process on this state dir
            tmp = Path(tempfile.mkdtemp(dir=self._models_dir, prefix=f".{model_id[:12]}."))
            try:
                _write_file(tmp / WEIGHTS_FILE, weights_bytes)
                _write_file(tmp / SPEC_FILE, spec_bytes)
                os.replace(tmp, final)
                _fsync_dir(self._models_dir)
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
                if not (final / SPEC_FILE).is_file():  # else another process stored it first
                    raise

    def get(self, model_id: str) -> LoadedModel:
        """The registered model ``model_id``.

        Parameters
        ----------
        model_id : str
            sha256 hex of the model's spec and weights.

        Returns
        -------
        LoadedModel

        Raises
        ------
        UnknownModelError
            If no model with this id is registered (here or on disk).
        """
        with self._lock:
            loaded = self._models.get(model_id)
        if loaded is None and isinstance(model_id, str) and _MODEL_ID_RE.fullmatch(model_id):
            loaded = self._load_from_disk(model_id)  # registered by another worker on the same state dir
        if loaded is None:
            raise UnknownModelError(f"model {str(model_id)[:80]!r} is not registered on this cloud; "
                                    "upload it with PUT /api/v1/models/<model_id>")
        return loaded

    def has(self, model_id: str) -> bool:
        """Whether model ``model_id`` is registered.

        Parameters
        ----------
        model_id : str

        Returns
        -------
        bool
        """
        try:
            self.get(model_id)
        except UnknownModelError:
            return False
        return True

    def split_shape(self, model_id: str, split: int) -> tuple[int, ...]:
        """Shape of one sample's tensor after stage ``split`` (0: the input) of a loaded model.

        Parameters
        ----------
        model_id : str
            A model :meth:`get` has returned (the caller checked it exists).
        split : int
            0..N.

        Returns
        -------
        tuple of int
            Without the batch dimension.
        """
        with self._lock:
            return self._shapes[model_id][split]

    def register(self, model_id: str, spec_bytes: bytes, weights_bytes: bytes) -> LoadedModel:
        """Check, store and load a model uploaded by the edge; idempotent.

        Parameters
        ----------
        model_id : str
            The id the edge claims: must be the sha256 of the canonical spec
            followed by the weights (see :func:`popex.nets.io.compute_model_id`).
        spec_bytes : bytes
            The spec JSON.
        weights_bytes : bytes
            The weights, safetensors only (a pickle is refused, never read).

        Returns
        -------
        LoadedModel

        Raises
        ------
        SpecError, WeightsError
            If the spec or the weights are invalid or do not fit each other.
        ModelIdMismatchError
            If the content hashes to another id than ``model_id``.
        """
        if self.has(model_id):
            _check_id(model_id, compute_model_id(parse_spec_json(spec_bytes), weights_bytes))
            return self.get(model_id)
        loaded = load_model_bytes(spec_bytes, weights_bytes)
        _check_id(model_id, loaded.model_id)
        self._store(model_id, spec_bytes, weights_bytes)
        loaded = self._add(loaded)
        log.info("registered model %s (%s, %d stages)", model_id, loaded.spec.get("name"), loaded.net.n_stages)
        return loaded
