"""The simulator: every policy on the same seeded sequences; loss and offload rate.

Loss of a sequence of L images (the seed's): mean local cost minus the total
reward of the offloaded images divided by L. The bucket is
:class:`popex.ratelimit.bucket.TokenBucket`, the one the live edge runs; at
step t the policy decides at the current level, then the I_t slots until
the next arrival refill it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from popex.checks import check_int
from popex.ratelimit.bucket import BucketParams, TokenBucket, integerise
from popex.ratelimit.data import MetricData
from popex.ratelimit.policies import POLICIES, Plan, Policy, make_policy
from popex.ratelimit.sequences import LocationReset, image_sequences, make_arrivals

__all__ = ["PolicyResult", "SimulationReport", "run_plan", "simulate"]


@dataclass(frozen=True)
class PolicyResult:
    """A policy's average loss and offload rate over all sequences, and its raw counts.

    Attributes
    ----------
    loss : float
    offload_rate : float
        Offloads per image.
    n_offloads, n_images, n_slots : int
        Totals over the sequences (n_slots: the slots the bucket refilled over).
    max_excess : float
        Max over sequences of offloads - (r * slots + b): <= 0 whenever the bucket applies.
    """

    loss: float
    offload_rate: float
    n_offloads: int
    n_images: int
    n_slots: int
    max_excess: float

    def to_dict(self) -> dict[str, float]:
        """``{"loss", "offload_rate"}``."""
        return {"loss": self.loss, "offload_rate": self.offload_rate}


@dataclass(frozen=True)
class SimulationReport:
    """The bucket, each policy's result, and the MDP thresholds (in tokens' metric units per level)."""

    bucket: BucketParams
    policies: dict[str, PolicyResult]
    mdp_thresholds: list[float | None] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        """The ``--json`` object: ``bucket``, ``policies``, ``mdp_thresholds`` (null below one token)."""
        return {"bucket": self.bucket.to_dict(),
                "policies": {name: result.to_dict() for name, result in self.policies.items()},
                "mdp_thresholds": self.mdp_thresholds}


def run_plan(plan: Plan, metric: np.ndarray, intervals: np.ndarray, params: BucketParams) -> np.ndarray:
    """Which steps of one sequence are offloaded (bool, shape (T,)) when following ``plan``."""
    if plan.mask is not None:
        return np.asarray(plan.mask, dtype=bool)
    bucket = TokenBucket(params)
    offloaded = np.zeros(len(metric), dtype=bool)
    gaps = intervals.tolist()
    if plan.thresholds is not None:
        thresholds = plan.thresholds.tolist()
        for t, x in enumerate(metric.tolist()):
            if x > thresholds[bucket.level] and bucket.try_take():
                offloaded[t] = True
            bucket.advance(gaps[t])
        return offloaded
    wants = plan.wants
    for t in range(len(metric)):
        if wants[t, bucket.level] and bucket.try_take():
            offloaded[t] = True
        bucket.advance(gaps[t])
    return offloaded


def simulate(data: MetricData, *, rate: float, depth: float, sequence: str = "iid", arrivals: str = "periodic",
             location_reset: LocationReset = LocationReset(), n_seq: int = 1, seq_len: int = 100_000, seed: int = 0,
             policies: tuple[str, ...] = ("weak", "strong", "baseline", "lower-bound", "mdp"),
             learned_weights: str | None = None) -> SimulationReport:
    """Every policy on the same ``n_seq`` seeded sequences of the test split.

    Parameters
    ----------
    data : MetricData
    rate : float
        r > 0 tokens per slot.
    depth : float
        b >= 1 tokens.
    sequence : {"iid", "locreset"}
    arrivals : {"periodic", "mmpp"}
    location_reset : LocationReset
    n_seq, seq_len : int
    seed : int
    policies : tuple of str
        Names of :data:`popex.ratelimit.policies.POLICIES`.
    learned_weights : str, optional

    Returns
    -------
    SimulationReport

    Raises
    ------
    ConfigError
        On r <= 0, b < 1, an unknown policy, sequence or arrival model.
    """
    params = integerise(rate, depth)
    arrival_model = make_arrivals(arrivals)
    n_seq = check_int(n_seq, name="n_seq", low=1, high=10_000)
    interval_probs = arrival_model.interval_probs()
    fitted: dict[str, Policy] = {}
    for name in policies:
        if name not in POLICIES:
            make_policy(name, params=params, metric_tr=data.metric_tr, interval_probs=interval_probs)  # raises
        fitted[name] = make_policy(name, params=params, metric_tr=data.metric_tr, interval_probs=interval_probs,
                                   learned_weights=learned_weights)
    rng = np.random.default_rng(seed)
    images = image_sequences(data.metric_ts, kind=sequence, n_seq=n_seq, seq_len=seq_len, rng=rng,
                             location_reset=location_reset)
    gaps = arrival_model.sample(n_seq, seq_len, rng)
    reward, wcost = data.reward_ts, data.wcost_ts
    totals = {name: [0.0, 0, 0, -np.inf] for name in fitted}  # loss sum, offloads, slots, max excess
    for row in range(n_seq):
        metric = data.metric_ts[images[row]]
        for name, policy in fitted.items():
            offloaded = run_plan(policy.plan(metric), metric, gaps[row], params)
            n_offloads = int(offloaded.sum())
            n_slots = int(gaps[row].sum())
            totals[name][0] += float(wcost[images[row]].mean() - reward[images[row]][offloaded].sum() / seq_len)
            totals[name][1] += n_offloads
            totals[name][2] += n_slots
            totals[name][3] = max(totals[name][3], n_offloads - (params.rate * n_slots + params.depth))
    results = {name: PolicyResult(loss=total[0] / n_seq, offload_rate=total[1] / (n_seq * seq_len),
                                  n_offloads=total[1], n_images=n_seq * seq_len, n_slots=total[2],
                                  max_excess=float(total[3]))
               for name, total in totals.items()}
    mdp = make_policy("mdp", params=params, metric_tr=data.metric_tr, interval_probs=interval_probs)
    thresholds = [None if not np.isfinite(t) else float(t) for t in mdp.thresholds]
    return SimulationReport(bucket=params, policies=results, mdp_thresholds=thresholds)
