"""The reference formulas of DESIGN.md §3: E[T(θ, s)] and the worst case, term by term.

They are deliberately plain loops: the reference that the vectorised strategy
table (:mod:`popex.decision.table`) and the shortest-path graph are tested against.
"""

from __future__ import annotations

import numpy as np

from popex.decision.latency import Link, Profile, _checked_split, _exit_config, _offload_ms
from popex.errors import ConfigError

__all__ = ["expected_latency_ms", "worst_latency_ms"]


def expected_latency_ms(
    profile: Profile, link: Link, exit_probs: object, active: object, split: int
) -> float:
    """Expected latency E[T(θ, s)] of DESIGN.md §3, evaluated term by term.

    A branch attached after the split (k_b > s) is never evaluated, so it is
    treated as off whatever ``active`` says.

    Parameters
    ----------
    profile : Profile
    link : Link
    exit_probs : array-like, shape (B,)
        q_b, fraction of all samples exiting at branch b (ignored where inactive).
    active : array-like of bool, shape (B,)
        Whether branch b has a threshold (is not off).
    split : int
        Number of stages run on the edge, 0..N.

    Returns
    -------
    float
        Expected latency in ms.

    Raises
    ------
    ConfigError
        On a bad split, wrong shapes, or probabilities outside [0, 1] or summing above 1.

    Examples
    --------
    >>> p = Profile(stage_names=("a", "b"), stage_edge_ms=[1.0, 2.0],
    ...             stage_cloud_ms=[0.0, 0.5], branch_after_stage=(1,),
    ...             branch_edge_ms=[0.5], split_bytes=[1000, 1000, 4],
    ...             offload_overhead_ms=1.0)
    >>> link = Link(uplink_mbps=8.0, rtt_ms=10.0)
    >>> expected_latency_ms(p, link, [0.5], [True], 1)  # 1 + 0.5 + 0.5 * (1 + 1 + 10 + 0.5)
    7.75
    """
    probs, flags = _exit_config(profile, exit_probs, active)
    split = _checked_split(profile, split)
    n_stages = profile.n_stages
    on = [b for b, k in enumerate(profile.branch_after_stage) if flags[b] and k <= split]

    def reach(stage: int) -> float:
        return 1.0 - sum(probs[b] for b in on if profile.branch_after_stage[b] < stage)

    total = profile.edge_fixed_ms
    for stage in range(1, split + 1):
        total += reach(stage) * profile.stage_edge_ms[stage - 1]
    for b in on:
        total += reach(profile.branch_after_stage[b]) * profile.branch_edge_ms[b]
    if split < n_stages:
        total += (1.0 - sum(probs[b] for b in on)) * _offload_ms(profile, link, split)
    return float(total)


def worst_latency_ms(profile: Profile, link: Link, active: object, split: int, *,
                     thresholds: object = None) -> float:
    """Per-sample worst-case latency of (θ, s): pass every active branch, then offload.

    An active branch at threshold 0 lets every sample leave (no confidence is
    below 0): the worst path then ends at the first such branch and sends
    nothing, which is how a tail requirement is met with an Edgent-style exit.

    Parameters
    ----------
    profile : Profile
    link : Link
    active : array-like of bool, shape (B,)
        Whether branch b is on; branches with k_b > split are ignored.
    split : int
        Number of stages run on the edge, 0..N.
    thresholds : array-like of float or None, shape (B,), optional
        θ_b of each branch (None or NaN: off); only θ_b <= 0 matters here.

    Returns
    -------
    float
        Latency in ms of a sample that no active branch lets exit.

    Raises
    ------
    ConfigError
        On a bad split or a wrongly shaped ``active``.

    Examples
    --------
    >>> p = Profile(stage_names=("a", "b"), stage_edge_ms=[1.0, 2.0],
    ...             stage_cloud_ms=[0.0, 0.5], branch_after_stage=(1,),
    ...             branch_edge_ms=[0.5], split_bytes=[1000, 1000, 4],
    ...             offload_overhead_ms=1.0)
    >>> worst_latency_ms(p, Link(uplink_mbps=8.0, rtt_ms=10.0), [True], 2)
    3.5
    >>> worst_latency_ms(p, Link(uplink_mbps=8.0, rtt_ms=10.0), [True], 0)
    12.5
    >>> worst_latency_ms(p, Link(uplink_mbps=8.0, rtt_ms=10.0), [True], 2, thresholds=[0.0])
    1.5
    """
    _, flags = _exit_config(profile, np.zeros(profile.n_branches), active)
    split = _checked_split(profile, split)
    theta = np.array([None] * profile.n_branches if thresholds is None else list(thresholds), dtype=np.float64)
    if theta.shape != (profile.n_branches,):
        raise ConfigError(f"thresholds must have shape ({profile.n_branches},), got {theta.shape}")
    on = [b for b, k in enumerate(profile.branch_after_stage) if flags[b] and k <= split]
    stop = next((b for b in on if theta[b] <= 0.0), None)  # every sample leaves there
    last_stage = split if stop is None else profile.branch_after_stage[stop]
    total = profile.edge_fixed_ms + float(np.sum(profile.stage_edge_ms[:last_stage]))
    total += sum(profile.branch_edge_ms[b] for b in on if stop is None or b <= stop)
    if stop is None and split < profile.n_stages:
        total += _offload_ms(profile, link, split)
    return float(total)
