"""TUN mode end to end (issue 21): IP packets between TUN devices over the lanes.

The netns bed (UDP between the namespaces dropped by nftables) with no WireGuard in the
path: a ut-tunnel server in the cloud with TUN ``ut0`` 10.78.0.1/24 (fd78::1/64), a
client in each home with 10.78.0.2 / .3 (fd78::2 / ::3), each CN confined to its own
addresses by ``tun.clients``. ``home`` uses TUN offloads (the default: super-packets
behind a virtio_net_hdr), ``home2`` has ``tun.offload: false``, so the server also cuts
super-packets for a client that takes none.
"""

from __future__ import annotations

import sys
import time

import pytest

from ut._testbase.netbed import metric_sum

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SERVER_V4, SERVER_V6 = "10.78.0.1", "fd78::1"
CLIENTS = {"home": ("10.78.0.2", "fd78::2"), "home2": ("10.78.0.3", "fd78::3")}
FAST = {"tcp": {"dial_backoff_min_seconds": 0.2, "dial_backoff_max_seconds": 2}}
HTTP_PORT = 8089


def _server_tun() -> dict:
    return {"tun": {"enabled": True, "address": [f"{SERVER_V4}/24", f"{SERVER_V6}/64"],
                    "clients": [f"{cn}={v4}/32,{v6}/128" for cn, (v4, v6) in CLIENTS.items()]}}


def _client_tun(cn: str) -> dict:
    v4, v6 = CLIENTS[cn]
    return {**FAST, "tun": {"enabled": True, "address": [f"{v4}/24", f"{v6}/64"],
                            "offload": cn == "home"}}


@pytest.fixture
def tun_bed(tun):
    bed = tun
    srv = bed.start_server(_server_tun())
    clients = [bed.start_client(h, _client_tun(h.name)) for h in bed.home_nodes[:2]]
    for h in bed.home_nodes[:2]:
        bed.wait_ping(h, SERVER_V4, within=15)
    yield bed, srv, clients


def _packet_sizes(bed, cn: str) -> tuple[float, float]:
    """Mean bytes per packet the server read from its device for ``cn`` and wrote to it
    from ``cn``: above the MTU only if super-packets crossed (TUN offloads)."""
    m = bed.metrics(bed.cloud)
    sizes = []
    for way in ("in", "out"):
        packets = metric_sum(m, f"ut_udp_{way}_packets_total", client_cn=cn) or 0.0
        sizes.append((metric_sum(m, f"ut_udp_{way}_bytes_total", client_cn=cn) or 0.0)
                     / max(packets, 1.0))
    return sizes[0], sizes[1]


def test_ping_and_64mib_both_ways(tun_bed, big_file):
    """64 MiB down and up, sha256 checked, for a client with TUN offloads (home) and one
    without (home2): home's bulk data crosses as super-packets, whole both ways; home2's
    as plain packets, which the server cut from its device's super-packets."""
    bed, srv, _ = tun_bed
    res = bed.ping(bed.home, SERVER_V4, count=5, interval=0.1)
    assert res["received"] == 5, res
    url = bed.start_http_server(bed.wd / "www", port=HTTP_PORT, bind=SERVER_V4)
    down, up = bed.both_ways(bed.home, *big_file, url, "tun")
    print(f"\nTUN mode, offloads: 64 MiB down {down:.0f} Mbit/s, up {up:.0f} Mbit/s")
    h2 = bed.home_nodes[1]
    down2, up2 = bed.both_ways(h2, *big_file, url, "tun2")
    print(f"TUN mode, tun.offload false: 64 MiB down {down2:.0f} Mbit/s, up {up2:.0f} Mbit/s")
    assert metric_sum(bed.metrics(bed.cloud), "ut_lanes_active_total") >= 2
    to_home, from_home = _packet_sizes(bed, "home")
    to_home2, from_home2 = _packet_sizes(bed, "home2")
    print(f"bytes per packet, server side: home {to_home:.0f} / {from_home:.0f}, "
          f"home2 {to_home2:.0f} / {from_home2:.0f}")
    assert to_home > 3000 and from_home > 3000  # super-packets both ways
    assert to_home2 <= 1500 and from_home2 <= 1500  # the MTU: cut for home2
    assert not metric_sum(bed.metrics(bed.cloud), "ut_udp_drop_total", reason="offload")
    assert srv.poll() is None


_TCP_ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); s.settimeout(20)
c, _ = s.accept(); c.sendall(c.recv(100)[::-1]); c.close()
"""

_TCP_CLIENT = """
import socket, sys, time
for _ in range(50):
    try:
        c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5); break
    except OSError:
        time.sleep(0.1)
c.sendall(b"over ipv6"); print(c.recv(100).decode())
"""


def test_ipv6_through_the_tunnel(tun_bed):
    bed, _srv, _ = tun_bed
    server = bed.spawn(bed.cloud, [sys.executable, "-c", _TCP_ECHO, SERVER_V6, "8090"],
                       name="tcp6-echo")
    try:
        res = bed.run(bed.home, [sys.executable, "-c", _TCP_CLIENT, SERVER_V6, "8090"], timeout=40)
        assert res.stdout.strip() == "6vpi revo"
    finally:
        bed.stop(server)


_SPOOF = """
import socket, struct, sys
src, dst = socket.inet_aton(sys.argv[1]), socket.inet_aton(sys.argv[2])
payload = b"spoofed"
udp = struct.pack("!HHHH", 40000, 9, 8 + len(payload), 0) + payload
total = 20 + len(udp)
hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 1, 0, 64, 17, 0, src, dst)
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
for _ in range(int(sys.argv[3])):
    s.sendto(hdr + udp, (sys.argv[2], 0))
"""


def test_a_client_cannot_send_from_another_clients_address(tun_bed):
    """home2 sends packets with home's source address: the server drops and counts them
    (reason spoofed, CN home2), and not as sent (packets or bytes); home2's own traffic
    still flows."""
    bed, srv, _ = tun_bed
    h2 = bed.home_nodes[1]

    def counts() -> tuple[float, float, float]:
        """home2's spoofed drops, and packets and bytes the server wrote to its device."""
        m = bed.metrics(bed.cloud)
        return (metric_sum(m, "ut_udp_drop_total", reason="spoofed", client_cn="home2") or 0.0,
                metric_sum(m, "ut_udp_out_packets_total", client_cn="home2") or 0.0,
                metric_sum(m, "ut_udp_out_bytes_total", client_cn="home2") or 0.0)

    before = counts()
    bed.run(h2, [sys.executable, "-c", _SPOOF, CLIENTS["home"][0], SERVER_V4, "20"])
    deadline = time.monotonic() + 10
    while counts()[0] - before[0] < 20 and time.monotonic() < deadline:
        time.sleep(0.2)
    after = counts()
    assert after[0] - before[0] == 20
    # Whatever else home2 sent meanwhile, its bytes come with packets (20 spoofed
    # packets of 35 bytes, counted as sent, would add 700 bytes and no packet).
    assert after[2] - before[2] <= (after[1] - before[1]) * 1500
    assert bed.ping(h2, SERVER_V4, count=3, interval=0.1)["received"] == 3
    assert metric_sum(bed.metrics(bed.cloud), "ut_udp_drop_total", reason="spoofed",
                      client_cn="home") in (None, 0.0)
    assert srv.poll() is None


def test_packets_route_by_destination_to_the_right_client(tun_bed):
    bed, _srv, _ = tun_bed
    for h in bed.home_nodes[:2]:
        assert bed.ping(bed.cloud, CLIENTS[h.name][0], count=3, interval=0.1)["received"] == 3
    # Nothing for an address no client owns leaves the server's device.
    assert bed.ping(bed.cloud, "10.78.0.99", count=1, timeout=0.5)["received"] == 0
