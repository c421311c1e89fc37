"""Exit statistics for every threshold configuration, computed once per calibration set.

A threshold configuration θ gives each branch a threshold or "off". A
sample exits at the first active branch whose confidence (compared in
float64) is >= θ_b; the rest reach the final exit. At split s only the
branches with k_b <= s can run, and since k_b increases with b these form a
prefix of the branches. So the distinct strategies are, for each prefix
level m = 0..B, every configuration of the first m branches with the later
ones off. Level m is grown from level m - 1 by trying every option of
branch m - 1 on the samples that are still in flight.

Per-sample masks are packed into uint64 words and counted with
``np.bitwise_count``; counts stay integers so equal accuracies compare
exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from popex.decision.calibration import Calibration
from popex.errors import CalibrationError, ConfigError

__all__ = [
    "DEFAULT_THRESHOLDS",
    "ExitLevel",
    "ExitStats",
    "sweep_exit_stats",
]

#: Default per-branch grid: 0.50, 0.55, ..., 0.95 (10 values); "off" is always added.
DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(float(x) for x in np.linspace(0.5, 0.95, 10))


def _pack(mask: np.ndarray) -> np.ndarray:
    """Pack booleans (..., n_samples) into uint64 words (..., n_words), zero padded."""
    n_samples = mask.shape[-1]
    n_words = -(-n_samples // 64)
    padded = np.zeros(mask.shape[:-1] + (n_words * 64,), dtype=bool)
    padded[..., :n_samples] = mask
    packed = np.packbits(padded, axis=-1, bitorder="little")
    return np.ascontiguousarray(packed).view("<u8").astype(np.uint64, copy=False)


def _popcount(words: np.ndarray) -> np.ndarray:
    return np.bitwise_count(words).sum(axis=-1, dtype=np.int64)


def _checked_grids(
    thresholds: Sequence[Sequence[float]] | None, n_branches: int
) -> tuple[np.ndarray, ...]:
    if thresholds is None:
        return tuple(np.array(DEFAULT_THRESHOLDS) for _ in range(n_branches))
    if isinstance(thresholds, (str, bytes)) or len(thresholds) != n_branches:
        raise ConfigError(
            f"thresholds must hold one grid per branch ({n_branches}), got {thresholds!r}"
        )
    grids = []
    for b, grid in enumerate(thresholds):
        try:
            values = np.asarray(grid, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"threshold grid of branch {b} is not numeric: {grid!r}") from err
        if values.ndim != 1 or not np.all(np.isfinite(values)):
            raise ConfigError(
                f"threshold grid of branch {b} must be a 1-d list of finite numbers, got {grid!r}"
            )
        if np.any(values < 0) or np.any(values > 1):
            raise ConfigError(f"thresholds of branch {b} must lie in [0, 1], got {values.tolist()}")
        grids.append(np.unique(values))
    return tuple(grids)


def _level(
    threshold_rows: np.ndarray, n_exit: np.ndarray, n_correct: np.ndarray, n_samples: int
) -> ExitLevel:
    arrays = {
        "thresholds": threshold_rows.copy(),
        "exit_probs": n_exit / n_samples,
        "n_exit": n_exit.copy(),
        "n_correct": n_correct.copy(),
        "accuracy": n_correct / n_samples,
    }
    for array in arrays.values():
        array.flags.writeable = False
    return ExitLevel(**arrays)


@dataclass(frozen=True, eq=False)
class ExitLevel:
    """Statistics of every configuration of the first m branches (the rest off).

    Configuration order is row-major over branches 0..m-1 (branch 0 slowest);
    each branch's options are "off" first, then its grid in increasing order.

    Attributes
    ----------
    thresholds : np.ndarray, shape (n_configs, B), float64
        Threshold of each branch, NaN = off (always NaN for branches >= m).
    exit_probs : np.ndarray, shape (n_configs, B), float64
        q_b = n_exit / n_samples (0 where off).
    n_exit : np.ndarray, shape (n_configs, B), int64
        Samples exiting at each branch.
    n_correct : np.ndarray, shape (n_configs,), int64
        Correct answers: at the exits taken plus at the final exit.
    accuracy : np.ndarray, shape (n_configs,), float64
        n_correct / n_samples.
    """

    thresholds: np.ndarray
    exit_probs: np.ndarray
    n_exit: np.ndarray
    n_correct: np.ndarray
    accuracy: np.ndarray

    @property
    def n_configs(self) -> int:
        """Number of configurations at this level."""
        return int(self.n_correct.shape[0])


@dataclass(frozen=True, eq=False)
class ExitStats:
    """Link-independent exit statistics of all prefix levels m = 0..B.

    Attributes
    ----------
    levels : tuple of ExitLevel, length B + 1
        ``levels[m]`` covers every configuration of the first m branches.
    n_samples : int
        Calibration samples the counts are out of.
    branch_after_stage : tuple of int
        k_b (1-based) of each branch.
    threshold_grids : tuple of np.ndarray
        The sorted, de-duplicated grid used for each branch.
    """

    levels: tuple[ExitLevel, ...]
    n_samples: int
    branch_after_stage: tuple[int, ...]
    threshold_grids: tuple[np.ndarray, ...]

    @property
    def n_branches(self) -> int:
        """Number of side branches B."""
        return len(self.branch_after_stage)


def sweep_exit_stats(
    calibration: Calibration,
    *,
    branch_after_stage: Sequence[int],
    thresholds: Sequence[Sequence[float]] | None = None,
) -> ExitStats:
    """Count exits and correct answers for every threshold configuration.

    Parameters
    ----------
    calibration : Calibration
        Per-sample confidence and correctness at every exit.
    branch_after_stage : sequence of int, length B
        k_b of each branch (1-based, strictly increasing); B must equal
        ``calibration.n_branches``.
    thresholds : sequence of B sequences of float, optional
        Grid of each branch, values in [0, 1] (sorted and de-duplicated
        here). Default: :data:`DEFAULT_THRESHOLDS` for every branch. "Off"
        is always added as an extra option.

    Returns
    -------
    ExitStats
        ``prod(len(grid_b) + 1 for b < m)`` configurations at level m.

    Raises
    ------
    CalibrationError
        If the calibration's branch count differs from ``branch_after_stage``.
    ConfigError
        On malformed grids or branch positions.

    Examples
    --------
    >>> cal = Calibration(confidence=np.array([[0.9, 1.0], [0.2, 1.0]]),
    ...                   predicted=np.array([[0, 0], [0, 1]]),
    ...                   correct=np.array([[True, True], [False, True]]),
    ...                   labels=np.array([0, 1]), temperature=np.ones(2))
    >>> stats = sweep_exit_stats(cal, branch_after_stage=[1], thresholds=[[0.5]])
    >>> stats.levels[1].exit_probs[:, 0].tolist(), stats.levels[1].accuracy.tolist()
    ([0.0, 0.5], [1.0, 1.0])
    """
    if not isinstance(calibration, Calibration):
        raise CalibrationError(f"expected a Calibration, got {type(calibration).__name__}")
    positions = tuple(int(k) for k in branch_after_stage)
    if any(k < 1 for k in positions) or any(a >= b for a, b in zip(positions, positions[1:])):
        raise ConfigError(
            f"branch_after_stage must be >= 1 and strictly increasing, got {positions!r}"
        )
    n_branches = len(positions)
    if calibration.n_branches != n_branches:
        raise CalibrationError(
            f"calibration has {calibration.n_branches} branches but branch_after_stage "
            f"lists {n_branches}"
        )
    grids = _checked_grids(thresholds, n_branches)
    n_samples = calibration.n_samples

    confidence = calibration.confidence.astype(np.float64)
    correct_words = _pack(calibration.correct.T)  # (n_exits, n_words)
    final_correct = correct_words[n_branches]

    # Level 0: nothing exits, every sample is still in flight.
    remaining = _pack(np.ones((1, n_samples), dtype=bool))
    n_exit = np.zeros((1, n_branches), dtype=np.int64)
    n_correct_exited = np.zeros(1, dtype=np.int64)
    threshold_rows = np.full((1, n_branches), np.nan)
    levels = []
    for m in range(n_branches + 1):
        n_correct = n_correct_exited + _popcount(remaining & final_correct)
        levels.append(_level(threshold_rows, n_exit, n_correct, n_samples))
        if m == n_branches:
            break
        grid = grids[m]
        # Option 0 is "off": an all-zero pass mask lets nobody exit.
        passes = np.zeros((grid.size + 1, n_samples), dtype=bool)
        passes[1:] = confidence[None, :, m] >= grid[:, None]
        pass_words = _pack(passes)  # (n_options, n_words)
        exits = remaining[:, None, :] & pass_words[None, :, :]  # (n_configs, n_options, n_words)
        n_parent, n_options = exits.shape[:2]
        n_exit = np.repeat(n_exit, n_options, axis=0)
        n_exit[:, m] = _popcount(exits).reshape(-1)
        n_correct_exited = np.repeat(n_correct_exited, n_options) + _popcount(
            exits & correct_words[m]
        ).reshape(-1)
        remaining = (remaining[:, None, :] ^ exits).reshape(n_parent * n_options, -1)
        threshold_rows = np.repeat(threshold_rows, n_options, axis=0)
        threshold_rows[:, m] = np.tile(np.concatenate([[np.nan], grid]), n_parent)
    return ExitStats(
        levels=tuple(levels),
        n_samples=n_samples,
        branch_after_stage=positions,
        threshold_grids=grids,
    )

