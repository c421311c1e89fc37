"""The three-tier latency model of DESIGN §3, vectorised over (θ, x, y).

Device d runs stages 1..x, edge e stages x+1..y, cloud c stages y+1..N
(0 <= x <= y <= N); every branch may be active, and runs on the tier that
ran its stage. With r_i the reach probability of stage i from the active
branches (as in :mod:`popex.decision.latency`) and p(j) = 1 - Σ_{active b,
k_b <= j} q_b the probability of still being in flight after stage j:

    E[T(θ,x,y)] = D(1..x) + p(x)·hop_de(α_x) + E(x+1..y) + p(y)·hop_ec(α_y) + C(y+1..N)

where D, E, C are the reach-weighted stage and branch times on each tier.
A hop costs ``rtt_ms + 8·bytes/(1000·B) + overhead_ms``. An edge that runs
nothing (x = y < N) is skipped, as in Scission: the device sends straight to
the cloud (``hop_dc``); at x = N nothing is sent. The worst case (``tail``)
is a sample that passes every active branch and crosses every hop.

Exit statistics come from :func:`popex.decision.sweep.sweep_exit_stats`
(its last level: every configuration of every branch); only the latency
part is new here. ``tests/test_three_tier.py`` checks the table against a
per-sample simulation of the calibration set.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from popex.decision.latency import Link
from popex.decision.sweep import ExitStats
from popex.errors import ConfigError, ProfileError

__all__ = ["TIER_NAMES", "Hop", "ThreeTierProfile", "ThreeTierTable", "enumerate_tier_cuts", "three_tier_table"]

TIER_NAMES = ("device", "edge", "cloud")


@dataclass(frozen=True)
class Hop:
    """One link between two tiers: its rate and RTT, and a fixed per-transfer overhead."""

    link: Link
    overhead_ms: float = 0.0

    def cost_ms(self, n_bytes: np.ndarray) -> np.ndarray:
        """Time to send ``n_bytes`` over the hop, ms.

        Parameters
        ----------
        n_bytes : np.ndarray

        Returns
        -------
        np.ndarray
        """
        return self.overhead_ms + self.link.rtt_ms + 8.0 * np.asarray(n_bytes, dtype=np.float64) / (
            1000.0 * self.link.uplink_mbps)


@dataclass(frozen=True, eq=False)
class ThreeTierProfile:
    """Stage and branch times of one model on each of the three tiers.

    Parameters
    ----------
    stage_ms : np.ndarray, shape (3, N)
        Row t: time of each stage on tier t (device, edge, cloud).
    branch_ms : np.ndarray, shape (3, B)
        Row t: time of each branch on tier t.
    branch_after_stage : tuple of int, length B
        k_b, 1-based, strictly increasing, < N.
    split_bytes : np.ndarray, shape (N + 1,)
        Bytes of the tensor after each stage (0: the input).

    Raises
    ------
    ProfileError
        On shapes that disagree or negative / non-finite numbers.
    """

    stage_ms: np.ndarray
    branch_ms: np.ndarray
    branch_after_stage: tuple[int, ...]
    split_bytes: np.ndarray

    def __post_init__(self) -> None:
        stage = np.asarray(self.stage_ms, dtype=np.float64)
        branch = np.asarray(self.branch_ms, dtype=np.float64).reshape(3, -1)
        split = np.asarray(self.split_bytes, dtype=np.float64)
        n_stages = stage.shape[-1] if stage.ndim == 2 else -1
        if stage.shape != (3, n_stages) or n_stages < 1 or split.shape != (n_stages + 1,):
            raise ProfileError(f"need stage_ms (3, N) and split_bytes (N+1,), got {stage.shape}, {split.shape}")
        positions = tuple(int(k) for k in self.branch_after_stage)
        if branch.shape[1] != len(positions) or any(not 1 <= k < n_stages for k in positions) or any(
                a >= b for a, b in zip(positions, positions[1:])):
            raise ProfileError(f"branches after stages {positions} do not fit {n_stages} stages / "
                               f"{branch.shape[1]} branch times")
        for name, values in (("stage_ms", stage), ("branch_ms", branch), ("split_bytes", split)):
            if not np.all(np.isfinite(values)) or np.any(values < 0):
                raise ProfileError(f"{name} must be finite and >= 0")
        for name, values in (("stage_ms", stage), ("branch_ms", branch), ("split_bytes", split)):
            values.flags.writeable = False
            object.__setattr__(self, name, values)
        object.__setattr__(self, "branch_after_stage", positions)

    @property
    def n_stages(self) -> int:
        """N."""
        return int(self.stage_ms.shape[1])


def enumerate_tier_cuts(n_stages: int) -> tuple[np.ndarray, np.ndarray]:
    """Every (x, y) with 0 <= x <= y <= N, x-major.

    Parameters
    ----------
    n_stages : int

    Returns
    -------
    tuple of two int arrays, shape ((N+1)(N+2)/2,)

    Examples
    --------
    >>> [a.tolist() for a in enumerate_tier_cuts(1)]
    [[0, 0, 1], [0, 1, 1]]
    """
    x, y = np.triu_indices(n_stages + 1)
    return x.astype(np.int64), y.astype(np.int64)


@dataclass(frozen=True, eq=False)
class ThreeTierTable:
    """Every (θ, x, y) for one triple of tiers: accuracy per θ, latency per θ and cut.

    Attributes
    ----------
    thresholds : np.ndarray, shape (n_configs, B)
        NaN = branch off.
    accuracy : np.ndarray, shape (n_configs,)
    x, y : np.ndarray, shape (n_cuts,)
    expected_ms, worst_ms : np.ndarray, shape (n_configs, n_cuts)
    exit_probs : np.ndarray, shape (n_configs, B)
    """

    thresholds: np.ndarray
    accuracy: np.ndarray
    x: np.ndarray
    y: np.ndarray
    expected_ms: np.ndarray
    worst_ms: np.ndarray
    exit_probs: np.ndarray

    def latency_ms(self, objective: str) -> np.ndarray:
        """``expected_ms`` (mean) or ``worst_ms`` (tail).

        Parameters
        ----------
        objective : {"mean", "tail"}

        Returns
        -------
        np.ndarray, shape (n_configs, n_cuts)
        """
        if objective not in ("mean", "tail"):
            raise ConfigError(f"objective must be 'mean' or 'tail', got {objective!r}")
        return self.expected_ms if objective == "mean" else self.worst_ms


def _prefix(values: np.ndarray) -> np.ndarray:
    """Column prefix sums with a leading 0: P[:, j] = Σ_{i<j} values[:, i]."""
    return np.concatenate([np.zeros((values.shape[0], 1)), np.cumsum(values, axis=1)], axis=1)


def three_tier_table(stats: ExitStats, profile: ThreeTierProfile, *, device_edge: Hop, edge_cloud: Hop,
                     device_cloud: Hop, branches_on_cloud: bool = True) -> ThreeTierTable:
    """Expected and worst-case latency of every (θ, x, y), for one device/edge/cloud triple.

    Parameters
    ----------
    stats : ExitStats
        From :func:`popex.decision.sweep.sweep_exit_stats`; its last level is used.
    profile : ThreeTierProfile
        Branch positions must equal the statistics'.
    device_edge, edge_cloud, device_cloud : Hop
    branches_on_cloud : bool, default True
        False: the cloud evaluates no branch (POPEX's cloud runs to the final
        exit), so a row whose active branch sits after y cannot run at that
        cut: its latencies there are +inf and no decision picks it.

    Returns
    -------
    ThreeTierTable

    Raises
    ------
    ProfileError
        If the branch positions differ.
    """
    if tuple(stats.branch_after_stage) != profile.branch_after_stage:
        raise ProfileError(f"profile branches after {profile.branch_after_stage}, statistics for "
                           f"{tuple(stats.branch_after_stage)}")
    level = stats.levels[-1]
    n_stages = profile.n_stages
    positions = np.asarray(profile.branch_after_stage, dtype=np.int64)
    q = level.exit_probs  # (C, B); 0 where off
    active = ~np.isnan(level.thresholds)
    stage_index = np.arange(1, n_stages + 1)
    before = (positions[:, None] < stage_index[None, :]).astype(np.float64)  # k_b < i
    reach = 1.0 - q @ before  # (C, N): r_i
    at_stage = np.zeros((positions.size, n_stages))  # branch b sits at stage k_b
    at_stage[np.arange(positions.size), positions - 1] = 1.0
    branch_reach = active * reach[:, positions - 1] if positions.size else np.zeros((q.shape[0], 0))
    # in_flight[:, j] = p(j): still going after stage j (its own branch included), j = 0..N
    in_flight = 1.0 - _prefix(q @ at_stage)
    weighted = []  # per tier: prefix sums of r_i t_i + r_{k_b} e_b at stage k_b
    worst = []
    for tier in range(3):
        per_stage = reach * profile.stage_ms[tier] + (branch_reach * profile.branch_ms[tier]) @ at_stage
        weighted.append(_prefix(per_stage))
        worst.append(_prefix(profile.stage_ms[tier][None, :] + (active * profile.branch_ms[tier]) @ at_stage))
    x, y = enumerate_tier_cuts(n_stages)
    edge_used = x < y
    cloud_used = y < n_stages
    hop1 = np.where(edge_used, device_edge.cost_ms(profile.split_bytes[x]),
                    np.where(cloud_used, device_cloud.cost_ms(profile.split_bytes[x]), 0.0))
    hop2 = np.where(edge_used & cloud_used, edge_cloud.cost_ms(profile.split_bytes[y]), 0.0)
    p_first = np.where(edge_used | cloud_used, in_flight[:, x], 0.0)
    p_second = np.where(edge_used & cloud_used, in_flight[:, y], 0.0)

    def compute(tables: list[np.ndarray]) -> np.ndarray:
        device, edge, cloud = tables
        return device[:, x] + (edge[:, y] - edge[:, x]) + (cloud[:, [n_stages]] - cloud[:, y])

    expected = compute(weighted) + p_first * hop1 + p_second * hop2
    worst_ms = compute(worst) + hop1[None, :] + hop2[None, :]
    if not branches_on_cloud and positions.size:
        on_cloud = (active[:, :, None] & (positions[None, :, None] > y[None, None, :])).any(axis=1)
        expected = np.where(on_cloud, np.inf, expected)
        worst_ms = np.where(on_cloud, np.inf, worst_ms)
    for array in (expected, worst_ms):
        array.flags.writeable = False
    return ThreeTierTable(thresholds=level.thresholds, accuracy=level.accuracy, x=x, y=y, expected_ms=expected,
                          worst_ms=worst_ms, exit_probs=q)
