"""Per-model plan state on the edge: the current strategy table and decisions.

Exit statistics (and the precision-aware thresholds) are found once per model from the
calibration; a :class:`~popex.decision.Planner` is built once per profile; a new link
estimate only rebuilds the table and one :class:`~popex.decision.DecisionIndex` per objective
(milliseconds), swapped in by one reference assignment: a request thread sees the whole old
plan or the whole new one. Decisions are cached per requirement inside the plan they were
made on (a dict read, O(1)); a new plan keeps the old decisions unless better by the hysteresis.

A model with expert head sets (see :mod:`popex.nets.experts`) gets one strategy table per
head set: the same profile, each head's own calibration swept once. The experts' plans hang
off the pristine plan object, so one assignment swaps every head's table together.
"""

from __future__ import annotations

import dataclasses
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from popex.checks import check_deadline_ms, check_objective
from popex.decision.decide import DEFAULT_INFEASIBLE_ACCURACY_MARGIN
from popex.decision.calibration import Calibration
from popex.decision.precision_aware import precision_aware_thresholds
from popex.decision.policies import PolicyBook, check_headroom, check_policy, edge_threshold_grids
from popex.decision.latency import Link, Profile
from popex.decision.sweep import ExitStats, sweep_exit_stats
from popex.decision.table import Planner, StrategyTable
from popex.edge.strategy import Strategy, keep_unless_better, strategy_from_row
from popex.errors import ConfigError
from popex.runtime.onnx_model import PRISTINE_HEAD, UnknownHeadError

__all__ = ["ModelPlan", "PlanBook"]

# Deadlines come from clients as arbitrary floats; bound the cache so a client
# sweeping deadlines cannot grow it without limit (it is refilled on demand).
_MAX_CACHED_DECISIONS = 4096


def _checked_link(link: object) -> Link:
    if not isinstance(link, Link):
        raise ConfigError(f"expected a Link, got {type(link).__name__}")
    return link


@dataclass(frozen=True, eq=False)
class _Plan:
    """Everything a request reads, for one profile and link; replaced, never mutated
    (except its decision cache, a dict whose single-key writes are atomic)."""

    profile: Profile
    link: Link
    table: StrategyTable
    policies: PolicyBook
    cache: dict[tuple[float, str, str], Strategy]
    experts: dict[str, _Plan] = dataclasses.field(default_factory=dict)  # expert head set -> its plan
    previous: dict[tuple[float, str, str], Strategy] = dataclasses.field(default_factory=dict)  # the replaced cache


def _hashable(key: tuple[object, ...]) -> bool:
    """Whether ``key`` can be looked up in a decision cache (a client may send anything)."""
    return all(isinstance(part, (str, int, float)) and not isinstance(part, bool) for part in key)


def _head_plan(planner: Planner, link: Link, options: dict, precision_aware: tuple) -> _Plan:
    table = planner.table(link)
    return _Plan(profile=planner.profile, link=link, table=table, cache={},
                 policies=PolicyBook.build(table, precision_aware=precision_aware, **options))


def _strategy(plan: _Plan, deadline_ms: float, objective: str, policy: str) -> Strategy:
    decision = plan.policies.decide(policy, deadline_ms=deadline_ms, objective=objective)
    return strategy_from_row(plan.table.row(decision.row), row_index=decision.row, feasible=decision.feasible,
                             objective=objective, deadline_ms=deadline_ms, policy=policy,
                             branch_after_stage=plan.profile.branch_after_stage,
                             fastest_latency_ms=decision.fastest_latency_ms)


class ModelPlan:
    """Plan state of one model: exit statistics, planner, current table and decisions.

    Parameters
    ----------
    calibration : Calibration
        The model's calibration; swept once here.
    profile : Profile
        Initial profile (measured or assumed).
    link : Link
        Initial link estimate.
    thresholds : sequence of sequences of float, optional
        Per-branch threshold grids (default: :func:`~popex.decision.policies.edge_threshold_grids`).
    expert_calibrations : mapping of str to Calibration, optional
        One per expert head set; each its own table on the same profile (``strategy(..., head=...)``).
    headroom_fraction : float, default 0
        Rows count as meeting a requirement D when predicted within
        ``D · (1 - headroom_fraction)`` (see :mod:`popex.decision.policies`).
    infeasible_accuracy_margin : float, default 0.05
        When nothing fits: the fastest row this close to the best accuracy (:mod:`popex.decision.decide`).
    strategy_hysteresis_accuracy : float, optional
        A re-plan keeps a requirement's strategy unless :func:`~popex.edge.strategy.keep_unless_better`.

    Raises
    ------
    CalibrationError, ProfileError
        If a calibration, the profile and branch positions disagree.
    """

    def __init__(self, calibration: Calibration, *, profile: Profile, link: Link,
                 thresholds: Sequence[Sequence[float]] | None = None,
                 expert_calibrations: Mapping[str, Calibration] | None = None, headroom_fraction: float = 0.0,
                 infeasible_accuracy_margin: float = DEFAULT_INFEASIBLE_ACCURACY_MARGIN,
                 strategy_hysteresis_accuracy: float | None = None) -> None:
        self.headroom_fraction, self._hysteresis = headroom_fraction, strategy_hysteresis_accuracy
        self._options = {"headroom_fraction": headroom_fraction, "infeasible_accuracy_margin": infeasible_accuracy_margin}
        if thresholds is None:
            thresholds = edge_threshold_grids(len(profile.branch_after_stage))
        positions = profile.branch_after_stage
        self.stats: ExitStats = sweep_exit_stats(calibration, branch_after_stage=positions, thresholds=thresholds)
        self.expert_stats: dict[str, ExitStats] = {
            head: sweep_exit_stats(c, branch_after_stage=positions, thresholds=thresholds)
            for head, c in (expert_calibrations or {}).items()
        }
        self._precision = {head: (precision_aware_thresholds(c, grids=thresholds).thresholds, positions)
                           for head, c in {PRISTINE_HEAD: calibration, **(expert_calibrations or {})}.items()}
        self._lock = threading.Lock()
        self._replan(profile, link)

    def _replan(self, profile: Profile, link: Link) -> None:
        """New planners for ``profile``, then one new plan swapped in (the caller holds the lock)."""
        planner = Planner(self.stats, profile)
        expert_planners = {head: Planner(stats, profile) for head, stats in self.expert_stats.items()}
        self._planner, self._expert_planners = planner, expert_planners
        self._plan = self._build(link)

    def _build(self, link: Link) -> _Plan:
        experts = {head: _head_plan(planner, link, self._options, self._precision[head])
                   for head, planner in self._expert_planners.items()}
        return dataclasses.replace(_head_plan(self._planner, link, self._options, self._precision[PRISTINE_HEAD]),
                                   experts=experts, previous=self._plan.cache if hasattr(self, "_plan") else {})

    @property
    def head_names(self) -> tuple[str, ...]:
        """The head sets with a strategy table: "pristine", then the experts."""
        return (PRISTINE_HEAD, *self.expert_stats)

    def table_of(self, head: str | None = PRISTINE_HEAD) -> StrategyTable:
        """The current strategy table of head set ``head``.

        Parameters
        ----------
        head : str, default "pristine"
            "pristine" (or None) or an expert head set.

        Returns
        -------
        StrategyTable

        Raises
        ------
        UnknownHeadError
            If the model has no such head set.
        """
        return self._head(self._plan, head).table

    def _head(self, plan: _Plan, head: str | None) -> _Plan:
        if head is None or head == PRISTINE_HEAD:
            return plan
        expert = plan.experts.get(head) if isinstance(head, str) else None
        if expert is None:
            raise UnknownHeadError(f"this model has no head set {str(head)[:40]!r}; it has {list(self.head_names)}")
        return expert

    @property
    def profile(self) -> Profile:
        """The profile the current plan was built from."""
        return self._plan.profile

    @property
    def link(self) -> Link:
        """The link estimate the current plan was built for."""
        return self._plan.link

    @property
    def table(self) -> StrategyTable:
        """The current strategy table."""
        return self._plan.table

    def set_link(self, link: Link) -> None:
        """Rebuild the table for a new link estimate and swap it in.

        Parameters
        ----------
        link : Link
            The uplink (rate, RTT) to plan for.

        Raises
        ------
        ConfigError
            If ``link`` is not a Link.
        """
        link = _checked_link(link)
        with self._lock:
            self._plan = self._build(link)

    def set_profile(self, profile: Profile, *, link: Link | None = None) -> None:
        """Use a new profile (e.g. measured, or with a new overhead O) and re-plan.

        Parameters
        ----------
        profile : Profile
        link : Link, optional
            Also a new link estimate; default: the current one.

        Raises
        ------
        ProfileError
            If the profile's branches differ from the model's.
        """
        with self._lock:
            self._replan(profile, self._plan.link if link is None else link)

    def update_profile(self, **changes: float) -> None:
        """Re-plan with some profile fields replaced (e.g. a measured O or fixed edge time), others kept.

        Parameters
        ----------
        **changes : float
            Profile fields, e.g. ``offload_overhead_ms``, ``edge_fixed_ms``, ``wire_ratio``.

        Raises
        ------
        ProfileError
            If a value is negative or not finite.
        """
        with self._lock:
            self._replan(dataclasses.replace(self._planner.profile, **changes), self._plan.link)

    def strategy(self, deadline_ms: float, objective: str = "mean", policy: str = "adaptive",
                 head: str | None = PRISTINE_HEAD) -> Strategy:
        """The strategy for a latency requirement, from the current plan (O(1) when cached).

        Parameters
        ----------
        deadline_ms : float
            Latency requirement, ms, finite and >= 0.
        objective : {"mean", "tail"}
        policy : str
            One of :data:`popex.decision.policies.POLICIES`; baselines share the table.
        head : str, default "pristine"
            Whose strategy table: "pristine" (or None) or an expert head set.

        Returns
        -------
        Strategy

        Raises
        ------
        ConfigError, UnknownHeadError
            On a bad deadline, objective or policy; if the model has no head set ``head``.
        """
        plan = self._head(self._plan, head)  # one read: the whole request uses this plan
        # Only checked arguments are ever cached, so a hit needs no check.
        key = (deadline_ms, objective, policy)
        cached = plan.cache.get(key) if _hashable(key) else None
        if cached is not None:
            return cached
        deadline_ms = check_deadline_ms(deadline_ms)
        strategy = _strategy(plan, deadline_ms, check_objective(objective), check_policy(policy))
        key = (deadline_ms, strategy.objective, strategy.policy)
        if (previous := plan.previous.get(key)) is not None:
            strategy = keep_unless_better(previous, strategy, plan.table.row(previous.row), hysteresis_accuracy=self
                                          ._hysteresis, held_to_ms=deadline_ms * (1.0 - self.headroom_fraction))
        if len(plan.cache) >= _MAX_CACHED_DECISIONS:
            plan.cache.clear()
        plan.cache[key] = strategy
        return strategy

    def table_csv(self) -> str:
        """The current strategy table as CSV text (see ``StrategyTable.to_csv``).

        Returns
        -------
        str
        """
        with tempfile.TemporaryDirectory() as tmp:
            self._plan.table.to_csv(Path(tmp) / "strategies.csv")
            return (Path(tmp) / "strategies.csv").read_text(encoding="utf-8")


class PlanBook:
    """The plans of every model, and the link estimate they share.

    Parameters
    ----------
    link : Link
        Initial link estimate (configured or emulated).
    headroom_fraction, infeasible_accuracy_margin, strategy_hysteresis_accuracy : float
        Passed to each :class:`ModelPlan` (the config's keys of these names; the first is ``plan_headroom_fraction``).
    thresholds : sequence of sequences of float, optional
        Passed to each :class:`ModelPlan`.

    Raises
    ------
    ConfigError
        If ``link`` is not a Link or the headroom is out of range.

    Examples
    --------
    >>> book = PlanBook(link=Link(uplink_mbps=10.0, rtt_ms=20.0), headroom_fraction=0.05)
    >>> book.model_ids()
    []
    """

    def __init__(self, *, link: Link, headroom_fraction: float, thresholds: Sequence[Sequence[float]] | None = None,
                 infeasible_accuracy_margin: float = DEFAULT_INFEASIBLE_ACCURACY_MARGIN,
                 strategy_hysteresis_accuracy: float | None = None) -> None:
        self._link = _checked_link(link)
        self._thresholds = thresholds
        self.headroom_fraction = check_headroom(headroom_fraction)
        self.infeasible_accuracy_margin, self.strategy_hysteresis_accuracy = (infeasible_accuracy_margin,
                                                                              strategy_hysteresis_accuracy)
        self._plans: dict[str, ModelPlan] = {}
        self._lock = threading.Lock()

    @property
    def link(self) -> Link:
        """The link estimate the plans are built for."""
        return self._link

    def model_ids(self) -> list[str]:
        """Ids of the models that have a plan.

        Returns
        -------
        list of str
        """
        return list(self._plans)

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._plans

    def get(self, model_id: str) -> ModelPlan:
        """The plan of ``model_id``.

        Parameters
        ----------
        model_id : str

        Returns
        -------
        ModelPlan
            The same object for the model's lifetime; re-planning replaces what it holds.

        Raises
        ------
        ConfigError
            If the model has no plan yet.
        """
        plan = self._plans.get(model_id)
        if plan is None:
            raise ConfigError(f"model {model_id!r} has no plan")
        return plan

    def install(self, model_id: str, calibration: Calibration, profile: Profile, *,
                expert_calibrations: Mapping[str, Calibration] | None = None) -> ModelPlan:
        """Plan a model with ``profile`` (one table per head set); replaces the profile if it already has a plan.

        Parameters
        ----------
        model_id : str
        calibration : Calibration
        profile : Profile
        expert_calibrations : mapping of str to Calibration, optional

        Returns
        -------
        ModelPlan

        Raises
        ------
        CalibrationError, ProfileError
            If the calibration, the profile and branch positions disagree.
        """
        with self._lock:
            existing = self._plans.get(model_id)
            if existing is not None:
                existing.set_profile(profile, link=self._link)
                return existing
            plan = ModelPlan(calibration, profile=profile, link=self._link, thresholds=self._thresholds,
                             expert_calibrations=expert_calibrations, headroom_fraction=self.headroom_fraction,
                             infeasible_accuracy_margin=self.infeasible_accuracy_margin,
                             strategy_hysteresis_accuracy=self.strategy_hysteresis_accuracy)
            self._plans[model_id] = plan
            return plan

    def remove(self, model_id: str) -> bool:
        """Drop the plan of ``model_id`` (a deleted model); False if it had none.

        >>> PlanBook(link=Link(uplink_mbps=1.0, rtt_ms=1.0), headroom_fraction=0.0).remove("m")
        False
        """
        with self._lock:
            return self._plans.pop(model_id, None) is not None

    def set_link(self, link: Link) -> None:
        """Re-plan every model for a new link estimate (the background planner's job).

        A model registered meanwhile is planned for ``link`` too.

        Parameters
        ----------
        link : Link
            As for :meth:`ModelPlan.set_link`, which raises ConfigError for anything else.
        """
        link = _checked_link(link)
        with self._lock:
            self._link = link
            for plan in list(self._plans.values()):
                plan.set_link(link)

    def update_profile(self, **changes: float) -> None:
        """Re-plan every model with some profile fields replaced (see :meth:`ModelPlan.update_profile`).

        Parameters
        ----------
        **changes : float

        Raises
        ------
        ProfileError
            If a value is negative or not finite.
        """
        with self._lock:
            for plan in list(self._plans.values()):
                plan.update_profile(**changes)

    def strategy(self, model_id: str, deadline_ms: float, objective: str = "mean",
                 policy: str = "adaptive", head: str | None = PRISTINE_HEAD) -> Strategy:
        """Shortcut for ``get(model_id).strategy(deadline_ms, objective, policy, head)``.

        Parameters and errors as :meth:`ModelPlan.strategy` (and ConfigError for a model without a plan).

        Returns
        -------
        Strategy
        """
        return self.get(model_id).strategy(deadline_ms, objective, policy, head)
