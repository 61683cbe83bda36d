"""Numbered DATA frames and the Resequencer (issue 14), for both fast-path implementations.

The contract: numbered datagrams come out in number order; a gap is waited for at most
``wait`` and then given up (``skipped``); a datagram whose gap was given up is still
delivered (``late``). Nothing is dropped: delivered + (skipped - late) = sent.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ut.errors import FrameError

MASK = 0xFFFFFFFF


def numbered(fp, datagrams, seq=0):
    """The deframed frames of ``datagrams`` numbered from ``seq``."""
    data, nxt = fp.encode_data_seq(datagrams, seq)
    return fp.Deframer().feed(data), nxt


def test_wire_format_of_a_numbered_frame(fp):
    data, nxt = fp.encode_data_seq([b"hi", b""], 7)
    assert data.hex() == "555401010100000006" "00000007" "6869" "555401010100000004" "00000008"
    assert nxt == 9
    assert fp.FLAG_SEQ == 1 and fp.SEQ_LEN == 4


def test_numbers_wrap_around(fp):
    frames, nxt = numbered(fp, [b"a", b"b", b"c"], MASK - 1)
    assert nxt == 1
    assert [int.from_bytes(p[:4], "big") for _, _, p in frames] == [MASK - 1, MASK, 0]


def test_a_datagram_too_long_to_number_goes_plain(fp):
    big = bytes(fp.MAX_PAYLOAD)
    data, nxt = fp.encode_data_seq([b"x", big, b"y"], 0)
    frames = fp.Deframer().feed(data)
    assert [(t, f, len(p)) for t, f, p in frames] == [(1, 1, 5), (1, 0, fp.MAX_PAYLOAD), (1, 1, 5)]
    assert nxt == 2
    r = fp.Resequencer()
    r.feed(frames, 0.0)
    assert [len(d) for d in r.take()[0]] == [1, fp.MAX_PAYLOAD, 1]


def test_encode_data_seq_errors(fp):
    with pytest.raises(ValueError):
        fp.encode_data_seq([b"x"], -1)
    with pytest.raises(ValueError):
        fp.encode_data_seq([b"x"], MASK + 1)
    with pytest.raises(ValueError):
        fp.encode_data_seq([bytes(fp.MAX_PAYLOAD + 1)], 0)


def test_in_order_passes_straight_through(fp):
    r = fp.Resequencer()
    frames, _ = numbered(fp, [b"a", b"b"])
    assert r.feed(frames, 1.0) == ([], 2, 10)
    assert r.take() == ([b"a", b"b"], 2, 1.0)
    assert (r.held, r.skipped, r.late, r.next_seq) == (0, 0, 0, 2)


def test_control_frames_are_handed_back_in_order(fp):
    r = fp.Resequencer()
    ctrl = (fp.TYPE_CTRL, 0, b"\x02\x01")
    frames, _ = numbered(fp, [b"a"])
    others, n, nbytes = r.feed([ctrl, frames[0], ctrl], 0.0)
    assert others == [ctrl, ctrl] and (n, nbytes) == (1, 5)


def test_plain_data_is_released_at_once(fp):
    r = fp.Resequencer()
    frames, _ = numbered(fp, [b"a", b"b"])
    plain = (fp.TYPE_DATA, 0, b"p")
    r.feed([frames[1], plain], 2.0)
    assert r.take() == ([b"p"], 1, 2.0)
    r.feed([frames[0]], 3.0)
    assert r.take()[0] == [b"a", b"b"]


def test_a_gap_is_waited_for_then_given_up_and_the_late_datagram_still_delivered(fp):
    r = fp.Resequencer(max_wait=0.05, min_wait=0.01)
    frames, _ = numbered(fp, [b"0", b"1", b"2", b"3"])
    r.feed([frames[0], frames[2], frames[3]], 10.0)
    assert r.take()[0] == [b"0"]
    assert r.held == 2 and r.deadline == pytest.approx(10.01)
    assert r.expire(10.005) == 0 and r.take()[0] == []
    assert r.expire(10.02) == 1
    assert r.take()[0] == [b"2", b"3"]
    assert (r.skipped, r.late, r.held) == (1, 0, 0)
    assert r.deadline == float("inf")
    r.feed([frames[1]], 10.03)
    assert r.take()[0] == [b"1"]
    assert r.late == 1
    # The late datagram's delay (0.02 s) raised the estimate: the wait grew past min_wait.
    assert 0.01 < r.wait <= 0.05


def test_small_datagrams_pass_a_gap_and_are_not_released_twice(fp):
    r = fp.Resequencer(pass_bytes=3)
    frames, _ = numbered(fp, [b"big0", b"ack", b"big2", b"ac"])
    r.feed([frames[1], frames[2], frames[3]], 0.0)
    assert r.take()[0] == [b"ack", b"ac"]  # small: at once, past the gap at 0
    assert r.held == 3 and r.held_bytes == 4
    r.feed([frames[0]], 0.01)
    assert r.take()[0] == [b"big0", b"big2"]
    assert (r.held, r.held_bytes, r.skipped, r.late, r.next_seq) == (0, 0, 0, 0, 4)


def test_wait_adapts_to_fill_times_within_bounds(fp):
    r = fp.Resequencer(max_wait=0.1, min_wait=0.002)
    assert r.wait == 0.002
    frames, _ = numbered(fp, [b"0", b"1"])
    r.feed([frames[1]], 0.0)
    r.feed([frames[0]], 0.03)  # a gap that took 30 ms to fill
    assert r.wait == pytest.approx(0.045)
    r.set_rtt_hint(0.07)
    assert r.wait == pytest.approx(0.07)
    r.set_rtt_hint(1.0)
    assert r.wait == 0.1  # the cap


def test_bounds_give_up_the_oldest_gap(fp):
    r = fp.Resequencer(max_packets=4, max_bytes=1 << 20)
    frames, _ = numbered(fp, [bytes([i]) for i in range(10)])
    r.feed(frames[1:], 0.0)  # number 0 never comes
    assert r.held <= 4
    assert r.skipped == 1
    assert r.take()[0] == [bytes([i]) for i in range(1, 10)][: 9 - r.held]
    r2 = fp.Resequencer(max_packets=100, max_bytes=10)
    frames, _ = numbered(fp, [b"x" * 6] * 4)
    r2.feed(frames[1:], 0.0)
    assert r2.held_bytes <= 10


def test_a_restarted_count_resyncs(fp):
    r = fp.Resequencer(max_packets=8)
    frames, _ = numbered(fp, [b"a", b"b"])
    r.feed(frames, 0.0)
    later, _ = numbered(fp, [b"c", b"d"], 1_000_000)
    r.feed(later, 0.1)
    assert r.take()[0] == [b"a", b"b", b"c", b"d"]
    assert r.resyncs == 1 and r.skipped == 0
    again, _ = numbered(fp, [b"e"], 0)  # far behind: the peer restarted at 0
    r.feed(again, 0.2)
    assert r.take()[0] == [b"e"] and r.resyncs == 2 and r.late == 0


def test_bad_seq_is_a_frame_error_after_the_frames_before_it(fp):
    r = fp.Resequencer()
    frames, _ = numbered(fp, [b"a"])
    with pytest.raises(FrameError) as info:
        r.feed([frames[0], (fp.TYPE_DATA, fp.FLAG_SEQ, b"\x00\x01")], 0.0)
    assert info.value.reason == "bad_seq"
    assert r.take()[0] == [b"a"]


def test_constructor_errors(fp):
    for kw in ({"max_packets": 0}, {"max_bytes": 0}, {"min_wait": 0.5, "max_wait": 0.1}):
        with pytest.raises(ValueError):
            fp.Resequencer(**kw)


def _stripe(fp, n, lanes, seed, start=0, lost=()):
    """``n`` datagrams numbered from ``start``, dealt in bursts to ``lanes`` lanes whose
    reads then interleave at random: what a receiver sees from several TCP lanes."""
    rnd = random.Random(seed)
    grams = [i.to_bytes(4, "big") for i in range(n)]
    frames, _ = numbered(fp, grams, start)
    per_lane = [[] for _ in range(lanes)]
    i = 0
    while i < n:
        burst = rnd.randint(1, 8)
        per_lane[rnd.randrange(lanes)].extend(
            f for j, f in enumerate(frames[i : i + burst], i) if j not in lost)
        i += burst
    reads = []
    while any(per_lane):
        lane = rnd.choice([q for q in per_lane if q])
        k = rnd.randint(1, 5)
        reads.append(lane[:k])
        del lane[:k]
    return grams, reads


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 300), lanes=st.integers(1, 6), seed=st.integers(0, 1 << 30),
       start=st.sampled_from([0, 5, MASK - 40]))
def test_striped_datagrams_come_out_in_order(fp, n, lanes, seed, start):
    grams, reads = _stripe(fp, n, lanes, seed, start)
    r = fp.Resequencer(max_packets=1000)
    if start:
        # A receiver expects 0 first; a count starting elsewhere is a resync.
        r.feed(numbered(fp, [], 0)[0], 0.0)
    out = []
    for t, read in enumerate(reads):
        r.feed(read, t * 1e-4)  # well inside the wait: no gap is given up
        out += r.take()[0]
    r.flush(1.0)
    out += r.take()[0]
    if start == 0:
        assert out == grams
        assert (r.skipped, r.late, r.held) == (0, 0, 0)
    else:
        assert sorted(out) == grams  # before the first number arrives nothing is known


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 200), lanes=st.integers(1, 5), seed=st.integers(0, 1 << 30),
       lost=st.sets(st.integers(0, 199), max_size=20), step=st.floats(0.0, 0.02))
def test_nothing_is_lost_or_duplicated_and_every_gap_is_counted(fp, n, lanes, seed, lost, step):
    grams, reads = _stripe(fp, n, lanes, seed, lost=lost)
    r = fp.Resequencer(max_packets=32 if seed % 2 else 256, max_wait=0.01, min_wait=0.001,
                       pass_bytes=4 if seed % 3 else 0)
    out = []
    now = 0.0
    for read in reads:
        now += step
        r.expire(now)
        r.feed(read, now)
        out += r.take()[0]
    r.flush(now + 1)
    out += r.take()[0]
    sent = [g for i, g in enumerate(grams) if i not in lost]
    assert sorted(out) == sorted(sent) and len(out) == len(sent)
    missing = len([i for i in lost if i < n])
    # Gaps that never fill are skipped; any other skip came back as a late datagram.
    # (A lost number at the very end leaves no gap: nothing follows it.)
    tail = 0
    while n - 1 - tail in lost:
        tail += 1
    if not r.resyncs:  # (a reorder wider than the window reads as a restarted count)
        assert r.skipped - r.late == missing - tail
    assert r.held == 0 and r.held_bytes == 0


@settings(max_examples=80, deadline=None)
@given(ops=st.lists(st.one_of(
    st.tuples(st.just("feed"), st.lists(st.integers(0, 70), max_size=6), st.floats(0, 0.01)),
    st.tuples(st.just("expire"), st.floats(0, 0.05)),
    st.tuples(st.just("hint"), st.floats(0, 0.05)),
), max_size=40))
def test_compiled_and_pure_agree(fp_compiled, fp_pure, ops):
    results = []
    for fp in (fp_compiled, fp_pure):
        r = fp.Resequencer(max_packets=16, max_bytes=200, max_wait=0.03, min_wait=0.001,
                           pass_bytes=3)
        trace = []
        now = 0.0
        for op in ops:
            if op[0] == "feed":
                now += op[2]
                frames = [numbered(fp, [bytes([s]) * (s % 9)], s)[0][0] for s in op[1]]
                trace.append(r.feed(frames, now))
            elif op[0] == "expire":
                now += op[1]
                trace.append(r.expire(now))
            else:
                r.set_rtt_hint(op[1])
            trace.append((r.take(), r.held, r.held_bytes, r.skipped, r.late, r.resyncs,
                          r.next_seq, round(r.wait, 12), r.deadline))
        results.append(trace)
    assert results[0] == results[1]
