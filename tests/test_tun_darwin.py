"""macOS utun support (ut.tun_darwin), on every platform: the 4-byte address family
framing, the unit and the ifconfig/route commands, and ``UtunPort`` over a datagram
socketpair standing in for the utun control socket (one datagram per packet, as there).
Opening a real utun needs macOS and root: CI does not run it (docs/guide.md section 15).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import struct
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ut.tun import TunUnavailable, open_port
from ut.tun_darwin import (
    UtunPort,
    add_family_header,
    open_utun,
    strip_family_header,
    utun_commands,
    utun_unit,
)


def _v4(src: str = "10.78.0.2", dst: str = "10.78.0.1", payload: bytes = b"x") -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, 0, 64, 17, 0,
                       ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed) + payload


def _v6(src: str = "fd78::2", dst: str = "fd78::1", payload: bytes = b"y") -> bytes:
    return (struct.pack("!IHBB", 6 << 28, len(payload), 17, 64) + ipaddress.ip_address(src).packed
            + ipaddress.ip_address(dst).packed + payload)


def test_the_header_is_the_darwin_address_family_in_network_order():
    assert add_family_header(_v4()) == b"\x00\x00\x00\x02" + _v4()
    assert add_family_header(_v6()) == b"\x00\x00\x00\x1e" + _v6()  # AF_INET6 is 30 there
    assert strip_family_header(b"\x00\x00\x00\x02" + _v4()) == _v4()


@pytest.mark.parametrize("packet", [b"", b"\x00" * 40, b"\x50" + bytes(30), b"\xff"])
def test_what_is_not_ipv4_or_ipv6_gets_no_header(packet):
    assert add_family_header(packet) is None


@pytest.mark.parametrize("frame", [b"", b"\x00", b"\x00\x00\x00\x02"])
def test_a_frame_without_a_packet_strips_to_nothing(frame):
    assert strip_family_header(frame) == b""


@given(st.sampled_from([0x40, 0x45, 0x4F, 0x60, 0x6A]), st.binary(max_size=300))
def test_strip_undoes_add(first, rest):
    packet = bytes([first]) + rest
    framed = add_family_header(packet)
    assert framed is not None and len(framed) == len(packet) + 4
    assert strip_family_header(framed) == packet


@pytest.mark.parametrize(("name", "unit"), [
    ("utun0", 1), ("utun7", 8), ("utun123", 124), ("ut0", 0), ("utun", 0), ("utunx", 0),
    ("myutun3", 0)])
def test_unit(name, unit):
    assert utun_unit(name) == unit


def test_commands():
    cmds = utun_commands("utun5", ["10.78.0.2/24", "fd78::2/64", "10.99.0.1/32"], 1380,
                         ["10.20.0.0/16", "fd20::/48"])
    assert cmds == [
        ["ifconfig", "utun5", "mtu", "1380"],
        ["ifconfig", "utun5", "inet", "10.78.0.2/24", "10.78.0.2", "alias"],
        ["ifconfig", "utun5", "inet6", "fd78::2/64", "alias"],
        ["ifconfig", "utun5", "inet", "10.99.0.1/32", "10.99.0.1", "alias"],
        ["ifconfig", "utun5", "up"],
        # A utun is point to point: its own networks get routes too (a /32 has none).
        ["route", "-q", "-n", "add", "-inet", "10.78.0.0/24", "-interface", "utun5"],
        ["route", "-q", "-n", "add", "-inet6", "fd78::/64", "-interface", "utun5"],
        ["route", "-q", "-n", "add", "-inet", "10.20.0.0/16", "-interface", "utun5"],
        ["route", "-q", "-n", "add", "-inet6", "fd20::/48", "-interface", "utun5"],
    ]


@pytest.mark.skipif(sys.platform == "darwin", reason="opens a real utun on macOS")
def test_open_utun_elsewhere_is_a_clear_error():
    with pytest.raises(TunUnavailable, match="only on macOS"):
        open_utun("utun9")


def test_port_frames_writes_and_unframes_reads():
    """UtunPort on one end of a datagram socketpair: what it writes arrives framed, one
    datagram per packet; what it reads reaches on_batch without the header (a datagram
    with no packet behind its header is skipped)."""

    async def main():
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        ours.setblocking(False)
        theirs.settimeout(2)
        got: list[list] = []
        read = asyncio.Event()

        def on_batch(batch):
            got.append(batch)
            read.set()

        port = UtunPort(asyncio.get_running_loop(), ours.detach(), on_batch)
        try:
            packets = [_v4(), b"\x00not ip", _v6()]
            assert port.send_many(packets) == (2, 1)
            assert packets == [_v4(), _v6(), b"\x00not ip"]  # the ones written first
            assert theirs.recv(70000) == b"\x00\x00\x00\x02" + _v4()
            assert theirs.recv(70000) == b"\x00\x00\x00\x1e" + _v6()

            big = _v4(payload=b"z" * 1400)  # macOS caps AF_UNIX datagrams at 2 KiB
            for frame in (b"\x00\x00\x00\x1e" + _v6(), b"\x00\x00\x00\x02",
                          b"\x00\x00\x00\x02" + big):
                theirs.send(frame)
            port.start()
            await asyncio.wait_for(read.wait(), 2)
            assert [p for batch in got for p in batch] == [_v6(), big]
        finally:
            port.close()
            theirs.close()

    asyncio.run(main())


@pytest.mark.skipif(sys.platform != "darwin" or os.geteuid() != 0,
                    reason="opens a real utun: macOS and root only (not run in CI)")
def test_a_real_utun():
    async def main():
        port = open_port(asyncio.get_running_loop(), "ut-test", ["10.213.0.1/24"], 1400, (),
                         lambda batch: None)
        try:
            assert port.name.startswith("utun") and isinstance(port, UtunPort)
            port.start()
            assert port.send_many([_v4("10.213.0.2", "10.213.0.1")]) == (1, 0)
        finally:
            port.close()

    asyncio.run(main())
