"""TUN mode's byte counts: what a session counts as sent is what reached the TUN device.

A spoofed packet (ut.tunserver) or one the kernel refuses (ut.tun) is counted as a drop,
never in ``udp_out_bytes``. Each case runs this file as a script in a network namespace
of its own (``unshare --net``, root), with a real TUN device and a real Session, under
the implementation the suite runs with (``UT_NO_EXTENSIONS`` is passed on).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import shutil
import struct
import subprocess
import sys
from types import SimpleNamespace

import pytest

SERVER, CLIENT, OTHER = "10.79.0.1", "10.79.0.2", "10.79.0.3"


def _udp4(src: str, dst: str, payload: bytes) -> bytes:
    """An IPv4/UDP packet (checksums left at 0: the kernel only has to take it)."""
    udp = struct.pack("!HHHH", 40000, 9, 8 + len(payload), 0) + payload
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                       ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed) + udp


def _in_own_netns(case: str) -> dict:
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs root, unshare (util-linux) and ip (iproute2)")
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("no /dev/net/tun")
    res = subprocess.run(["unshare", "--net", sys.executable, __file__, case],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_spoofed_packets_are_not_counted_as_sent():
    """Four packets from a lane, two of them from an address the CN does not own: two
    sent, their bytes only; two dropped as spoofed."""
    got = _in_own_netns("spoofed")
    assert got["packets"] == 2
    assert got["bytes"] == got["good_bytes"]
    assert got["drops"] == {"spoofed": 2}


def test_a_source_behind_a_virtio_header_is_checked_too():
    """With TUN offloads a client's packet may come behind its virtio_net_hdr: its source
    is checked where the device will read it (after the header), so a spoofed packet
    cannot hide behind one; good ones with and without a header are written."""
    got = _in_own_netns("spoofed_vnet")
    assert got["offload"] is True
    assert got["packets"] == 2
    assert got["bytes"] == got["good_bytes"]
    assert got["drops"] == {"spoofed": 1}


def test_offloads_only_when_both_ends_offer_them():
    """FLAG_OFFLOAD on our HELLO only if our device has offloads; a session uses them
    only if the peer's HELLO offered them too (docs/protocol.md, "TUN offloads")."""
    from ut import fastpath
    from ut.session import Session, hello_flags
    from ut.stats import TunnelStats

    assert hello_flags(True) & fastpath.FLAG_OFFLOAD == 0
    assert hello_flags(True, offload=True) & fastpath.FLAG_OFFLOAD
    loop = asyncio.new_event_loop()
    try:
        s = Session(loop, TunnelStats(role="server", max_lanes=1), client_cn="home",
                    session_id=1, n_lanes=1, max_packets=64, max_bytes=1 << 20)
        assert not s.hello_flags() & fastpath.FLAG_OFFLOAD
        s.peer_hello(fastpath.FLAG_OFFLOAD)
        assert s.offload is False  # the peer offers, we do not
        s.offer_offload = True
        assert s.hello_flags() & fastpath.FLAG_OFFLOAD
        s.peer_hello(fastpath.FLAG_SEQ)
        assert s.offload is False  # we offer, the peer does not
        s.peer_hello(fastpath.FLAG_OFFLOAD | fastpath.FLAG_PAD)
        assert s.offload is True
    finally:
        loop.close()


def test_packets_the_kernel_refuses_are_not_counted_as_sent():
    """Client side: a non-IP packet between two good ones is refused (EINVAL) and counted
    as a write error; the bytes counted are the two packets written."""
    got = _in_own_netns("refused")
    assert got["packets"] == 2
    assert got["bytes"] == got["good_bytes"]
    assert got["drops"] == {"udp_write_error": 1}


# -- the cases, run as a script inside the namespace ---------------------------------

async def _case(case: str) -> dict:
    from ut.configschema import TunConfig
    from ut.session import Session
    from ut.stats import TunnelStats
    from ut.tun import open_port
    from ut.tunserver import TunHub

    loop = asyncio.get_running_loop()
    role = "server" if case.startswith("spoofed") else "client"

    class TunSession(Session):
        def udp_target(self):
            return self.udp, None

    TunSession.role = role
    stats = TunnelStats(role=role, max_lanes=1)
    s = TunSession(loop, stats, client_cn="home", session_id=1, n_lanes=1,
                   max_packets=64, max_bytes=1 << 20)
    good = [_udp4(CLIENT, SERVER, b"a" * 100), _udp4(CLIENT, SERVER, b"b" * 300)]
    if case == "spoofed":
        tun = TunConfig(enabled=True, name="utspoof0", address=(f"{SERVER}/24",),
                        clients=(f"home={CLIENT}/32", f"other={OTHER}/32"))
        hub = TunHub(loop, SimpleNamespace(tun=tun))
        s.udp = hub.port_for(s)
        batch = [good[0], _udp4(OTHER, SERVER, b"x" * 700), good[1],
                 _udp4(OTHER, SERVER, b"y" * 900)]
    elif case == "spoofed_vnet":
        tun = TunConfig(enabled=True, name="utspoof1", address=(f"{SERVER}/24",),
                        clients=(f"home={CLIENT}/32", f"other={OTHER}/32"))
        hub = TunHub(loop, SimpleNamespace(tun=tun))
        s.udp = hub.port_for(s)
        header = bytes(10)  # a virtio_net_hdr: no offload at work
        good = [header + good[0], good[1]]
        batch = [good[0], header + _udp4(OTHER, SERVER, b"x" * 700), good[1]]
    else:
        s.udp = open_port(loop, "utrefuse0", [f"{CLIENT}/24"], 1500, (), s.push_datagrams)
        batch = [good[0], b"\x00" * 500, good[1]]  # version 0: not an IP packet
    s.send_udp(batch, sum(map(len, batch)))
    c = s.counters
    return {"packets": c.udp_out_packets, "bytes": c.udp_out_bytes,
            "good_bytes": sum(map(len, good)), "drops": c.drops,
            "offload": getattr(getattr(s.udp, "hub", None), "port", s.udp).vnet}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(_case(sys.argv[1]))))
