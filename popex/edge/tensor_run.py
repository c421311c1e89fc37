"""A device's tensor at cut x: the edge runs stages x+1..y with its exits and forwards at y, as for an image.

The device ran stages 1..x and its own branches (:mod:`popex.device.client`)
and sends the tensor in the wire format of :mod:`popex.wire` (``split`` = x,
its request id and the budget it has left), deflated or not. Everything
about the payload is checked before any compute: the format
(:func:`popex.wire.decode_offload`), the model (by id), no expert head, x in
0..N-1 and the tensor's shape at x; any of these wrong is a 4xx.

The edge's part comes from the current three-tier plan for the request's
requirement (:class:`~popex.edge.three_tier_plan.DevicePlanner`) with the
tensor's x pinned (and the device's pinned y, if it asked for one): its y and
the thresholds of the edge's branches. For a device on the current plan
that is the same plan; one whose plan is older than the edge's gets the best
plan for the x it sent, so a re-plan never turns a request away. From there the request is the edge's ordinary pipeline
(``EdgeRunner._run`` from stage x+1, :mod:`popex.edge.pipeline`): the same
branch evaluation, offload, circuit breaker and fallback to the edge's
best local exit, counted once.
"""

from __future__ import annotations

from dataclasses import dataclass

from popex.edge.budget import RequestRun, offload_budget_ms
from popex.edge.classification import Classification
from popex.edge.strategy import Strategy
from popex.edge.three_tier_plan import DEFAULT_THREE_TIER_POLICY, DevicePlan, DevicePlanner
from popex.wire import MAX_WIRE_BYTES, WireError, decode_offload, decompress_payload

__all__ = ["TensorAnswer", "classify_tensor"]


@dataclass(frozen=True)
class TensorAnswer:
    """The edge's answer to a device tensor: the classification and the cuts it ran with."""

    classification: Classification
    x: int
    y: int

    def to_dict(self) -> dict:
        """The body of ``POST /api/v1/classify/tensor``: the classification's, plus ``cuts`` [x, y].

        Returns
        -------
        dict
        """
        return {**self.classification.to_dict(), "cuts": [self.x, self.y]}


def _strategy(plan: DevicePlan, x: int, y: int) -> Strategy:
    active = tuple(b for b, t in enumerate(plan.thresholds)
                   if t is not None and x < plan.branch_after_stage[b] <= y)
    return Strategy(split=y, thresholds=plan.thresholds, active_branches=active,
                    latency_ms=plan.expected_latency_ms, worst_latency_ms=plan.worst_latency_ms,
                    accuracy=plan.accuracy, offload_prob=plan.cloud_prob,
                    feasible=plan.feasible, row=-1, objective=plan.objective, deadline_ms=plan.deadline_ms,
                    policy=plan.policy)


def classify_tensor(runner, planner: DevicePlanner, body: bytes, *, content_encoding: str | None,
                    deadline_ms: float | None, objective: str | None, arrival_s: float,
                    policy: str = DEFAULT_THREE_TIER_POLICY, max_bytes: int = MAX_WIRE_BYTES,
                    y: int | None = None) -> TensorAnswer:
    """Run a device's tensor from its cut through the edge's part of the three-tier plan.

    Parameters
    ----------
    runner : EdgeRunner
        The edge's pipeline (model lookup, plans, compute, the cloud port, counts).
    planner : DevicePlanner
        The three-tier plans.
    body : bytes
        The request body: a wire payload, deflated when ``content_encoding`` says so.
    content_encoding : str, optional
        "deflate" or None.
    deadline_ms : float, optional
        The requirement; default: the edge's.
    objective : {"mean", "tail"}, optional
    arrival_s : float
        ``time.perf_counter()`` at the request's arrival.
    policy : str
        A three-tier policy (its y and thresholds are used).
    max_bytes : int
        Largest payload taken, after inflating.
    y : int, optional
        The device's pinned edge cut (its plan query's ``y``); default: the plan's best y for this x.

    Returns
    -------
    TensorAnswer

    Raises
    ------
    WireError
        A malformed payload, a cut out of range, an expert head, or a tensor whose shape does not fit the cut.
    UnknownModelError, ConfigError
        Unknown model, bad requirement, objective or policy.
    """
    outcome = "rejected"
    try:
        payload = decompress_payload(body, encoding=content_encoding, max_bytes=max_bytes)
        request = decode_offload(payload, max_bytes=max_bytes)
        model = runner.resolve_model(request.model_id)
        net = model.loaded.net
        x = request.split
        if request.head is not None:
            raise WireError("a device tensor runs the pristine heads only: send no 'head'")
        if request.request_ids is not None:
            raise WireError("a device sends one tensor per request, not a batch")
        if not 0 <= x < net.n_stages:
            raise WireError(f"cut {x} is out of range: a device that ran all {net.n_stages} stages answers itself, "
                            f"so split must be in 0..{net.n_stages - 1}")
        expected = (1, *net.stage_output_shapes()[x])
        if tuple(request.tensor.shape) != expected:
            raise WireError(f"tensor shape {list(request.tensor.shape)} does not fit model {model.model_id[:12]} "
                            f"after stage {x}: expected {list(expected)}")
        model_plan = runner.plan_of(model)
        deadline_ms = runner.default_deadline_ms if deadline_ms is None else deadline_ms
        plan = planner.plan(model, model_plan, deadline_ms=deadline_ms,
                            objective=runner.objective if objective is None else objective, policy=policy, x=x, y=y)
        y = plan.y
        strategy = _strategy(plan, x, y)
        budget_ms = offload_budget_ms(plan.deadline_ms, plan.objective, strategy)
        if request.budget_ms is not None:  # what the device has left, counted from this arrival
            budget_ms = min(budget_ms, max(0.0, request.budget_ms))
        run = RequestRun(arrival_s=arrival_s, deadline_ms=plan.deadline_ms, budget_ms=budget_ms,
                         features=[None] * x + [request.tensor], evaluated=[], first_stage=x)
        result = runner._run(model, model_plan, strategy, run, request_id=request.request_id)
        outcome = result.outcome
        return TensorAnswer(classification=result, x=x, y=y)
    finally:
        runner.count(outcome)  # each request is counted once, whatever happened
