"""``tun_read_batch`` / ``tun_write_batch``: TUN mode's device I/O in the fast path (issue 21).

The real-device cases run this file as a script in a network namespace of their own
(``unshare --net``, root) with a real TUN device, once per implementation (compiled and
pure); the differential cases hold the two to the same results on AF_UNIX datagram
socketpairs (one read, one datagram, as on a TUN device), with no privileges.
"""

from __future__ import annotations

import errno
import importlib
import ipaddress
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

IMPLEMENTATIONS = ["compiled", "pure"]


def _module(impl: str):
    return importlib.import_module("ut._fastpath" if impl == "compiled" else "ut._purepy")


def _checksum(header: bytes) -> int:
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _udp4(src: str, dst: str, payload: bytes, dport: int = 9000) -> bytes:
    """An IPv4/UDP packet with a valid header checksum (UDP checksum 0: none)."""
    udp = struct.pack("!HHHH", 40000, dport, 8 + len(payload), 0) + payload
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                         ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed)
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    return header + udp


def _in_own_netns(case: str, impl: str, request: pytest.FixtureRequest) -> dict:
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs root, unshare (util-linux) and ip (iproute2)")
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("no /dev/net/tun")
    if impl == "compiled":
        request.getfixturevalue("fp_compiled")  # skips (or fails) as conftest says
    res = subprocess.run(["unshare", "--net", sys.executable, __file__, case, impl],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_reads_what_the_kernel_routes_to_the_device(impl, request):
    """Datagrams routed to the TUN device come back as IP packets, in order, at most
    ``max_packets`` per call; IPv4 local multicast and broadcast are dropped; an empty
    queue gives ``[]`` without raising."""
    got = _in_own_netns("read", impl, request)
    assert got["first"] == [f"p{i}" for i in range(4)]
    assert got["rest"] == [f"p{i}" for i in range(4, 10)]
    assert got["after"] == []
    assert got["versions"] == [4]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_drops_the_kernels_ipv6_link_chatter(impl, request):
    """With IPv6 on, the kernel sends MLD reports (and router solicitations) to the
    device: none of them is returned; a packet to a global address is."""
    got = _in_own_netns("chatter", impl, request)
    assert got["v6_payloads"] == ["six"]
    assert got["link_local"] == 0


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_drops_a_packet_longer_than_the_buffer(impl, request):
    """A packet of ``mtu + TUN_READ_HEADROOM`` bytes or more is dropped (the kernel
    truncates it to the buffer); the next one is read."""
    got = _in_own_netns("truncated", impl, request)
    assert got["payloads"] == ["small"]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_writes_until_the_kernel_refuses(impl, request):
    """Packets reach the stack in order (bytes, bytearray, memoryview alike); a packet that
    is not IP stops the batch with EINVAL, the ones before it counted with their bytes."""
    got = _in_own_netns("write", impl, request)
    assert got["result"] == [3, got["good_bytes"], errno.EINVAL]
    assert got["received"] == ["w0", "w1", "w2"]
    assert got["empty"] == [0, 0, 0]


# -- differential: both implementations, the same results ----------------------------

def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.setblocking(False)
    b.setblocking(False)
    return a, b


_ip_like = st.one_of(
    st.binary(min_size=1, max_size=300),
    st.builds(lambda b, rest: bytes([b]) + rest, st.sampled_from([0x45, 0x60, 0x6F]),
              st.binary(min_size=19, max_size=200)),
    # link-local chatter as link_local() knows it
    st.builds(lambda rest: b"\x60" + bytes(7) + b"\xfe\x80" + rest, st.binary(min_size=30,
              max_size=60)),
    st.builds(lambda src, rest: b"\x60" + bytes(7) + src + b"\xff\x02" + rest,
              st.binary(min_size=16, max_size=16), st.binary(min_size=14, max_size=40)),
    st.builds(lambda dst: b"\x45" + bytes(15) + dst, st.sampled_from(
        [b"\xe0\x00\x00\xfb", b"\xff\xff\xff\xff", b"\xe0\x00\x01\x01", b"\x0a\x00\x00\x01"])),
)


@settings(max_examples=150, deadline=None)
@given(packets=st.lists(_ip_like, max_size=40), max_packets=st.integers(0, 50),
       mtu=st.integers(0, 1500))
def test_read_batch_differential(fp_compiled, fp_pure, packets, max_packets, mtu):
    from ut.tunroute import link_local

    results = []
    for fp in (fp_compiled, fp_pure):
        a, b = _pair()
        try:
            for p in packets:
                a.send(p)
            results.append(fp.tun_read_batch(b.fileno(), max_packets, mtu))
        finally:
            a.close()
            b.close()
    assert results[0] == results[1]
    size = mtu + fp_pure.TUN_READ_HEADROOM
    expected = [p for p in packets[:max_packets] if len(p) < size and not link_local(p)]
    assert results[0] == expected


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 3000), max_size=40))
def test_write_batch_differential(fp_compiled, fp_pure, sizes):
    results, received = [], []
    for fp in (fp_compiled, fp_pure):
        a, b = _pair()
        try:
            packets = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
            results.append(fp.tun_write_batch(a.fileno(), packets))
            got = []
            while True:
                try:
                    got.append(b.recv(65536))
                except BlockingIOError:
                    break
            received.append(got)
        finally:
            a.close()
            b.close()
    assert results[0] == results[1] == (len(sizes), sum(sizes), 0)
    assert received[0] == received[1]


def test_write_batch_stops_at_a_full_queue(fp_compiled, fp_pure):
    """A full queue stops the batch with EAGAIN, never an exception; both the same."""
    results = []
    for fp in (fp_compiled, fp_pure):
        a, b = _pair()
        try:
            results.append(fp.tun_write_batch(a.fileno(), [b"x" * 1000] * 5000))
        finally:
            a.close()
            b.close()
    assert results[0] == results[1]
    sent, sent_bytes, err = results[0]
    assert 0 < sent < 5000 and sent_bytes == sent * 1000 and err == errno.EAGAIN


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_read_batch_on_a_closed_descriptor_returns_nothing(impl, fp_compiled, fp_pure):
    """Any error but EAGAIN also ends the batch quietly (the device went away)."""
    fp = fp_compiled if impl == "compiled" else fp_pure
    a, b = _pair()
    fd = b.fileno()
    b.close()
    a.close()
    assert fp.tun_read_batch(fd, 8, 1500) == []


# -- the cases, run as a script inside the namespace ---------------------------------

def _tun(name: str, addresses: list[str], mtu: int = 1400) -> int:
    from ut.tun import configure_tun, open_tun

    fd = open_tun(name)
    configure_tun(name, addresses, mtu)
    return fd


def _payload(packet: bytes) -> str:
    head = 20 if packet[0] >> 4 == 4 else 40
    return packet[head + 8:].decode(errors="replace")


def _drain(fp, fd: int, mtu: int = 1400, wait: float = 0.3) -> list[bytes]:
    out: list[bytes] = []
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        out += fp.tun_read_batch(fd, 64, mtu)
        time.sleep(0.02)
    return out


def _case(case: str, impl: str) -> dict:
    fp = _module(impl)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    if case != "chatter":
        with open("/proc/sys/net/ipv6/conf/default/disable_ipv6", "w") as f:
            f.write("1")
    if case == "read":
        fd = _tun("uttio0", ["10.81.0.1/24"])
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"uttio0")
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF,
                     socket.inet_aton("10.81.0.1"))
        s.sendto(b"mcast", ("224.0.0.251", 5353))
        s.sendto(b"bcast", ("255.255.255.255", 9))
        for i in range(10):
            s.sendto(f"p{i}".encode(), ("10.81.0.2", 9999))
        time.sleep(0.2)
        first = fp.tun_read_batch(fd, 6, 1400)  # the two dropped count against the six
        rest = _drain(fp, fd)
        after = fp.tun_read_batch(fd, 64, 1400)
        return {"first": [_payload(p) for p in first], "rest": [_payload(p) for p in rest],
                "after": after, "versions": sorted({p[0] >> 4 for p in first + rest})}
    if case == "chatter":
        from ut.tunroute import link_local

        fd = _tun("uttio1", ["fd81::1/64"])
        subprocess.run(["ip", "addr", "replace", "fd81::1/64", "dev", "uttio1", "nodad"],
                       check=True)
        time.sleep(1.0)  # MLD reports for the groups the address joined, RS
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        s.sendto(b"six", ("fd81::2", 9999))
        got = _drain(fp, fd, wait=1.5)
        v6 = [p for p in got if p[0] >> 4 == 6]
        return {"v6_payloads": [_payload(p) for p in v6],
                "link_local": sum(map(link_local, got))}
    if case == "truncated":
        fd = _tun("uttio2", ["10.83.0.1/24"])
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.sendto(b"L" * 1000, ("10.83.0.2", 9999))
        s.sendto(b"small", ("10.83.0.2", 9999))
        time.sleep(0.2)
        got = fp.tun_read_batch(fd, 64, 100)  # a buffer of 100 + TUN_READ_HEADROOM
        return {"payloads": [_payload(p) for p in got]}
    if case == "write":
        fd = _tun("uttio3", ["10.84.0.1/24"])
        r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        r.bind(("10.84.0.1", 9000))
        r.settimeout(2)
        good = [_udp4("10.84.0.2", "10.84.0.1", f"w{i}".encode()) for i in range(4)]
        batch = [good[0], bytearray(good[1]), memoryview(good[2]), b"\x00" * 40, good[3]]
        result = fp.tun_write_batch(fd, batch)
        received = []
        for _ in range(3):
            received.append(r.recv(100).decode())
        return {"result": list(result), "received": received,
                "good_bytes": sum(map(len, good[:3])),
                "empty": list(fp.tun_write_batch(fd, []))}
    raise SystemExit(f"unknown case {case}")


if __name__ == "__main__":
    print(json.dumps(_case(sys.argv[1], sys.argv[2])))
