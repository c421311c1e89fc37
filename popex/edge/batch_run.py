"""The edge's batched path: prepared requests of one model, cut, head set and thresholds run as one batch.

The batch runs stage by stage with compaction (:func:`popex.runtime.compaction.run_compacted`):
at each active branch the samples that exit are answered at once and leave
the batch; the continuing samples' tensors, gathered by index, go to the next
stage and, after the cut, to the cloud as *one* batched payload
(``request_ids`` and ``budgets_ms`` in its metadata). Each answer carries its
own exit, place and latency; the answers come back in the order of the
requests. A batch in which every sample exits sends nothing upstream.

With ``batch_plan`` on, the batch runs only the branches the batch-aware
plan (:mod:`popex.edge.batch_plans`) finds worth running at its size; the
answers then report those thresholds.

Each sample keeps its own :class:`~popex.edge.budget.RequestRun` (its stage
outputs and evaluated branches), so a cloud failure falls back per sample
exactly as :mod:`popex.edge.fallback` does for one request.

:class:`~popex.edge.pipeline.EdgeRunner` builds the prepared requests (decode,
preprocess, strategy) and hands them here, from its micro-batcher
(:mod:`popex.runtime.batcher`) or from ``POST /api/v1/classify/batch``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from popex.edge.budget import RequestRun
from popex.edge.classification import Classification
from popex.edge.cloud_port import CloudError, CloudRejected
from popex.edge.plans import ModelPlan
from popex.edge.rate_limit import refused_offload
from popex.edge.store import StoredModel
from popex.edge.strategy import Strategy
from popex.errors import PopexError
from popex.ratelimit.streams import current_stream, request_stream
from popex.runtime.compaction import run_compacted
from popex.wire import compress_payload, encode_offload

__all__ = ["PreparedRequest", "batch_key", "run_batch", "run_prepared"]


@dataclass
class PreparedRequest:
    """A classify request ready to run: its model, plan, strategy and bookkeeping (input in ``run.features[0]``)."""

    model: StoredModel
    plan: ModelPlan
    strategy: Strategy
    run: RequestRun
    request_id: str
    #: Its request-stream id (per-stream buckets), taken where it is prepared: the request's own thread,
    #: since a micro-batch runs on its leader's, whose stream may be another's.
    stream: str | None = field(default_factory=current_stream)


def batch_key(request: PreparedRequest) -> Hashable:
    """What requests must share to run as one batch: model, cut, head set and thresholds.

    Parameters
    ----------
    request : PreparedRequest

    Returns
    -------
    tuple
        ``(model id, split, head, thresholds)``.
    """
    return (request.model.model_id, request.strategy.split, request.run.head, request.strategy.thresholds)


def run_batch(runner: Any, requests: list[PreparedRequest]) -> list[Classification]:
    """Run prepared requests of one :func:`batch_key` as one batch; one answer per request, in order.

    Parameters
    ----------
    runner : EdgeRunner
        Its compute, cloud port, planner and answer helpers are used.
    requests : list of PreparedRequest
        Equal :func:`batch_key`.

    Returns
    -------
    list of Classification
    """
    first = requests[0]
    strategy = first.strategy
    if runner.batch_exits is not None:  # the batch-aware plan: the branches worth running at this batch size
        strategy = runner.batch_exits.strategy_for(first.model, first.plan, strategy, first.run.head, len(requests))
    if len(requests) == 1:  # alone: exactly the one-request path
        with request_stream(first.stream):
            return [runner._run(first.model, first.plan, strategy, first.run, request_id=first.request_id)]
    model, head = first.model, first.run.head
    net, compute = model.loaded.net, runner.compute
    runs = [request.run for request in requests]

    def keep_features(stage: int, indices: np.ndarray, h: np.ndarray) -> None:
        for k, j in enumerate(indices):
            runs[j].features.append(h[k:k + 1])  # a view: what the fallback reads

    def keep_evaluated(b: int, indices: np.ndarray, confidence: np.ndarray, label: np.ndarray) -> None:
        for k, j in enumerate(indices):
            runs[j].evaluated.append((b, float(confidence[k]), int(label[k])))

    def branch_exit(b: int, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return compute.exit_batch(model, compute.on_edge_batch(net.run_branch, b, h, head=head), b, head)

    compacted = run_compacted(
        np.concatenate([run.features[0] for run in runs]), start=0, stop=strategy.split,
        branch_after_stage=net.branch_after_stage,
        thresholds={b: float(strategy.thresholds[b]) for b in strategy.active_branches},
        run_stage=lambda h, i: compute.on_edge_batch(net.run_stages, h, start=i, stop=i + 1, head=head),
        branch_exit=branch_exit, on_stage=keep_features, on_branch=keep_evaluated,
    )
    answers: list[Classification | None] = [None] * len(requests)
    for out in compacted.exits:
        request = requests[out.index]
        answers[out.index] = runner._answer(model, strategy, request.run, request.request_id, label=out.label,
                                            confidence=out.confidence, exit_=out.branch)
    rest = [int(j) for j in compacted.continuing]
    if rest and strategy.split == net.n_stages:
        confidence, label = compute.exit_batch(model, compacted.features, -1, head)
        for k, j in enumerate(rest):
            answers[j] = runner._answer(model, strategy, runs[j], requests[j].request_id, label=int(label[k]),
                                        confidence=float(confidence[k]), exit_="final")
    elif rest:
        offloading = _through_bucket(runner, requests, rest, strategy, answers)
        features = compacted.features[[k for k, j in enumerate(rest) if j in offloading]]
        if len(offloading) == 1:
            j = offloading[0]
            answers[j] = runner._offload(model, first.plan, strategy, runs[j], requests[j].request_id, features)
        elif offloading:
            for j, answer in zip(offloading, _offload_batch(runner, [requests[j] for j in offloading], features,
                                                            strategy)):
                answers[j] = answer
    return answers  # type: ignore[return-value]  # every position was answered above


def run_prepared(runner: Any, requests: list[PreparedRequest]) -> list[Classification]:
    """Run an uploaded batch: requests grouped by :func:`batch_key`, each group one batch; answers in order.

    Each request is counted once (``runner.count``), as ``classify`` counts its own.

    Parameters
    ----------
    runner : EdgeRunner
    requests : list of PreparedRequest
        In upload order; they may differ in head set (distortion-aware) or strategy.

    Returns
    -------
    list of Classification
        In the order of ``requests``.
    """
    groups: dict[Hashable, list[int]] = {}
    for index, request in enumerate(requests):
        groups.setdefault(batch_key(request), []).append(index)
    answers: list[Classification | None] = [None] * len(requests)
    for indices in groups.values():
        for index, answer in zip(indices, run_batch(runner, [requests[i] for i in indices])):
            answers[index] = answer
            runner.count(answer.outcome)
    return answers  # type: ignore[return-value]  # every position was answered above


def _through_bucket(runner: Any, requests: list[PreparedRequest], rest: list[int], strategy: Strategy,
                    answers: list[Classification | None]) -> list[int]:
    """The continuing samples the rate limit lets offload; the others answered locally, ``rate_limited``.

    Each sample consults the bucket as a request alone would (one token per
    offload), so a batch cannot spend more tokens than its samples would.
    """
    if runner.rate_limiter is None:
        return rest
    offloading = []
    for j in rest:
        request = requests[j]
        with request_stream(request.stream):  # its own stream's bucket, whoever leads the batch
            local = refused_offload(runner.rate_limiter, runner.compute, request.model, request.plan, strategy,
                                    request.run)
        if local is None:
            offloading.append(j)
        else:
            answers[j] = runner._answer(request.model, strategy, request.run, request.request_id, label=local.label,
                                        confidence=local.confidence, exit_=local.exit, rate_limited=True)
    return offloading


def _offload_batch(runner: Any, requests: list[PreparedRequest], features: np.ndarray,
                   strategy: Strategy) -> list[Classification]:
    """The continuing samples as one batched payload; per-sample answers (or fallbacks), in order."""
    first = requests[0]
    model, plan = first.model, first.plan
    ids = [request.request_id for request in requests]

    def tightest_ms() -> float:
        return min(request.run.remaining_ms() for request in requests)

    def fall_back(reason: str) -> list[Classification]:
        return [runner._fallback(model, plan, strategy, r.run, r.request_id, reason) for r in requests]

    encode_started = time.perf_counter()
    try:
        payload = encode_offload(features, model_id=model.model_id, split=strategy.split,
                                 request_id=uuid.uuid4().hex, wire_dtype=runner.wire_dtype, head=first.run.head,
                                 request_ids=ids, budgets_ms=[r.run.remaining_ms() for r in requests])
    except PopexError as err:  # e.g. NaN activations: the edge still answers
        return fall_back(f"cannot encode the tensor: {err}")
    deflated = compress_payload(payload) if runner.wire_compression == "deflate" else None
    body = payload if deflated is None else deflated
    encode_ms = (time.perf_counter() - encode_started) * 1000.0
    if tightest_ms() <= 0:
        return fall_back("no time left in the budget for the cloud")
    if runner.breaker is not None and not runner.breaker.allow():
        return fall_back("the cloud's circuit breaker is open")
    call_started = time.perf_counter()
    try:
        result = runner.pusher.call(
            lambda timeout_s: runner.client.infer_batch(body, request_ids=tuple(ids), timeout_s=timeout_s,
                                                        content_encoding=None if deflated is None else "deflate"),
            model=model, remaining_ms=tightest_ms)
    except CloudError as err:
        waited_ms = (time.perf_counter() - call_started) * 1000.0
        for request in requests:
            request.run.transfer_ms = waited_ms
        if runner.breaker is not None:
            runner.breaker.record(err)
        if isinstance(err, CloudRejected) and runner.on_cloud_rejected is not None:
            runner.on_cloud_rejected(model.model_id)
        return fall_back(f"{type(err).__name__}: {err}")
    if runner.breaker is not None:
        runner.breaker.record(None)
    runner.planner.submit_offload(len(body), encode_ms=encode_ms, round_trip_ms=float(result.round_trip_ms),
                                  cloud_ms=float(result.cloud_ms), payload_n_bytes=len(payload))
    answers = []
    for request, reply in zip(requests, result.replies):
        request.run.cloud_ms, request.run.transfer_ms = float(result.cloud_ms), float(result.transfer_ms)
        label = int(reply.label)
        class_name = model.class_names[label] if 0 <= label < len(model.class_names) else reply.class_name
        answers.append(runner._answer(model, strategy, request.run, request.request_id, label=label,
                                      confidence=float(reply.confidence), exit_="final", where="cloud",
                                      class_name=class_name))
    return answers
