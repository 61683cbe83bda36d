"""RingQueue: the session's drop-oldest backpressure queue, against both implementations."""

from __future__ import annotations

import gc
import sys

import pytest


def test_fifo(fp):
    q = fp.RingQueue()
    for i in range(100):
        assert q.push(b"%d" % i, float(i)) == 0
    assert len(q) == 100
    assert [q.pop() for _ in range(100)] == [b"%d" % i for i in range(100)]
    assert len(q) == 0 and q.nbytes == 0


def test_pop_empty_raises_index_error(fp):
    q = fp.RingQueue()
    with pytest.raises(IndexError):
        q.pop()
    q.push(b"x")
    q.pop()
    with pytest.raises(IndexError):
        q.pop()


def test_fifo_across_wraparound_and_growth(fp):
    q = fp.RingQueue(max_packets=1000)
    expect = []
    n = 0
    for round_ in range(50):
        for _ in range(round_ * 7 % 40 + 1):
            q.push(b"%d" % n)
            expect.append(b"%d" % n)
            n += 1
        for _ in range(round_ * 5 % 30):
            if expect:
                assert q.pop() == expect.pop(0)
    assert q.pop_batch(10**6) == expect


def test_drop_oldest_by_count(fp):
    q = fp.RingQueue(max_packets=3, max_bytes=10**6)
    assert [q.push(d) for d in (b"a", b"b", b"c")] == [0, 0, 0]
    assert q.push(b"d") == 1
    assert q.push(b"e") == 1
    assert len(q) == 3
    assert q.dropped == 2 and q.dropped_bytes == 2
    assert q.pop_batch(10) == [b"c", b"d", b"e"]


def test_drop_oldest_by_bytes(fp):
    q = fp.RingQueue(max_packets=100, max_bytes=10)
    assert q.push(b"aaaa") == 0
    assert q.push(b"bbbb") == 0
    assert q.nbytes == 8
    assert q.push(b"ccc") == 1  # 8 + 3 > 10: "aaaa" goes
    assert q.nbytes == 7
    assert q.push(b"dddddddddd") == 2  # exactly max_bytes: everything else goes
    assert q.nbytes == 10 and len(q) == 1
    assert q.dropped == 3 and q.dropped_bytes == 4 + 4 + 3
    assert q.pop() == b"dddddddddd"


def test_drop_counter_is_exact(fp):
    q = fp.RingQueue(max_packets=64, max_bytes=1000)
    total_dropped = 0
    for i in range(5000):
        total_dropped += q.push(b"x" * (i % 37))
        if i % 11 == 0:
            q.pop_batch(3)
        assert len(q) <= 64 and q.nbytes <= 1000
    assert q.dropped == total_dropped > 0


def test_drop_accounting_balances(fp):
    q = fp.RingQueue(max_packets=10, max_bytes=50)
    pushed = popped = 0
    pushed_bytes = popped_bytes = 0
    for i in range(1000):
        d = bytes(i % 13)
        dropped_now = q.push(d)
        assert dropped_now >= 0
        pushed += 1
        pushed_bytes += len(d)
        if i % 7 == 0:
            for x in q.pop_batch(2):
                popped += 1
                popped_bytes += len(x)
    assert pushed == popped + q.dropped + len(q)
    assert pushed_bytes == popped_bytes + q.dropped_bytes + q.nbytes


def test_oversize_is_refused(fp):
    q = fp.RingQueue(max_packets=10, max_bytes=100)
    q.push(b"keep")
    assert q.push(bytes(101)) == 1
    assert len(q) == 1 and q.nbytes == 4
    assert q.dropped == 1 and q.dropped_bytes == 101
    assert q.pop() == b"keep"


def test_pop_batch_limits(fp):
    q = fp.RingQueue()
    for n in (10, 20, 30, 40):
        q.push(bytes(n))
    assert q.pop_batch(0) == []
    assert [len(d) for d in q.pop_batch(2)] == [10, 20]
    assert [len(d) for d in q.pop_batch(10, max_bytes=30)] == [30]
    assert [len(d) for d in q.pop_batch(10, max_bytes=5)] == [40]  # first one always comes
    assert q.pop_batch(10) == []
    for n in (10, 20, 30):
        q.push(bytes(n))
    assert [len(d) for d in q.pop_batch(10, max_bytes=30)] == [10, 20]
    assert q.nbytes == 30


def test_head_stamp(fp):
    q = fp.RingQueue(max_packets=2)
    assert q.head_stamp == 0.0
    q.push(b"a", 1.5)
    q.push(b"b", 2.5)
    assert q.head_stamp == 1.5
    q.push(b"c", 3.5)  # drops "a"
    assert q.head_stamp == 2.5
    q.pop()
    assert q.head_stamp == 3.5
    q.pop()
    assert q.head_stamp == 0.0
    q.push(b"d")
    assert q.head_stamp == 0.0
    assert isinstance(q.head_stamp, float)


def test_drop_stale_takes_only_the_old_head(fp):
    """The age bound (queue.max_age_seconds, issue 19): what is older than the cutoff
    leaves from the head, nothing else; not counted as dropped-oldest."""
    q = fp.RingQueue(max_packets=8)
    for i, stamp in enumerate((1.0, 2.0, 3.0, 4.0)):
        q.push(bytes(10 + i), stamp)
    assert q.drop_stale(1.0) == 0  # older than, not as old as
    assert q.drop_stale(2.5) == 2
    assert len(q) == 2 and q.nbytes == 25 and q.head_stamp == 3.0
    assert q.dropped == 0 and q.dropped_bytes == 0
    assert q.drop_stale(100.0) == 2
    assert len(q) == 0 and q.nbytes == 0 and q.drop_stale(100.0) == 0
    q.push(b"x", 5.0)
    assert q.pop() == b"x"


def test_drop_stale_across_the_ring_wrap(fp):
    q = fp.RingQueue(max_packets=16)
    for i in range(40):  # the compiled ring wraps around its array
        q.push(i.to_bytes(2, "big"), float(i))
        if len(q) > 10:
            q.pop()
    assert q.drop_stale(35.0) == 5  # 30..34
    assert [int.from_bytes(d, "big") for d in q.pop_batch(100)] == [35, 36, 37, 38, 39]


def test_clear(fp):
    q = fp.RingQueue(max_packets=3)
    for d in (b"a", b"b", b"c", b"d"):
        q.push(d)
    assert q.clear() == 3
    assert len(q) == 0 and q.nbytes == 0 and q.head_stamp == 0.0
    assert q.dropped == 1  # clear() does not count as drops
    assert q.clear() == 0
    q.push(b"e")
    assert q.pop() == b"e"


def test_limits_and_validation(fp):
    q = fp.RingQueue()
    assert q.max_packets == 4096 and q.max_bytes == 8388608
    for bad in ((0, 10), (10, 0), (-1, 10)):
        with pytest.raises(ValueError):
            fp.RingQueue(*bad)


def test_push_accepts_bytes_like_and_stores_bytes(fp):
    q = fp.RingQueue()
    buf = bytearray(b"abc")
    q.push(buf)
    q.push(memoryview(b"def"))
    buf[0] = 0  # the queue holds a copy
    assert q.pop_batch(5) == [b"abc", b"def"]
    q.push(bytearray(b"g"))
    assert type(q.pop()) is bytes
    with pytest.raises(TypeError):
        q.push(5)
    with pytest.raises(TypeError):
        q.push("text")


def test_bool_and_len(fp):
    q = fp.RingQueue()
    assert not q
    q.push(b"")
    assert q and len(q) == 1 and q.nbytes == 0


@pytest.mark.skipif(not hasattr(sys, "getrefcount"), reason="needs sys.getrefcount")
def test_no_reference_leaks(fp):
    item = b"refcounted" * 3
    before = sys.getrefcount(item)
    q = fp.RingQueue(max_packets=5)
    for _ in range(20):
        q.push(item)
    assert sys.getrefcount(item) == before + 5
    q.pop()
    q.pop_batch(2)
    assert sys.getrefcount(item) == before + 2
    q.clear()
    assert sys.getrefcount(item) == before
    for _ in range(3):
        q.push(item)
    del q
    gc.collect()
    assert sys.getrefcount(item) == before


def test_large_counts(fp):
    q = fp.RingQueue(max_packets=4096)
    for i in range(20000):
        q.push(b"%d" % i)
    assert len(q) == 4096
    assert q.dropped == 20000 - 4096
    assert q.pop() == b"%d" % (20000 - 4096)
