"""The micro-batcher (popex.runtime.batcher): windows, budgets on a fake clock, and the threaded driver."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popex.errors import ConfigError
from popex.runtime.batcher import BatchQueue, BatchTimes, MicroBatcher


def _simulate(arrivals, *, max_batch_size, batch_max_wait_ms, batch_ms):
    """Drive a BatchQueue with a fake clock: each request arrives at its time; batches start when due.

    Returns (batch start time, members) for every batch.
    """
    queue = BatchQueue(max_batch_size=max_batch_size, batch_max_wait_ms=batch_max_wait_ms,
                       predict_batch_ms=lambda n: batch_ms * n)
    started, clock_s = [], 0.0
    for index, (arrival_s, key, budget_ms) in enumerate(sorted(arrivals)):
        while queue.due_s() <= arrival_s:  # batches that had to start before this arrival
            clock_s = max(clock_s, queue.due_s())
            started += [(clock_s, batch) for batch in queue.take_due(clock_s)]
        clock_s = arrival_s
        queue.add(key, index, budget_ms=budget_ms, now_s=clock_s)
        started += [(clock_s, batch) for batch in queue.take_due(clock_s)]
    while len(queue):
        clock_s = max(clock_s, queue.due_s())
        started += [(clock_s, batch) for batch in queue.take_due(clock_s)]
    return started


_arrivals = st.lists(st.tuples(st.floats(0.0, 1.0), st.sampled_from(["a", "b"]), st.floats(0.0, 300.0)),
                     min_size=1, max_size=60)


@settings(max_examples=200, deadline=None)
@given(arrivals=_arrivals, max_batch_size=st.integers(1, 16), batch_max_wait_ms=st.floats(0.0, 50.0),
       batch_ms=st.floats(0.0, 5.0))
def test_no_request_waits_past_its_budget(arrivals, max_batch_size, batch_max_wait_ms, batch_ms):
    arrivals_sorted = sorted(arrivals)
    started = _simulate(arrivals, max_batch_size=max_batch_size, batch_max_wait_ms=batch_max_wait_ms,
                        batch_ms=batch_ms)
    assert sorted(i for _, batch in started for i in batch.items) == list(range(len(arrivals)))
    for start_s, batch in started:
        assert 1 <= len(batch.members) <= max_batch_size
        assert all(arrivals_sorted[i][1] == batch.key for i in batch.items)
        first = batch.members[0]
        assert start_s <= first.arrival_s + batch_max_wait_ms / 1000.0 + 1e-12  # the window
        predicted_s = batch_ms * len(batch.members) / 1000.0
        for member in batch.members:
            assert start_s >= member.arrival_s - 1e-12
            # it never waits past the time its batch must start to finish by its deadline
            assert start_s <= max(member.arrival_s, member.deadline_s - predicted_s) + 1e-9


def test_batch_size_one_runs_every_request_at_once():
    queue = BatchQueue(max_batch_size=1, batch_max_wait_ms=1000.0, predict_batch_ms=lambda n: 0.0)
    for index in range(5):
        batch, _ = queue.add("k", index, budget_ms=1e6, now_s=float(index))
        assert batch.closed and batch.items == [index]
        assert queue.take_due(float(index)) == [batch]
    assert len(queue) == 0


def test_a_tight_budget_closes_the_window_early():
    queue = BatchQueue(max_batch_size=8, batch_max_wait_ms=50.0, predict_batch_ms=lambda n: 4.0)
    queue.add("k", "loose", budget_ms=1000.0, now_s=0.0)
    assert queue.due_s() == pytest.approx(0.050)
    queue.add("k", "tight", budget_ms=10.0, now_s=0.001)  # must start by 0.001 + 0.010 - 0.004
    assert queue.due_s() == pytest.approx(0.007)
    assert queue.take_due(0.006) == []
    (batch,) = queue.take_due(0.007)
    assert batch.items == ["loose", "tight"]


def test_a_request_that_would_make_a_batch_late_starts_it_and_waits_in_the_next():
    queue = BatchQueue(max_batch_size=8, batch_max_wait_ms=50.0, predict_batch_ms=lambda n: 4.0 * n)
    queue.add("k", "tight", budget_ms=10.0, now_s=0.0)  # alone: must start by 0.006
    queue.add("k", "late", budget_ms=1000.0, now_s=0.003)  # two would need 8 ms: 0.002 < now
    (batch,) = queue.take_due(0.003)
    assert batch.items == ["tight"]
    assert len(queue) == 1 and queue.due_s() == pytest.approx(0.053)


def test_keys_never_mix():
    queue = BatchQueue(max_batch_size=2, batch_max_wait_ms=10.0, predict_batch_ms=lambda n: 0.0)
    first, _ = queue.add("a", 1, budget_ms=100.0, now_s=0.0)
    other, _ = queue.add("b", 2, budget_ms=100.0, now_s=0.0)
    assert first is not other and not first.closed
    full, _ = queue.add("a", 3, budget_ms=100.0, now_s=0.0)
    assert full is first and full.closed and full.items == [1, 3]


@pytest.mark.parametrize("changes", [{"max_batch_size": 0}, {"max_batch_size": 10**6}, {"batch_max_wait_ms": -1.0},
                                     {"batch_max_wait_ms": float("nan")}])
def test_bad_settings_are_refused(changes):
    settings_ = {"max_batch_size": 4, "batch_max_wait_ms": 2.0, **changes}
    with pytest.raises(ConfigError):
        BatchQueue(predict_batch_ms=lambda n: 0.0, **settings_)


def test_batch_times_scale_from_the_nearest_measured_size():
    times = BatchTimes()
    times.record(4, 8.0)
    times.record(1, 3.0)
    assert times.predict_ms(4) == 8.0 and times.predict_ms(8) == 16.0 and times.predict_ms(2) == 6.0
    times.record(2, float("nan"))  # ignored
    assert times.predict_ms(2) == 6.0


def _submit_all(batcher, items, *, key="k", budget_ms=10_000.0):
    results, errors = {}, {}
    barrier = threading.Barrier(len(items))

    def one(item):
        barrier.wait()
        try:
            results[item] = batcher.submit(key, item, budget_ms=budget_ms)
        except Exception as err:  # noqa: BLE001 - the test looks at it
            errors[item] = err

    threads = [threading.Thread(target=one, args=(item,)) for item in items]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)
    return results, errors


def test_threaded_batches_answer_each_request_with_its_own_result():
    seen = []

    def run_batch(key, items):
        seen.append(list(items))
        return [item * 10 for item in items]

    batcher = MicroBatcher(run_batch, max_batch_size=4, batch_max_wait_ms=2000.0)
    results, errors = _submit_all(batcher, list(range(8)))
    assert not errors
    assert results == {item: item * 10 for item in range(8)}
    assert sorted(len(batch) for batch in seen) == [4, 4]  # full batches leave before the window ends
    assert batcher.n_batches == 2


def test_an_error_in_a_batch_reaches_every_member_and_not_the_next_batch():
    calls = []

    def run_batch(key, items):
        calls.append(items)
        if len(calls) == 1:
            raise ValueError("bad batch")
        return items

    batcher = MicroBatcher(run_batch, max_batch_size=3, batch_max_wait_ms=2000.0)
    _, errors = _submit_all(batcher, [1, 2, 3])
    assert set(errors) == {1, 2, 3} and all(isinstance(err, ValueError) for err in errors.values())
    results, errors = _submit_all(batcher, [4, 5, 6])
    assert not errors and results == {4: 4, 5: 5, 6: 6}


def test_a_wrong_number_of_results_is_an_error_not_a_silent_mismatch():
    batcher = MicroBatcher(lambda key, items: items[:1], max_batch_size=2, batch_max_wait_ms=2000.0)
    _, errors = _submit_all(batcher, [1, 2])
    assert set(errors) == {1, 2}


def test_the_window_follows_the_injected_clock():
    now = [0.0]
    batcher = MicroBatcher(lambda key, items: items, max_batch_size=8, batch_max_wait_ms=5.0, clock=lambda: now[0])
    now[0] = 1.0  # the window (5 ms from 1.0) has not passed on this clock until it is advanced
    done = []
    thread = threading.Thread(target=lambda: done.append(batcher.submit("k", "x", budget_ms=1e6)))
    thread.start()
    thread.join(timeout=0.2)
    assert thread.is_alive() and not done  # still waiting: the fake clock did not move
    now[0] = 1.006  # the leader re-reads the clock each time its (real) wait times out
    thread.join(timeout=10)
    assert done == ["x"]
