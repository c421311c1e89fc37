"""The inference time matrix: every stage and branch timed at batch sizes 1, 2, 4, ..., ``max_batch_size``.

The batch-aware plan (:mod:`popex.decision.batch_plan`) predicts a batch's
stage times from it. Timed as :mod:`popex.runtime.profiler` times batch 1
(ONNX Runtime, after a warm-up, repeats interleaved across stages and sizes,
medians); :func:`popex.runtime.profiler.save_profile` stores it in
``profile.json`` under ``"batch"`` and :func:`load_batch_timings` reads it back.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from popex.checks import check_int
from popex.errors import ConfigError, ProfileError

if TYPE_CHECKING:
    from popex.runtime.onnx_model import OnnxModel

__all__ = ["BatchTimings", "batch_sizes_up_to", "time_batches", "load_batch_timings"]

#: Largest batch size timed (the batcher's own cap).
_MAX_TIMED_BATCH = 1024


def _check_sizes(sizes: tuple[int, ...], error: type[Exception]) -> None:
    if not sizes or sizes[0] != 1 or any(a >= b for a, b in zip(sizes, sizes[1:])) or sizes[-1] > _MAX_TIMED_BATCH:
        raise error(f"batch sizes must ascend from 1 to at most {_MAX_TIMED_BATCH}, got {list(sizes)}")


@dataclass(frozen=True, eq=False)
class BatchTimings:
    """The inference time matrix: median time of each stage and branch per batch size, on one machine.

    Attributes
    ----------
    batch_sizes : tuple of int, length K
        Ascending, starting at 1.
    stage_ms : np.ndarray, shape (N, K)
        Stage i (0-based) on a batch of ``batch_sizes[j]`` samples, ms (the whole batch, not per sample).
    branch_ms : np.ndarray, shape (B, K)
        The same for each branch.
    n_repeats : int
    """

    batch_sizes: tuple[int, ...]
    stage_ms: np.ndarray
    branch_ms: np.ndarray
    n_repeats: int

    def to_dict(self) -> dict:
        """JSON form (stored under ``"batch"`` in ``profile.json``)."""
        return {"batch_sizes": list(self.batch_sizes), "stage_ms": self.stage_ms.tolist(),
                "branch_ms": self.branch_ms.tolist(), "n_repeats": self.n_repeats}

    @classmethod
    def from_dict(cls, data: dict) -> BatchTimings:
        """Read :meth:`to_dict`'s form back, checking shapes and values.

        Raises
        ------
        ProfileError
            If sizes are not ascending from 1, or a time is negative, NaN or of the wrong shape.

        Examples
        --------
        >>> t = BatchTimings.from_dict({"batch_sizes": [1, 2], "stage_ms": [[1.0, 1.5]], "branch_ms": [],
        ...                             "n_repeats": 3})
        >>> t.stage_ms.shape, t.branch_ms.shape
        ((1, 2), (0, 2))
        """
        try:
            sizes = tuple(int(n) for n in data["batch_sizes"])
            n_sizes = len(sizes)
            stage_ms = np.asarray(data["stage_ms"], dtype=np.float64).reshape(-1, n_sizes)
            branch_ms = np.asarray(data["branch_ms"], dtype=np.float64).reshape(-1, n_sizes)
            n_repeats = int(data.get("n_repeats", 1))
        except (KeyError, TypeError, ValueError) as err:
            raise ProfileError(f"malformed batch timings: {err}") from err
        _check_sizes(sizes, ProfileError)
        for name, ms in (("stage_ms", stage_ms), ("branch_ms", branch_ms)):
            if not np.all(np.isfinite(ms)) or np.any(ms < 0):
                raise ProfileError(f"batch timings {name} must be finite and >= 0")
        return cls(batch_sizes=sizes, stage_ms=stage_ms, branch_ms=branch_ms, n_repeats=n_repeats)


def batch_sizes_up_to(max_batch_size: int) -> tuple[int, ...]:
    """The batch sizes the profiler times: powers of two below ``max_batch_size``, then it.

    >>> batch_sizes_up_to(12)
    (1, 2, 4, 8, 12)
    """
    top = check_int(max_batch_size, name="max_batch_size", low=1, high=_MAX_TIMED_BATCH)
    sizes = [1]
    while sizes[-1] * 2 < top:
        sizes.append(sizes[-1] * 2)
    return tuple(sizes) if sizes[-1] == top else (*sizes, top)


def time_batches(net: OnnxModel, *, batch_sizes: Sequence[int], n_warmup: int = 2, n_repeats: int = 10,
                 progress: bool = False) -> BatchTimings:
    """Time every stage and branch of ``net`` at each batch size (the inference time matrix).

    The inputs are one zero image's stage outputs repeated ``n`` times; sizes
    and stages are interleaved within each repeat, as :func:`time_stages` does.

    Parameters
    ----------
    net : OnnxModel
    batch_sizes : sequence of int
        Ascending from 1 (:func:`batch_sizes_up_to`).
    n_warmup, n_repeats : int
        Untimed and timed runs of each (stage, size); the median is kept.
    progress : bool

    Returns
    -------
    BatchTimings
    """
    if n_warmup < 0 or n_repeats < 1:
        raise ConfigError(f"need n_warmup >= 0 and n_repeats >= 1, got {n_warmup}, {n_repeats}")
    sizes = tuple(int(n) for n in batch_sizes)
    _check_sizes(sizes, ConfigError)
    single = [np.zeros((1, *net.input_shape), dtype=np.float32)]
    for i in range(net.n_stages):
        single.append(net.run_stages(single[-1], start=i, stop=i + 1))
    inputs = {n: [np.repeat(x, n, axis=0) for x in single] for n in sizes}
    stage_samples = np.zeros((n_repeats, net.n_stages, len(sizes)))
    branch_samples = np.zeros((n_repeats, net.n_branches, len(sizes)))
    for repeat in tqdm(range(-n_warmup, n_repeats), desc="profiling batches", disable=not progress):
        for j, n in enumerate(sizes):
            for i in range(net.n_stages):
                started = time.perf_counter_ns()
                net.run_stages(inputs[n][i], start=i, stop=i + 1)
                if repeat >= 0:
                    stage_samples[repeat, i, j] = (time.perf_counter_ns() - started) / 1e6
            for b, after_stage in enumerate(net.branch_after_stage):
                started = time.perf_counter_ns()
                net.run_branch(b, inputs[n][after_stage])
                if repeat >= 0:
                    branch_samples[repeat, b, j] = (time.perf_counter_ns() - started) / 1e6
    return BatchTimings(batch_sizes=sizes, stage_ms=np.median(stage_samples, axis=0),
                        branch_ms=np.median(branch_samples, axis=0), n_repeats=n_repeats)


def load_batch_timings(path: str | os.PathLike[str]) -> BatchTimings:
    """The inference time matrix stored in a ``profile.json`` (``popex profile --max-batch-size N``).

    Raises
    ------
    ProfileError
        If the file cannot be read or holds no batch timings.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ProfileError(f"cannot read profile {str(path)!r}: {err}") from err
    if not isinstance(data, dict) or "batch" not in data:
        raise ProfileError(f"profile {str(path)!r} has no batch timings (popex profile --max-batch-size N)")
    return BatchTimings.from_dict(data["batch"])
