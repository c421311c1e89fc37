"""Preparation of a model on the edge: register, plan at once, then prepare in the background.

A registered model is classifiable at once: :meth:`ModelPreparation.register`
stores it, times its stages on the edge quickly (a few repeats), assumes the
cloud is ``cloud_speedup`` times faster and plans with the current link
estimate. One background worker (a single daemon thread, started by the
first job, never by a constructor) then prepares it properly:

1. push it to the cloud unless the cloud has it;
2. profile the edge (``profile_n_repeats``) and the cloud (its profile
   endpoint); if the cloud is unreachable, cloud = edge / cloud_speedup,
   marked "assumed";
3. measure the per-offload overhead O with a few real offloads (through the
   background planner, waited for);
4. build the profile (bytes on the wire measured from real payloads) and
   re-plan; the state becomes "ready" (or "failed" with the error).

Stored models are planned again when the node opens: from their saved
profile if they were ready, else with the quick assumed plan and a new
preparation. When the cloud later refuses an offload (for example it lost
the model on a restart), the model is pushed again, at most once per
``resync_interval_s``.

A model with expert head sets is planned once per head set (same profile,
each head's calibration). Its distortion classifier runs on the edge for
every distortion-aware request, so its time is part of the profile's fixed
edge time: until requests measure that time, the classifier's own timing
stands in for it. The cloud gets the spec and weights as for any model (the
expert heads are in them); the classifier stays on the edge.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from contextlib import nullcontext
from typing import Any

import numpy as np

from popex.checks import check_finite, check_int
from popex.decision.latency import Profile
from popex.edge.admission import DEFAULT_MAX_CONFIGURATIONS, check_plan_cost
from popex.edge.cloud_port import CloudError
from popex.edge.compute import EdgeCompute
from popex.edge.store import Registration, StoredModel
from popex.edge.worker import JobWorker
from popex.errors import CostError, PopexError
from popex.runtime.profiler import StageTimings, build_profile, time_stages
from popex.wire import encode_offload

__all__ = ["ModelPreparation"]

_log = logging.getLogger(__name__)

_QUICK_N_WARMUP = 1
_QUICK_N_REPEATS = 3
_N_WARMUP = 5
_N_OVERHEAD_OFFLOADS = 5
_CLASSIFIER_N_REPEATS = 10
_MAX_N_REPEATS = 1000


def _wire_split_bytes(model: StoredModel, wire_dtype: str) -> np.ndarray:
    """Exact payload bytes α_s at each split s < N (the tensor plus the wire header); 0 at s = N."""
    net = model.loaded.net
    shapes = net.stage_output_shapes()
    sizes = [
        len(encode_offload(np.zeros((1, *shape), np.float32), model_id=model.model_id, split=s, request_id=uuid.uuid4().hex,
                           wire_dtype=wire_dtype))
        for s, shape in enumerate(shapes[:-1])
    ]
    return np.array(sizes + [0], dtype=np.int64)


class ModelPreparation:
    """Registered models and their preparation (push, profile, measure O, plan).

    Parameters
    ----------
    registry : ModelRegistry
    plans : PlanBook
        Where each model's plan is installed.
    client : CloudClient
        Control calls to the cloud (upload, profile, overhead offloads).
    planner : BackgroundPlanner
        Takes the overhead offloads' measurements; its medians go into each profile.
    compute : EdgeCompute
        Its ``edge_slowdown`` scales the measured edge times.
    wire_dtype : {"float32", "float16", "int8"}
        Precision of offloaded tensors (sets the bytes at each split).
    distortion_aware_default : bool
        Whether requests run the distortion classifier by default (its time
        stands in for the fixed edge time until requests measure it).
    cloud_speedup : float
        Cloud = edge / cloud_speedup when the cloud cannot be profiled.
    profile_n_repeats : int
        Timed runs per stage when preparing (edge and cloud).
    cloud_timeout_s : float
        Timeout of control calls to the cloud, s.
    resync_interval_s : float, default 10
        Least time between two pushes of one model after the cloud refused it, s.
    max_strategy_configurations : int
        A model whose plan would sweep more threshold configurations is refused
        (:func:`popex.edge.admission.check_plan_cost`).
    vetting : ModelVetting, optional
        Vets uploads (:meth:`register`) in a limited process first; None: not.

    Raises
    ------
    ConfigError
        On a non-positive speedup, repeat count or timeout.
    """

    def __init__(self, *, registry: Any, plans: Any, client: Any, planner: Any, compute: EdgeCompute,
                 wire_dtype: str, distortion_aware_default: bool, cloud_speedup: float, profile_n_repeats: int,
                 cloud_timeout_s: float, resync_interval_s: float = 10.0,
                 max_strategy_configurations: int = DEFAULT_MAX_CONFIGURATIONS, vetting: Any = None) -> None:
        self.registry = registry
        self.plans = plans
        self.client = client
        self.planner = planner
        self.compute = compute
        self.wire_dtype = wire_dtype
        self.distortion_aware_default = distortion_aware_default
        self.cloud_speedup = check_finite(cloud_speedup, name="cloud_speedup", low=0.0, low_open=True)
        self.profile_n_repeats = check_int(profile_n_repeats, name="profile_n_repeats", low=1, high=_MAX_N_REPEATS)
        self.cloud_timeout_s = check_finite(cloud_timeout_s, name="cloud_timeout_s", low=0.0, low_open=True)
        self.resync_interval_s = check_finite(resync_interval_s, name="resync_interval_s", low=0.0)
        self.max_strategy_configurations = check_int(max_strategy_configurations, name="max_strategy_configurations",
                                                     low=1, high=10**9)
        self.vetting = vetting
        self._worker = JobWorker("popex-prepare")
        self._jobs: dict[tuple[str, str], Future[Any]] = {}
        self._jobs_lock = threading.Lock()
        self._last_sync_s: dict[str, float] = {}

    # -- lifecycle ----------------------------------------------------------------

    def open(self) -> None:
        """Plan every stored model and queue the work it still needs (no wait)."""
        for model_id in self.registry.ids():
            model = self.registry.get(model_id)
            try:  # a model that cannot be planned is skipped, never the end of the start
                check_plan_cost(model, max_configurations=self.max_strategy_configurations)
                # A profile measured under another emulated slowdown is another device's: profile again.
                if (model.state == "ready" and model.profile is not None
                        and model.profile_edge_slowdown == self.compute.edge_slowdown):
                    self.plans.install(model_id, model.calibration, model.profile,
                                       expert_calibrations=model.expert_calibrations)
                    # the first run of a network is slow; not a request's
                    model.loaded.net(np.zeros((1, *model.loaded.net.input_shape), np.float32))
                    self._submit("sync", model_id, self._sync)
                else:
                    self._install_assumed_plan(model)
                    self._submit("prepare", model_id, self.prepare)
            except (PopexError, MemoryError) as err:
                _log.error("not planning stored model %s: %s", model_id[:12], err)
                self.plans.remove(model_id)
                self.registry.set_state(model_id, "failed", error=str(err) or type(err).__name__)

    def close(self) -> None:
        """Drop queued jobs; a job already running finishes in its daemon thread."""
        self._worker.close()

    def wait_idle(self, timeout_s: float = 60.0) -> bool:
        """Wait until no job is queued or running.

        Parameters
        ----------
        timeout_s : float
            Longest wait, s.

        Returns
        -------
        bool
            False if ``timeout_s`` passed first.
        """
        deadline_s = time.monotonic() + timeout_s
        while True:
            with self._jobs_lock:
                pending = [job for job in self._jobs.values() if not job.done()]
            if not pending:
                return True
            left_s = deadline_s - time.monotonic()
            if left_s <= 0:
                return False
            try:
                pending[0].result(timeout=left_s)
            except Exception:  # jobs log their own failures
                pass

    # -- registration and preparation ------------------------------------------------

    def register(self, files: Mapping[str, bytes], *, trusted: bool = False) -> Registration:
        """Validate and store a model, plan it with assumptions, queue its preparation.

        Parameters
        ----------
        files : mapping of str to bytes
            The model directory's files by relative path
            (:meth:`popex.edge.store.ModelRegistry.add`).
        trusted : bool
            Sent with the admin token: the model answers to its name.

        Returns
        -------
        Registration
            ``created`` is False when it was registered already; its
            preparation is queued again only if it had failed.

        Raises
        ------
        SpecError, WeightsError, CalibrationError, OnnxModelError, ConflictError
            Nothing is stored in that case.
        """
        try:  # an upload is vetted in its own process first (popex.edge.vetting)
            with self.vetting.gate(files, known=self.registry.__contains__) if self.vetting else nullcontext():
                registration = self.registry.add(files, trusted=trusted, admit=self._admit)
        except BaseException:
            self._drop_orphan_plans()  # planned, then refused (a name taken meanwhile, the store full)
            raise
        model = self.registry.get(registration.model_id)
        if registration.model_id not in self.plans:
            self._install_assumed_plan(model)
        if registration.created or model.state == "failed":
            self._submit("prepare", registration.model_id, self.prepare)
        return registration

    def register_directory(self, directory: str) -> str:
        """Register the model files of a directory (the default model at start).

        Parameters
        ----------
        directory : str
            Holds spec.json, weights.safetensors, calibration.npz.

        Returns
        -------
        str
            The model id.

        Raises
        ------
        PopexError
            If the files are missing or invalid.
        """
        model_id = self.registry.register_directory(directory, admit=self._admit)
        model = self.registry.get(model_id)
        if model_id not in self.plans:
            self._install_assumed_plan(model)
        if model.state == "registered":  # new (planned on admission), or stored and not prepared yet
            self._submit("prepare", model_id, self.prepare)  # a job already queued for it is not doubled
        return model_id

    def remove(self, model_id: str) -> dict[str, Any]:
        """Delete a model on the edge (store and plan), then on the cloud.

        The edge's copy goes first, so the model is gone for requests even
        when the cloud cannot be reached; a job still running on it fails
        quietly (it no longer finds the model).

        Parameters
        ----------
        model_id : str

        Returns
        -------
        dict
            ``model_id``, ``deleted`` (True) and ``cloud``: "deleted", "absent"
            (the cloud did not hold it) or "unreachable" (with the cloud's error).

        Raises
        ------
        UnknownModelError
            If no model with that id is registered here.
        """
        self.registry.remove(model_id)
        self.plans.remove(model_id)
        self._last_sync_s.pop(model_id, None)
        answer: dict[str, Any] = {"model_id": model_id, "deleted": True}
        try:
            held = self.client.delete_model(model_id, timeout_s=self.cloud_timeout_s)
            answer["cloud"] = "deleted" if held else "absent"
        except CloudError as err:
            _log.warning("model %s removed here, not on the cloud: %s", model_id[:12], err)
            answer.update(cloud="unreachable", cloud_error=str(err))
        return answer

    def prepare(self, model_id: str) -> StoredModel:
        """Push, profile both sides, measure O and re-plan, synchronously (the worker's job).

        Failures are recorded in the model's state ("failed" with the
        error), not raised: the model stays classifiable with its assumed plan.

        Parameters
        ----------
        model_id : str

        Returns
        -------
        StoredModel
            In its new state.

        Raises
        ------
        UnknownModelError
            If no such model is registered.
        """
        model = self.registry.get(model_id)
        self.registry.set_state(model_id, "profiling")
        try:
            check_plan_cost(model, max_configurations=self.max_strategy_configurations)
            on_cloud = self._push(model)
            timings = time_stages(model.loaded.net, n_warmup=_N_WARMUP, n_repeats=self.profile_n_repeats)
            cloud_stage_ms = self._cloud_profile(model) if on_cloud else None
            if on_cloud:
                self._measure_overhead(model)
            profile = self._profile(model, timings, cloud_stage_ms)
            self.plans.install(model_id, model.calibration, profile, expert_calibrations=model.expert_calibrations)
            cloud_profile = "measured" if cloud_stage_ms is not None else "assumed"
            return self.registry.set_state(model_id, "ready", profile=profile, cloud_profile=cloud_profile,
                                           profile_edge_slowdown=self.compute.edge_slowdown)
        except Exception as err:  # any failure leaves a usable model and a visible error
            _log.exception("preparing model %s failed", model_id)
            return self.registry.set_state(model_id, "failed", error=f"{type(err).__name__}: {err}")

    def request_sync(self, model_id: str) -> None:
        """Push a model to the cloud again soon (after the cloud refused an offload); rate-limited.

        Only queues a job, so a request thread may call it.

        Parameters
        ----------
        model_id : str
        """
        now_s = time.monotonic()
        if now_s - self._last_sync_s.get(model_id, -float("inf")) < self.resync_interval_s:
            return
        self._last_sync_s[model_id] = now_s
        self._submit("sync", model_id, self._sync)

    # -- private ------------------------------------------------------------------

    def _submit(self, kind: str, model_id: str, job: Callable[[str], Any]) -> None:
        key = (kind, model_id)
        with self._jobs_lock:
            running = self._jobs.get(key)
            if running is not None and not running.done():
                return
            try:
                self._jobs[key] = self._worker.submit(lambda: job(model_id))
            except RuntimeError:  # shut down: the node is closing
                _log.info("not queueing %s of %s: the node is closing", kind, model_id)

    def _admit(self, model: StoredModel) -> None:
        """Plan a validated model before it enters the store; refuse it (CostError) if it cannot be."""
        check_plan_cost(model, max_configurations=self.max_strategy_configurations)
        try:
            self._install_assumed_plan(model)
        except MemoryError as err:
            self.plans.remove(model.model_id)
            raise CostError(f"model {model.name!r} cannot be planned in the memory this edge has") from err

    def _drop_orphan_plans(self) -> None:
        for model_id in self.plans.model_ids():
            if model_id not in self.registry:
                self.plans.remove(model_id)

    def _install_assumed_plan(self, model: StoredModel) -> None:
        timings = time_stages(model.loaded.net, n_warmup=_QUICK_N_WARMUP, n_repeats=_QUICK_N_REPEATS)
        self.plans.install(model.model_id, model.calibration, self._profile(model, timings, None),
                           expert_calibrations=model.expert_calibrations)

    def _profile(self, model: StoredModel, timings: StageTimings, cloud_stage_ms: list[float] | None) -> Profile:
        timings = dataclasses.replace(timings.scaled(self.compute.edge_slowdown),
                                      split_bytes=_wire_split_bytes(model, self.wire_dtype))
        return build_profile(
            timings,
            branch_after_stage=model.loaded.net.branch_after_stage,
            cloud_stage_ms=cloud_stage_ms,
            offload_overhead_ms=self.planner.overhead.current_ms,
            edge_fixed_ms=self._edge_fixed_ms(model),
            wire_ratio=self.planner.wire_ratio.current_ms,
            cloud_speedup=self.cloud_speedup,
        )

    def _edge_fixed_ms(self, model: StoredModel) -> float:
        """The measured fixed edge time; before any request, the distortion classifier's time for a
        model that runs it by default (requests then measure it as part of the fixed time)."""
        tracker = self.planner.edge_fixed
        if tracker.n_samples or model.classifier is None or not self.distortion_aware_default:
            return self.planner.edge_fixed_ms(model.model_id)  # the model's own, once it has any
        return max(tracker.current_ms, model.classifier.time_one_image_ms(n_repeats=_CLASSIFIER_N_REPEATS,
                                                                          n_warmup=1))

    def _push(self, model: StoredModel) -> bool:
        """Make sure the cloud has the model; False if the cloud cannot be reached."""
        try:
            if self.client.has_model(model.model_id, timeout_s=self.cloud_timeout_s):
                return True
            self.client.put_model(model.model_id, model.loaded.files, timeout_s=self.cloud_timeout_s)
            return True
        except CloudError as err:
            _log.warning("cannot push model %s to the cloud (%s); assuming cloud times", model.model_id, err)
            return False

    def _cloud_profile(self, model: StoredModel) -> list[float] | None:
        try:
            return self.client.profile(model.model_id, n_repeats=self.profile_n_repeats,
                                       timeout_s=self.cloud_timeout_s)
        except CloudError as err:
            _log.warning("cannot profile model %s on the cloud (%s); assuming cloud times", model.model_id, err)
            return None

    def _measure_overhead(self, model: StoredModel) -> None:
        """A few real offloads of the input (split 0) to measure O; failures are skipped.

        The measurements go through the planner like a request's, and this
        job waits for it, so the profile built next sees them.
        """
        x = np.zeros((1, *model.loaded.net.input_shape), np.float32)
        for _ in range(_N_OVERHEAD_OFFLOADS):
            started_s = time.perf_counter()
            payload = encode_offload(x, model_id=model.model_id, split=0, request_id=uuid.uuid4().hex,
                                     wire_dtype=self.wire_dtype)
            encode_ms = (time.perf_counter() - started_s) * 1000.0
            try:
                result = self.client.infer(payload, timeout_s=self.cloud_timeout_s)
            except CloudError as err:
                _log.warning("overhead offload of model %s failed: %s", model.model_id, err)
                continue
            self.planner.submit_offload(len(payload), encode_ms=encode_ms, round_trip_ms=float(result.round_trip_ms),
                                        cloud_ms=float(result.cloud_ms))
        if not self.planner.drain(self.cloud_timeout_s):
            _log.warning("the planner did not take the overhead measurements of %s in time", model.model_id)

    def _sync(self, model_id: str) -> None:
        model = self.registry.get(model_id)
        on_cloud = self._push(model)
        if on_cloud and model.cloud_profile != "measured":
            self.prepare(model_id)  # the cloud is back: measure what was assumed
