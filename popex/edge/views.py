"""Read-only views of the edge: its models, their strategy tables, and the edge at a glance.

What ``GET /api/v1/models...`` and ``GET /api/v1/status`` answer, as
JSON-ready dicts. Everything is read at call time from the objects that own
it (the store, the plans, the runner, the planner, the uplink monitor);
nothing is copied here.
"""

from __future__ import annotations

from typing import Any

from popex.edge.cloud_port import CloudError
from popex.edge.plans import ModelPlan
from popex.edge.store import StoredModel
from popex.runtime.onnx_model import PRISTINE_HEAD

__all__ = ["DEFAULT_ROW_LIMIT", "MAX_ROW_LIMIT", "EdgeViews"]

#: Rows of a strategy table one ``/strategies`` answer holds unless asked (``?limit=``), and at most.
DEFAULT_ROW_LIMIT = 1000
MAX_ROW_LIMIT = 10_000

_HEALTH_TIMEOUT_S = 1.0


class EdgeViews:
    """JSON-ready views over the edge's parts.

    Parameters
    ----------
    registry : ModelRegistry
    plans : PlanBook
    runner : EdgeRunner
        Gives each model's plan, the default deadline and objective, and the request counts.
    planner : BackgroundPlanner
        Gives the measured O, fixed edge time and wire ratio.
    monitor : UplinkMonitor or None
        Gives the uplink estimate; None: the plans' link, "configured".
    client : CloudClient
        Asked for the cloud's health.
    cloud_url : str
        Shown in the status.
    """

    def __init__(self, *, registry: Any, plans: Any, runner: Any, planner: Any, monitor: Any | None, client: Any,
                 cloud_url: str) -> None:
        self.registry = registry
        self.plans = plans
        self.runner = runner
        self.planner = planner
        self.monitor = monitor
        self.client = client
        self.cloud_url = cloud_url

    def list_models(self) -> list[dict[str, Any]]:
        """Every registered model.

        Returns
        -------
        list of dict
            ``model_id``, ``name``, ``state`` of each.
        """
        return [
            {"model_id": m.model_id, "name": m.name, "state": m.state}
            for m in (self.registry.get(i) for i in self.registry.ids())
        ]

    def describe(self, model_id: str) -> dict[str, Any]:
        """One model: state, names, profile in use, current decision for the default deadline, experts.

        Parameters
        ----------
        model_id : str

        Returns
        -------
        dict

        Raises
        ------
        UnknownModelError
        """
        model = self.registry.get(model_id)
        if model_id not in self.plans:  # refused at start (its error says why): nothing planned to show
            return {"model_id": model.model_id, "name": model.name, "state": model.state, "error": model.error,
                    "n_stages": model.loaded.net.n_stages, "strategy": None}
        plan = self.runner.plan_of(model)
        strategy = plan.strategy(self.runner.default_deadline_ms, self.runner.objective)
        return {
            "model_id": model.model_id,
            "name": model.name,
            "state": model.state,
            "error": model.error,
            "class_names": list(model.class_names),
            "n_stages": model.loaded.net.n_stages,
            "branch_after_stage": list(model.loaded.net.branch_after_stage),
            "profile": plan.profile.to_dict(),
            "cloud_profile": model.cloud_profile or "assumed",
            "link": {"uplink_mbps": plan.link.uplink_mbps, "rtt_ms": plan.link.rtt_ms},
            "strategy": strategy.to_dict(),
            **self._experts_view(model, plan),
        }

    def strategies(self, model_id: str, *, deadline_ms: float | None = None,
                   objective: str | None = None, head: str | None = None, offset: int = 0,
                   limit: int = DEFAULT_ROW_LIMIT) -> dict[str, Any]:
        """The current strategy table of a model as JSON rows, and the row chosen for a deadline.

        Parameters
        ----------
        model_id : str
        deadline_ms : float, optional
            Default: the config's default deadline.
        objective : {"mean", "tail"}, optional
            Default: the config's objective.
        head : str, optional
            Whose table: "pristine" (default) or one of the model's experts.
        offset, limit : int
            Which rows: ``rows[offset:offset + limit]`` (a 4-branch table has
            ~100,000 rows, 9 MB of JSON; a page is bounded).

        Returns
        -------
        dict
            ``model_id``, ``head``, ``link``, ``n_rows`` (all), ``offset``, ``limit``, ``chosen``, ``rows``.

        Raises
        ------
        UnknownModelError, ConfigError, UnknownHeadError
        """
        model = self.registry.get(model_id)
        plan = self.runner.plan_of(model)
        head = PRISTINE_HEAD if head is None else head
        table = plan.table_of(head)
        deadline_ms = self.runner.default_deadline_ms if deadline_ms is None else deadline_ms
        strategy = plan.strategy(deadline_ms, self.runner.objective if objective is None else objective, head=head)
        return {
            "model_id": model.model_id,
            "head": head,
            "link": {"uplink_mbps": table.link.uplink_mbps, "rtt_ms": table.link.rtt_ms},
            "n_rows": len(table),
            "offset": offset,
            "limit": limit,
            "chosen": strategy.to_dict(),
            "rows": [table.row(index) for index in range(offset, min(len(table), offset + limit))],
        }

    def strategies_csv(self, model_id: str) -> str:
        """The current strategy table of a model as CSV text.

        Parameters
        ----------
        model_id : str

        Returns
        -------
        str
            A header line, then one row per strategy.

        Raises
        ------
        UnknownModelError
            If the edge holds no such model.
        """
        return self.runner.plan_of(self.registry.get(model_id)).table_csv()

    def status(self) -> dict[str, Any]:
        """The edge at a glance: uplink estimate, cloud health, models and their strategies.

        Returns
        -------
        dict
            The body of ``GET /api/v1/status``.
        """
        runner, planner = self.runner, self.planner
        emulated = getattr(self.client, "link", None)
        models = []
        for info in self.list_models():
            if info["model_id"] not in self.plans:  # refused at start (its error says why): no strategy
                models.append({**info, "strategy": None})
                continue
            model = self.registry.get(info["model_id"])
            strategy = runner.plan_of(model).strategy(runner.default_deadline_ms, runner.objective)
            if runner.batch_exits is not None:  # queues the default strategy's batch plan, shown once made
                runner.batch_exits.strategy_for(model, runner.plan_of(model), strategy, None, 1)
            models.append({**info, "strategy": strategy.to_dict()})
        return {
            "uplink": self._uplink(),
            "cloud": {"url": self.cloud_url, "healthy": self._cloud_healthy(),
                      **({} if runner.breaker is None else {"breaker": runner.breaker.to_dict()})},
            "models": models,
            "emulated_link": None if emulated is None else {"uplink_mbps": emulated.uplink_mbps,
                                                            "rtt_ms": emulated.rtt_ms},
            "emulated_edge_slowdown": runner.compute.edge_slowdown,
            "default_deadline_ms": runner.default_deadline_ms,
            "objective": runner.objective,
            "plan_headroom_fraction": self.plans.headroom_fraction,
            "offload_overhead_ms": planner.overhead.current_ms,
            "edge_fixed_ms": planner.edge_fixed.current_ms,
            "wire_compression": runner.wire_compression,
            "wire_ratio": planner.wire_ratio.current_ms,
            "requests": runner.counts(),
            "rate_limit": None if runner.rate_limiter is None else runner.rate_limiter.status(),
            "batch_plan": None if runner.batch_exits is None else runner.batch_exits.status(),
        }

    # -- private ------------------------------------------------------------------

    def _experts_view(self, model: StoredModel, plan: ModelPlan) -> dict[str, Any]:
        classifier = model.classifier
        deadline_ms, objective = self.runner.default_deadline_ms, self.runner.objective
        return {
            "experts": list(model.expert_names),
            "distortion_aware_default": self.runner.distortion_aware_default and model.has_experts,
            "distortion_classifier": None if classifier is None else {
                "model_id": classifier.model_id,
                "classes": list(classifier.net.class_names),
                "input_shape": list(classifier.net.input_shape),
            },
            "expert_strategies": {head: plan.strategy(deadline_ms, objective, head=head).to_dict()
                                  for head in model.expert_names},
        }

    def _uplink(self) -> dict[str, Any]:
        if self.monitor is not None:
            return self.monitor.status()
        link = self.plans.link
        return {"uplink_mbps": link.uplink_mbps, "rtt_ms": link.rtt_ms, "source": "configured", "n_samples": 0,
                "history": []}

    def _cloud_healthy(self) -> bool:
        try:
            return bool(self.client.health(timeout_s=_HEALTH_TIMEOUT_S))
        except CloudError:
            return False
