"""The cloud side of a split inference: registered models, stages split+1..N, final exit.

Models are registered by the edge (spec JSON + safetensors weights, never a
pickle) and stored under ``<state_dir>/models/<model_id>/``, so they survive
a restart and are shared by every worker process on the same state dir: a
model missing from memory is looked up on disk before it is called unknown.

A model with expert head sets needs nothing special here: its spec and
weights hold every head set, and an offload's ``head`` metadata says whose
final stage to run (the edge's distortion classifier chose it).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from popex.runtime.profiler import time_stages
from popex.errors import PopexError, UnknownModelError
from popex.nets.early_exit import UnknownHeadError
from popex.nets.io import SPEC_FILE, WEIGHTS_FILE, LoadedModel, compute_model_id, load_model, load_model_bytes
from popex.nets.spec import parse_spec_json
from popex.wire import MAX_WIRE_BYTES, OffloadRequest, WireError, decode_offload, decompress_payload

__all__ = [
    "MODELS_DIR",
    "MAX_PROFILE_N_REPEATS",
    "UnknownModelError",
    "UnknownHeadError",
    "ModelIdMismatchError",
    "CloudResult",
    "CloudReply",
    "CloudRunner",
]

log = logging.getLogger(__name__)

MODELS_DIR = "models"
MAX_PROFILE_N_REPEATS = 1_000
_MODEL_ID_RE = re.compile(r"[0-9a-f]{64}")


class ModelIdMismatchError(PopexError):
    """The id a model was uploaded under is not the sha256 of its spec and weights."""

    code = "model_id_mismatch"


@dataclass(frozen=True)
class CloudResult:
    """The final exit's answer for one offloaded sample; ``cloud_ms`` is the compute time."""

    label: int
    class_name: str
    confidence: float
    cloud_ms: float


@dataclass(frozen=True)
class CloudReply:
    """What the cloud answers to one offload; ``cloud_ms`` is decode + compute time in ms."""

    label: int
    class_name: str
    confidence: float
    cloud_ms: float
    request_id: str
    model_id: str


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


class CloudRunner:
    """Registered models and the cloud half of each split inference.

    Parameters
    ----------
    state_dir : path
        Directory holding ``models/<model_id>/{spec.json,weights.safetensors}``;
        created if missing. Every model found there is loaded now.
    n_threads : int, optional
        Torch intra-op threads used when profiling (None: torch's default).

    Notes
    -----
    Thread-safe: registration and lookups take a lock; inference runs the
    network under ``torch.inference_mode()``, which changes no module state,
    so requests for the same model run concurrently.
    """

    def __init__(self, state_dir: str | os.PathLike[str], *, n_threads: int | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.n_threads = n_threads
        self._models_dir = self.state_dir / MODELS_DIR
        self._models_dir.mkdir(parents=True, exist_ok=True)
        self._models: dict[str, LoadedModel] = {}
        self._shapes: dict[str, list[tuple[int, ...]]] = {}  # per model: shape after each split 0..N
        self._lock = threading.Lock()
        self._store_lock = threading.Lock()
        self._profile_lock = threading.Lock()  # one profile at a time: they would skew each other
        for directory in sorted(self._models_dir.iterdir()):
            if directory.is_dir() and _MODEL_ID_RE.fullmatch(directory.name):
                self._load_from_disk(directory.name)

    @property
    def n_models(self) -> int:
        """Number of models loaded in this process."""
        with self._lock:
            return len(self._models)

    # -- registry ------------------------------------------------------------------

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

    def get(self, model_id: str) -> LoadedModel:
        """The registered model ``model_id``.

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
        """Whether model ``model_id`` is registered."""
        try:
            self.get(model_id)
        except UnknownModelError:
            return False
        return True

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
            computed = compute_model_id(parse_spec_json(spec_bytes), weights_bytes)
            self._check_id(model_id, computed)
            return self.get(model_id)
        loaded = load_model_bytes(spec_bytes, weights_bytes)
        self._check_id(model_id, loaded.model_id)
        self._store(model_id, spec_bytes, weights_bytes)
        loaded = self._add(loaded)
        log.info("registered model %s (%s, %d stages)", model_id, loaded.spec.get("name"), loaded.net.n_stages)
        return loaded

    def _add(self, loaded: LoadedModel) -> LoadedModel:
        """Make a checked model visible; the first of two concurrent adds wins."""
        shapes = loaded.net.stage_output_shapes()  # a forward pass: done once, outside the lock
        with self._lock:
            if loaded.model_id not in self._models:
                self._shapes[loaded.model_id] = shapes
                self._models[loaded.model_id] = loaded
            return self._models[loaded.model_id]

    @staticmethod
    def _check_id(model_id: str, computed: str) -> None:
        if model_id != computed:
            raise ModelIdMismatchError(
                f"model id {str(model_id)[:80]!r} does not match its content: spec + weights hash to {computed}; "
                "upload the model under the id popex.nets.io.compute_model_id gives"
            )

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

    # -- inference -----------------------------------------------------------------

    def infer(self, request: OffloadRequest) -> CloudResult:
        """Run stages split+1..N and the final exit on a decoded offload.

        Parameters
        ----------
        request : OffloadRequest
            Its tensor must have shape (1, *shape after stage ``split``);
            its ``head`` (None: pristine) selects whose final stage runs.

        Returns
        -------
        CloudResult
            Label, class name and max-softmax confidence (temperature 1) of
            the final exit; ``cloud_ms`` is the compute time in ms.

        Raises
        ------
        UnknownModelError
            If the model is not registered.
        UnknownHeadError
            If the model has no head set ``request.head``.
        WireError
            If the split is outside 0..N-1, the batch is not 1, or the
            tensor's shape is not the model's shape at that split.
        """
        start_s = time.perf_counter()
        loaded = self.get(request.model_id)
        net = loaded.net
        head = net.check_head(request.head)
        if not 0 <= request.split < net.n_stages:
            raise WireError(f"split {request.split} is out of range for model {request.model_id[:12]}: "
                            f"the cloud runs stages split+1..{net.n_stages}, so split must be in 0..{net.n_stages - 1}")
        expected = (1, *self._shapes[request.model_id][request.split])
        if tuple(request.tensor.shape) != expected:
            raise WireError(f"tensor shape {list(request.tensor.shape)} does not fit model "
                            f"{request.model_id[:12]} at split {request.split}: expected {list(expected)} "
                            "(a batch of exactly 1)")
        with torch.inference_mode():
            logits = net.run_stages(request.tensor, start=request.split, head=head)
            probs = torch.softmax(logits.float(), dim=1)
            confidence, label = probs.max(dim=1)
        label_index = int(label[0])
        return CloudResult(
            label=label_index,
            class_name=net.class_names[label_index],
            confidence=float(confidence[0]),
            cloud_ms=(time.perf_counter() - start_s) * 1000.0,
        )

    def infer_payload(self, payload: bytes, *, max_bytes: int = MAX_WIRE_BYTES,
                      content_encoding: str | None = None) -> CloudReply:
        """Decode a wire payload and finish its inference: what ``POST /api/v1/infer`` does.

        ``cloud_ms`` in the reply covers inflating, decoding and compute, so
        the edge can subtract it from its round trip to get the transfer time.

        Raises
        ------
        WireError, UnknownModelError, UnknownHeadError
            As :func:`popex.wire.decompress_payload`,
            :func:`popex.wire.decode_offload` and :meth:`infer`.
        """
        start_s = time.perf_counter()
        payload = decompress_payload(payload, encoding=content_encoding, max_bytes=max_bytes)
        request = decode_offload(payload, max_bytes=max_bytes)
        result = self.infer(request)
        return CloudReply(
            label=result.label,
            class_name=result.class_name,
            confidence=result.confidence,
            cloud_ms=(time.perf_counter() - start_s) * 1000.0,
            request_id=request.request_id,
            model_id=request.model_id,
        )

    # -- profiling -----------------------------------------------------------------

    def profile(self, model_id: str, *, n_repeats: int) -> list[float]:
        """Median cloud time of each stage, in ms, measured now on this machine.

        Parameters
        ----------
        model_id : str
        n_repeats : int
            Timed runs per stage, 1..MAX_PROFILE_N_REPEATS.

        Returns
        -------
        list of float, length N
            ``t^c_i`` of DESIGN.md §3 for i = 1..N.

        Raises
        ------
        UnknownModelError
            If the model is not registered.
        ValueError
            If ``n_repeats`` is out of range (callers validate user input).
        """
        if isinstance(n_repeats, bool) or not isinstance(n_repeats, int) or \
                not 1 <= n_repeats <= MAX_PROFILE_N_REPEATS:
            raise ValueError(f"n_repeats must be an int in 1..{MAX_PROFILE_N_REPEATS}, got {n_repeats!r}")
        net = self.get(model_id).net
        with self._profile_lock:
            timings = time_stages(net, n_warmup=min(5, n_repeats), n_repeats=n_repeats, n_threads=self.n_threads)
        return [float(ms) for ms in timings.stage_ms]
