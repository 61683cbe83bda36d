"""WebSocket lanes end to end with real WireGuard (issue 18), in the netns bed.

Three setups, each carrying a 64 MiB file both ways with identical sha256:

* ``wss`` straight from the home's client to the cloud's server;
* the server behind a real nginx in the cloud (the guide's configuration, section 14:
  nginx terminates TLS on the link address, ut-tunnel speaks plain WebSocket on loopback);
* the client through a real HTTP proxy (tinyproxy, in the cloud) while nftables drops
  direct TCP from the homes to the server's port, so the proxy is the only way.

See tests/e2e/test_wireguard.py for the bed and docs/testing.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ut._testbase.netbed import NetBed, deep_merge, metric_sum
from ut._testbase.nginx import guide_reverse_proxy
from ut._testbase.require import require_tools
from ut._testbase.tinyproxy import Tinyproxy

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
LANES = 5
FIRST_PING_WITHIN = 15.0
FAST = {"tcp": {"dial_backoff_min_seconds": 0.2, "dial_backoff_max_seconds": 2}}
WSS = {"tcp": {"transport": "wss", "ws_path": "/ws"}}
NGINX_PORT = 443
PROXY_PORT = 8888


def _both_ways(bed: NetBed, big_file, http_url: str, tag: str) -> None:
    down, up = bed.both_ways(bed.home, *big_file, http_url, tag)
    print(f"\n{tag}: 64 MiB down {down:.0f} Mbit/s, up {up:.0f} Mbit/s")


def _start(bed: NetBed, server: dict, client: dict):
    srv = bed.start_server(server)
    cli = bed.start_client(bed.home, deep_merge(FAST, client))
    bed.use_tunnel(bed.home)
    bed.reset_wireguard()
    bed.wait_ping(bed.home, bed.cloud, within=FIRST_PING_WITHIN)
    return srv, cli


def _alive(*procs) -> None:
    for p in procs:
        assert p.poll() is None, f"{p.bed_name} exited {p.returncode}:\n{NetBed.log_text(p, 30)}"


def test_wss_64mib_both_ways(tun, big_file, http_url):
    bed = tun
    srv, cli = _start(bed, WSS, WSS)
    _both_ways(bed, big_file, http_url, "wss")
    assert metric_sum(bed.metrics(bed.cloud), "ut_lanes_active_total") == LANES
    assert metric_sum(bed.metrics(bed.home), "ut_tls_handshake_failures_total") == 0
    _alive(srv, cli)


def test_behind_nginx_64mib_both_ways(tun, big_file, http_url):
    """The guide's nginx in the cloud namespace on the link address; ut-tunnel on
    loopback with transport ws; the client dials nginx."""
    require_tools("nginx")
    bed = tun
    ng = guide_reverse_proxy(bed.wd / "nginx", bed.pki_dir / "server.pem",
                             bed.pki_dir / "server.key", ut_port=8443,
                             listen=bed.cloud.link_ip, port=NGINX_PORT,
                             guide=ROOT / "docs" / "guide.md", netns=bed._ns(bed.cloud))
    ng.tls_port, ng.http_port, ng.h2c_port = 18443, 18080, 18081  # the bed's own ports
    ng.start()
    try:
        server = {"tcp": {"listen_addr": "127.0.0.1:8443", "transport": "ws", "ws_path": "/ws"}}
        client = deep_merge(WSS, {"tcp": {"server_addr": f"{bed.cloud.link_ip}:{NGINX_PORT}"}})
        srv, cli = _start(bed, server, client)
        _both_ways(bed, big_file, http_url, "nginx")
        s = bed.metrics(bed.cloud)
        assert metric_sum(s, "ut_lanes_active_total") == LANES
        assert metric_sum(s, "ut_web_face_connections_total") == 0
        # Every other path is nginx's site.
        res = bed.run(bed.home, ["curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}",
                                 f"https://{bed.cloud.link_ip}:{NGINX_PORT}/"], check=False)
        assert res.stdout.strip() in ("200", "403", "404"), res.stdout  # nginx, not ut-tunnel
        _alive(srv, cli)
    finally:
        ng.stop()


@pytest.mark.parametrize("transport", ["tls", "wss"])
def test_through_an_http_proxy_only(tun, big_file, http_url, transport):
    """tinyproxy in the cloud; nftables in the cloud drops TCP from the links to the
    server's port, so lanes can only come through the proxy (which dials it locally)."""
    require_tools("tinyproxy")
    bed = tun
    ns = bed._ns(bed.cloud)
    proxy = Tinyproxy(bed.wd / f"tinyproxy-{transport}", listen=bed.cloud.link_ip,
                      port=PROXY_PORT, allow="0.0.0.0/0", netns=ns).start()
    links = ", ".join(f'"{i}"' for i in bed._links_of(bed.cloud))
    port = int(bed.server_config()["tcp"]["listen_addr"].rsplit(":", 1)[1])
    bed.run(bed.cloud, ["nft", "-f", "-"], input=f"""
table inet utproxy {{
  chain input {{ type filter hook input priority -20; policy accept;
    iifname {{ {links} }} tcp dport {port} counter drop; }}
}}
""")
    try:
        direct = bed.run(bed.home, ["curl", "-s", "--connect-timeout", "2", "-o", "/dev/null",
                                    f"http://{bed.cloud.link_ip}:{port}/"], check=False)
        assert direct.returncode != 0, "direct TCP to the server must be blocked"
        mode = {"tcp": {"transport": transport}}
        client = deep_merge(mode, {"tcp": {"proxy": f"http://{bed.cloud.link_ip}:{PROXY_PORT}"}})
        srv, cli = _start(bed, mode, client)
        _both_ways(bed, big_file, http_url, f"proxy-{transport}")
        assert metric_sum(bed.metrics(bed.cloud), "ut_lanes_active_total") == LANES
        assert proxy.connects() >= LANES
        _alive(srv, cli)
    finally:
        bed.run(bed.cloud, "nft delete table inet utproxy", check=False)
        proxy.stop()
