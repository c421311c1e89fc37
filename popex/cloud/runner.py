"""The cloud half of a split inference: stages split+1..N and the final exit.

:class:`CloudRunner` is the cloud tier's one object: it owns the
:class:`~popex.cloud.store.ModelStore` of registered models and runs their
remaining stages on decoded offloads, answering with the wire contract's
:class:`~popex.wire.OffloadReply`.

Stages run with ONNX Runtime (:mod:`popex.runtime.onnx_model`); this process
never imports torch. A model with expert head sets needs nothing special
here: its graphs hold every head set, and an offload's ``head`` metadata says whose
final stage to run (the edge's distortion classifier chose it).
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from popex.checks import check_int
from popex.cloud.store import ModelStore
from popex.errors import UnknownModelError
from popex.runtime.batcher import MicroBatcher
from popex.runtime.exits import exit_confidence
from popex.runtime.model_files import LoadedModel
from popex.runtime.profiler import time_stages
from popex.wire import MAX_WIRE_BYTES, OffloadReply, OffloadRequest, WireError, decode_offload, decompress_payload

__all__ = ["MAX_PROFILE_N_REPEATS", "ModelNotHeldError", "BatchTooLargeError", "CloudResult", "CloudRunner"]

#: Most timed runs per stage one profile may ask for.
MAX_PROFILE_N_REPEATS = 1_000


class ModelNotHeldError(UnknownModelError):
    """An offload for a model this replica does not hold: 409, so the edge pushes it and retries (DESIGN §6)."""

    http_status = 409


class BatchTooLargeError(WireError):
    """A batched payload with more samples than this cloud takes in one request."""

    code = "batch_too_large"
    http_status = 413


@dataclass(frozen=True)
class CloudResult:
    """The final exit's answer for one offloaded sample; ``cloud_ms`` is the compute time."""

    label: int
    class_name: str
    confidence: float
    cloud_ms: float


def _reply(result: CloudResult, request_id: str, model_id: str, start_s: float) -> OffloadReply:
    """The wire reply; its ``cloud_ms`` runs from the body's arrival (inflate, decode, batch wait, compute)."""
    return OffloadReply(label=result.label, class_name=result.class_name, confidence=result.confidence,
                        cloud_ms=(time.perf_counter() - start_s) * 1000.0, request_id=request_id, model_id=model_id)


class CloudRunner:
    """Registered models and the cloud half of each split inference.

    Parameters
    ----------
    state_dir : path
        Directory of the :class:`~popex.cloud.store.ModelStore`; created if
        missing. Every model found there is loaded now.
    n_threads : int, optional
        ONNX Runtime intra-op threads of each stage's session (default 1).
    max_batch_size : int
        One-sample offloads of one model, split and head set that arrive
        together run as one batch of at most this many (1: each on its own).
    batch_max_wait_ms : float
        Longest such a batch waits for company, ms (:mod:`popex.runtime.batcher`).

    Notes
    -----
    Thread-safe: the store takes its own locks, and ONNX Runtime sessions
    may run from several threads, so requests for the same model run
    concurrently.
    """

    def __init__(self, state_dir: str | os.PathLike[str], *, n_threads: int | None = None, max_batch_size: int = 1,
                 batch_max_wait_ms: float = 0.0) -> None:
        self.n_threads = 1 if n_threads is None else n_threads
        self.store = ModelStore(state_dir, n_threads=self.n_threads)
        self.batcher = MicroBatcher(lambda key, requests: self._run_checked(requests),
                                    max_batch_size=max_batch_size, batch_max_wait_ms=batch_max_wait_ms)
        self.state_dir = self.store.state_dir
        self._profile_lock = threading.Lock()  # one profile at a time: they would skew each other

    @property
    def n_models(self) -> int:
        """Number of models loaded in this process."""
        return self.store.n_models

    def get(self, model_id: str) -> LoadedModel:
        """The registered model ``model_id``: :meth:`ModelStore.get <popex.cloud.store.ModelStore.get>`.

        Parameters
        ----------
        model_id : str
            The content id: sha256 of the canonical spec and the weights.

        Returns
        -------
        LoadedModel
            Loaded once and shared by every request for it.

        Raises
        ------
        UnknownModelError
            If no model with this id is registered (here or on disk).
        """
        return self.store.get(model_id)

    def has(self, model_id: str) -> bool:
        """Whether model ``model_id`` is registered.

        Parameters
        ----------
        model_id : str

        Returns
        -------
        bool
        """
        return self.store.has(model_id)

    def remove(self, model_id: str) -> bool:
        """Forget a model and delete its files: :meth:`popex.cloud.store.ModelStore.remove`.

        Parameters
        ----------
        model_id : str

        Returns
        -------
        bool
            False if it was not registered.
        """
        return self.store.remove(model_id)

    def register(self, model_id: str, files: Mapping[str, bytes]) -> LoadedModel:
        """Check, store and load a model uploaded by the edge: :meth:`popex.cloud.store.ModelStore.register`.

        Parameters
        ----------
        model_id : str
            The hash of the files (either form).
        files : mapping of str to bytes
            ``model.json`` and its graphs, or ``spec.json`` and ``weights.safetensors``.

        Returns
        -------
        LoadedModel

        Raises
        ------
        SpecError, WeightsError, OnnxModelError, ModelIdMismatchError
            As :meth:`popex.cloud.store.ModelStore.register`.
        """
        return self.store.register(model_id, files)

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
        ModelNotHeldError
            If the model is not registered here (409: the edge pushes it and retries).
        UnknownHeadError
            If the model has no head set ``request.head``.
        WireError
            If the split is outside 0..N-1, the batch is not 1, or the
            tensor's shape is not the model's shape at that split.
        """
        self._check(request, n_batch=1)
        return self._raise_or(self._run_checked([request])[0])

    def infer_batch(self, request: OffloadRequest, *, max_batch_size: int) -> list[CloudResult]:
        """Run stages split+1..N once on a batched offload; one result per sample, in batch order.

        Parameters
        ----------
        request : OffloadRequest
            With ``request_ids`` (one per sample) and a tensor of shape
            (n, *shape after stage ``split``), 1 <= n <= ``max_batch_size``.
        max_batch_size : int
            Most samples accepted.

        Returns
        -------
        list of CloudResult
            ``cloud_ms`` of each is the batch's compute time.

        Raises
        ------
        WireError
            If the payload is not a batch (no ``request_ids``), its shape does
            not fit, or any sample's logits are not finite.
        BatchTooLargeError
            If it holds more than ``max_batch_size`` samples.
        ModelNotHeldError, UnknownHeadError
            As :meth:`infer`.
        """
        if request.request_ids is None:
            raise WireError("a batched payload needs request_ids in its metadata, one per sample")
        n_batch = len(request.request_ids)
        if n_batch > max_batch_size:
            raise BatchTooLargeError(f"the batch holds {n_batch} samples; this cloud takes at most "
                                     f"{max_batch_size} per request")
        self._check(request, n_batch=n_batch)
        return [self._raise_or(result) for result in self._compute(request.tensor, [request])]

    def _check(self, request: OffloadRequest, *, n_batch: int) -> None:
        """Everything about one offload that can be wrong, checked before it joins a batch."""
        try:
            net = self.store.get(request.model_id).net
        except UnknownModelError as err:
            raise ModelNotHeldError(str(err)) from err
        net.check_head(request.head)
        if not 0 <= request.split < net.n_stages:
            raise WireError(f"split {request.split} is out of range for model {request.model_id[:12]}: "
                            f"the cloud runs stages split+1..{net.n_stages}, so split must be in 0..{net.n_stages - 1}")
        expected = (n_batch, *self.store.split_shape(request.model_id, request.split))
        if tuple(request.tensor.shape) != expected:
            raise WireError(f"tensor shape {list(request.tensor.shape)} does not fit model "
                            f"{request.model_id[:12]} at split {request.split}: expected {list(expected)} "
                            f"(a batch of exactly {n_batch})")

    def _run_checked(self, requests: list[OffloadRequest]) -> list[CloudResult | WireError]:
        """One-sample offloads of one (model, split, head), checked, as one batch: the batcher's runner."""
        tensor = requests[0].tensor if len(requests) == 1 else np.concatenate([r.tensor for r in requests])
        return self._compute(tensor, requests)

    def _compute(self, tensor: np.ndarray, requests: list[OffloadRequest]) -> list[CloudResult | WireError]:
        start_s = time.perf_counter()
        first = requests[0]
        net = self.store.get(first.model_id).net
        logits = net.run_stages(tensor, start=first.split, head=net.check_head(first.head))
        finite = np.isfinite(logits).all(axis=1)
        confidence, label = exit_confidence(np.where(finite[:, None], logits, 0.0))  # the final exit at T = 1
        cloud_ms = (time.perf_counter() - start_s) * 1000.0
        return [CloudResult(label=int(label[k]), class_name=net.class_names[int(label[k])],
                            confidence=float(confidence[k]), cloud_ms=cloud_ms) if finite[k] else
                WireError(f"model {first.model_id[:12]} produced NaN or infinite logits for this tensor")
                for k in range(tensor.shape[0])]

    @staticmethod
    def _raise_or(result: CloudResult | WireError) -> CloudResult:
        if isinstance(result, WireError):
            raise result
        return result

    def infer_payload(self, payload: bytes, *, max_bytes: int = MAX_WIRE_BYTES,
                      content_encoding: str | None = None) -> OffloadReply:
        """Decode a wire payload and finish its inference: what ``POST /api/v1/infer`` does.

        Parameters
        ----------
        payload : bytes
            The request body.
        max_bytes : int
            Largest payload accepted, after inflating.
        content_encoding : str, optional
            The request's Content-Encoding ("deflate" or none).

        Returns
        -------
        OffloadReply
            Its ``cloud_ms`` covers inflating, decoding and compute, so the
            edge can subtract it from its round trip to get the transfer time.

        Raises
        ------
        WireError, UnknownModelError, UnknownHeadError
            As :func:`popex.wire.decompress_payload`,
            :func:`popex.wire.decode_offload` and :meth:`infer`.
        """
        start_s = time.perf_counter()
        payload = decompress_payload(payload, encoding=content_encoding, max_bytes=max_bytes)
        request = decode_offload(payload, max_bytes=max_bytes)
        self._check(request, n_batch=1)  # a bad offload never joins (or spoils) a batch
        budget_ms = math.inf if request.budget_ms is None else request.budget_ms - (time.perf_counter() - start_s) * 1e3
        result = self._raise_or(self.batcher.submit((request.model_id, request.split, request.head), request,
                                                    budget_ms=budget_ms))
        return _reply(result, request.request_id, request.model_id, start_s)

    def infer_batch_payload(self, payload: bytes, *, max_bytes: int = MAX_WIRE_BYTES,
                            content_encoding: str | None = None, max_batch_size: int) -> list[OffloadReply]:
        """Decode a batched wire payload and finish every sample: what ``POST /api/v1/infer/batch`` does.

        Parameters
        ----------
        payload : bytes
        max_bytes : int
        content_encoding : str, optional
        max_batch_size : int
            Most samples accepted.

        Returns
        -------
        list of OffloadReply
            One per sample in batch order, each echoing its own request id.

        Raises
        ------
        WireError, BatchTooLargeError, ModelNotHeldError, UnknownHeadError
            As :meth:`infer_payload` and :meth:`infer_batch`.
        """
        start_s = time.perf_counter()
        payload = decompress_payload(payload, encoding=content_encoding, max_bytes=max_bytes)
        request = decode_offload(payload, max_bytes=max_bytes)
        results = self.infer_batch(request, max_batch_size=max_batch_size)
        return [_reply(result, request_id, request.model_id, start_s)
                for result, request_id in zip(results, request.request_ids or ())]

    def profile(self, model_id: str, *, n_repeats: int) -> list[float]:
        """Median cloud time of each stage, in ms, measured now on this machine.

        Parameters
        ----------
        model_id : str
            A registered model.
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
        ConfigError
            If ``n_repeats`` is out of range.
        """
        n_repeats = check_int(n_repeats, name="n_repeats", low=1, high=MAX_PROFILE_N_REPEATS)
        net = self.store.get(model_id).net
        with self._profile_lock:
            timings = time_stages(net, n_warmup=min(5, n_repeats), n_repeats=n_repeats, n_threads=self.n_threads)
        return [float(ms) for ms in timings.stage_ms]
