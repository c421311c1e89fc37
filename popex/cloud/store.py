"""The cloud's model store: models registered by the edge, in memory and on disk.

Models are registered by the edge in either form (DESIGN.md §2: model.json and
ONNX graphs, or spec JSON + safetensors weights, never a pickle), run by ONNX
Runtime, and stored under ``<state_dir>/models/<model_id>/`` (a spec model
with its ONNX export in ``onnx/``), so they survive
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
import time
from pathlib import Path

from collections.abc import Mapping

from popex.errors import PopexError, UnknownModelError
from popex.runtime.model_files import ONNX_DIR, LoadedModel, files_model_id, load_model_dir, write_files

__all__ = ["MODELS_DIR", "ModelIdMismatchError", "ModelStore"]

log = logging.getLogger(__name__)

MODELS_DIR = "models"
_MODEL_ID_RE = re.compile(r"[0-9a-f]{64}")
_STALE_TMP_S = 600.0  # a temporary directory this old is a crash's leftover


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; durability is best effort there
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _check_id(model_id: str, computed: str) -> None:
    if model_id != computed:
        raise ModelIdMismatchError(
            f"model id {str(model_id)[:80]!r} does not match its content: its files hash to {computed}; "
            "upload the model under the id its registration on the edge answered"
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

    def __init__(self, state_dir: str | os.PathLike[str], *, n_threads: int = 1) -> None:
        self.state_dir = Path(state_dir)
        self.n_threads = n_threads
        self._models_dir = self.state_dir / MODELS_DIR
        self._models_dir.mkdir(parents=True, exist_ok=True)
        self._models: dict[str, LoadedModel] = {}
        self._shapes: dict[str, list[tuple[int, ...]]] = {}  # per model: shape after each split 0..N
        self._lock = threading.Lock()
        self._store_lock = threading.Lock()
        for directory in sorted(self._models_dir.iterdir()):
            if directory.is_dir() and directory.name.startswith("."):
                # a PUT or a delete a crash interrupted (not one another worker is writing now)
                if time.time() - directory.stat().st_mtime > _STALE_TMP_S:
                    shutil.rmtree(directory, ignore_errors=True)
                continue
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
        if not directory.is_dir():
            return None
        try:
            loaded = load_model_dir(directory, n_threads=self.n_threads)
        except (PopexError, OSError) as err:
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

    def remove(self, model_id: str) -> bool:
        """Forget a model and delete its directory (renamed aside first, so no reader sees half of it).

        Parameters
        ----------
        model_id : str

        Returns
        -------
        bool
            False if it was not registered.
        """
        if not isinstance(model_id, str) or not _MODEL_ID_RE.fullmatch(model_id):
            return False
        final = self._models_dir / model_id
        with self._store_lock:
            with self._lock:
                known = self._models.pop(model_id, None) is not None
                self._shapes.pop(model_id, None)
            if not final.is_dir():
                return known
            doomed = Path(tempfile.mkdtemp(dir=self._models_dir, prefix=f".deleted-{model_id[:12]}."))
            os.replace(final, doomed / model_id)
            shutil.rmtree(doomed, ignore_errors=True)
        log.info("removed model %s", model_id)
        return True

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

    def register(self, model_id: str, files: Mapping[str, bytes]) -> LoadedModel:
        """Check, store and load a model uploaded by the edge; idempotent.

        Parameters
        ----------
        model_id : str
            The id the edge claims: the hash of the files
            (:func:`popex.runtime.model_files.files_model_id`).
        files : mapping of str to bytes
            Relative path -> content: ``model.json`` and its graphs, or
            ``spec.json`` and ``weights.safetensors`` (converted to ONNX by
            a separate process, never unpickled).

        Returns
        -------
        LoadedModel

        Raises
        ------
        SpecError, WeightsError, OnnxModelError
            If the files are invalid or do not fit each other; nothing is stored.
        ModelIdMismatchError
            If the content hashes to another id than ``model_id``.
        """
        _check_id(model_id, files_model_id(files))
        if self.has(model_id):
            return self.get(model_id)
        final = self._models_dir / model_id
        with self._store_lock:
            if not final.is_dir():
                tmp = Path(tempfile.mkdtemp(dir=self._models_dir, prefix=f".{model_id[:12]}."))
                try:
                    write_files(files, tmp)
                    loaded = load_model_dir(tmp, n_threads=self.n_threads,
                                            export_to=tmp / ONNX_DIR)
                    _check_id(model_id, loaded.model_id)
                    for path in sorted(tmp.rglob("*")):
                        if path.is_file():
                            _fsync_file(path)
                    os.replace(tmp, final)
                    _fsync_dir(self._models_dir)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    if not final.is_dir():  # else another process stored it first
                        raise
        loaded = self.get(model_id)
        log.info("registered model %s (%s, %d stages, %s form)", model_id, loaded.spec.get("name"),
                 loaded.net.n_stages, loaded.form)
        return loaded

