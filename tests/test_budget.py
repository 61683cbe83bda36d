"""The queued-bytes budget (issue 19): ``QueueBudget`` shared by ``RingQueue`` s on both
fast paths, and ``ut.budget.shed`` (longest queue first) on top of them."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ut.budget import SHED_TO, shed, water_level

OPS = st.lists(
    st.tuples(st.integers(0, 2), st.sampled_from(
        ["push", "pop", "pop_batch", "clear", "drop_stale", "shrink_to"]),
        st.integers(0, 3000)),
    max_size=80)


def _run(fp, ops):
    budget = fp.QueueBudget(10_000)
    queues = [fp.RingQueue(8, 4000, budget) for _ in range(3)]
    trace = []
    for i, (q_idx, op, n) in enumerate(ops):
        q = queues[q_idx]
        if op == "push":
            r = q.push(bytes(n % 2000), float(i))
        elif op == "pop":
            r = q.pop() if len(q) else None
        elif op == "pop_batch":
            r = len(q.pop_batch(n % 5, n))
        elif op == "clear":
            r = q.clear()
        elif op == "drop_stale":
            r = q.drop_stale(float(i - n % 10))
        else:
            r = q.shrink_to(n)
        assert budget.nbytes == sum(x.nbytes for x in queues)
        trace.append((r if not isinstance(r, bytes) else len(r), budget.nbytes, budget.over))
    return trace


@settings(max_examples=150, deadline=None)
@given(OPS)
def test_budget_is_the_sum_of_its_queues_same_on_both(fp_compiled, fp_pure, ops):
    assert _run(fp_compiled, ops) == _run(fp_pure, ops)


def test_a_queue_that_goes_away_gives_its_bytes_back(fp):
    budget = fp.QueueBudget(100)
    q = fp.RingQueue(budget=budget)
    q.push(b"x" * 70)
    q2 = fp.RingQueue(budget=budget)
    q2.push(b"y" * 50)
    assert budget.nbytes == 120 and budget.over and q.budget is budget
    del q2
    assert budget.nbytes == 70 and not budget.over
    assert fp.RingQueue().budget is None
    with pytest.raises(ValueError):
        fp.QueueBudget(0)


def test_shrink_to_drops_oldest_not_counted_as_dropped(fp):
    q = fp.RingQueue(budget=fp.QueueBudget(1 << 20))
    for i in range(5):
        q.push(bytes([i]) * 10, float(i))
    assert q.shrink_to(25) == 3
    assert q.pop_batch(10) == [b"\x03" * 10, b"\x04" * 10]
    assert q.dropped == 0 and q.budget.nbytes == 0


class _S:
    def __init__(self, queue):
        self.queue = queue


def test_shed_takes_from_the_longest_queues_down_to_a_common_level(fp):
    budget = fp.QueueBudget(10_000)
    sessions = [_S(fp.RingQueue(1000, 1 << 20, budget)) for _ in range(3)]
    for s, n in zip(sessions, (5, 60, 80), strict=True):
        for _ in range(n):
            s.queue.push(b"z" * 100)
    assert budget.nbytes == 14_500 and budget.over
    dropped = dict((id(s), n) for s, n in shed(budget, sessions))
    assert budget.nbytes <= SHED_TO * 10_000
    assert id(sessions[0]) not in dropped  # the light one keeps everything
    assert sessions[0].queue.nbytes == 500
    assert abs(sessions[1].queue.nbytes - sessions[2].queue.nbytes) <= 100
    assert sum(dropped.values()) == 145 - sum(len(s.queue) for s in sessions)
    assert shed(budget, sessions) == []  # under the budget: nothing


def test_water_level_frees_enough_and_no_more_than_it_must():
    rng = random.Random(19)
    for _ in range(2000):
        sizes = [rng.randint(0, 100) for _ in range(rng.randint(1, 8))]
        excess = rng.randint(1, sum(sizes) + 5)
        level = water_level(sizes, excess)
        assert sum(max(0, x - level) for x in sizes) >= excess or level == 0
        if level:
            assert sum(max(0, x - level - 1) for x in sizes) < excess
