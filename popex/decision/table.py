"""Strategy table: every distinct (θ, s) with its accuracy and latencies.

Building a table is split in two. :class:`Planner` is built once from the
exit statistics and the profile and precomputes everything that does not
depend on the link (accuracy, exit probabilities, the edge part of E[T],
p_off, the cloud time and the bytes of each row). :meth:`Planner.table`
then only adds ``p_off·(O + 8α_s/(1000B) + R + cloud)`` for a new link
estimate, vectorised, which takes well under a millisecond.

Rows come grouped by split s = 0..N; within a split they follow the
configuration order of prefix level m(s) (see :mod:`popex.decision.sweep`),
and the thresholds of branches with k_b > s are reported as off (NaN).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from os import PathLike

import numpy as np

from popex.checks import OBJECTIVES, check_objective
from popex.decision.latency import Link, Profile
from popex.decision.sweep import ExitStats
from popex.errors import ConfigError, ProfileError

__all__ = [
    "OBJECTIVES",
    "StrategyTable",
    "Planner",
]

def _frozen(array: np.ndarray) -> np.ndarray:
    array = np.ascontiguousarray(array)
    array.flags.writeable = False
    return array


def _worst_path(thresholds: np.ndarray, active: np.ndarray, positions: np.ndarray, stage_edge_ms: np.ndarray,
                branch_edge_ms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edge time of each configuration's longest path, and whether that path goes past every branch.

    A branch at threshold 0 lets every sample leave (a confidence is never
    below 0), so no sample goes past it: the worst path ends there and sends
    nothing. Without such a branch it passes every active branch and offloads.
    """
    n_configs = active.shape[0]
    if positions.size == 0:
        return np.full(n_configs, float(stage_edge_ms.sum())), np.ones(n_configs, dtype=bool)
    always_exit = active & (np.nan_to_num(thresholds, nan=1.0) <= 0.0)
    stops = always_exit.any(axis=1)
    first = np.argmax(always_exit, axis=1)  # the first such branch (0 where none: masked by stops)
    cum_stage_ms = np.concatenate([[0.0], np.cumsum(stage_edge_ms)])
    stage_ms = np.where(stops, cum_stage_ms[np.minimum(positions[first], stage_edge_ms.size)], cum_stage_ms[-1])
    reached = active & (~stops[:, None] | (np.arange(positions.size)[None, :] <= first[:, None]))
    return stage_ms + reached @ branch_edge_ms, ~stops


def _front_order(
    latency_ms: np.ndarray, n_correct: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort rows by latency and track the most accurate row of every prefix.

    Shared by :meth:`StrategyTable.pareto_front` and the decision index.

    Returns
    -------
    order : np.ndarray of int64, shape (n_rows,)
        Row indices by increasing latency; a stable sort, so equal latencies
        keep increasing row index.
    improved : np.ndarray of bool, shape (n_rows,)
        At each sorted position, whether that row is strictly more accurate
        than every row before it (the Pareto front).
    best : np.ndarray of int64, shape (n_rows,)
        At each sorted position, the row with the most correct answers so
        far; updated only on strict improvement, so among equally accurate
        rows the fastest, then the lowest row index, wins.
    """
    order = np.argsort(latency_ms, kind="stable")
    counts = n_correct[order]
    improved = np.empty(counts.shape, dtype=bool)
    improved[:1] = True
    improved[1:] = counts[1:] > np.maximum.accumulate(counts)[:-1]
    last_improvement = np.maximum.accumulate(np.where(improved, np.arange(counts.size), 0))
    return order, improved, order[last_improvement]


@dataclass(frozen=True, eq=False)
class StrategyTable:
    """One row per distinct strategy (θ, s), for one link estimate.

    Attributes
    ----------
    thresholds : np.ndarray, shape (n_rows, B), float64
        Threshold of each branch, NaN = off.
    split : np.ndarray, shape (n_rows,), int64
        Stages run on the edge.
    accuracy : np.ndarray, shape (n_rows,), float64
    n_correct : np.ndarray, shape (n_rows,), int64
        Correct calibration samples (exact ties in accuracy).
    exit_probs : np.ndarray, shape (n_rows, B), float64
    offload_prob : np.ndarray, shape (n_rows,), float64
        p_off; 0 at s = N.
    expected_latency_ms : np.ndarray, shape (n_rows,), float64
    worst_latency_ms : np.ndarray, shape (n_rows,), float64
    bytes_sent : np.ndarray, shape (n_rows,), float64
        Mean bytes uploaded per request, ``offload_prob · α_s``.
    link : Link
        The link estimate the latencies are for.
    """

    thresholds: np.ndarray
    split: np.ndarray
    accuracy: np.ndarray
    n_correct: np.ndarray
    exit_probs: np.ndarray
    offload_prob: np.ndarray
    expected_latency_ms: np.ndarray
    worst_latency_ms: np.ndarray
    bytes_sent: np.ndarray
    link: Link

    def __len__(self) -> int:
        return int(self.split.shape[0])

    def latency_ms(self, objective: str = "mean") -> np.ndarray:
        """Latency column of an objective: E[T] for "mean", worst case for "tail".

        Parameters
        ----------
        objective : {"mean", "tail"}

        Returns
        -------
        np.ndarray of float64, shape (n_rows,)
            ms; the table's own (read-only) column, not a copy.

        Raises
        ------
        ConfigError
            On an unknown objective.
        """
        objective = check_objective(objective)
        return self.expected_latency_ms if objective == "mean" else self.worst_latency_ms

    def row(self, index: int) -> dict:
        """Return row ``index`` as a JSON-ready dict of plain Python types.

        Parameters
        ----------
        index : int
            0..len(self) - 1.

        Returns
        -------
        dict
            ``{"thresholds": [float | None], "split", "accuracy", "exit_probs",
            "offload_prob", "expected_latency_ms", "worst_latency_ms",
            "bytes_sent"}``; a threshold of None means the branch is off.

        Raises
        ------
        ConfigError
            If ``index`` is not in ``0..len(self) - 1``.
        """
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise ConfigError(f"row index must be an integer, got {index!r}")
        if not 0 <= index < len(self):
            raise ConfigError(f"row index {index} is outside 0..{len(self) - 1}")
        return {
            "thresholds": [
                None if math.isnan(value) else value for value in self.thresholds[index].tolist()
            ],
            "split": int(self.split[index]),
            "accuracy": float(self.accuracy[index]),
            "exit_probs": self.exit_probs[index].tolist(),
            "offload_prob": float(self.offload_prob[index]),
            "expected_latency_ms": float(self.expected_latency_ms[index]),
            "worst_latency_ms": float(self.worst_latency_ms[index]),
            "bytes_sent": float(self.bytes_sent[index]),
        }

    def to_rows(self) -> list[dict]:
        """All rows as :meth:`row` dicts.

        Returns
        -------
        list of dict
            ``len(self)`` dicts, in row order.
        """
        return [self.row(index) for index in range(len(self))]

    def to_csv(self, path: str | PathLike[str]) -> None:
        """Write the table as CSV: one column per branch threshold (empty = off).

        Columns: ``threshold_<b>``, ``split``, ``accuracy``, ``exit_prob_<b>``,
        ``offload_prob``, ``expected_latency_ms``, ``worst_latency_ms``,
        ``bytes_sent``.

        Parameters
        ----------
        path : path
            The CSV file, overwritten.

        Raises
        ------
        OSError
            If the file cannot be written.
        """
        n_branches = self.thresholds.shape[1]
        header = (
            [f"threshold_{b}" for b in range(n_branches)]
            + ["split", "accuracy"]
            + [f"exit_prob_{b}" for b in range(n_branches)]
            + ["offload_prob", "expected_latency_ms", "worst_latency_ms", "bytes_sent"]
        )
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            for index in range(len(self)):
                row = self.row(index)
                writer.writerow(
                    ["" if t is None else repr(t) for t in row["thresholds"]]
                    + [row["split"], repr(row["accuracy"])]
                    + [repr(q) for q in row["exit_probs"]]
                    + [
                        repr(row[key])
                        for key in (
                            "offload_prob",
                            "expected_latency_ms",
                            "worst_latency_ms",
                            "bytes_sent",
                        )
                    ]
                )

    def pareto_front(self, objective: str = "mean") -> np.ndarray:
        """Row indices of the accuracy/latency Pareto front, sorted by latency.

        A row is on the front when every faster row (or equally fast row with
        a lower index) is strictly less accurate.

        Parameters
        ----------
        objective : {"mean", "tail"}

        Returns
        -------
        np.ndarray of int64
            Row indices, increasing latency and strictly increasing accuracy.

        Raises
        ------
        ConfigError
            On an unknown objective.
        """
        latency_ms = self.latency_ms(objective)
        if len(self) == 0:
            return np.zeros(0, dtype=np.int64)
        order, improved, _ = _front_order(latency_ms, self.n_correct)
        return order[improved].astype(np.int64)


class Planner:
    """Link-independent part of the strategy table, built once per (stats, profile).

    Parameters
    ----------
    stats : ExitStats
        Output of :func:`popex.decision.sweep.sweep_exit_stats`.
    profile : Profile
        Timings and sizes; its branch positions must match ``stats``.

    Raises
    ------
    ProfileError
        If the profile's branch positions differ from the statistics'.

    Examples
    --------
    >>> from popex.decision.calibration import Calibration
    >>> from popex.decision.sweep import sweep_exit_stats
    >>> cal = Calibration(confidence=np.array([[0.9, 1.0], [0.2, 1.0]]),
    ...                   predicted=np.array([[0, 0], [0, 1]]),
    ...                   correct=np.array([[True, True], [False, True]]),
    ...                   labels=np.array([0, 1]), temperature=np.ones(2))
    >>> profile = Profile(stage_names=("a", "b"), stage_edge_ms=[1.0, 2.0],
    ...                   stage_cloud_ms=[0.1, 0.2], branch_after_stage=(1,),
    ...                   branch_edge_ms=[0.5], split_bytes=[100, 50, 4],
    ...                   offload_overhead_ms=1.0)
    >>> stats = sweep_exit_stats(cal, branch_after_stage=[1], thresholds=[[0.5]])
    >>> table = Planner(stats, profile).table(Link(uplink_mbps=10.0, rtt_ms=5.0))
    >>> len(table), table.split.tolist()
    (5, [0, 1, 1, 2, 2])
    """

    def __init__(self, stats: ExitStats, profile: Profile) -> None:
        if not isinstance(stats, ExitStats) or not isinstance(profile, Profile):
            raise ConfigError(
                "Planner expects (ExitStats, Profile), got "
                f"({type(stats).__name__}, {type(profile).__name__})"
            )
        if tuple(stats.branch_after_stage) != profile.branch_after_stage:
            raise ProfileError(
                f"profile branches sit after stages {profile.branch_after_stage} but the "
                f"exit statistics were swept for {tuple(stats.branch_after_stage)}"
            )
        self.profile = profile
        self.n_samples = stats.n_samples
        n_stages = profile.n_stages
        positions = np.array(profile.branch_after_stage, dtype=np.int64)
        # before[b, i] = 1 when branch b sits before stage i + 1 (k_b < i + 1).
        before = (positions[:, None] < np.arange(1, n_stages + 1)[None, :]).astype(np.float64)
        stage_edge_ms = profile.stage_edge_ms
        columns: dict[str, list[np.ndarray]] = {
            key: []
            for key in (
                "thresholds", "split", "n_correct", "accuracy", "exit_probs",
                "offload_prob", "edge_ms", "worst_edge_ms",
            )
        }
        for split in range(n_stages + 1):
            level = stats.levels[int(np.sum(positions <= split))]
            active = ~np.isnan(level.thresholds)
            worst_edge_ms, offloads = _worst_path(level.thresholds, active, positions, stage_edge_ms[:split],
                                                  profile.branch_edge_ms)
            # Before the last stage, a configuration that lets every sample leave at a branch
            # (threshold 0) offloads nothing: it is the split-N row with the same thresholds.
            keep = offloads if split < n_stages else np.ones(level.n_configs, dtype=bool)
            probs = level.exit_probs[keep]
            active = active[keep]
            reach = 1.0 - probs @ before  # (n_configs, N): r_i of stage i
            edge_ms = reach[:, :split] @ stage_edge_ms[:split]
            if positions.size:
                edge_ms = edge_ms + (active * reach[:, positions - 1]) @ profile.branch_edge_ms
            if split < n_stages:
                offload_prob = 1.0 - probs.sum(axis=1)
            else:
                offload_prob = np.zeros(probs.shape[0])
            columns["thresholds"].append(level.thresholds[keep])
            columns["split"].append(np.full(probs.shape[0], split, dtype=np.int64))
            columns["n_correct"].append(level.n_correct[keep])
            columns["accuracy"].append(level.accuracy[keep])
            columns["exit_probs"].append(probs)
            columns["offload_prob"].append(offload_prob)
            columns["edge_ms"].append(np.broadcast_to(edge_ms, (probs.shape[0],)))
            columns["worst_edge_ms"].append(worst_edge_ms[keep])
        merged = {key: _frozen(np.concatenate(parts)) for key, parts in columns.items()}
        self._thresholds = merged["thresholds"]
        self._split = merged["split"]
        self._n_correct = merged["n_correct"]
        self._accuracy = merged["accuracy"]
        self._exit_probs = merged["exit_probs"]
        self._offload_prob = merged["offload_prob"]
        self._edge_ms = merged["edge_ms"]
        self._worst_edge_ms = merged["worst_edge_ms"]
        self._bytes_sent = _frozen(self._offload_prob * profile.wire_bytes[self._split])
        # Cloud time after each split, Σ_{i>s} t^c_i, and whether s < N.
        self._cloud_after_ms = np.concatenate(
            [np.cumsum(profile.stage_cloud_ms[::-1])[::-1], [0.0]]
        )
        self._offloads = np.arange(n_stages + 1) < n_stages

    @property
    def n_rows(self) -> int:
        """Number of strategies in every table this planner builds."""
        return int(self._split.shape[0])

    def table(self, link: Link) -> StrategyTable:
        """Strategy table for one link estimate.

        Parameters
        ----------
        link : Link
            Uplink rate and RTT.

        Returns
        -------
        StrategyTable
            Shares the link-independent columns with this planner (read-only).

        Raises
        ------
        ConfigError
            If ``link`` is not a :class:`Link`.
        """
        if not isinstance(link, Link):
            raise ConfigError(f"expected a Link, got {type(link).__name__}")
        profile = self.profile
        # Cost of one offload at each split s (0 at s = N: nothing is sent).
        offload_ms = np.where(
            self._offloads,
            profile.offload_overhead_ms
            + 8.0 * profile.split_bytes / (1000.0 * link.uplink_mbps)
            + link.rtt_ms
            + self._cloud_after_ms,
            0.0,
        )
        row_offload_ms = offload_ms[self._split]
        expected_ms = profile.edge_fixed_ms + self._edge_ms + self._offload_prob * row_offload_ms
        worst_ms = profile.edge_fixed_ms + self._worst_edge_ms + row_offload_ms
        expected_ms.flags.writeable = False
        worst_ms.flags.writeable = False
        return StrategyTable(
            thresholds=self._thresholds,
            split=self._split,
            accuracy=self._accuracy,
            n_correct=self._n_correct,
            exit_probs=self._exit_probs,
            offload_prob=self._offload_prob,
            expected_latency_ms=expected_ms,
            worst_latency_ms=worst_ms,
            bytes_sent=self._bytes_sent,
            link=link,
        )
