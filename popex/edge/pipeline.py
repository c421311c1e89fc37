"""The edge runner: classify one image under a latency requirement.

For each request the runner reads the model's current strategy (split s,
thresholds θ) in O(1), runs stages 1..s, evaluates each *active* branch
(k_b <= s and θ_b not off) with that exit's calibration temperature and the
calibration's confidence method, and exits at the first branch whose
confidence reaches its threshold, compared in float64 exactly as the sweep
does. At s = N the final exit answers locally; otherwise the tensor at the
split goes to the cloud with a timeout equal to what is left of the
request's budget (the deadline, measured from the request's arrival).

A model with expert head sets (see :mod:`popex.nets.experts`) is
*distortion-aware* by default: its distortion classifier runs on the decoded
image (inside the fixed edge time, before preprocessing), picks a head set
("pristine", "blur" or "noise"), and the request then uses that head's
strategy table, temperatures and branches; an offload names the head so the
cloud runs that head's final stage.

If the cloud is late, refuses or cannot be reached, the edge answers with its
best local exit, marked ``fallback``: the most confident branch already
evaluated; if none was, the rest of the network on the edge when the
profile says it fits in the remaining budget, else the cheapest branch at or
before the split (evaluated even if it was off), else the whole network.

Each offload feeds the uplink monitor a passive sample and the overhead
tracker a measurement of O (encode time plus round trip minus cloud compute
minus the link part); the median of recent O values re-plans when it moves.
Preparing a model (cloud upload, profiling, planning) is
:mod:`popex.edge.preparation`'s job.
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from popex.data.images import decode_image
from popex.data.preprocess import preprocess
from popex.decision.latency import Link
from popex.decision.table import OBJECTIVES
from popex.errors import ConfigError, PopexError
from popex.nets.early_exit import PRISTINE_HEAD, exit_confidence
from popex.nets.experts import choose_head
from popex.edge.cloud_port import CloudError, CloudRejected
from popex.edge.plans import ModelPlan, PlanBook, Strategy, _check_deadline
from popex.edge.store import ModelRegistry, StoredModel, UnknownModelError
from popex.wire import WIRE_COMPRESSIONS, compress_payload, encode_offload

__all__ = [
    "LatencyBreakdown",
    "Classification",
    "OverheadTracker",
    "EdgeRunner",
]

_log = logging.getLogger(__name__)

# O changes by less than this are noise (a scheduler tick), not a reason to re-plan.
_OVERHEAD_SLACK_MS = 0.5
_WIRE_RATIO_SLACK = 0.05  # re-plan when the median compression ratio moves more than this
_MEAN_BUDGET_SLACK = 1.25  # room for the latency model's error on the slowest path


def _public_name(err: Exception) -> str:
    """The error's most specific public class name (CloudUnavailable, not a private subclass)."""
    return next(cls.__name__ for cls in type(err).__mro__ if not cls.__name__.startswith("_"))


@dataclass(frozen=True)
class LatencyBreakdown:
    """Where the time of one request went, ms.

    ``transfer_ms`` is the cloud call's round trip minus the cloud's compute
    time (for a failed call: the time spent waiting); ``edge_ms`` is the rest.
    """

    edge_ms: float
    transfer_ms: float
    cloud_ms: float
    total_ms: float

    def to_dict(self) -> dict[str, float]:
        """JSON form with the API's key names."""
        return {"edge": self.edge_ms, "transfer": self.transfer_ms, "cloud": self.cloud_ms, "total": self.total_ms}


@dataclass(frozen=True)
class Classification:
    """The answer to one request.

    Attributes
    ----------
    label : int
    class_name : str
    confidence : float
        Of the exit that answered (temperature-scaled).
    exit : int or str
        Branch index, or "final".
    where : str
        "edge" or "cloud".
    split : int
        The strategy's split.
    thresholds : tuple of (float or None)
        The strategy's thresholds (None = off).
    fallback : bool
        True when the cloud failed and the edge answered instead.
    fallback_reason : str or None
    latency : LatencyBreakdown
    predicted_latency_ms : float
        The strategy's expected latency.
    model_id : str
    feasible : bool
        Whether the strategy meets the deadline by the model's prediction.
    deadline_ms : float
    request_id : str
    policy : str
        The policy that chose the strategy ("adaptive" is POPEX).
    expert : str
        The head set that answered: "pristine" (also for models without
        experts or requests that are not distortion-aware) or an expert
        such as "blur" or "noise".
    expert_confidence : float or None
        The distortion classifier's confidence in its choice; None when it did not run.
    """

    label: int
    class_name: str
    confidence: float
    exit: int | str
    where: str
    split: int
    thresholds: tuple[float | None, ...]
    fallback: bool
    fallback_reason: str | None
    latency: LatencyBreakdown
    predicted_latency_ms: float
    model_id: str
    feasible: bool
    deadline_ms: float
    request_id: str
    policy: str = "adaptive"
    expert: str = PRISTINE_HEAD
    expert_confidence: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON body of ``POST /api/v1/classify`` (``expert_confidence`` only when the classifier ran)."""
        body = {
            "label": self.label,
            "class_name": self.class_name,
            "confidence": self.confidence,
            "exit": self.exit,
            "where": self.where,
            "split": self.split,
            "thresholds": list(self.thresholds),
            "fallback": self.fallback,
            "fallback_reason": self.fallback_reason,
            "latency_ms": self.latency.to_dict(),
            "predicted_latency_ms": self.predicted_latency_ms,
            "model": self.model_id,
            "feasible": self.feasible,
            "deadline_ms": self.deadline_ms,
            "request_id": self.request_id,
            "policy": self.policy,
            "expert": self.expert,
        }
        if self.expert_confidence is not None:
            body["expert_confidence"] = self.expert_confidence
        return body


class OverheadTracker:
    """Median of the recent per-offload overheads O, ms.

    Parameters
    ----------
    initial_ms : float
        O until the first measurement.
    window_n : int
        Measurements kept.

    Examples
    --------
    >>> tracker = OverheadTracker(initial_ms=2.0, window_n=3)
    >>> for value in (1.0, 5.0, 3.0, 4.0):
    ...     tracker.add(value)
    >>> tracker.current_ms  # median of 5, 3, 4
    4.0
    """

    def __init__(self, *, initial_ms: float, window_n: int = 21) -> None:
        if not math.isfinite(initial_ms) or initial_ms < 0:
            raise ConfigError(f"initial offload overhead must be finite and >= 0, got {initial_ms!r}")
        if window_n < 1:
            raise ConfigError(f"window_n must be >= 1, got {window_n!r}")
        self.initial_ms = float(initial_ms)
        self._samples: deque[float] = deque(maxlen=int(window_n))
        self._lock = threading.Lock()

    def add(self, overhead_ms: float) -> None:
        """Add one measurement (negative values, from timer noise, count as 0)."""
        if math.isfinite(overhead_ms):
            with self._lock:
                self._samples.append(max(0.0, float(overhead_ms)))

    @property
    def n_samples(self) -> int:
        """Measurements in the window."""
        return len(self._samples)

    @property
    def current_ms(self) -> float:
        """Median of the window, or the initial value without measurements."""
        with self._lock:
            samples = list(self._samples)
        return float(statistics.median(samples)) if samples else self.initial_ms


@dataclass
class _Run:
    """Mutable bookkeeping of one request while it runs (never leaves the module)."""

    arrival_s: float
    deadline_ms: float  # the requirement, as reported
    budget_ms: float  # when the edge stops waiting for the cloud (see offload_budget_ms())
    features: list[torch.Tensor]
    evaluated: list[tuple[int, float, int]]  # (branch, confidence, predicted)
    transfer_ms: float = 0.0
    cloud_ms: float = 0.0
    head: str | None = None  # the expert head set in use; None = pristine
    sleep_overshoot_ms: float = 0.0  # emulated device: oversleep not yet paid back
    expert_confidence: float | None = None  # the distortion classifier's, when it ran

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.arrival_s) * 1000.0

    def remaining_ms(self) -> float:
        return self.budget_ms - self.elapsed_ms()


def offload_budget_ms(deadline_ms: float, objective: str, strategy: Strategy) -> float:
    """How long one request may wait for the cloud, ms from its arrival.

    "tail" bounds every request, so its budget is the requirement. "mean"
    bounds the average: the plan already counts the offloaded requests
    taking longer than the requirement while early exits take less, so
    cutting them off at the requirement would turn planned offloads into
    fallbacks (16% of the requests, 6 points of accuracy at 50 ms in the
    latency-vs-uplink experiment). They get the strategy's predicted
    worst-case path with some slack instead; the fallback still catches a
    cloud that is late beyond that, or gone.

    >>> from types import SimpleNamespace
    >>> s = SimpleNamespace(worst_latency_ms=70.0)  # a Strategy whose slowest path is predicted at 70 ms
    >>> offload_budget_ms(50.0, "tail", s), offload_budget_ms(50.0, "mean", s)
    (50.0, 87.5)
    """
    if objective != "mean" or not math.isfinite(strategy.worst_latency_ms):
        return deadline_ms
    return max(deadline_ms, _MEAN_BUDGET_SLACK * strategy.worst_latency_ms)


class EdgeRunner:
    """Classify images with the current plans and measure each offload.

    Parameters
    ----------
    registry : ModelRegistry
    plans : PlanBook
    client : CloudClient
        The seam to the cloud (a fake in tests).
    monitor : UplinkMonitor, optional
        Receives passive samples from offloads.
    objective : {"mean", "tail"}
        Default objective for decisions.
    default_deadline_ms : float
        Latency requirement of a request that names none, ms.
    max_image_pixels : int
        Largest declared width x height accepted.
    wire_dtype : {"float32", "float16", "int8"}
    wire_compression : {"deflate", "none"}
        Deflate each payload for the HTTP hop when that shrinks it; the
        median ratio of the last offloads (``wire_ratio``) feeds the plan.
    overhead : OverheadTracker
        The smoothed O shared with planning.
    replan_hysteresis_fraction : float
        Relative change of O that re-plans.
    edge_slowdown : float
        Emulate an edge device this many times slower than this machine: the
        profile's edge times are scaled by it, and each stage or branch takes
        at least its scaled profile time (1 = no emulation). For demos on a
        server-class machine, where the edge would otherwise always win.
    distortion_aware_default : bool
        Whether a request that does not say is distortion-aware when its
        model has expert head sets (models without experts never are).

    Raises
    ------
    ConfigError
        On an unknown objective or a bad default deadline.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        plans: PlanBook,
        client: Any,
        *,
        monitor: Any | None = None,
        objective: str = "mean",
        default_deadline_ms: float = 100.0,
        max_image_pixels: int = 4096 * 4096,
        wire_dtype: str = "float32",
        wire_compression: str = "deflate",
        overhead: OverheadTracker | None = None,
        replan_hysteresis_fraction: float = 0.2,
        edge_slowdown: float = 1.0,
        distortion_aware_default: bool = True,
    ) -> None:
        if not (math.isfinite(edge_slowdown) and edge_slowdown >= 1.0):
            raise ConfigError(f"edge_slowdown must be a finite number >= 1, got {edge_slowdown!r}")
        if objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        self.registry = registry
        self.plans = plans
        self.client = client
        self.monitor = monitor
        self.objective = objective
        self.default_deadline_ms = _check_deadline(default_deadline_ms)
        self.max_image_pixels = int(max_image_pixels)
        self.wire_dtype = wire_dtype
        if wire_compression not in WIRE_COMPRESSIONS:
            raise ConfigError(f"wire_compression must be one of {list(WIRE_COMPRESSIONS)}, got {wire_compression!r}")
        self.wire_compression = wire_compression
        #: Median bytes sent / payload bytes of recent offloads (1 until the first).
        self.wire_ratio = OverheadTracker(initial_ms=1.0)
        self.overhead = overhead if overhead is not None else OverheadTracker(initial_ms=2.0)
        self.replan_hysteresis_fraction = float(replan_hysteresis_fraction)
        self.edge_slowdown = float(edge_slowdown)
        if not isinstance(distortion_aware_default, bool):
            raise ConfigError(f"distortion_aware_default must be true or false, got {distortion_aware_default!r}")
        self.distortion_aware_default = distortion_aware_default
        self.default_model_id: str | None = None
        #: Median time from a request's arrival to its preprocessed input (the
        #: profile's edge_fixed_ms): reading, decoding, the distortion
        #: classifier (distortion-aware requests), preprocessing.
        self.edge_fixed = OverheadTracker(initial_ms=0.0)
        self._planned_ms = {"offload_overhead_ms": self.overhead.current_ms, "edge_fixed_ms": 0.0, "wire_ratio": 1.0}
        self._counts: Counter[str] = Counter()
        self._counts_lock = threading.Lock()
        #: Called with the model id when the cloud refuses an offload (e.g. it
        #: lost the model on a restart), so the model can be pushed again.
        self.on_cloud_rejected: Callable[[str], None] | None = None

    # -- models -------------------------------------------------------------------

    def resolve_model(self, model: str | None) -> StoredModel:
        """The model a request names (id or unique spec name), or the default one.

        Raises
        ------
        UnknownModelError
            If nothing matches, or no model is registered.
        ConfigError
            If ``model`` is omitted and several models are registered without a default.
        """
        if model is None or model == "":
            if self.default_model_id is not None and self.default_model_id in self.registry:
                return self.registry.get(self.default_model_id)
            ids = self.registry.ids()
            if not ids:
                raise UnknownModelError("no model is registered on this edge; POST one to /api/v1/models")
            if len(ids) > 1:
                raise ConfigError(f"{len(ids)} models are registered and none is the default; name one with 'model'")
            return self.registry.get(ids[0])
        if model in self.registry:
            return self.registry.get(model)
        named = [i for i in self.registry.ids() if self.registry.get(i).name == model]
        if len(named) == 1:
            return self.registry.get(named[0])
        if len(named) > 1:
            raise ConfigError(f"{len(named)} models are named {model!r}; name one by its id")
        raise UnknownModelError(f"no model {model!r} is registered on this edge")

    def plan_of(self, model: StoredModel) -> ModelPlan:
        """The model's plan (installed at registration, see :mod:`popex.edge.preparation`)."""
        try:
            return self.plans.get(model.model_id)
        except ConfigError as err:
            raise UnknownModelError(f"model {model.model_id!r} is registered but has no plan yet") from err

    def strategy(self, model_id: str | None, *, deadline_ms: float | None = None,
                 objective: str | None = None) -> Strategy:
        """The current strategy of a model for a deadline (defaults from the config).

        Raises
        ------
        UnknownModelError, ConfigError
        """
        model = self.resolve_model(model_id)
        deadline_ms = self.default_deadline_ms if deadline_ms is None else _check_deadline(deadline_ms)
        return self.plan_of(model).strategy(deadline_ms, self.objective if objective is None else objective)

    # -- classify -----------------------------------------------------------------

    def classify(
        self,
        image_bytes: bytes,
        *,
        model_id: str | None = None,
        deadline_ms: float | None = None,
        objective: str | None = None,
        policy: str = "adaptive",
        arrival_s: float | None = None,
        distortion_aware: bool | None = None,
    ) -> Classification:
        """Classify one encoded image under a latency requirement.

        Parameters
        ----------
        image_bytes : bytes
            PNG, JPEG or BMP (untrusted; decoded safely).
        model_id : str, optional
            Model id or unique name; default: the default model.
        deadline_ms : float, optional
            Latency requirement, ms, finite and >= 0; default from the config.
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
            deadline_ms = self.default_deadline_ms if deadline_ms is None else _check_deadline(deadline_ms)
            model = self.resolve_model(model_id)
            aware = self._distortion_aware(model, distortion_aware)
            plan = self.plan_of(model)
            objective = self.objective if objective is None else objective
            strategy = plan.strategy(deadline_ms, objective, policy)  # validates before any image work
            image = decode_image(image_bytes, max_pixels=self.max_image_pixels)
            choice = choose_head(model.classifier, model.loaded.net, image) if aware else None
            x = torch.from_numpy(preprocess(image, model.preprocessing))
            self.record_edge_fixed((time.perf_counter() - arrival_s) * 1000.0)  # the classifier's time included
            if choice is not None and choice.head is not None:
                strategy = plan.strategy(deadline_ms, objective, policy, head=choice.head)
            run = _Run(arrival_s=arrival_s, deadline_ms=deadline_ms,
                       budget_ms=offload_budget_ms(deadline_ms, objective, strategy), features=[x], evaluated=[])
            if choice is not None:
                run.head, run.expert_confidence = choice.head, choice.confidence
            with torch.inference_mode():
                result = self._run(model, plan, strategy, run)
            outcome = ("fallback" if result.fallback else
                       "cloud" if result.where == "cloud" else
                       "edge_final" if result.exit == "final" else "edge_branch")
            return result
        finally:
            with self._counts_lock:  # each request is counted once, whatever happened
                self._counts["n_requests"] += 1
                self._counts[f"n_{outcome}"] += 1

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

    def counts(self) -> dict[str, int]:
        """Requests so far, in total and by outcome (edge_branch, edge_final, cloud, fallback, rejected)."""
        with self._counts_lock:
            counts = dict(self._counts)
        keys = ("n_requests", "n_edge_branch", "n_edge_final", "n_cloud", "n_fallback", "n_rejected")
        return {key: counts.get(key, 0) for key in keys}

    def _run(self, model: StoredModel, plan: ModelPlan, strategy: Strategy, run: _Run) -> Classification:
        net = model.loaded.net
        request_id = uuid.uuid4().hex
        active = set(strategy.active_branches)
        h = run.features[0]
        for stage in range(1, strategy.split + 1):
            h = self._on_edge(net.run_stages, h, start=stage - 1, stop=stage, head=run.head, run=run,
                              emulated_ms=float(plan.profile.stage_edge_ms[stage - 1]))
            run.features.append(h)
            for b, after_stage in enumerate(net.branch_after_stage):
                if after_stage != stage or b not in active:
                    continue
                confidence, label = self._evaluate_branch(model, plan, b, h, head=run.head, run=run)
                run.evaluated.append((b, confidence, label))
                # float64 on both sides, exactly as popex.decision.sweep compares
                if confidence >= float(strategy.thresholds[b]):
                    return self._answer(model, strategy, run, request_id, label=label, confidence=confidence,
                                        exit_=b)
        if strategy.split == net.n_stages:
            confidence, label = self._final(model, h, head=run.head)
            return self._answer(model, strategy, run, request_id, label=label, confidence=confidence, exit_="final")
        return self._offload(model, plan, strategy, run, request_id, h)

    def _on_edge(self, compute: Callable[..., torch.Tensor], *args: Any, emulated_ms: float,
                 run: _Run | None = None, **kwargs: Any) -> torch.Tensor:
        """Run edge compute; on an emulated slower device, take at least ``emulated_ms``.

        ``emulated_ms`` is the profile's (already scaled) time of this piece, so
        the emulated device is a fixed model, "F times this machine's median",
        and load on this machine is not multiplied by F. ``time.sleep`` wakes
        late (0.1-1 ms on a busy VM, per piece); within a request the next
        piece sleeps that much less, or the emulated device would run slower
        than its model by a few ms per request.
        """
        if self.edge_slowdown == 1.0:
            return compute(*args, **kwargs)
        started = time.perf_counter()
        result = compute(*args, **kwargs)
        owed_ms = run.sleep_overshoot_ms if run is not None else 0.0
        remaining_s = (emulated_ms - owed_ms) / 1000.0 - (time.perf_counter() - started)
        overshoot_ms = min(owed_ms, max(0.0, -remaining_s * 1000.0))  # what this piece could not repay
        if remaining_s > 0:
            sleep_started = time.perf_counter()
            time.sleep(remaining_s)
            overshoot_ms = max(0.0, (time.perf_counter() - sleep_started - remaining_s) * 1000.0)
        if run is not None:
            run.sleep_overshoot_ms = overshoot_ms
        return result

    def _evaluate_branch(self, model: StoredModel, plan: ModelPlan, branch: int, features: torch.Tensor, *,
                         head: str | None = None, run: _Run | None = None) -> tuple[float, int]:
        calibration = model.calibration_of(head)
        logits = self._on_edge(model.loaded.net.run_branch, branch, features, head=head, run=run,
                               emulated_ms=float(plan.profile.branch_edge_ms[branch]))
        confidence, predicted = exit_confidence(
            logits, temperature=float(calibration.temperature[branch]), method=calibration.confidence_method
        )
        return float(confidence[0]), int(predicted[0])

    def _final(self, model: StoredModel, logits: torch.Tensor, *, head: str | None = None) -> tuple[float, int]:
        calibration = model.calibration_of(head)
        confidence, predicted = exit_confidence(
            logits, temperature=float(calibration.temperature[-1]), method=calibration.confidence_method
        )
        return float(confidence[0]), int(predicted[0])

    def _offload(self, model: StoredModel, plan: ModelPlan, strategy: Strategy, run: _Run, request_id: str,
                 h: torch.Tensor) -> Classification:
        encode_started = time.perf_counter()
        try:
            payload = encode_offload(h, model_id=model.model_id, split=strategy.split, request_id=request_id,
                                     wire_dtype=self.wire_dtype, head=run.head)
        except PopexError as err:  # e.g. NaN activations: the edge still answers
            return self._fallback(model, plan, strategy, run, request_id, f"cannot encode the tensor: {err}")
        payload_n_bytes = len(payload)
        body = compress_payload(payload) if self.wire_compression == "deflate" else None
        content_encoding = None if body is None else "deflate"
        body = payload if body is None else body
        encode_ms = (time.perf_counter() - encode_started) * 1000.0
        remaining_ms = run.remaining_ms()
        if remaining_ms <= 0:
            return self._fallback(model, plan, strategy, run, request_id,
                                  "no time left in the budget for the cloud")
        call_started = time.perf_counter()
        try:
            result = self.client.infer(body, timeout_s=remaining_ms / 1000.0, content_encoding=content_encoding)
        except CloudError as err:
            run.transfer_ms = (time.perf_counter() - call_started) * 1000.0
            if isinstance(err, CloudRejected) and self.on_cloud_rejected is not None:
                self.on_cloud_rejected(model.model_id)
            return self._fallback(model, plan, strategy, run, request_id, f"{_public_name(err)}: {err}")
        round_trip_ms = float(result.round_trip_ms)
        run.cloud_ms = max(0.0, float(result.cloud_ms))
        run.transfer_ms = max(0.0, round_trip_ms - run.cloud_ms)
        self.record_offload(len(body), encode_ms=encode_ms, round_trip_ms=round_trip_ms, cloud_ms=run.cloud_ms,
                            payload_n_bytes=payload_n_bytes)
        label = int(result.label)
        class_names = model.class_names
        class_name = class_names[label] if 0 <= label < len(class_names) else str(result.class_name)
        return self._answer(model, strategy, run, request_id, label=label, confidence=float(result.confidence),
                            exit_="final", where="cloud", class_name=class_name)

    def _fallback(self, model: StoredModel, plan: ModelPlan, strategy: Strategy, run: _Run, request_id: str,
                  reason: str) -> Classification:
        net = model.loaded.net
        split = strategy.split
        answer = dict(fallback=True, fallback_reason=reason)
        if run.evaluated:
            branch, confidence, label = max(run.evaluated, key=lambda item: item[1])
            return self._answer(model, strategy, run, request_id, label=label, confidence=confidence,
                                exit_=branch, **answer)
        profile = plan.profile
        rest_ms = float(profile.stage_edge_ms[split:].sum())
        candidates = [b for b, k in enumerate(net.branch_after_stage) if k <= split]
        if rest_ms <= run.remaining_ms() or not candidates:
            logits = self._on_edge(net.run_stages, run.features[split], start=split, head=run.head, run=run,
                                   emulated_ms=rest_ms)
            confidence, label = self._final(model, logits, head=run.head)
            return self._answer(model, strategy, run, request_id, label=label, confidence=confidence,
                                exit_="final", **answer)
        branch = min(candidates, key=lambda b: float(profile.branch_edge_ms[b]))
        confidence, label = self._evaluate_branch(model, plan, branch, run.features[net.branch_after_stage[branch]],
                                                  head=run.head)
        return self._answer(model, strategy, run, request_id, label=label, confidence=confidence,
                            exit_=branch, **answer)

    def _answer(self, model: StoredModel, strategy: Strategy, run: _Run, request_id: str, *, label: int,
                confidence: float, exit_: int | str, where: str = "edge", class_name: str | None = None,
                fallback: bool = False, fallback_reason: str | None = None) -> Classification:
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
        )

    # -- measurements from offloads ----------------------------------------------------

    def link_part_ms(self, n_bytes: int) -> float:
        """The link's share of an offload's round trip as the plan models it, ms.

        ``8·n_bytes/(1000·B) + R`` from the current uplink estimate. Always
        the estimate, even when the client emulates the link: with an HTTP
        RTT, R already holds one request's HTTP cost, and O must be what the
        plan does not yet count, or that cost (and, on a kernel-shaped link,
        the transfer) would be counted twice.
        """
        link: Link = self.monitor.link() if self.monitor is not None else self.plans.link
        return link.transfer_ms(n_bytes) + link.rtt_ms

    def record_overhead(self, n_bytes: int, *, encode_ms: float, round_trip_ms: float, cloud_ms: float) -> float:
        """Add one measurement of the per-offload overhead O and re-plan if its median moved.

        ``O = encode_ms + (round_trip_ms − cloud_ms − link part)``; see :meth:`link_part_ms`.

        Returns
        -------
        float
            This measurement, ms.
        """
        overhead_ms = encode_ms + (round_trip_ms - cloud_ms - self.link_part_ms(n_bytes))
        self._track(self.overhead, "offload_overhead_ms", overhead_ms)
        return overhead_ms

    def record_edge_fixed(self, fixed_ms: float) -> None:
        """Add one measurement of the per-request fixed edge time and re-plan if its median moved."""
        self._track(self.edge_fixed, "edge_fixed_ms", fixed_ms)

    def _track(self, tracker: OverheadTracker, field: str, value_ms: float, *,
               slack: float = _OVERHEAD_SLACK_MS) -> None:
        tracker.add(value_ms)
        current_ms = tracker.current_ms
        planned_ms = self._planned_ms[field]
        if abs(current_ms - planned_ms) > max(self.replan_hysteresis_fraction * planned_ms, slack):
            self._planned_ms[field] = current_ms
            try:
                self.plans.update_profile(**{field: current_ms})
            except PopexError:
                _log.exception("re-plan with %s = %.3f ms failed", field, current_ms)

    def record_offload(self, n_bytes: int, *, encode_ms: float, round_trip_ms: float, cloud_ms: float,
                       payload_n_bytes: int | None = None) -> None:
        """Feed one successful offload to the uplink monitor (passive sample), the O tracker and,
        given the uncompressed ``payload_n_bytes``, the wire-ratio tracker.

        ``n_bytes`` is what went on the wire. Offloads of synthetic tensors
        (the start-up O measurement sends zeros) leave ``payload_n_bytes``
        out: their compression ratio says nothing about real activations.
        """
        if self.monitor is not None:
            self.monitor.add_passive_sample(n_bytes, round_trip_ms - cloud_ms)
        self.record_overhead(n_bytes, encode_ms=encode_ms, round_trip_ms=round_trip_ms, cloud_ms=cloud_ms)
        if payload_n_bytes:
            self._track(self.wire_ratio, "wire_ratio", n_bytes / payload_n_bytes, slack=_WIRE_RATIO_SLACK)
