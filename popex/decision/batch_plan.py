"""Batch-aware exits: which of a strategy's branches a batch of n samples should run (DESIGN §3, "Batching").

A batched path (:mod:`popex.runtime.compaction`) runs a batch stage by stage
and drops the samples that exit; each sample's latency is the time of every
stage and branch that ran while it was still in the batch. A branch costs
its time at the batch size that reaches it, and pays off only if enough
samples leave there to shrink the later stages' batches. Whether it does
depends on two measured matrices:

- the **inference time matrix** (:mod:`popex.runtime.batch_profile`): the
  time t_i(n) of each stage and e_b(n) of each branch for a batch of n,
  measured at n = 1, 2, 4, ..., interpolated linearly between; anchored on
  the profile's batch-1 times (so an emulated slower edge keeps its factor),
  and applied to the cloud's batch-1 times for the batched offload;
- the **batching pattern matrix** (:mod:`popex.decision.batch_pattern`): for given
  thresholds, the distribution of how many samples of a batch of n continue
  past each branch. A batch is n samples drawn without replacement from the
  calibration split, so the count is hypergeometric in the number of
  calibration samples that continue there.

With n_i the samples that run stage i (n_b branch b, m offloaded), the sum
of a batch's per-sample latencies is Σ_i n_i·t_i(n_i) + Σ_b n_b·e_b(n_b) +
m·off(m) (a piece's time is paid by every sample in the batch while it runs);
its expectation needs only each count's marginal, a row of the pattern
matrix, so the prediction is exact for batches drawn from the calibration
split (``tests/test_batch_plan.py`` checks it against every batch of a small
split). A batch's completion time is Σ E[t_i(n_i)] + Σ E[e_b(n_b)] + E[off(m)].

:func:`plan_batch_exits` chooses, for each batch size, the subset of the
strategy's active branches with the least expected per-sample latency among
those whose expected completion time is <= the model's without exits at the
same cut. The per-query expectation at an arrival rate
(:mod:`popex.decision.batch_arrivals`) is separable in the batch size, so
choosing per size minimises it too; the rate sets how long a request waits
and which sizes occur, not the choice per size.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from popex.checks import check_int
from popex.decision.batch_arrivals import ArrivalModel
from popex.decision.batch_pattern import hypergeometric_pmf, continuing_counts
from popex.decision.calibration import Calibration
from popex.decision.latency import Link, Profile
from popex.decision.precision_aware import evaluate_thresholds
from popex.errors import ConfigError, ProfileError
from popex.runtime.batch_profile import BatchTimings

__all__ = ["BatchCosts", "SizePlan", "BatchExitPlan", "predict_batch", "plan_batch_exits"]

#: Relative slack on "completion time <= the model's without exits" (float noise, not a margin).
_COMPLETION_SLACK = 1e-9
#: Largest batch size planned for.
_MAX_PLANNED_BATCH = 1024


def _per_size(row_ms: np.ndarray, sizes: Sequence[int], max_n: int) -> np.ndarray:
    """A piece's time for batches of 0..max_n, relative to batch 1: linear between sizes, per-sample beyond."""
    n = np.arange(max_n + 1, dtype=np.float64)
    sizes_f = np.asarray(sizes, dtype=np.float64)
    ms = np.interp(n, sizes_f, row_ms)
    beyond = n > sizes_f[-1]
    ms[beyond] = row_ms[-1] * n[beyond] / sizes_f[-1]
    ms[0] = 0.0
    base = float(row_ms[0])
    return ms / base if base > 0 else n  # a piece too fast to time scales with the batch


def _subset_thresholds(thresholds: Sequence[float | None], exits: Sequence[int]) -> tuple[float | None, ...]:
    return tuple(t if b in exits else None for b, t in enumerate(thresholds))


@dataclass(frozen=True, eq=False)
class BatchCosts:
    """Whole-batch time of every piece at batch sizes 0..max_n, ms, for one cut (from the time matrix).

    Attributes
    ----------
    stage_ms : np.ndarray, shape (N, max_n + 1)
        Stage i (0-based) on the edge for a batch of n (0 for n = 0).
    branch_ms : np.ndarray, shape (B, max_n + 1)
    offload_ms : np.ndarray, shape (max_n + 1,)
        One batched offload of n samples at ``split``: O + transfer + R + the cloud's stages (0 at split N).
    split : int
    branch_after_stage : tuple of int
    edge_fixed_ms : float
        Per request before its batch (decode, preprocessing).
    """

    stage_ms: np.ndarray
    branch_ms: np.ndarray
    offload_ms: np.ndarray
    split: int
    branch_after_stage: tuple[int, ...]
    edge_fixed_ms: float

    @property
    def max_n(self) -> int:
        """Largest batch size these costs cover."""
        return self.offload_ms.size - 1

    @classmethod
    def build(cls, profile: Profile, timings: BatchTimings, *, link: Link, split: int, max_n: int) -> BatchCosts:
        """Costs of a cut from a profile (batch-1 times, bytes, O) and the inference time matrix.

        Parameters
        ----------
        profile : Profile
        timings : BatchTimings
            Measured on this machine; only its growth with the batch size is used.
        link : Link
        split : int
            Stages on the edge, 0..N.
        max_n : int
            Largest batch size to cover.

        Returns
        -------
        BatchCosts

        Raises
        ------
        ProfileError
            If the timings' stages or branches differ from the profile's.
        ConfigError
            On a bad split or size.
        """
        n_stages = profile.n_stages
        if timings.stage_ms.shape[0] != n_stages or timings.branch_ms.shape[0] != profile.n_branches:
            raise ProfileError(f"batch timings have {timings.stage_ms.shape[0]} stages and {timings.branch_ms.shape[0]}"
                               f" branches; the profile has {n_stages} and {profile.n_branches}")
        split = check_int(split, name="split", low=0, high=n_stages)
        max_n = check_int(max_n, name="max_n", low=1, high=_MAX_PLANNED_BATCH)
        sizes = timings.batch_sizes
        stage_ratio = np.array([_per_size(row, sizes, max_n) for row in timings.stage_ms]).reshape(n_stages, -1)
        branch_ratio = np.array([_per_size(row, sizes, max_n) for row in timings.branch_ms]).reshape(-1, max_n + 1)
        n = np.arange(max_n + 1, dtype=np.float64)
        offload = np.zeros(max_n + 1)
        if split < n_stages:
            cloud = (profile.stage_cloud_ms[split:, None] * stage_ratio[split:]).sum(axis=0)
            transfer = np.array([link.transfer_ms(float(profile.wire_bytes[split]) * k) for k in n])
            offload = profile.offload_overhead_ms + link.rtt_ms + transfer + cloud
            offload[0] = 0.0
        return cls(stage_ms=profile.stage_edge_ms[:, None] * stage_ratio,
                   branch_ms=profile.branch_edge_ms[:, None] * branch_ratio, offload_ms=offload, split=split,
                   branch_after_stage=tuple(profile.branch_after_stage), edge_fixed_ms=float(profile.edge_fixed_ms))


@dataclass(frozen=True)
class _Prediction:
    per_sample_ms: float
    completion_ms: float


def _predict(costs: BatchCosts, n_population: int, running_counts: np.ndarray, exits: Sequence[int],
             n: int) -> _Prediction:
    """Expected per-sample and completion time of a batch of n; ``running_counts[b]`` continue past b."""
    total_ms = completion_ms = 0.0
    reaching = n_population  # calibration samples that run the current stage
    active = set(exits)

    def add(ms_by_n: np.ndarray, k: int) -> None:
        nonlocal total_ms, completion_ms
        pmf = hypergeometric_pmf(n_population, k, n)
        total_ms += float(pmf @ (np.arange(n + 1) * ms_by_n[:n + 1]))
        completion_ms += float(pmf @ ms_by_n[:n + 1])

    for stage in range(1, costs.split + 1):
        add(costs.stage_ms[stage - 1], reaching)
        for b, after_stage in enumerate(costs.branch_after_stage):
            if after_stage == stage and b in active:
                add(costs.branch_ms[b], reaching)
                reaching = int(running_counts[b])
    add(costs.offload_ms, reaching)
    return _Prediction(per_sample_ms=total_ms / n + costs.edge_fixed_ms, completion_ms=completion_ms)


def predict_batch(costs: BatchCosts, calibration: Calibration, thresholds: Sequence[float | None],
                  n: int) -> tuple[float, float]:
    """Expected per-sample latency and completion time of a batch of n with these exits, ms.

    Parameters
    ----------
    costs : BatchCosts
    calibration : Calibration
    thresholds : sequence of (float or None), length B
        A branch runs when its threshold is not None and it sits at or before the cut.
    n : int
        1..min(costs.max_n, calibration.n_samples).

    Returns
    -------
    tuple of float
        ``(per_sample_ms, completion_ms)``; per sample includes ``edge_fixed_ms``, not the batcher's wait.
    """
    n = check_int(n, name="batch size", low=1, high=min(costs.max_n, calibration.n_samples))
    exits = [b for b, t in enumerate(thresholds) if t is not None and costs.branch_after_stage[b] <= costs.split]
    counts = continuing_counts(calibration, _subset_thresholds(thresholds, exits))
    prediction = _predict(costs, calibration.n_samples, counts, exits, n)
    return prediction.per_sample_ms, prediction.completion_ms


@dataclass(frozen=True)
class SizePlan:
    """The exits chosen for one batch size, and the predictions behind the choice (ms).

    Attributes
    ----------
    n_samples : int
    exits : tuple of int
        The branches to run (a subset of the strategy's active ones).
    per_sample_ms, completion_ms, accuracy : float
        With ``exits``.
    all_exits_per_sample_ms, all_exits_completion_ms : float
        With every active branch (the strategy as it is).
    no_exits_per_sample_ms, no_exits_completion_ms : float
        With none (the model without exits, same cut).
    """

    n_samples: int
    exits: tuple[int, ...]
    per_sample_ms: float
    completion_ms: float
    accuracy: float
    all_exits_per_sample_ms: float
    all_exits_completion_ms: float
    no_exits_per_sample_ms: float
    no_exits_completion_ms: float


@dataclass(frozen=True)
class BatchExitPlan:
    """Exits per batch size for one strategy (cut and thresholds).

    Attributes
    ----------
    split : int
    thresholds : tuple of (float or None)
        The strategy's thresholds (its active branches are the candidates).
    sizes : tuple of SizePlan
        For batch sizes 1..max, in order.
    """

    split: int
    thresholds: tuple[float | None, ...]
    sizes: tuple[SizePlan, ...]

    def for_size(self, n: int) -> SizePlan:
        """The plan of a batch of n (the largest planned size beyond it).

        Parameters
        ----------
        n : int

        Returns
        -------
        SizePlan
        """
        return self.sizes[min(max(int(n), 1), len(self.sizes)) - 1]

    def thresholds_for(self, n: int) -> tuple[float | None, ...]:
        """The strategy's thresholds with the branches a batch of n does not run turned off.

        Parameters
        ----------
        n : int

        Returns
        -------
        tuple of (float or None)
        """
        return _subset_thresholds(self.thresholds, self.for_size(n).exits)

    def expected_per_query_ms(self, arrival: ArrivalModel, *, exits: str = "chosen") -> float:
        """Expected latency of a request at an arrival rate: its batcher wait plus its per-sample time, ms.

        Parameters
        ----------
        arrival : ArrivalModel
            Its max batch size must not exceed the sizes planned.
        exits : {"chosen", "all", "none"}

        Returns
        -------
        float
        """
        field = {"chosen": "per_sample_ms", "all": "all_exits_per_sample_ms", "none": "no_exits_per_sample_ms"}
        if exits not in field:
            raise ConfigError(f"exits must be one of {sorted(field)}, got {exits!r}")
        if arrival.p_batch.size - 1 > len(self.sizes):
            raise ConfigError(f"the arrival model forms batches of up to {arrival.p_batch.size - 1}, "
                              f"the plan covers {len(self.sizes)}")
        per_sample = np.array([0.0, *(getattr(size, field[exits]) for size in self.sizes)])
        p_query = arrival.p_query
        n = p_query.size
        return float(p_query @ (arrival.mean_wait_ms + per_sample[:n]))

    def to_dict(self) -> dict:
        """JSON form.

        Returns
        -------
        dict
            The cut, the thresholds and one entry per batch size (``by_batch_size``).
        """
        return {"split": self.split, "thresholds": list(self.thresholds),
                "by_batch_size": [{key: (list(value) if isinstance(value, tuple) else value)
                                   for key, value in size.__dict__.items()} for size in self.sizes]}


def plan_batch_exits(costs: BatchCosts, calibration: Calibration, thresholds: Sequence[float | None], *,
                     max_n: int | None = None) -> BatchExitPlan:
    """For each batch size 1..max_n, the subset of the active branches with the least expected per-sample
    latency whose expected completion time is <= the model's without exits.

    Parameters
    ----------
    costs : BatchCosts
    calibration : Calibration
    thresholds : sequence of (float or None), length B
        The strategy's thresholds; its active branches (not None, at or before the cut) are the candidates.
    max_n : int, optional
        Default: ``costs.max_n`` (at most the calibration's size).

    Returns
    -------
    BatchExitPlan
        Ties go to fewer branches (less compute for the same prediction).

    Examples
    --------
    >>> cal = Calibration(confidence=np.array([[0.9, 1.0], [0.2, 1.0]]), predicted=np.zeros((2, 2), int),
    ...                   correct=np.ones((2, 2), bool), labels=np.zeros(2, int), temperature=np.ones(2))
    >>> costs = BatchCosts(stage_ms=np.array([[0.0, 1.0, 1.2], [0.0, 10.0, 12.0]]), branch_ms=np.array([[0, 0.1, 0.1]]),
    ...                    offload_ms=np.zeros(3), split=2, branch_after_stage=(1,), edge_fixed_ms=0.0)
    >>> [size.exits for size in plan_batch_exits(costs, cal, [0.5]).sizes]
    [(0,), (0,)]
    """
    if len(thresholds) != calibration.n_branches or len(thresholds) != len(costs.branch_after_stage):
        raise ConfigError(f"need one threshold per branch ({len(costs.branch_after_stage)}), got {len(thresholds)}")
    top = min(costs.max_n, calibration.n_samples) if max_n is None else \
        check_int(max_n, name="max_n", low=1, high=min(costs.max_n, calibration.n_samples))
    candidates = [b for b, t in enumerate(thresholds) if t is not None and costs.branch_after_stage[b] <= costs.split]
    subsets = [combo for r in range(len(candidates) + 1) for combo in itertools.combinations(candidates, r)]
    counts = {subset: continuing_counts(calibration, _subset_thresholds(thresholds, subset)) for subset in subsets}
    accuracy = {subset: evaluate_thresholds(calibration, _subset_thresholds(thresholds, subset)).accuracy
                for subset in subsets}
    n_population = calibration.n_samples
    every, none = tuple(candidates), ()
    plans = []
    for n in range(1, top + 1):
        predicted = {subset: _predict(costs, n_population, counts[subset], subset, n) for subset in subsets}
        bound_ms = predicted[none].completion_ms * (1.0 + _COMPLETION_SLACK)
        feasible = [subset for subset in subsets if predicted[subset].completion_ms <= bound_ms]
        best = min(feasible, key=lambda subset: (predicted[subset].per_sample_ms, len(subset), subset))
        plans.append(SizePlan(
            n_samples=n, exits=best, per_sample_ms=predicted[best].per_sample_ms,
            completion_ms=predicted[best].completion_ms, accuracy=accuracy[best],
            all_exits_per_sample_ms=predicted[every].per_sample_ms,
            all_exits_completion_ms=predicted[every].completion_ms,
            no_exits_per_sample_ms=predicted[none].per_sample_ms, no_exits_completion_ms=predicted[none].completion_ms,
        ))
    return BatchExitPlan(split=costs.split, thresholds=tuple(thresholds), sizes=tuple(plans))
