"""Batched early exit with compaction (popex.runtime.compaction): random exit patterns against one sample at a time."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popex.runtime.compaction import run_compacted

N_STAGES = 5
BRANCH_AFTER_STAGE = (1, 2, 2, 4)  # two branches after stage 2: the first active one that is confident wins


class _Chain:
    """A chain whose samples say where they exit: column 0 holds the branch that is confident about it.

    Each stage adds its index to the other columns (so a gathered row is checked to be the right one);
    branch b's confidence is 0.9 on rows whose code is b, else 0.1. ``rows_run`` counts the samples
    each stage ran on.
    """

    def __init__(self):
        self.rows_run = [0] * N_STAGES

    def run_stage(self, h, i):
        self.rows_run[i] += h.shape[0]
        out = h.copy()
        out[:, 1:] += i + 1
        return out

    @staticmethod
    def branch_exit(b, h):
        confident = h[:, 0] == b
        return np.where(confident, 0.9, 0.1), (h[:, 1] * 7 + b).astype(np.int64) % 10


def _one_by_one(x, *, stop, thresholds):
    """The reference: each sample alone, the first active branch at or above its threshold."""
    answers = []
    for row in x:
        h = row[None].copy()
        answer = None
        for stage in range(stop):
            h = _Chain().run_stage(h, stage)
            for b, after in enumerate(BRANCH_AFTER_STAGE):
                if after == stage + 1 and b in thresholds:
                    confidence, label = _Chain.branch_exit(b, h)
                    if float(confidence[0]) >= thresholds[b]:
                        answer = ("exit", b, int(label[0]), float(confidence[0]))
                        break
            if answer is not None:
                break
        answers.append(answer if answer is not None else ("continue", h[0]))
    return answers


@settings(max_examples=300, deadline=None)
@given(codes=st.lists(st.integers(-1, len(BRANCH_AFTER_STAGE) - 1), min_size=1, max_size=40),
       active=st.sets(st.integers(0, len(BRANCH_AFTER_STAGE) - 1)), stop=st.integers(0, N_STAGES),
       threshold=st.sampled_from([0.05, 0.5, 0.95]))
def test_compaction_answers_every_sample_as_it_would_alone(codes, active, stop, threshold):
    x = np.stack([np.array([code, index, index * 2.0]) for index, code in enumerate(codes)])
    thresholds = {b: threshold for b in active}
    chain = _Chain()
    seen_branches = []
    run = run_compacted(x, start=0, stop=stop, branch_after_stage=BRANCH_AFTER_STAGE, thresholds=thresholds,
                        run_stage=chain.run_stage, branch_exit=chain.branch_exit,
                        on_branch=lambda b, indices, c, l: seen_branches.append((b, indices.tolist())))
    expected = _one_by_one(x, stop=stop, thresholds=thresholds)
    exits = {out.index: out for out in run.exits}
    assert len(exits) == len(run.exits)  # nobody exits twice
    assert sorted([*exits, *run.continuing.tolist()]) == list(range(len(codes)))  # everyone answered once
    assert run.continuing.tolist() == sorted(run.continuing.tolist())
    for index, answer in enumerate(expected):
        if answer[0] == "exit":
            out = exits[index]
            assert (out.branch, out.label, out.confidence) == answer[1:]
        else:
            position = run.continuing.tolist().index(index)
            np.testing.assert_array_equal(run.features[position], answer[1])  # gathered by index
    # compaction: stage i ran only on the samples that had not exited before it
    alive = len(codes)
    for stage in range(stop):
        assert chain.rows_run[stage] == alive
        for b, indices in seen_branches:
            if BRANCH_AFTER_STAGE[b] == stage + 1:
                assert all(index not in exits or exits[index].branch >= b for index in indices)
        alive -= sum(1 for out in run.exits if BRANCH_AFTER_STAGE[out.branch] == stage + 1)
    assert alive == run.continuing.size


def test_when_every_sample_exits_no_later_stage_runs():
    x = np.array([[0.0, 1.0, 1.0], [0.0, 2.0, 2.0]])
    chain = _Chain()
    run = run_compacted(x, start=0, stop=N_STAGES, branch_after_stage=BRANCH_AFTER_STAGE, thresholds={0: 0.5},
                        run_stage=chain.run_stage, branch_exit=chain.branch_exit)
    assert [out.index for out in run.exits] == [0, 1]
    assert run.continuing.size == 0 and run.features.shape[0] == 0
    assert chain.rows_run == [2, 0, 0, 0, 0]


@pytest.mark.parametrize("bad", [{"start": 2, "stop": 1}, {"start": -1, "stop": 1}])
def test_bad_ranges_and_empty_batches_are_refused(bad):
    x = np.zeros((2, 3))
    with pytest.raises(ValueError):
        run_compacted(x, branch_after_stage=(), thresholds={}, run_stage=_Chain().run_stage,
                      branch_exit=_Chain.branch_exit, **bad)
    with pytest.raises(ValueError, match="at least one sample"):
        run_compacted(np.zeros((0, 3)), start=0, stop=1, branch_after_stage=(), thresholds={},
                      run_stage=_Chain().run_stage, branch_exit=_Chain.branch_exit)
