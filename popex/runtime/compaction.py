"""Batched early exit with compaction: a batch runs stage by stage and loses its exited samples on the way.

At each active branch the samples whose confidence reaches the branch's
threshold leave the batch (the caller answers them at once); only the
continuing samples' tensors go on to the next stage, gathered by index, so
no stage runs on a sample that has already exited. What is left after the
last stage is the batch the next tier receives as one payload. Every tier
(and :class:`~popex.runtime.exit_chain.ExitChain` form) runs it alike: the
caller passes how to run stages and how to turn a branch's logits into
confidences, so the edge can emulate a slower device and use its calibrated
temperatures.

Exits are decided exactly as for one request (``popex.edge.pipeline``): the
first active branch whose confidence, compared in float64, reaches its
threshold.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["SampleExit", "CompactedRun", "run_compacted"]


@dataclass(frozen=True)
class SampleExit:
    """One sample that left the batch at a branch.

    Attributes
    ----------
    index : int
        Its position in the batch given to :func:`run_compacted`.
    branch : int
        The branch it exited at (0-based).
    confidence : float
        That branch's confidence (float64, as compared).
    label : int
        That branch's predicted class.
    """

    index: int
    branch: int
    confidence: float
    label: int


@dataclass(frozen=True)
class CompactedRun:
    """What a compacted run gives back.

    Attributes
    ----------
    exits : tuple of SampleExit
        Samples that exited, in the order they did.
    continuing : np.ndarray of int64, shape (m,)
        Batch positions of the samples that did not exit, ascending.
    features : np.ndarray, shape (m, ...)
        Their tensor after stage ``stop`` (m = 0: nothing continues, and no
        stage after the last exit was run).
    """

    exits: tuple[SampleExit, ...]
    continuing: np.ndarray
    features: np.ndarray


def run_compacted(
    x: np.ndarray,
    *,
    start: int,
    stop: int,
    branch_after_stage: Sequence[int],
    thresholds: Mapping[int, float],
    run_stage: Callable[[np.ndarray, int], np.ndarray],
    branch_exit: Callable[[int, np.ndarray], tuple[np.ndarray, np.ndarray]],
    on_stage: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
    on_branch: Callable[[int, np.ndarray, np.ndarray, np.ndarray], None] | None = None,
) -> CompactedRun:
    """Run stages start+1..stop on a batch, removing the samples that exit at the active branches.

    Parameters
    ----------
    x : np.ndarray, shape (n, ...)
        The batch's tensor after stage ``start`` (the input for 0).
    start, stop : int
        Stages already run, and the last stage to run (0 <= start <= stop).
    branch_after_stage : sequence of int
        k_b of each branch: it is attached after stage k_b.
    thresholds : mapping of int to float
        The active branches and their thresholds; a branch not in it is off.
    run_stage : callable(h, i) -> np.ndarray
        Runs stage i+1 (0-based ``i``) on a batch.
    branch_exit : callable(b, h) -> (confidence, label)
        Branch b's confidence (shape (m,)) and label (shape (m,)) for a batch.
    on_stage : callable(stage, indices, h), optional
        Called after each stage with the batch positions still running and
        their output (e.g. to keep features for a fallback).
    on_branch : callable(b, indices, confidence, label), optional
        Called after each branch with what it found for every sample it ran on.

    Returns
    -------
    CompactedRun

    Raises
    ------
    ValueError
        If ``start``/``stop`` are out of order or the batch is empty.

    Examples
    --------
    >>> x = np.array([[0.9], [0.1], [0.8]])
    >>> run = run_compacted(x, start=0, stop=2, branch_after_stage=[1], thresholds={0: 0.5},
    ...                     run_stage=lambda h, i: h, branch_exit=lambda b, h: (h[:, 0], np.zeros(len(h), int)))
    >>> [e.index for e in run.exits], run.continuing.tolist()
    ([0, 2], [1])
    """
    if not 0 <= start <= stop:
        raise ValueError(f"need 0 <= start <= stop, got start={start}, stop={stop}")
    h = np.asarray(x)
    if h.ndim < 1 or h.shape[0] == 0:
        raise ValueError(f"the batch must hold at least one sample, got shape {list(h.shape)}")
    indices = np.arange(h.shape[0], dtype=np.int64)
    exits: list[SampleExit] = []
    for stage in range(start, stop):
        h = run_stage(h, stage)
        if on_stage is not None:
            on_stage(stage + 1, indices, h)
        for b, after_stage in enumerate(branch_after_stage):
            if after_stage != stage + 1 or b not in thresholds:
                continue
            confidence, label = branch_exit(b, h)
            confidence = np.asarray(confidence, dtype=np.float64)
            label = np.asarray(label)
            if on_branch is not None:
                on_branch(b, indices, confidence, label)
            leaves = confidence >= float(thresholds[b])
            exits += [SampleExit(index=int(indices[k]), branch=b, confidence=float(confidence[k]),
                                 label=int(label[k])) for k in np.flatnonzero(leaves)]
            if leaves.any():
                keep = np.flatnonzero(~leaves)
                indices, h = indices[keep], h[keep]  # gather: only the continuing samples go on
            if indices.size == 0:
                return CompactedRun(exits=tuple(exits), continuing=indices, features=h)
    return CompactedRun(exits=tuple(exits), continuing=indices, features=h)
