"""The edge's hook into the offload token bucket: consult it, or answer at the best local exit.

A request whose strategy would offload asks the
:class:`popex.ratelimit.live.RateLimiter` with the metric of its most
confident evaluated branch; refused, it is answered by the same local choice
as a fallback (:func:`popex.edge.fallback.fallback_exit`) but marked
``rate_limited``. The bucket, the policy and their background work live in
:mod:`popex.ratelimit.live`; this module only joins them to a request.
"""

from __future__ import annotations

from typing import Any

from popex.edge.budget import RequestRun
from popex.edge.compute import EdgeCompute
from popex.edge.fallback import LocalExit, fallback_exit
from popex.edge.plans import ModelPlan
from popex.edge.store import StoredModel
from popex.edge.strategy import Strategy
from popex.ratelimit.live import StrategyPrediction
from popex.ratelimit.streams import StreamLimiters

__all__ = ["refused_offload", "strategy_prediction"]


def strategy_prediction(plan: ModelPlan, strategy: Strategy) -> StrategyPrediction:
    """The strategy's predictions and the latency of its offload and refused paths, ms (from the plan's profile).

    An offloaded request passed every active branch, then the uplink and the
    cloud: the strategy's worst case. A refused one pays the same edge part
    and is answered at its best evaluated branch; with no active branch it
    runs the rest of the network on the edge (what ``fallback_exit`` does
    when that fits).

    Parameters
    ----------
    plan : ModelPlan
    strategy : Strategy

    Returns
    -------
    StrategyPrediction
    """
    profile, split = plan.profile, strategy.split
    edge_ms = profile.edge_fixed_ms + float(sum(profile.stage_edge_ms[:split])) + sum(
        float(profile.branch_edge_ms[b]) for b in strategy.active_branches)
    refused_ms = edge_ms if strategy.active_branches else edge_ms + float(sum(profile.stage_edge_ms[split:]))
    return StrategyPrediction(accuracy=float(strategy.accuracy), offload_prob=float(strategy.offload_prob),
                              latency_ms=float(strategy.latency_ms), offload_path_ms=float(strategy.worst_latency_ms),
                              refused_path_ms=refused_ms)


def refused_offload(limiter: Any, compute: EdgeCompute, model: StoredModel, plan: ModelPlan, strategy: Strategy,
                    run: RequestRun) -> LocalExit | None:
    """The local answer of a request the bucket refuses, or None when it may offload (its token spent).

    Parameters
    ----------
    limiter : RateLimiter
    compute : EdgeCompute
    model : StoredModel
    plan : ModelPlan
    strategy : Strategy
        The request's: its split (stages already run) and active branches.
    run : RequestRun
        Its evaluated branches give the metric.

    Returns
    -------
    LocalExit or None
    """
    if isinstance(limiter, StreamLimiters):  # this request's stream's bucket, else the edge's
        limiter = limiter.for_request()
        if limiter is None:
            return None
    if run.evaluated:
        branch, confidence, _ = max(run.evaluated, key=lambda item: item[1])
    else:
        branch, confidence = None, 0.0
    gate = tuple((b, float(strategy.thresholds[b])) for b in strategy.active_branches)
    decision = limiter.consult(model.model_id, model.calibration_of(run.head), branch, float(confidence), gate=gate,
                               strategy_prediction=strategy_prediction(plan, strategy))
    if decision.granted:
        return None
    return fallback_exit(compute, model, plan, strategy.split, run)
