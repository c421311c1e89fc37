"""The fallback choice: the edge's best local answer when the cloud is late, refuses or is gone.

In order: the most confident branch already evaluated; else the rest of
the network on the edge when the profile says it fits in the remaining
budget (or no branch is at or before the split); else the cheapest branch at
or before the split, evaluated even if the strategy had it off.
"""

from __future__ import annotations

from dataclasses import dataclass

from popex.edge.budget import RequestRun
from popex.edge.compute import EdgeCompute
from popex.edge.plans import ModelPlan
from popex.edge.store import StoredModel

__all__ = ["LocalExit", "fallback_exit", "fallback_reserve_ms"]


@dataclass(frozen=True)
class LocalExit:
    """An answer computed on the edge.

    Attributes
    ----------
    label : int
    confidence : float
    exit : int or str
        Branch index, or "final".
    """

    label: int
    confidence: float
    exit: int | str


def fallback_reserve_ms(model: StoredModel, plan: ModelPlan, split: int, run: RequestRun, *,
                        offload_worst_ms: float) -> float:
    """Edge time the fallback would take now, ms: what an offload's timeout leaves for it.

    So that a request whose cloud is late still answers within its budget
    when the edge alone can: 0 once a branch was evaluated (its answer is
    ready), else the cheaper of the rest of the network and the cheapest
    branch at or before the split (the profile's times). Never so much that
    the offload is left less than 1.5x what the plan predicts it takes: on a
    slow edge the whole local rest would otherwise doom every offload.

    Parameters
    ----------
    model : StoredModel
    plan : ModelPlan
    split : int
        Stages already run.
    run : RequestRun
    offload_worst_ms : float
        The strategy's predicted worst-case latency, ms from arrival.

    Returns
    -------
    float
    """
    if run.evaluated:
        return 0.0
    profile = plan.profile
    rest_ms = float(profile.stage_edge_ms[split:].sum())
    branch_ms = [float(profile.branch_edge_ms[b]) for b, k in enumerate(model.loaded.net.branch_after_stage)
                 if run.first_stage < k <= split]
    needed_ms = 1.5 * max(0.0, offload_worst_ms - run.elapsed_ms())
    return min([rest_ms, *branch_ms, max(0.0, run.remaining_ms() - needed_ms)])


def fallback_exit(compute: EdgeCompute, model: StoredModel, plan: ModelPlan, split: int,
                  run: RequestRun) -> LocalExit:
    """The best local exit for a request that ran stages 1..``split`` on the edge.

    Parameters
    ----------
    compute : EdgeCompute
    model : StoredModel
    plan : ModelPlan
        The plan the request ran with (its profile decides what fits).
    split : int
        Stages already run.
    run : RequestRun
        The request's features, evaluated branches and budget.

    Returns
    -------
    LocalExit
    """
    if run.evaluated:
        branch, confidence, label = max(run.evaluated, key=lambda item: item[1])
        return LocalExit(label=label, confidence=confidence, exit=branch)
    net = model.loaded.net
    profile = plan.profile
    rest_ms = float(profile.stage_edge_ms[split:].sum())
    candidates = [b for b, k in enumerate(net.branch_after_stage) if run.first_stage < k <= split]  # ran here
    if rest_ms <= run.remaining_ms() or not candidates:
        logits = compute.on_edge(net.run_stages, run.features[split], start=split, head=run.head, run=run,
                                 emulated_ms=rest_ms)
        confidence, label = compute.final(model, logits, head=run.head)
        return LocalExit(label=label, confidence=confidence, exit="final")
    branch = min(candidates, key=lambda b: float(profile.branch_edge_ms[b]))
    confidence, label = compute.evaluate_branch(model, plan, branch, run.features[net.branch_after_stage[branch]],
                                                head=run.head)
    return LocalExit(label=label, confidence=confidence, exit=branch)
