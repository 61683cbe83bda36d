"""LanePicker and flow_key, against both implementations."""

from __future__ import annotations

import random
from collections import Counter

import pytest


def all_ready(fp, n, strategy="rr"):
    p = fp.LanePicker(n, strategy)
    for i in range(n):
        p.set_ready(i, True)
    return p


def test_lanes_start_not_ready(fp):
    p = fp.LanePicker(5)
    assert p.n_lanes == 5
    assert p.ready_count == 0
    assert not any(p.is_ready(i) for i in range(5))
    assert p.pick() == -1
    assert fp.LanePicker(5, "hash").pick(123) == -1


def test_validation(fp):
    with pytest.raises(ValueError):
        fp.LanePicker(5, "random")
    with pytest.raises(ValueError):
        fp.LanePicker(0)
    p = fp.LanePicker(3)
    for bad in (-1, 3):
        with pytest.raises(IndexError):
            p.set_ready(bad, True)
        with pytest.raises(IndexError):
            p.is_ready(bad)
    assert p.strategy == "rr" and fp.LanePicker(2, "hash").strategy == "hash"


def test_rr_cycles_in_order(fp):
    p = all_ready(fp, 5)
    assert [p.pick() for _ in range(12)] == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]


def test_rr_is_even_over_many_picks(fp):
    p = all_ready(fp, 5)
    counts = Counter(p.pick() for _ in range(100_000))
    assert counts == {i: 20_000 for i in range(5)}


def test_rr_skips_paused_and_closed_lanes(fp):
    p = all_ready(fp, 5)
    p.set_ready(1, False)
    p.set_ready(3, False)
    assert p.ready_count == 3
    assert [p.pick() for _ in range(6)] == [0, 2, 4, 0, 2, 4]
    p.set_ready(3, True)
    assert [p.pick() for _ in range(4)] == [0, 2, 3, 4]
    counts = Counter(p.pick() for _ in range(4000))
    assert counts == {0: 1000, 2: 1000, 3: 1000, 4: 1000}


def test_rr_continues_after_the_last_pick(fp):
    p = all_ready(fp, 4)
    assert p.pick() == 0 and p.pick() == 1
    p.set_ready(2, False)
    assert p.pick() == 3
    p.set_ready(2, True)
    assert p.pick() == 0
    p.set_ready(1, False)
    assert p.pick() == 2


def test_single_lane_and_none(fp):
    p = fp.LanePicker(3)
    p.set_ready(2, True)
    assert {p.pick() for _ in range(10)} == {2}
    p.set_ready(2, False)
    assert p.pick() == -1
    assert p.ready_count == 0


def test_set_ready_is_idempotent(fp):
    p = fp.LanePicker(3)
    p.set_ready(1, True)
    p.set_ready(1, True)
    assert p.ready_count == 1 and p.is_ready(1)
    p.set_ready(1, 0)
    p.set_ready(1, False)
    assert p.ready_count == 0 and not p.is_ready(1)


def test_hash_is_key_mod_ready_count(fp):
    p = all_ready(fp, 5, "hash")
    for key in range(50):
        assert p.pick(key) == key % 5
    p.set_ready(0, False)
    p.set_ready(3, False)
    ready = [1, 2, 4]
    for key in (0, 1, 2, 3, 10, 2**32 - 1, 2**63 - 1):
        assert p.pick(key) == ready[key % 3]
    assert p.pick(-1) == ready[-1 % 3]


def test_hash_is_stable_per_key(fp):
    p = all_ready(fp, 5, "hash")
    rng = random.Random(2)
    keys = [rng.getrandbits(32) for _ in range(200)]
    first = [p.pick(k) for k in keys]
    for _ in range(3):
        assert [p.pick(k) for k in keys] == first
    assert len(set(first)) == 5


def test_hash_ignores_rr_state_and_rr_ignores_key(fp):
    h = all_ready(fp, 4, "hash")
    assert [h.pick(7) for _ in range(5)] == [3] * 5
    r = all_ready(fp, 4, "rr")
    assert [r.pick(7) for _ in range(5)] == [0, 1, 2, 3, 0]


# -- flow_key -------------------------------------------------------------------------


def wg(kind: int, length: int, fields: dict[int, int]) -> bytes:
    msg = bytearray(length)
    msg[0] = kind
    for offset, value in fields.items():
        msg[offset : offset + 4] = value.to_bytes(4, "little")
    return bytes(msg)


def test_flow_key_wireguard_transport_data(fp):
    assert fp.flow_key(wg(4, 32, {4: 0xDEADBEEF, 8: 1})) == 0xDEADBEEF
    assert fp.flow_key(wg(4, 16, {4: 7})) == 7


def test_flow_key_wireguard_handshakes(fp):
    assert fp.flow_key(wg(1, 148, {4: 0x11223344})) == 0x11223344  # initiation: sender
    assert fp.flow_key(wg(2, 92, {4: 5, 8: 0x55667788})) == 0x55667788  # response: receiver
    assert fp.flow_key(wg(3, 64, {4: 0x99AABBCC})) == 0x99AABBCC  # cookie: receiver


def fnv1a32(data: bytes) -> int:
    h = 0x811C9DC5
    for b in data[:16]:
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h


@pytest.mark.parametrize(
    "data",
    [b"", b"\x04" * 15, b"\x02" + bytes(10), b"\x01abc", b"hello world, this is not WG",
     bytes(range(256)), b"\x05" + bytes(40), b"\x00"],
)
def test_flow_key_fallback_is_fnv1a_of_16_bytes(fp, data):
    assert fp.flow_key(data) == fnv1a32(data)


def test_flow_key_is_deterministic_and_accepts_bytes_like(fp):
    data = b"some datagram payload"
    assert fp.flow_key(data) == fp.flow_key(bytearray(data)) == fp.flow_key(memoryview(data))
    assert fp.flow_key(data) == 0x73B52077  # pinned: the key must not change between releases
    assert 0 <= fp.flow_key(data) < 2**32
