"""LanePicker and flow_key, against both implementations."""

from __future__ import annotations

import random
import struct
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st


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


# -- flow_key of IP packets (TUN mode) -------------------------------------------------

PORTED = (6, 17, 132, 136)  # TCP, UDP, SCTP, UDP-Lite: the header starts with the ports


def ipv4(proto: int, src: bytes, dst: bytes, l4: bytes, *, ident: int = 0, frag: int = 0,
         ttl: int = 64, checksum: int = 0, options: bytes = b"") -> bytes:
    """An IPv4 packet: ``frag`` is the flags + fragment offset field (0x2000 = MF)."""
    ihl = 5 + len(options) // 4
    return struct.pack(
        ">BBHHHBBH4s4s", 0x40 | ihl, 0, 4 * ihl + len(l4), ident, frag, ttl, proto, checksum,
        src, dst,
    ) + options + l4


def ipv6(next_header: int, src: bytes, dst: bytes, l4: bytes, *, flow_label: int = 0,
         hop_limit: int = 64) -> bytes:
    return struct.pack(
        ">IHBB16s16s", (6 << 28) | flow_label, len(l4), next_header, hop_limit, src, dst
    ) + l4


def ports(sport: int, dport: int, rest: bytes = b"") -> bytes:
    return struct.pack(">HH", sport, dport) + rest


A4, B4 = bytes([10, 78, 0, 2]), bytes([192, 0, 2, 7])
A6 = bytes.fromhex("fd00007800000000000000000000000a")
B6 = bytes.fromhex("20010db8000000000000000000000007")


def spec_ip_key(proto: int, fields: bytes) -> int:
    """The IP key as flow_key's docstring defines it: FNV-1a over 32-bit big-endian words
    (the protocol, then ``fields``: addresses and ports), then MurmurHash3's finaliser."""
    h = 0x811C9DC5
    for w in (proto, *struct.unpack(f">{len(fields) // 4}I", fields)):
        h = ((h ^ w) * 0x01000193) & 0xFFFFFFFF
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def test_flow_key_ip_pinned(fp):
    # Pinned: a flow's key must not change between releases.
    cases = [
        (ipv4(6, A4, B4, ports(40000, 443, bytes(20))), 0x13E30BDA,
         spec_ip_key(6, A4 + B4 + ports(40000, 443))),
        (ipv4(1, A4, B4, bytes([8, 0]) + bytes(62)), 0x0CF0E875, spec_ip_key(1, A4 + B4)),
        (ipv6(17, A6, B6, ports(5353, 53, bytes(30))), 0xC56CDC29,
         spec_ip_key(17, A6 + B6 + ports(5353, 53))),
        (ipv6(58, A6, B6, bytes([128, 0]) + bytes(30)), 0xA3FA0FB3, spec_ip_key(58, A6 + B6)),
    ]
    for packet, pinned, spec in cases:
        assert fp.flow_key(packet) == pinned == spec


def test_flow_key_ipv4_ignores_what_changes_per_packet(fp):
    first = ipv4(6, A4, B4, ports(40000, 443, bytes(20)), ident=1, checksum=0x1234)
    later = ipv4(6, A4, B4, ports(40000, 443, b"x" * 1400), ident=999, checksum=0xBEEF, ttl=3)
    assert fp.flow_key(first) == fp.flow_key(later)
    # Options move the ports; the key follows them.
    with_options = ipv4(6, A4, B4, ports(40000, 443), options=bytes([1, 1, 1, 0]))
    assert fp.flow_key(with_options) == fp.flow_key(first)


def test_flow_key_ipv4_ports_only_where_the_protocol_has_them(fp):
    for proto in PORTED:
        assert fp.flow_key(ipv4(proto, A4, B4, ports(1, 2))) != fp.flow_key(
            ipv4(proto, A4, B4, ports(1, 3))
        ), proto
    # ICMP: the "ports" are type, code and checksum, which must not split a flow.
    assert fp.flow_key(ipv4(1, A4, B4, ports(0x0800, 1))) == fp.flow_key(
        ipv4(1, A4, B4, ports(0x0800, 2))
    )
    # A header too short for the ports, or an IHL below 5, gives the addresses' key.
    no_ports = fp.flow_key(ipv4(6, A4, B4, b""))
    assert fp.flow_key(ipv4(6, A4, B4, b"\x01\x02\x03")) == no_ports
    bad_ihl = bytearray(ipv4(6, A4, B4, ports(1, 2)))
    bad_ihl[0] = 0x44
    assert fp.flow_key(bytes(bad_ihl)) == no_ports


def test_flow_key_ipv4_fragments_share_the_packets_key(fp):
    whole = ipv4(17, A4, B4, ports(5000, 6000, bytes(100)), ident=7)
    first = ipv4(17, A4, B4, ports(5000, 6000, bytes(100)), ident=7, frag=0x2000)  # MF
    middle = ipv4(17, A4, B4, bytes(104), ident=7, frag=0x2000 | 13)
    last = ipv4(17, A4, B4, bytes(50), ident=7, frag=26)
    keys = {fp.flow_key(p) for p in (first, middle, last)}
    assert len(keys) == 1
    assert keys == {fp.flow_key(ipv4(17, A4, B4, b""))}  # the addresses' and protocol's
    assert fp.flow_key(whole) not in keys
    # DF is not a fragment.
    assert fp.flow_key(ipv4(17, A4, B4, ports(5000, 6000), frag=0x4000)) == fp.flow_key(whole)


def test_flow_key_ipv6(fp):
    key = fp.flow_key(ipv6(6, A6, B6, ports(40000, 443, bytes(20))))
    assert key == fp.flow_key(ipv6(6, A6, B6, ports(40000, 443, b"y" * 1300), hop_limit=1,
                                   flow_label=0xABCDE))
    assert key != fp.flow_key(ipv6(6, A6, B6, ports(40001, 443)))
    assert key != fp.flow_key(ipv6(6, B6, A6, ports(40000, 443)))
    # Extension headers (here a fragment header, 44): no ports, one key for the packet.
    frag = {fp.flow_key(ipv6(44, A6, B6, bytes([6, 0, 0, 1]) + bytes(n))) for n in (4, 80)}
    assert frag == {fp.flow_key(ipv6(44, A6, B6, b""))}


def test_flow_key_ip_too_short_falls_back(fp):
    assert fp.flow_key(ipv4(6, A4, B4, b"")[:19]) == fnv1a32(ipv4(6, A4, B4, b"")[:19])
    short6 = ipv6(6, A6, B6, b"")[:39]
    assert fp.flow_key(short6) == fnv1a32(short6)


@pytest.mark.parametrize("n_lanes", [2, 3, 4, 8])
def test_flow_key_spreads_flows_over_lanes(fp, n_lanes):
    # Linux gives connect() even source ports: the low bits of the key must still vary.
    keys = [fp.flow_key(ipv4(6, A4, B4, ports(sport, 443))) for sport in range(32768, 34768, 2)]
    assert len(set(keys)) == len(keys)
    counts = Counter(k % n_lanes for k in keys)
    assert len(counts) == n_lanes
    assert min(counts.values()) > 0.7 * len(keys) / n_lanes, counts


addr4 = st.binary(min_size=4, max_size=4)
addr6 = st.binary(min_size=16, max_size=16)
port = st.integers(0, 65535)
IP_SETTINGS = settings(max_examples=200, deadline=None)


@IP_SETTINGS
@given(
    proto=st.sampled_from(PORTED) | st.integers(0, 255), src=addr4, dst=addr4, sport=port,
    dport=port, a=st.tuples(st.integers(0, 65535), st.integers(0, 65535), st.integers(1, 255),
                            st.binary(max_size=64)),
    b=st.tuples(st.integers(0, 65535), st.integers(0, 65535), st.integers(1, 255),
                st.binary(max_size=64)),
    options=st.integers(0, 10).map(lambda n: bytes(4 * n)),
)
def test_flow_key_ipv4_same_flow_same_key(fp, proto, src, dst, sport, dport, a, b, options):
    one = ipv4(proto, src, dst, ports(sport, dport, a[3]), ident=a[0], checksum=a[1], ttl=a[2],
               options=options)
    two = ipv4(proto, src, dst, ports(sport, dport, b[3]), ident=b[0], checksum=b[1], ttl=b[2])
    assert fp.flow_key(one) == fp.flow_key(two)


@IP_SETTINGS
@given(
    next_header=st.sampled_from(PORTED) | st.integers(0, 255), src=addr6, dst=addr6,
    sport=port, dport=port, payloads=st.tuples(st.binary(max_size=64), st.binary(max_size=64)),
    labels=st.tuples(st.integers(0, 0xFFFFF), st.integers(0, 0xFFFFF)),
)
def test_flow_key_ipv6_same_flow_same_key(fp, next_header, src, dst, sport, dport, payloads,
                                          labels):
    one = ipv6(next_header, src, dst, ports(sport, dport, payloads[0]), flow_label=labels[0])
    two = ipv6(next_header, src, dst, ports(sport, dport, payloads[1]), flow_label=labels[1],
               hop_limit=1)
    assert fp.flow_key(one) == fp.flow_key(two)


@IP_SETTINGS
@given(
    version=st.sampled_from([4, 6]), proto=st.sampled_from(PORTED), src=addr6, dst=addr6,
    flows=st.lists(st.tuples(port, port), min_size=20, max_size=60, unique=True),
)
def test_flow_key_different_ports_usually_differ(fp, version, proto, src, dst, flows):
    if version == 4:
        keys = {fp.flow_key(ipv4(proto, src[:4], dst[:4], ports(s, d))) for s, d in flows}
    else:
        keys = {fp.flow_key(ipv6(proto, src, dst, ports(s, d))) for s, d in flows}
    assert len(keys) >= len(flows) - 1  # a 32-bit collision among 60 flows: ~4e-7


@IP_SETTINGS
@given(
    proto=st.integers(0, 255), src=addr4, dst=addr4, ident=st.integers(0, 65535),
    pieces=st.lists(st.tuples(st.integers(0, 0x1FFF), st.booleans(), st.binary(max_size=64)),
                    min_size=1, max_size=6),
)
def test_flow_key_ipv4_fragments_one_key(fp, proto, src, dst, ident, pieces):
    frags = [
        ipv4(proto, src, dst, body, ident=ident, frag=(0x2000 if more else 0) | offset)
        for offset, more, body in pieces
        if offset or more
    ]
    assert {fp.flow_key(f) for f in frags} <= {fp.flow_key(ipv4(proto, src, dst, b""))}


def old_flow_key(data: bytes) -> int:
    """flow_key as it was before IP packets had their own branch (WireGuard + FNV-1a)."""
    if data:
        kind = data[0]
        if (kind == 4 and len(data) >= 16) or (kind in (1, 3) and len(data) >= 8):
            return int.from_bytes(data[4:8], "little")
        if kind == 2 and len(data) >= 12:
            return int.from_bytes(data[8:12], "little")
    return fnv1a32(data)


@settings(max_examples=300, deadline=None)
@given(
    data=st.tuples(st.sampled_from([1, 2, 3, 4]), st.binary(max_size=200)).map(
        lambda t: bytes([t[0]]) + t[1]
    )
    | st.binary(max_size=200)
)
def test_flow_key_unchanged_for_non_ip(fp, data):
    is_ip = data and ((data[0] >> 4 == 4 and len(data) >= 20)
                      or (data[0] >> 4 == 6 and len(data) >= 40))
    if not is_ip:
        assert fp.flow_key(data) == old_flow_key(data)
