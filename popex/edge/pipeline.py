"""The request pipeline: classify one image under a latency requirement.

For each request the runner reads the model's current strategy (split s,
thresholds θ) in O(1), runs stages 1..s, evaluates each *active* branch
(k_b <= s and θ_b not off) with that exit's calibration temperature and the
calibration's confidence method, and exits at the first branch whose
confidence reaches its threshold, compared in float64 exactly as the sweep
does. At s = N the final exit answers locally; otherwise the tensor at the
split goes to the cloud with a timeout equal to what is left of the
request's budget (:mod:`popex.edge.budget`).

A model with expert head sets (see :mod:`popex.nets.experts`) is
*distortion-aware* by default: its distortion classifier runs on the decoded
image (inside the fixed edge time, before preprocessing), picks a head set
("pristine", "blur" or "noise"), and the request then uses that head's
strategy table, temperatures and branches; an offload names the head so the
cloud runs that head's final stage.

If the cloud is late, refuses or cannot be reached, the edge answers with its
best local exit, marked ``fallback`` (:mod:`popex.edge.fallback`).

The request path only reads: the plan, the model, the cloud port. What it
measures (the fixed edge time; per offload O, the wire ratio and a passive
uplink sample) goes to the :class:`~popex.edge.planner.BackgroundPlanner`'s
queue, which re-plans on its own thread. Preparing a model (cloud upload,
profiling, planning) is :mod:`popex.edge.preparation`'s job.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np

from popex.checks import check_deadline_ms, check_objective
from popex.data.images import decode_image
from popex.data.preprocess import preprocess
from popex.edge.batch_run import PreparedRequest, batch_key, run_batch
from popex.edge.budget import RequestRun, offload_budget_ms
from popex.edge.classification import Classification, LatencyBreakdown
from popex.edge.cloud_port import CloudError, CloudRejected
from popex.edge.compute import EdgeCompute
from popex.edge.breaker import CircuitBreaker
from popex.edge.fallback import fallback_exit, fallback_reserve_ms
from popex.edge.model_lookup import resolve_model
from popex.edge.model_push import ModelPusher
from popex.edge.rate_limit import refused_offload
from popex.edge.plans import ModelPlan
from popex.edge.strategy import Strategy
from popex.edge.store import StoredModel, UnknownModelError
from popex.errors import ConfigError, PopexError
from popex.runtime.onnx_model import PRISTINE_HEAD
from popex.runtime.batcher import MicroBatcher
from popex.runtime.distortion import choose_head
from popex.wire import WIRE_COMPRESSIONS, compress_payload, encode_offload

__all__ = ["EdgeRunner"]

_COUNT_KEYS = ("n_requests", "n_edge_branch", "n_edge_final", "n_cloud", "n_fallback", "n_rejected", "n_rate_limited")


def _public_name(err: Exception) -> str:
    """The error's most specific public class name (CloudUnavailable, not a private subclass)."""
    return next(cls.__name__ for cls in type(err).__mro__ if not cls.__name__.startswith("_"))


class EdgeRunner:
    """Classify images with the current plans; hand each measurement to the planner.

    Parameters
    ----------
    registry : ModelRegistry
        The stored models.
    plans : PlanBook
        Read per request (``plans.get(model_id).strategy(...)``).
    client : CloudClient
        The seam to the cloud (a fake in tests).
    planner : BackgroundPlanner
        Takes the measurements (``submit_offload``, ``submit_edge_fixed``).
    compute : EdgeCompute
        Runs the edge's stages and branches (and emulates a slower device).
    objective : {"mean", "tail"}
        Objective of a request that names none.
    default_deadline_ms : float
        Latency requirement of a request that names none, ms.
    max_image_pixels : int
        Largest declared width x height accepted.
    wire_dtype : {"float32", "float16", "int8"}
    wire_compression : {"deflate", "none"}
        Deflate each payload for the HTTP hop when that shrinks it.
    distortion_aware_default : bool
        Whether a request that does not say is distortion-aware when its
        model has expert head sets (models without experts never are).
    on_cloud_rejected : callable(str), optional
        Called with the model id when the cloud refuses an offload (e.g. it
        lost the model on a restart), so the model can be pushed again.
    breaker : CircuitBreaker, optional
        Skips offloads while the cloud keeps failing (:mod:`popex.edge.breaker`).
    max_batch_size, batch_max_wait_ms : int, float
        The micro-batcher (:mod:`popex.runtime.batcher`): requests of one
        :func:`~popex.edge.batch_run.batch_key` within the wait (ms) run as one
        batch (:mod:`popex.edge.batch_run`); 1 = each request on its own thread.

    Raises
    ------
    ConfigError
        On an unknown objective or compression, or a bad default deadline.
    """

    def __init__(self, *, registry: Any, plans: Any, client: Any, planner: Any, compute: EdgeCompute,
                 objective: str, default_deadline_ms: float, max_image_pixels: int, wire_dtype: str,
                 wire_compression: str, distortion_aware_default: bool,
                 on_cloud_rejected: Callable[[str], None] | None = None, max_batch_size: int = 1,
                 batch_max_wait_ms: float = 0.0, breaker: CircuitBreaker | None = None) -> None:
        if wire_compression not in WIRE_COMPRESSIONS:
            raise ConfigError(f"wire_compression must be one of {list(WIRE_COMPRESSIONS)}, got {wire_compression!r}")
        if not isinstance(distortion_aware_default, bool):
            raise ConfigError(f"distortion_aware_default must be true or false, got {distortion_aware_default!r}")
        self.registry = registry
        self.plans = plans
        self.client = client
        self.planner = planner
        self.compute = compute
        self.objective = check_objective(objective)
        self.default_deadline_ms = check_deadline_ms(default_deadline_ms, name="default_deadline_ms")
        self.max_image_pixels = int(max_image_pixels)
        self.wire_dtype = wire_dtype
        self.wire_compression = wire_compression
        self.distortion_aware_default = distortion_aware_default
        self.on_cloud_rejected = on_cloud_rejected
        self.breaker = breaker  # None: always offload (tests of the bare pipeline)
        #: The model a request without a name gets (set when the default model directory is registered).
        self.default_model_id: str | None = None
        #: The offload token bucket (popex.ratelimit.live.RateLimiter), None when offloads are not rate-limited.
        self.rate_limiter: Any = None
        #: The batch-aware plan (popex.edge.batch_plans.BatchExitPlanner), None unless ``batch_plan`` is on.
        self.batch_exits: Any = None
        self._counts: Counter[str] = Counter()
        self._counts_lock = threading.Lock()
        self.pusher = ModelPusher(client=client)  # a replica without the model: push, retry once
        self.batcher: MicroBatcher[PreparedRequest, Classification] = MicroBatcher(
            lambda key, requests: run_batch(self, requests), max_batch_size=max_batch_size,
            batch_max_wait_ms=batch_max_wait_ms)

    # -- models -------------------------------------------------------------------

    def resolve_model(self, model: str | None) -> StoredModel:
        """The model a request names (id or trusted unique name), or the default one.

        Parameters
        ----------
        model : str or None
            See :func:`popex.edge.model_lookup.resolve_model`.

        Returns
        -------
        StoredModel
        """
        return resolve_model(self.registry, self.default_model_id, model)

    def plan_of(self, model: StoredModel) -> ModelPlan:
        """The model's plan (installed at registration, see :mod:`popex.edge.preparation`).

        Parameters
        ----------
        model : StoredModel
            A model of this edge's store.

        Returns
        -------
        ModelPlan
            Its tables are swapped whole by the planner: a request reads them once.

        Raises
        ------
        UnknownModelError
            If the model has no plan yet.
        """
        try:
            return self.plans.get(model.model_id)
        except ConfigError as err:
            raise UnknownModelError(f"model {model.model_id!r} is registered but has no plan yet") from err

    def strategy(self, model_id: str | None, *, deadline_ms: float | None = None,
                 objective: str | None = None) -> Strategy:
        """The current strategy of a model for a deadline (defaults from the config).

        Parameters
        ----------
        model_id : str or None
            As for :meth:`resolve_model`.
        deadline_ms : float, optional
            Finite, in [0, 3.6e6] ms; default: ``default_deadline_ms``.
        objective : {"mean", "tail"}, optional

        Returns
        -------
        Strategy

        Raises
        ------
        UnknownModelError, ConfigError
        """
        model = self.resolve_model(model_id)
        deadline_ms = self.default_deadline_ms if deadline_ms is None else check_deadline_ms(deadline_ms)
        return self.plan_of(model).strategy(deadline_ms, self.objective if objective is None else objective)

    def counts(self) -> dict[str, int]:
        """Requests so far, in total and by outcome.

        Returns
        -------
        dict of str to int
            ``n_requests``, ``n_edge_branch``, ``n_edge_final``, ``n_cloud``, ``n_fallback``, ``n_rejected``.
        """
        with self._counts_lock:
            counts = dict(self._counts)
        return {key: counts.get(key, 0) for key in _COUNT_KEYS}

    # -- classify -----------------------------------------------------------------

    def classify(self, image_bytes: bytes, *, model_id: str | None = None, deadline_ms: float | None = None,
                 objective: str | None = None, policy: str = "adaptive", arrival_s: float | None = None,
                 distortion_aware: bool | None = None) -> Classification:
        """Classify one encoded image under a latency requirement.

        Parameters
        ----------
        image_bytes : bytes
            PNG, JPEG or BMP (untrusted; decoded safely).
        model_id : str, optional
            Model id or unique name; default: the default model.
        deadline_ms : float, optional
            Latency requirement, ms, finite, in [0, 3.6e6]; default from the config.
        objective : {"mean", "tail"}, optional
        policy : str
            "adaptive" (POPEX) or a baseline of :data:`popex.decision.policies.POLICIES`.
        arrival_s : float, optional
            ``time.perf_counter()`` when the request arrived; the budget
            counts from here. Default: now.
        distortion_aware : bool, optional
            Run the model's distortion classifier and use the expert head set
            it picks. None: ``distortion_aware_default`` for a model with
            experts, off for one without.

        Returns
        -------
        Classification

        Raises
        ------
        DataError
            If the bytes are not a complete, small enough image.
        UnknownModelError, ConfigError
            On an unknown model or a bad deadline or objective, or
            ``distortion_aware=True`` for a model without expert heads.
        """
        arrival_s = time.perf_counter() if arrival_s is None else float(arrival_s)
        outcome = "rejected"
        try:
            prepared = self.prepare(image_bytes, model_id=model_id, deadline_ms=deadline_ms, objective=objective,
                                    policy=policy, arrival_s=arrival_s, distortion_aware=distortion_aware)
            if self.batcher.max_batch_size == 1:
                result = self._run(prepared.model, prepared.plan, prepared.strategy, prepared.run,
                                   request_id=prepared.request_id)
            else:
                result = self.batcher.submit(batch_key(prepared), prepared, budget_ms=prepared.run.remaining_ms())
            outcome = result.outcome
            self.planner.submit_answer(result.model_id, predicted_ms=result.predicted_latency_ms,
                                       measured_ms=result.latency.total_ms)
            return result
        finally:
            self.count(outcome)  # each request is counted once, whatever happened

    def prepare(self, image_bytes: bytes, *, model_id: str | None = None, deadline_ms: float | None = None,
                objective: str | None = None, policy: str = "adaptive", arrival_s: float,
                distortion_aware: bool | None = None) -> PreparedRequest:
        """Check, decode and preprocess one request and pick its strategy: everything before its stages.

        Parameters and errors as :meth:`classify` (``arrival_s`` is required).

        Returns
        -------
        PreparedRequest
        """
        deadline_ms = self.default_deadline_ms if deadline_ms is None else check_deadline_ms(deadline_ms)
        model = self.resolve_model(model_id)
        aware = self._distortion_aware(model, distortion_aware)
        plan = self.plan_of(model)
        objective = self.objective if objective is None else objective
        strategy = plan.strategy(deadline_ms, objective, policy)  # checks before any image work
        image = decode_image(image_bytes, max_pixels=self.max_image_pixels)
        choice = choose_head(model.classifier, model.loaded.net, image) if aware else None
        x = preprocess(image, model.preprocessing)
        self.planner.submit_edge_fixed((time.perf_counter() - arrival_s) * 1000.0, model_id=model.model_id)
        if choice is not None and choice.head is not None:
            strategy = plan.strategy(deadline_ms, objective, policy, head=choice.head)
        run = RequestRun(arrival_s=arrival_s, deadline_ms=deadline_ms,
                         budget_ms=offload_budget_ms(deadline_ms, objective, strategy), features=[x], evaluated=[])
        if choice is not None:
            run.head, run.expert_confidence = choice.head, choice.confidence
        return PreparedRequest(model=model, plan=plan, strategy=strategy, run=run, request_id=uuid.uuid4().hex)

    def count(self, outcome: str) -> None:
        """Count one request under its outcome.

        Parameters
        ----------
        outcome : str
            "rejected" or a :attr:`Classification.outcome <popex.edge.classification.Classification.outcome>`.
        """
        with self._counts_lock:
            self._counts["n_requests"] += 1
            self._counts[f"n_{outcome}"] += 1

    # -- private ------------------------------------------------------------------

    def _distortion_aware(self, model: StoredModel, requested: bool | None) -> bool:
        if requested is None:
            return self.distortion_aware_default and model.has_experts
        if not isinstance(requested, bool):
            raise ConfigError(f"distortion_aware must be true or false, got {requested!r}")
        if requested and not model.has_experts:
            raise ConfigError(f"model {model.name!r} ({model.model_id[:12]}) has no expert heads, so it cannot "
                              "run distortion-aware: send distortion_aware=false, or register a model whose "
                              "spec lists 'experts' (with their calibrations and the distortion classifier)")
        return requested

    def _run(self, model: StoredModel, plan: ModelPlan, strategy: Strategy, run: RequestRun, *,
             request_id: str) -> Classification:
        net = model.loaded.net
        active = set(strategy.active_branches)
        h = run.features[run.first_stage]  # a device's tensor starts after its cut (popex.edge.tensor_run)
        for stage in range(run.first_stage + 1, strategy.split + 1):
            h = self.compute.on_edge(net.run_stages, h, start=stage - 1, stop=stage, head=run.head, run=run,
                                     emulated_ms=float(plan.profile.stage_edge_ms[stage - 1]))
            run.features.append(h)
            for b, after_stage in enumerate(net.branch_after_stage):
                if after_stage != stage or b not in active:
                    continue
                confidence, label = self.compute.evaluate_branch(model, plan, b, h, head=run.head, run=run)
                run.evaluated.append((b, confidence, label))
                # float64 on both sides, exactly as popex.decision.sweep compares
                if confidence >= float(strategy.thresholds[b]):
                    return self._answer(model, strategy, run, request_id, label=label, confidence=confidence,
                                        exit_=b)
        if strategy.split == net.n_stages:
            confidence, label = self.compute.final(model, h, head=run.head)
            return self._answer(model, strategy, run, request_id, label=label, confidence=confidence, exit_="final")
        local = None if self.rate_limiter is None else refused_offload(self.rate_limiter, self.compute, model, plan,
                                                                       strategy, run)
        if local is not None:
            return self._answer(model, strategy, run, request_id, label=local.label, confidence=local.confidence,
                                exit_=local.exit, rate_limited=True)
        return self._offload(model, plan, strategy, run, request_id, h)

    def _offload(self, model: StoredModel, plan: ModelPlan, strategy: Strategy, run: RequestRun, request_id: str,
                 h: np.ndarray) -> Classification:
        encode_started = time.perf_counter()
        try:
            payload = encode_offload(h, model_id=model.model_id, split=strategy.split, request_id=request_id,
                                     wire_dtype=self.wire_dtype, head=run.head, budget_ms=run.remaining_ms())
        except PopexError as err:  # e.g. NaN activations: the edge still answers
            return self._fallback(model, plan, strategy, run, request_id, f"cannot encode the tensor: {err}")
        payload_n_bytes = len(payload)
        body = compress_payload(payload) if self.wire_compression == "deflate" else None
        content_encoding = None if body is None else "deflate"
        body = payload if body is None else body
        encode_ms = (time.perf_counter() - encode_started) * 1000.0
        # The cloud gets the budget less what the local fallback needs: a late cloud still leaves an answer in time.
        reserve_ms = fallback_reserve_ms(model, plan, strategy.split, run, offload_worst_ms=strategy.worst_latency_ms)
        remaining_ms = run.remaining_ms() - reserve_ms
        if remaining_ms <= 0:
            return self._fallback(model, plan, strategy, run, request_id,
                                  "no time left in the budget for the cloud")
        if self.breaker is not None and not self.breaker.allow():
            return self._fallback(model, plan, strategy, run, request_id, "the cloud's circuit breaker is open")
        call_started = time.perf_counter()
        try:
            result = self.pusher.call(
                lambda timeout_s: self.client.infer(body, timeout_s=timeout_s, content_encoding=content_encoding),
                model=model, remaining_ms=lambda: run.remaining_ms() - reserve_ms)
        except CloudError as err:
            run.transfer_ms = (time.perf_counter() - call_started) * 1000.0
            if self.breaker is not None:
                self.breaker.record(err)
            if isinstance(err, CloudRejected) and self.on_cloud_rejected is not None:
                self.on_cloud_rejected(model.model_id)
            return self._fallback(model, plan, strategy, run, request_id, f"{_public_name(err)}: {err}")
        if self.breaker is not None:
            self.breaker.record(None)
        round_trip_ms = float(result.round_trip_ms)
        run.cloud_ms = max(0.0, float(result.cloud_ms))
        run.transfer_ms = max(0.0, round_trip_ms - run.cloud_ms)
        self.planner.submit_offload(len(body), encode_ms=encode_ms, round_trip_ms=round_trip_ms,
                                    cloud_ms=run.cloud_ms, payload_n_bytes=payload_n_bytes)
        label = int(result.label)
        class_names = model.class_names
        class_name = class_names[label] if 0 <= label < len(class_names) else str(result.class_name)
        return self._answer(model, strategy, run, request_id, label=label, confidence=float(result.confidence),
                            exit_="final", where="cloud", class_name=class_name)

    def _fallback(self, model: StoredModel, plan: ModelPlan, strategy: Strategy, run: RequestRun, request_id: str,
                  reason: str) -> Classification:
        local = fallback_exit(self.compute, model, plan, strategy.split, run)
        return self._answer(model, strategy, run, request_id, label=local.label, confidence=local.confidence,
                            exit_=local.exit, fallback=True, fallback_reason=reason)

    def _answer(self, model: StoredModel, strategy: Strategy, run: RequestRun, request_id: str, *, label: int,
                confidence: float, exit_: int | str, where: str = "edge", class_name: str | None = None,
                fallback: bool = False, fallback_reason: str | None = None,
                rate_limited: bool = False) -> Classification:
        total_ms = run.elapsed_ms()
        edge_ms = max(0.0, total_ms - run.transfer_ms - run.cloud_ms)
        return Classification(
            label=label,
            class_name=class_name if class_name is not None else model.class_names[label],
            confidence=confidence,
            exit=exit_,
            where=where,
            split=strategy.split,
            thresholds=strategy.thresholds,
            fallback=fallback,
            fallback_reason=fallback_reason,
            latency=LatencyBreakdown(edge_ms=edge_ms, transfer_ms=run.transfer_ms, cloud_ms=run.cloud_ms,
                                     total_ms=total_ms),
            predicted_latency_ms=strategy.latency_ms,
            model_id=model.model_id,
            feasible=strategy.feasible,
            deadline_ms=run.deadline_ms,
            request_id=request_id,
            policy=strategy.policy,
            expert=PRISTINE_HEAD if run.head is None else run.head,
            expert_confidence=run.expert_confidence,
            rate_limited=rate_limited,
        )
