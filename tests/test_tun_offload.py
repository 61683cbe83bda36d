"""TUN offloads: ``gso_split`` and the ``vnet`` modes of ``tun_read_batch`` /
``tun_write_batch`` (a device opened with ``IFF_VNET_HDR``, offloads on).

Without privileges, property tests (hypothesis) build TCP and UDP super-packets over
IPv4 (with and without IP options) and IPv6 behind a valid ``virtio_net_hdr``, hold the
compiled fast path and its pure-Python twin to the same bytes, and check every segment
on its own with a checksum written here (not the package's): IPv4 header checksum,
length and identification, IPv6 payload length, TCP sequence numbers and flags (FIN and
PSH on the last segment only, CWR on the first only), UDP length and a never-zero UDP
checksum, the transport checksum over the pseudo-header, the payload cut at
``gso_size`` and nothing lost; a packet left with ``NEEDS_CSUM`` comes back with its
checksum finished, one without flags unchanged, and headers that cannot be followed give
``[]``. The ``vnet`` reads and writes are held to a model on AF_UNIX datagram
socketpairs (one read, one datagram, as on a TUN device).

As root, the real kernel judges: two network namespaces, a TUN device in each (opened
here, moved there), and a relay thread that moves packets between the two descriptors
with the implementation under test. TCP transfers (IPv4 and IPv6) must arrive whole
with the sender's sha256: between two offloading devices the super-packets pass as they
are; toward a device without offloads ``tun_read_batch(..., vnet=2)`` cuts them, so the
receiving kernel checks every segment and checksum ``gso_split`` made (a bad one would
stall the transfer, which is bounded in time). UDP segmentation (``UDP_SEGMENT``) is cut
the same way and must arrive as the datagrams the sender meant.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import importlib
import json
import os
import random
import select
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

IMPLEMENTATIONS = ["compiled", "pure"]
VNET = 10
NEEDS_CSUM, DATA_VALID = 1, 2
GSO_NONE, GSO_TCPV4, GSO_UDP, GSO_TCPV6, GSO_UDP_L4, GSO_ECN = 0, 1, 3, 4, 5, 0x80
FIN, PSH, CWR = 0x01, 0x08, 0x80
KEEP_MAX = 65531  # the longest frame tun_read_batch(vnet=1) keeps whole


# -- checksums and packets, written here ---------------------------------------------

def _fold(total: int) -> int:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _sum16(data: bytes) -> int:
    """The sum of ``data``'s big-endian 16-bit words (an odd last byte is a high half)."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    return sum(struct.unpack(f"!{len(data) // 2}H", data))


def _pseudo(packet: bytes, l4: int, proto: int) -> bytes:
    length = len(packet) - l4
    if packet[0] >> 4 == 4:
        return packet[12:20] + struct.pack("!BBH", 0, proto, length)
    return packet[8:40] + struct.pack("!I3xB", length, proto)


def _l4_valid(packet: bytes, l4: int, proto: int) -> bool:
    """The transport checksum of ``packet`` checks out over its pseudo-header."""
    return _fold(_sum16(_pseudo(packet, l4, proto)) + _sum16(packet[l4:])) == 0xFFFF


def _ip_header_valid(packet: bytes) -> bool:
    return _fold(_sum16(packet[:(packet[0] & 15) * 4])) == 0xFFFF


def _csum_field(proto: int) -> int:
    return 16 if proto == 6 else 6


def _put16(data: bytes, offset: int, value: int) -> bytes:
    return data[:offset] + struct.pack("!H", value) + data[offset + 2:]


def _packet(version: int, proto: int, payload: bytes, *, ip_opts: bytes = b"",
            tcp_opts: bytes = b"", flags: int = 0x18, seq: int = 1000, ip_id: int = 7,
            src: bytes | None = None, dst: bytes | None = None, tos: int = 0,
            partial: bool = True) -> tuple[bytes, int, int]:
    """``(packet, l4 offset, payload offset)``: an IPv4 (valid header checksum) or IPv6
    packet with a TCP or UDP header; the transport checksum field holds the folded,
    uncomplemented pseudo-header sum as the kernel leaves it for ``NEEDS_CSUM``
    (``partial``), or the full checksum."""
    if proto == 6:
        l4h = struct.pack("!HHIIBBHHH", 40000, 5201, seq, 0x01020304,
                          (5 + len(tcp_opts) // 4) << 4, flags, 65535, 0, 0) + tcp_opts
    else:
        l4h = struct.pack("!HHHH", 40000, 5201, (8 + len(payload)) & 0xFFFF, 0)
    l4len = len(l4h) + len(payload)
    if version == 4:
        ihl = 20 + len(ip_opts)
        iph = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl // 4, tos, ihl + l4len, ip_id, 0x4000,
                          64, proto, 0, src or bytes([10, 86, 0, 1]),
                          dst or bytes([10, 86, 0, 2])) + ip_opts
        iph = _put16(iph, 10, ~_fold(_sum16(iph)) & 0xFFFF)
    else:
        iph = struct.pack("!IHBB16s16s", 0x60000000 | tos << 20, l4len, proto, 64,
                          src or bytes.fromhex("fd85" + "00" * 13 + "01"),
                          dst or bytes.fromhex("fd85" + "00" * 13 + "02"))
    packet = iph + l4h + payload
    l4 = len(iph)
    off = l4 + _csum_field(proto)
    if partial:
        packet = _put16(packet, off, _fold(_sum16(_pseudo(packet, l4, proto))))
    else:
        full = ~_fold(_sum16(_pseudo(packet, l4, proto)) + _sum16(packet[l4:])) & 0xFFFF
        packet = _put16(packet, off, full or (0xFFFF if proto == 17 else 0))
    return packet, l4, l4 + len(l4h)


def _vnet(flags: int, gso_type: int, hdr_len: int, gso_size: int, csum_start: int,
          csum_offset: int) -> bytes:
    return struct.pack("<BBHHHH", flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)


class Super(NamedTuple):
    frame: bytes  # virtio_net_hdr + packet
    packet: bytes
    l4: int
    l4_end: int
    proto: int
    gso_size: int


def _super(version: int, proto: int, payload: bytes, gso_size: int, ecn: bool = False,
           **kw: Any) -> Super:
    packet, l4, l4_end = _packet(version, proto, payload, **kw)
    gso_type = GSO_UDP_L4 if proto == 17 else GSO_TCPV4 if version == 4 else GSO_TCPV6
    header = _vnet(NEEDS_CSUM, gso_type | (GSO_ECN if ecn else 0), l4_end, gso_size, l4,
                   _csum_field(proto))
    return Super(header + packet, packet, l4, l4_end, proto, gso_size)


def _check_segments(sp: Super, segments: list[bytes]) -> None:
    """Each segment of ``sp`` checked on its own, and all of them against ``sp``."""
    p, l4, l4_end, proto, gso = sp.packet, sp.l4, sp.l4_end, sp.proto, sp.gso_size
    payload = p[l4_end:]
    assert len(segments) == -(-len(payload) // gso)
    version = p[0] >> 4
    ip_id = int.from_bytes(p[4:6], "big")
    seq0 = int.from_bytes(p[l4 + 4:l4 + 8], "big")
    off = 0
    for i, seg in enumerate(segments):
        first, last = i == 0, i == len(segments) - 1
        chunk = seg[l4_end:]
        assert len(chunk) == (gso if not last else len(payload) - off) > 0
        assert chunk == payload[off:off + len(chunk)]
        if version == 4:
            assert seg[:2] == p[:2] and seg[6:10] == p[6:10] and seg[12:l4] == p[12:l4]
            assert int.from_bytes(seg[2:4], "big") == len(seg)
            assert int.from_bytes(seg[4:6], "big") == (ip_id + i) & 0xFFFF
            assert _ip_header_valid(seg), f"segment {i}: bad IPv4 header checksum"
        else:
            assert seg[:4] == p[:4] and seg[6:l4] == p[6:l4]
            assert int.from_bytes(seg[4:6], "big") == len(seg) - 40
        if proto == 6:
            assert seg[l4:l4 + 4] == p[l4:l4 + 4]  # ports
            assert int.from_bytes(seg[l4 + 4:l4 + 8], "big") == (seq0 + off) & 0xFFFFFFFF
            assert seg[l4 + 8:l4 + 13] == p[l4 + 8:l4 + 13]  # ack, data offset
            want = p[l4 + 13]
            if not last:
                want &= ~(FIN | PSH)
            if not first:
                want &= ~CWR
            assert seg[l4 + 13] == want, f"segment {i}: flags {seg[l4 + 13]:#x} != {want:#x}"
            assert seg[l4 + 14:l4 + 16] == p[l4 + 14:l4 + 16]  # window
            assert seg[l4 + 18:l4_end] == p[l4 + 18:l4_end]  # urgent pointer, options
        else:
            assert seg[l4:l4 + 4] == p[l4:l4 + 4]
            assert int.from_bytes(seg[l4 + 4:l4 + 6], "big") == len(seg) - l4
            assert seg[l4 + 6:l4 + 8] != b"\0\0", f"segment {i}: UDP checksum 0"
        assert _l4_valid(seg, l4, proto), f"segment {i}: bad transport checksum"
        off += len(chunk)
    assert off == len(payload)


# -- gso_split: properties and differential ------------------------------------------

@st.composite
def _supers(draw: Any) -> Super:
    version = draw(st.sampled_from([4, 6]))
    proto = draw(st.sampled_from([6, 17]))
    ip_opts = draw(st.integers(0, 10)) * 4 if version == 4 else 0
    tcp_opts = draw(st.integers(0, 10)) * 4 if proto == 6 else 0
    rnd = random.Random(draw(st.integers(0, 2**32 - 1)))
    gso_size = draw(st.sampled_from([1, 536, 1000, 1348, 1360, 1448]) | st.integers(1, 3000))
    segments = draw(st.integers(1, max(1, min(200, 20000 // gso_size))))
    size = (segments - 1) * gso_size + draw(st.integers(1, gso_size))  # 1 .. 20000 bytes
    flags = draw(st.sampled_from([0x10, 0x18, 0x19, 0x11, 0x90, 0x99, 0xD8, 0xFF, 0x01,
                                  0x08, 0x80]) | st.integers(0, 255)) if proto == 6 else 0
    return _super(version, proto, rnd.randbytes(size), gso_size,
                  ecn=proto == 6 and draw(st.booleans()),
                  ip_opts=rnd.randbytes(ip_opts), tcp_opts=rnd.randbytes(tcp_opts),
                  flags=flags, seq=draw(st.integers(0, 2**32 - 1)),
                  ip_id=draw(st.integers(0, 0xFFFF)), tos=draw(st.integers(0, 255)),
                  src=rnd.randbytes(4 if version == 4 else 16),
                  dst=rnd.randbytes(4 if version == 4 else 16))


@settings(max_examples=150, deadline=None)
@given(sp=_supers())
def test_gso_split_cuts_super_packets_as_the_kernel_would(fp_compiled, fp_pure, sp):
    """TCP/UDP super-packets over IPv4 (with options) and IPv6: both twins give the same
    bytes, and each segment stands on its own (lengths, ids, sequence numbers, flags,
    checksums), its payload the next ``gso_size`` bytes of the original."""
    compiled = fp_compiled.gso_split(sp.frame)
    pure = fp_pure.gso_split(sp.frame)
    assert compiled == pure
    _check_segments(sp, compiled)
    for fp in (fp_compiled, fp_pure):
        assert fp.gso_split(sp.frame, header=True) == [bytes(VNET) + s for s in compiled]
    # any bytes-like object will do
    assert fp_compiled.gso_split(memoryview(bytearray(sp.frame))) == compiled
    assert fp_pure.gso_split(bytearray(sp.frame)) == compiled


def test_gso_split_sequence_numbers_wrap_and_ids_wrap(fp_compiled, fp_pure):
    """A sequence number near 2**32 and an IPv4 id near 65535 wrap around."""
    sp = _super(4, 6, bytes(range(256)) * 20, 1000, seq=2**32 - 1500, ip_id=0xFFFF,
                flags=0x99)
    for fp in (fp_compiled, fp_pure):
        segments = fp.gso_split(sp.frame)
        _check_segments(sp, segments)
        assert [int.from_bytes(s[4:6], "big") for s in segments] == [0xFFFF, 0, 1, 2, 3, 4]
        assert int.from_bytes(segments[2][24:28], "big") == 500


@st.composite
def _partials(draw: Any) -> tuple[bytes, bytes, int, int]:
    version = draw(st.sampled_from([4, 6]))
    proto = draw(st.sampled_from([6, 17]))
    rnd = random.Random(draw(st.integers(0, 2**32 - 1)))
    payload = rnd.randbytes(draw(st.integers(0, 3000)))
    ip_opts = rnd.randbytes(4 * draw(st.integers(0, 10))) if version == 4 else b""
    tcp_opts = rnd.randbytes(4 * draw(st.integers(0, 10))) if proto == 6 else b""
    packet, l4, _ = _packet(version, proto, payload, ip_opts=ip_opts, tcp_opts=tcp_opts,
                            src=rnd.randbytes(4 if version == 4 else 16),
                            dst=rnd.randbytes(4 if version == 4 else 16))
    header = _vnet(NEEDS_CSUM, draw(st.sampled_from([GSO_NONE, GSO_ECN])), 0, 0, l4,
                   _csum_field(proto))
    return header + packet, packet, l4, proto


def _check_finished(packet: bytes, got: bytes, l4: int, proto: int) -> None:
    field = l4 + _csum_field(proto)
    assert len(got) == len(packet)
    assert got[:field] == packet[:field] and got[field + 2:] == packet[field + 2:]
    assert _l4_valid(got, l4, proto), "checksum not finished right"
    # The kernel (skb_checksum_help) never leaves a computed 0: it stores 0xFFFF (for
    # UDP, 0 means "no checksum", and IPv6 drops such a packet).
    assert got[field:field + 2] != b"\0\0", "checksum finished as 0, not 0xFFFF"


@settings(max_examples=150, deadline=None)
@given(case=_partials())
def test_gso_split_finishes_a_needs_csum_checksum(fp_compiled, fp_pure, case):
    """A packet that is not a super-packet but has ``NEEDS_CSUM`` (its checksum field
    holding the pseudo-header's folded sum, as the kernel leaves it) comes back with the
    checksum finished, all else unchanged; the same from both twins."""
    frame, packet, l4, proto = case
    compiled = fp_compiled.gso_split(frame)
    assert compiled == fp_pure.gso_split(frame)
    assert len(compiled) == 1
    _check_finished(packet, compiled[0], l4, proto)
    for fp in (fp_compiled, fp_pure):
        assert fp.gso_split(frame, header=True) == [bytes(VNET) + compiled[0]]


def _zero_sum_payload(version: int, proto: int, size: int) -> bytes:
    """A payload of ``size`` (even) bytes whose packet's transport checksum comes out 0."""
    body = bytes(range(256)) * (size // 256 + 1)
    body = body[:size - 2] + b"\0\0"
    packet, l4, _ = _packet(version, proto, body, partial=False)
    packet = _put16(packet, l4 + _csum_field(proto), 0)
    total = _fold(_sum16(_pseudo(packet, l4, proto)) + _sum16(packet[l4:]))
    return body[:-2] + struct.pack("!H", 0xFFFF - total)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("version", [4, 6])
def test_gso_split_never_finishes_a_udp_checksum_as_zero(impl, version, fp_compiled,
                                                         fp_pure):
    """A UDP packet whose checksum computes to 0 is sent with 0xFFFF (as the kernel does):
    0 would mean "no checksum", which IPv6 does not allow. Both for a segment of a
    super-packet and for a single ``NEEDS_CSUM`` packet."""
    fp = fp_compiled if impl == "compiled" else fp_pure
    payload = _zero_sum_payload(version, 17, 600)
    packet, l4, _ = _packet(version, 17, payload, partial=False)
    assert packet[l4 + 6:l4 + 8] == b"\xff\xff"  # the computed sum was 0 indeed
    sp = _super(version, 17, payload, 1000)
    (segment,) = fp.gso_split(sp.frame)
    _check_segments(sp, [segment])
    partial, l4, _ = _packet(version, 17, payload)
    frame = _vnet(NEEDS_CSUM, GSO_NONE, 0, 0, l4, 6) + partial
    (got,) = fp.gso_split(frame)
    _check_finished(partial, got, l4, 17)


@settings(max_examples=100, deadline=None)
@given(flags=st.sampled_from([0, DATA_VALID]), gso_type=st.sampled_from([GSO_NONE, GSO_ECN]),
       rest=st.binary(min_size=8, max_size=8), packet=st.binary(min_size=1, max_size=3000))
def test_gso_split_leaves_a_packet_without_flags_alone(fp_compiled, fp_pure, flags, gso_type,
                                                       rest, packet):
    """No ``NEEDS_CSUM`` and no GSO type: the packet as it is, whatever it holds (and
    whatever the rest of the header says)."""
    frame = bytes([flags, gso_type]) + rest + packet
    for fp in (fp_compiled, fp_pure):
        assert fp.gso_split(frame) == [packet]
        assert fp.gso_split(frame, header=True) == [bytes(VNET) + packet]


def _malformed() -> list[tuple[str, bytes]]:
    tcp4 = _super(4, 6, b"x" * 3000, 1000)
    tcp6 = _super(6, 6, b"x" * 3000, 1000)
    udp4 = _super(4, 17, b"x" * 3000, 1000)
    h4, p4, l4 = tcp4.frame[:VNET], tcp4.packet, tcp4.l4
    bad_doff = p4[:l4 + 12] + bytes([4 << 4]) + p4[l4 + 13:]
    huge_doff = (_super(4, 6, b"x" * 10, 1000).packet[:l4 + 12] + bytes([15 << 4])
                 + _super(4, 6, b"x" * 10, 1000).packet[l4 + 13:])
    bad_ihl = bytes([0x44]) + p4[1:]
    no_payload, l4_np, end_np = _packet(4, 6, b"")
    return [
        ("GSO type 3 (UFO)", _vnet(1, GSO_UDP, 40, 1000, 20, 6) + udp4.packet),
        ("GSO type 2 (unknown)", _vnet(1, 2, 40, 1000, 20, 16) + p4),
        ("GSO type 6 (unknown)", _vnet(1, 6, 40, 1000, 20, 16) + p4),
        ("csum_start beyond the packet", _vnet(1, GSO_TCPV4, 40, 1000, len(p4), 16) + p4),
        ("csum_start far beyond", _vnet(1, GSO_TCPV4, 40, 1000, 60000, 16) + p4),
        ("UDP header beyond the packet",
         _vnet(1, GSO_UDP_L4, 0, 1000, len(udp4.packet) - 4, 6) + udp4.packet),
        ("csum_start inside the IPv4 header", _vnet(1, GSO_TCPV4, 40, 1000, 12, 16) + p4),
        ("csum_start inside the IPv6 header",
         _vnet(1, GSO_TCPV6, 60, 1000, 20, 16) + tcp6.packet),
        ("gso_size 0", _vnet(1, GSO_TCPV4, 40, 0, 20, 16) + p4),
        ("gso_size 0, UDP", _vnet(1, GSO_UDP_L4, 28, 0, 20, 6) + udp4.packet),
        ("TCPV4 on an IPv6 packet", _vnet(1, GSO_TCPV4, 60, 1000, 40, 16) + tcp6.packet),
        ("TCPV6 on an IPv4 packet", h4[:1] + bytes([GSO_TCPV6]) + h4[2:] + p4),
        ("UDP_L4 on a version 5 packet",
         _vnet(1, GSO_UDP_L4, 28, 1000, 20, 6) + bytes([0x55]) + udp4.packet[1:]),
        ("TCP data offset 4", h4 + bad_doff),
        ("TCP data offset beyond the packet", h4 + huge_doff[:l4 + 30]),
        ("IPv4 header length 16", h4 + bad_ihl),
        ("GSO with no payload",
         _vnet(1, GSO_TCPV4, end_np, 1000, l4_np, 16) + no_payload),
        ("NEEDS_CSUM, field beyond the packet",
         _vnet(1, GSO_NONE, 0, 0, len(p4) - 1, 0) + p4),
        ("NEEDS_CSUM, offset beyond the packet", _vnet(1, GSO_NONE, 0, 0, 20, 60000) + p4),
        ("a header alone", h4),
        ("nine bytes", h4[:9]),
        ("two bytes", b"\x01\x01"),
        ("nothing", b""),
    ]


@pytest.mark.parametrize("name,frame", _malformed(), ids=[n for n, _ in _malformed()])
def test_gso_split_gives_nothing_for_a_header_it_cannot_follow(fp_compiled, fp_pure, name,
                                                              frame):
    for fp in (fp_compiled, fp_pure):
        assert fp.gso_split(frame) == [], name
        assert fp.gso_split(frame, header=True) == [], name


# -- tun_read_batch / tun_write_batch with vnet, on socketpairs ----------------------

def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.setblocking(False)
    b.setblocking(False)
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    return a, b


def _recv_all(s: socket.socket) -> list[bytes]:
    got = []
    while True:
        try:
            got.append(s.recv(1 << 17))
        except BlockingIOError:
            return got


_written = st.one_of(
    st.builds(lambda first, rest: bytes([first]) + rest,  # IP packets: get a header
              st.sampled_from([0x45, 0x46, 0x4F, 0x60, 0x6A, 0x40]),
              st.binary(max_size=2000)),
    st.builds(lambda first, rest: bytes([first]) + rest,  # frames with their own header
              st.sampled_from([0x00, 0x01, 0x02, 0x03]), st.binary(max_size=2000)),
    st.binary(min_size=1, max_size=2000),  # anything
)


@settings(max_examples=100, deadline=None)
@given(packets=st.lists(_written, max_size=30),
       kinds=st.lists(st.sampled_from(["bytes", "bytearray", "memoryview"]), min_size=30,
                      max_size=30))
def test_write_batch_vnet_differential(fp_compiled, fp_pure, packets, kinds):
    """``vnet=True``: an IP packet (version 4 or 6 in its first byte) goes out behind 10
    zero bytes, anything else as it is; ``sent_bytes`` counts the packets' own bytes."""
    wrap = {"bytes": bytes, "bytearray": bytearray, "memoryview": memoryview}
    batch = [wrap[k](p) for p, k in zip(packets, kinds, strict=False)]
    expected = [bytes(VNET) + p if p[0] >> 4 in (4, 6) else p for p in packets]
    for fp in (fp_compiled, fp_pure):
        a, b = _pair()
        try:
            assert fp.tun_write_batch(a.fileno(), batch, True) == (
                len(packets), sum(map(len, packets)), 0)
            assert _recv_all(b) == expected
            # without vnet, as they are
            assert fp.tun_write_batch(a.fileno(), batch) == (
                len(packets), sum(map(len, packets)), 0)
            assert _recv_all(b) == packets
        finally:
            a.close()
            b.close()


def _small_supers() -> st.SearchStrategy[bytes]:
    return st.builds(
        lambda v, proto, n, gso, seed: _super(v, proto, random.Random(seed).randbytes(n),
                                              gso).frame,
        st.sampled_from([4, 6]), st.sampled_from([6, 17]), st.integers(1, 4000),
        st.integers(500, 1400), st.integers(0, 1000))


def _partial_frames() -> st.SearchStrategy[bytes]:
    def build(v: int, proto: int, n: int) -> bytes:
        packet, l4, _ = _packet(v, proto, b"p" * n)
        return _vnet(NEEDS_CSUM, GSO_NONE, 0, 0, l4, _csum_field(proto)) + packet
    return st.builds(build, st.sampled_from([4, 6]), st.sampled_from([6, 17]),
                     st.integers(0, 1400))


_frames = st.one_of(
    _small_supers(),
    _partial_frames(),
    # a zeroed header and a plain packet (as a device without offloads gives)
    st.builds(lambda v, n: bytes(VNET) + _packet(v, 17, b"q" * n, partial=False)[0],
              st.sampled_from([4, 6]), st.integers(0, 1400)),
    # link-local packets behind a header: dropped
    st.builds(lambda rest: bytes(VNET) + b"\x60" + bytes(7) + b"\xfe\x80" + rest,
              st.binary(min_size=30, max_size=60)),
    st.builds(lambda dst: bytes(VNET) + b"\x45" + bytes(15) + dst,
              st.sampled_from([b"\xe0\x00\x00\xfb", b"\xff\xff\xff\xff"])),
    # a header and nothing (or less than a header): dropped
    st.binary(min_size=1, max_size=VNET),
    # headers it cannot follow: dropped
    st.sampled_from([f for _, f in _malformed() if len(f) > VNET]),
    st.binary(min_size=11, max_size=200),
)


def _read_model(fp_pure: Any, frames: list[bytes], max_packets: int, vnet: int) -> list:
    from ut.tunroute import link_local

    out: list[bytes] = []
    for f in frames[:max_packets]:
        if len(f) <= VNET or link_local(f[VNET:]):
            continue
        if vnet == 1 and len(f) <= KEEP_MAX:
            out.append(f)
        elif vnet == 2 and f[0] == 0 and f[1] == 0:
            out.append(f[VNET:])
        else:
            out += fp_pure.gso_split(f, header=vnet == 1)
    return out


@settings(max_examples=100, deadline=None)
@given(frames=st.lists(_frames, max_size=20), max_packets=st.integers(0, 25),
       vnet=st.sampled_from([1, 2]))
def test_read_batch_vnet_differential(fp_compiled, fp_pure, frames, max_packets, vnet):
    """``vnet=1`` keeps each frame with its header; ``vnet=2`` gives plain packets
    (headers stripped, super-packets cut, ``NEEDS_CSUM`` finished); both drop link-local
    packets behind a header, datagrams of a header or less and headers ``gso_split``
    cannot follow (each still counting against ``max_packets``)."""
    results = []
    for fp in (fp_compiled, fp_pure):
        a, b = _pair()
        try:
            for f in frames:
                a.send(f)
            results.append(fp.tun_read_batch(b.fileno(), max_packets, 1400, vnet))
        finally:
            a.close()
            b.close()
    assert results[0] == results[1]
    assert results[0] == _read_model(fp_pure, frames, max_packets, vnet)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_read_batch_vnet1_splits_what_no_data_frame_holds(impl, fp_compiled, fp_pure):
    """``vnet=1``: a frame of up to 65531 bytes is kept whole, a longer one is cut as
    ``gso_split(..., header=True)`` cuts it; ``vnet=2`` cuts both."""
    fp = fp_compiled if impl == "compiled" else fp_pure
    seed = random.Random(5)
    fits = _super(4, 6, seed.randbytes(KEEP_MAX - VNET - 40), 1448)
    too_long = _super(4, 6, seed.randbytes(KEEP_MAX - VNET - 40 + 1), 1448)
    assert len(fits.frame) == KEEP_MAX and len(too_long.frame) == KEEP_MAX + 1
    a, b = _pair()
    try:
        a.send(fits.frame)
        a.send(too_long.frame)
        got = fp.tun_read_batch(b.fileno(), 64, 1400, 1)
        assert got[0] == fits.frame
        assert got[1:] == fp_pure.gso_split(too_long.frame, header=True)
        assert all(s[:VNET] == bytes(VNET) for s in got[1:])
        _check_segments(too_long, [s[VNET:] for s in got[1:]])
        a.send(fits.frame)
        a.send(too_long.frame)
        got = fp.tun_read_batch(b.fileno(), 64, 1400, 2)
        n = -(-(len(fits.packet) - fits.l4_end) // fits.gso_size)
        _check_segments(fits, got[:n])
        _check_segments(too_long, got[n:])
    finally:
        a.close()
        b.close()


# -- the real kernel as judge: two namespaces, a relay thread ------------------------

def _module(impl: str, request: pytest.FixtureRequest) -> Any:
    if impl == "compiled":
        return request.getfixturevalue("fp_compiled")  # skips (or fails) as conftest says
    return importlib.import_module("ut._purepy")


def _need_root() -> None:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and ip (iproute2)")
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("no /dev/net/tun")


def _ip(*args: str) -> None:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, f"ip {' '.join(args)}: {res.stderr.strip()}"


class _Route(NamedTuple):
    src: int  # descriptor read
    read_vnet: int  # tun_read_batch's vnet
    per_read: int  # its max_packets
    dst: int  # descriptor written
    write_vnet: bool


class _Relay(threading.Thread):
    """Moves packets along ``routes`` with one implementation until stopped; counts
    what it saw (``stats``, one dict per route)."""

    def __init__(self, fp: Any, routes: list[_Route]) -> None:
        super().__init__(daemon=True, name="uttoff-relay")
        self.fp = fp
        self.routes = routes
        self.stats: list[dict[str, Any]] = [
            {"reads": 0, "packets": 0, "bytes": 0, "max_len": 0, "gso_types": {},
             "needs_csum": 0, "split_reads": 0, "max_per_read": 0, "refused": 0, "lost": 0,
             "first_refused": ""} for _ in routes]
        self.halt = threading.Event()
        self.error: BaseException | None = None

    def snapshot(self) -> list[dict]:
        return json.loads(json.dumps(self.stats))

    def run(self) -> None:
        try:
            poller = select.poll()
            by_fd = {}
            for i, r in enumerate(self.routes):
                poller.register(r.src, select.POLLIN)
                by_fd[r.src] = i
            while not self.halt.is_set():
                for fd, _ in poller.poll(50):
                    self._pump(by_fd[fd])
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def _pump(self, i: int) -> None:
        r, st_ = self.routes[i], self.stats[i]
        fp = self.fp
        for _ in range(64):
            packets = fp.tun_read_batch(r.src, r.per_read, 1400, r.read_vnet)
            if not packets:
                return
            st_["reads"] += 1
            st_["packets"] += len(packets)
            st_["max_per_read"] = max(st_["max_per_read"], len(packets))
            if len(packets) > 1 and r.per_read == 1:
                st_["split_reads"] += 1
            for p in packets:
                st_["bytes"] += len(p)
                st_["max_len"] = max(st_["max_len"], len(p))
                if r.read_vnet == 1:
                    st_["needs_csum"] += p[0] & NEEDS_CSUM
                    t = str(p[1] & ~GSO_ECN)
                    st_["gso_types"][t] = st_["gso_types"].get(t, 0) + 1
            start = 0
            while start < len(packets):
                sent, _, err = fp.tun_write_batch(r.dst, packets[start:], r.write_vnet)
                start += sent
                if not err:
                    break
                if err in (errno.EINVAL, errno.EMSGSIZE, errno.EFAULT):
                    st_["refused"] += 1
                    if not st_["first_refused"]:
                        st_["first_refused"] = f"{os.strerror(err)}: {packets[start][:80].hex()}"
                    start += 1
                    continue
                st_["lost"] += len(packets) - start  # a full queue: TCP sends them again
                break

    def stop(self) -> None:
        self.halt.set()
        self.join(10)
        assert not self.is_alive(), "relay thread did not stop"
        if self.error is not None:
            raise self.error


class _Bed:
    """Namespaces ``ns[0]`` (A: 10.86.0.1, fd85::1) and ``ns[1]`` (B: .2, ::2), each with a
    TUN device opened here (``fds``) and moved there, MTU 1400."""

    count = 0
    ADDRS = (("10.86.0.1", "fd85::1"), ("10.86.0.2", "fd85::2"))

    def __init__(self, vnet: tuple[bool, bool]) -> None:
        _Bed.count += 1
        tag = f"{os.getpid()}-{_Bed.count}"
        self.vnet = vnet
        self.ns = (f"uttoff-{tag}-a", f"uttoff-{tag}-b")
        self.dev = (f"uto{tag}a"[-15:], f"uto{tag}b"[-15:])
        self.fds: list[int] = []
        self.made: list[str] = []
        self.procs: list[subprocess.Popen] = []

    def up(self) -> None:
        from ut.tun import configure_tun, open_tun, set_offloads

        for ns in self.ns:
            _ip("netns", "add", ns)
            self.made.append(ns)
        for ns, dev, vnet, (v4, v6) in zip(self.ns, self.dev, self.vnet, self.ADDRS, strict=True):
            fd = open_tun(dev, vnet)
            self.fds.append(fd)
            _ip("link", "set", "dev", dev, "netns", ns)
            _ip("-n", ns, "link", "set", "dev", "lo", "up")
            configure_tun(dev, [f"{v4}/24"], 1400, netns=ns)
            _ip("-n", ns, "addr", "add", f"{v6}/64", "dev", dev, "nodad")
            if vnet:
                assert set_offloads(fd, True)
                _ip("-n", ns, "link", "set", "dev", dev, "gso_max_size", "65000")

    def spawn(self, side: int, script: str, *args: object) -> subprocess.Popen:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns[side], sys.executable, "-c", script,
             *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.procs.append(proc)
        return proc

    def down(self) -> list[str]:
        problems = []
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=10)
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()
        for ns in self.made:
            res = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True,
                                 timeout=30)
            if res.returncode:
                problems.append(f"ip netns del {ns}: {res.stderr.strip()}")
        self.made.clear()
        return problems


@contextlib.contextmanager
def _bed(vnet: tuple[bool, bool]) -> Iterator[_Bed]:
    _need_root()
    bed = _Bed(vnet)
    try:
        bed.up()
        yield bed
    finally:
        problems = bed.down()
        assert not problems, problems


@contextlib.contextmanager
def _relaying(fp: Any, routes: list[_Route]) -> Iterator[_Relay]:
    relay = _Relay(fp, routes)
    relay.start()
    try:
        yield relay
    finally:
        relay.stop()


_TCP_RECEIVER = r"""
import hashlib, json, socket, sys
addr, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((addr, port))
s.listen(1)
s.settimeout(timeout)
c, _ = s.accept()
c.settimeout(timeout)
h, n = hashlib.sha256(), 0
while True:
    d = c.recv(1 << 20)
    if not d:
        break
    h.update(d)
    n += len(d)
c.close()
print(json.dumps({"sha256": h.hexdigest(), "bytes": n}), flush=True)
"""

_TCP_SENDER = r"""
import hashlib, json, os, socket, sys, time
addr, port, total, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
deadline = time.monotonic() + 10
while True:
    try:
        s = socket.create_connection((addr, port), timeout=timeout)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.05)
h, left = hashlib.sha256(), total
while left:
    chunk = os.urandom(min(left, 1 << 20))
    s.sendall(chunk)
    h.update(chunk)
    left -= len(chunk)
s.shutdown(socket.SHUT_WR)
s.recv(1)
print(json.dumps({"sha256": h.hexdigest(), "bytes": total}), flush=True)
"""

_UDP_RECEIVER = r"""
import hashlib, json, socket, sys
addr, port, want, idle = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE
s.bind((addr, port))
print("ready", flush=True)
s.settimeout(idle)
got = []
try:
    while len(got) < want:
        d = s.recv(65536)
        got.append(hashlib.sha256(d).hexdigest() + ":" + str(len(d)))
except socket.timeout:
    pass
print(json.dumps(got), flush=True)
"""

_UDP_SENDER = r"""
import random, socket, sys, time
addr, port, seg, sends, size = sys.argv[1], int(sys.argv[2]), *map(int, sys.argv[3:6])
s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(17, 103, seg)  # SOL_UDP, UDP_SEGMENT
for i in range(sends):
    s.sendto(random.Random(i).randbytes(size), (addr, port))
    time.sleep(0.05)
"""

TIMEOUT = 60.0
_port = [5300]


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[int | None, str, str]:
    try:
        out, err = proc.communicate(timeout=max(timeout, 0.1))
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=10)
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def _tcp_transfer(bed: _Bed, relay: _Relay, src: int, dst: int, v6: bool, size: int) -> None:
    """``size`` bytes over TCP from side ``src`` to side ``dst``; fails unless the receiver
    got them all, with the sender's sha256, within ``TIMEOUT``."""
    _port[0] += 1
    addr = bed.ADDRS[dst][1 if v6 else 0]
    deadline = time.monotonic() + TIMEOUT
    receiver = bed.spawn(dst, _TCP_RECEIVER, addr, _port[0], TIMEOUT)
    sender = bed.spawn(src, _TCP_SENDER, addr, _port[0], size, TIMEOUT)
    rc_r, out_r, err_r = _finish(receiver, deadline - time.monotonic())
    rc_s, out_s, err_s = _finish(sender, deadline - time.monotonic() + 5)
    what = f"{size} bytes {bed.ns[src]} -> {addr}"
    detail = (f"receiver rc={rc_r} out={out_r.strip()!r} err={err_r.strip()[-500:]!r}; "
              f"sender rc={rc_s} out={out_s.strip()!r} err={err_s.strip()[-500:]!r}; "
              f"relay {relay.stats}")
    assert rc_r == 0 and rc_s == 0, f"{what} did not complete in {TIMEOUT:.0f} s: {detail}"
    got, sent = json.loads(out_r.splitlines()[-1]), json.loads(out_s.splitlines()[-1])
    assert got == sent and got["bytes"] == size, f"{what}: corrupted or short: {detail}"
    assert all(s["refused"] == 0 for s in relay.stats), f"kernel refused a write: {detail}"


BULK = 32 << 20  # bytes of the IPv4 transfers (IPv6: 4 MiB)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_super_packets_pass_whole_between_offloading_devices(impl, request):
    """A and B both offload; the relay reads with ``vnet=1`` and writes with
    ``vnet=True`` (frames as they are). TCP over IPv4 (32 MiB) and IPv6 (4 MiB) arrive
    whole, and the relay carried super-packets (GSO types TCPV4 and TCPV6, frames longer
    than the MTU) and, back from B, ACKs left with ``NEEDS_CSUM``."""
    fp = _module(impl, request)
    with _bed((True, True)) as bed:
        a, b = bed.fds
        with _relaying(fp, [_Route(a, 1, 64, b, True), _Route(b, 1, 64, a, True)]) as relay:
            _tcp_transfer(bed, relay, 0, 1, False, BULK)
            seen4 = relay.snapshot()[0]
            _tcp_transfer(bed, relay, 0, 1, True, 4 << 20)
            seen, back = relay.snapshot()
    assert seen4["gso_types"].get(str(GSO_TCPV4), 0) > 0, seen4
    assert seen["gso_types"].get(str(GSO_TCPV6), 0) > 0, seen
    assert seen4["max_len"] > 1500, seen4
    assert back["needs_csum"] > 0, back


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_split_segments_are_what_a_plain_device_takes(impl, request):
    """A offloads and is read with ``vnet=2`` (super-packets cut by ``gso_split``, its
    ACKs' checksums finished), B has no offloads (read ``vnet=0``, written as is), and
    what goes to A is written behind a zeroed header. TCP from A to B over IPv4 (32 MiB)
    and IPv6 (4 MiB), and from B to A over IPv4 (32 MiB), arrive whole: B's kernel took
    every segment and checksum made here (a bad one is dropped, and the transfer
    stalls); reads of A gave more than one packet (cut super-packets) on both address
    families."""
    fp = _module(impl, request)
    with _bed((True, False)) as bed:
        a, b = bed.fds
        with _relaying(fp, [_Route(a, 2, 1, b, False), _Route(b, 0, 64, a, True)]) as relay:
            _tcp_transfer(bed, relay, 0, 1, False, BULK)
            split4 = relay.snapshot()[0]
            _tcp_transfer(bed, relay, 0, 1, True, 4 << 20)
            split6 = relay.snapshot()[0]
            _tcp_transfer(bed, relay, 1, 0, False, BULK)
    assert split4["split_reads"] > 0 and split4["max_len"] <= 1400, split4
    assert split6["split_reads"] > split4["split_reads"], split6


def _uso_on(fd: int) -> bool:
    """Whether the kernel takes UDP segmentation offload on this device (Linux 6.2+)."""
    flags = 0x01 | 0x02 | 0x04 | 0x20 | 0x40  # CSUM TSO4 TSO6 USO4 USO6 (linux/if_tun.h)
    try:
        fcntl.ioctl(fd, 0x400454D0, flags)  # TUNSETOFFLOAD
    except OSError:
        return False
    return True


def _readline(proc: subprocess.Popen, timeout: float) -> bytes:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline() if ready else b""


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_udp_segmentation_is_cut_into_the_senders_datagrams(impl, request):
    """A UDP socket in A with ``UDP_SEGMENT`` 1000 sends 20000-byte buffers; A is read
    with ``vnet=2``, B has no offloads: B's receiver gets 20 datagrams of 1000 bytes per
    send, in order, each the right bytes (B's kernel checks the UDP checksums), over
    IPv4 and IPv6; each send was one read of A cut in 20."""
    fp = _module(impl, request)
    seg, sends, size = 1000, 5, 20000
    expected = []
    for i in range(sends):
        buf = random.Random(i).randbytes(size)
        expected += [f"{hashlib.sha256(buf[j:j + seg]).hexdigest()}:{seg}"
                     for j in range(0, size, seg)]
    with _bed((True, False)) as bed:
        a, b = bed.fds
        if not _uso_on(a):
            pytest.skip("this kernel does not take UDP segmentation offload on TUN "
                        "(TUN_F_USO4/6: Linux 6.2+)")
        with _relaying(fp, [_Route(a, 2, 1, b, False), _Route(b, 0, 64, a, True)]) as relay:
            for v6 in (False, True):
                _port[0] += 1
                addr = bed.ADDRS[1][1 if v6 else 0]
                receiver = bed.spawn(1, _UDP_RECEIVER, addr, _port[0], len(expected), 5)
                assert _readline(receiver, 20).strip() == b"ready", _finish(receiver, 1)
                before = relay.snapshot()[0]
                sender = bed.spawn(0, _UDP_SENDER, addr, _port[0], seg, sends, size)
                rc_s, _, err_s = _finish(sender, 30)
                assert rc_s == 0, err_s
                rc_r, out_r, err_r = _finish(receiver, 30)
                assert rc_r == 0, err_r
                got = json.loads(out_r.splitlines()[-1])
                after = relay.snapshot()[0]
                family = "IPv6" if v6 else "IPv4"
                assert got == expected, (f"{family}: {len(got)} datagrams of "
                                         f"{len(expected)} right or not; relay {after}")
                assert after["max_per_read"] >= size // seg, (family, after)
                assert after["split_reads"] - before["split_reads"] >= sends, (family, after)
