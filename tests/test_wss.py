"""WebSocket lanes (tcp.transport: wss / ws), the HTTP CONNECT proxy, on loopback.

Real parts: TLS with the test PKI, a real nginx in front of the server with the guide's
configuration (docs/guide.md section 14, "Behind nginx"), a real tinyproxy for CONNECT.
The real-WireGuard versions of these are in tests/e2e/test_wss_wireguard.py.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest

import ut
from ut._testbase import probes
from ut._testbase.certs import TestPki
from ut._testbase.nginx import free_port, guide_reverse_proxy
from ut._testbase.require import require_tools
from ut._testbase.tinyproxy import Tinyproxy
from ut._testbase.tunnelkit import (
    UdpEcho,
    UdpPeer,
    capture_events,
    client_config,
    run_on,
    server_config,
    tunnel,
    wait_for,
)
from ut.httpproxy import parse_proxy

ROOT = Path(__file__).resolve().parent.parent
WSS = {"tcp": {"transport": "wss", "ws_path": "/ws"}}


async def _echo_through(client: ut.Client, n: int = 300) -> None:
    peer = await UdpPeer.open(client.udp_address[:2])
    try:
        sent = [b"datagram %d " % i * 20 for i in range(n)]
        for d in sent:
            peer.send(d)
        assert sorted(await peer.drain(n, 15)) == sorted(sent)
    finally:
        peer.close()


def test_wss_tunnel(pki: TestPki, loop_kind: str) -> None:
    async def main() -> None:
        async with tunnel(pki, server_tcp={"_extra": WSS}, client_tcp={"_extra": WSS}) as t:
            await _echo_through(t.client)
            assert await wait_for(lambda: t.client.stats()["lanes_ready"] == 5, 10)
            (sess,) = t.server.stats()["sessions"]
            assert sess["client_cn"] == "home" and sess["lanes"] == 5
            lane = t.client.session.lanes[0]
            assert type(lane.transport).__name__ == "WsLink"
            # Idle close and redial behave as with tls.
            for other in list(t.client.session.lanes):
                if other is not None:
                    other.abort("test")
            assert await wait_for(lambda: t.client.stats()["lanes_ready"] == 0, 5)
            await _echo_through(t.client, 50)
            assert t.client.stats()["handshake_failures"] == {}

    run_on(loop_kind, main())


def test_wss_idle_close_and_rebuild(pki: TestPki) -> None:
    """As with tls: idle lanes close (GOODBYE idle, then a WebSocket close) and the next
    datagram rebuilds them."""
    idle = dict(WSS, tcp={**WSS["tcp"], "idle_seconds": 1})

    async def main() -> None:
        async with tunnel(pki, lanes=2, server_tcp={"_extra": idle},
                          client_tcp={"_extra": idle}) as t:
            await _echo_through(t.client, 20)
            assert await wait_for(lambda: t.client.stats()["lanes_ready"] == 2, 10)
            assert await wait_for(lambda: t.client.stats()["lanes_ready"] == 0, 10)
            assert await wait_for(lambda: t.server.stats()["lanes_active"] == 0, 5)
            await _echo_through(t.client, 20)
            assert t.server.stats()["protocol_errors"] == {}

    run_on("uvloop", main())


def test_wss_with_a_wrong_path_is_refused_clearly(pki: TestPki) -> None:
    async def main() -> None:
        echo = UdpEcho().start()
        async with ut.Server(server_config(pki, echo.address, _extra=WSS)) as server:
            other = {"tcp": {"transport": "wss", "ws_path": "/other"}}
            cfg = client_config(pki, server.address[:2], lanes=1, _extra=other)
            with capture_events() as cap:
                async with ut.Client(cfg) as client:
                    peer = await UdpPeer.open(client.udp_address[:2])
                    peer.send(b"x")
                    assert await wait_for(lambda: client.stats()["handshake_failures"], 10)
                    peer.close()
            fails = cap.named("tls_handshake_fail")
            assert fails[0]["reason"] == "refused_by_server"
            assert "ws_path" in fails[0]["err"]
            assert server.stats()["sessions"] == [] and server.stats()["web_face"]["site"] >= 1
        echo.close()

    run_on("uvloop", main())


def _guide_server_yaml() -> dict:
    import yaml

    text = (ROOT / "docs" / "guide.md").read_text()
    section = text[text.index("### Behind nginx"):]
    m = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert m
    return yaml.safe_load(m.group(1))


def test_behind_nginx_with_the_guides_config(pki: TestPki, tmp_path: Path) -> None:
    """The server speaks plain WebSocket on loopback (transport: ws) behind the guide's
    nginx, which terminates TLS and serves the site on every other path."""
    require_tools("nginx")
    guide = _guide_server_yaml()
    assert guide["tcp"]["transport"] == "ws" and guide["tcp"]["ws_path"] == "/ws"

    async def main() -> None:
        echo = UdpEcho().start()
        port = free_port()
        scfg = server_config(pki, echo.address, listen_addr=f"127.0.0.1:{port}",
                             _extra={"tcp": dict(guide["tcp"], listen_addr=f"127.0.0.1:{port}")})
        async with ut.Server(scfg) as server:
            ng = guide_reverse_proxy(tmp_path / "nginx", pki.server_cert, pki.server_key,
                                     ut_port=port, listen="127.0.0.1", port=free_port(),
                                     guide=ROOT / "docs" / "guide.md")
            await asyncio.to_thread(ng.start)
            try:
                front = ("127.0.0.1", ng.proxy_port)  # type: ignore[attr-defined]
                ccfg = client_config(pki, front, _extra=WSS)
                async with ut.Client(ccfg) as client:
                    await _echo_through(client)
                    assert await wait_for(lambda: client.stats()["lanes_ready"] == 5, 10)
                    (sess,) = server.stats()["sessions"]
                    assert sess["client_cn"] == "home"  # identity from the proof, not TLS
                # The site on other paths is nginx's; the ws path without a proof is ours.
                site = await asyncio.to_thread(
                    probes.probe_tls, front, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                assert site.status == "HTTP/1.1 200 OK" and b"Hello." in site.body
                ws = await asyncio.to_thread(
                    probes.probe_tls, front,
                    b"GET /ws/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                assert ws.status == "HTTP/1.1 404 Not Found", ws.data[:200]
                assert server.stats()["web_face"]["site"] == 1
            finally:
                await asyncio.to_thread(ng.stop)
        echo.close()

    run_on("uvloop", main(), timeout=90)


@pytest.mark.parametrize("transport", ["tls", "wss"])
def test_through_tinyproxy(pki: TestPki, tmp_path: Path, transport: str) -> None:
    require_tools("tinyproxy")
    proxy = Tinyproxy(tmp_path / "tp").start()
    try:
        async def main() -> None:
            mode = {"tcp": {"transport": transport}}
            echo = UdpEcho().start()
            async with ut.Server(server_config(pki, echo.address, _extra=mode)) as server:
                extra = {"tcp": {"transport": transport,
                                 "proxy": f"http://127.0.0.1:{proxy.port}"}}
                async with ut.Client(client_config(pki, server.address[:2], _extra=extra)) as client:
                    await _echo_through(client)
                    assert await wait_for(lambda: client.stats()["lanes_ready"] == 5, 10)
            echo.close()

        run_on("uvloop", main(), timeout=60)
        assert proxy.connects() >= 5  # every lane went through the proxy
    finally:
        proxy.stop()


def test_a_proxy_that_refuses_connect_is_reported(pki: TestPki) -> None:
    """An HTTP server that is not a proxy answers CONNECT with an error status."""
    async def main() -> None:
        async def not_a_proxy(reader: Any, writer: Any) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            writer.close()

        fake = await asyncio.start_server(not_a_proxy, "127.0.0.1", 0)
        port = fake.sockets[0].getsockname()[1]
        echo = UdpEcho().start()
        async with ut.Server(server_config(pki, echo.address)) as server:
            extra = {"tcp": {"proxy": f"http://127.0.0.1:{port}"}}
            with capture_events() as cap:
                async with ut.Client(client_config(pki, server.address[:2], lanes=1,
                                                   _extra=extra)) as client:
                    peer = await UdpPeer.open(client.udp_address[:2])
                    peer.send(b"x")
                    assert await wait_for(lambda: cap.named("lane_dial_fail"), 10)
                    peer.close()
            err = cap.named("lane_dial_fail")[0]["err"]
            assert "proxy refused CONNECT" in err and "403" in err, err
        fake.close()
        echo.close()

    run_on("asyncio", main())


def test_proxy_setting() -> None:
    assert parse_proxy(None) is None and parse_proxy("") is None
    assert parse_proxy("http://u:p%40ss@proxy:3128") == ("proxy", 3128, "u:p@ss")
    assert parse_proxy("env", {"HTTPS_PROXY": "http://p:8888"}) == ("p", 8888, None)
    assert parse_proxy("env", {"https_proxy": "p2:3128"}) == ("p2", 3128, None)
    assert parse_proxy("env", {}) is None
    with pytest.raises(ValueError):
        parse_proxy("socks5://p:1080")


@pytest.mark.parametrize("role, extra, key", [
    ("client", {"tcp": {"transport": "ws"}}, "tcp.transport"),
    ("server", {"tcp": {"transport": "wss"}, "tls": {"client_auth": "handshake"}}, "tcp.transport"),
    ("client", {"tcp": {"proxy": "socks5://x:1"}}, "tcp.proxy"),
    ("client", {"tcp": {"ws_path": "ws"}}, "tcp.ws_path"),
    ("server", {"tcp": {"transport": "ws", "listen_addr": "0.0.0.0:8443"}}, "listen on loopback"),
])
def test_config_errors(pki: TestPki, role: str, extra: dict, key: str) -> None:
    with pytest.raises(ut.ConfigError, match=re.escape(key)):
        if role == "client":
            client_config(pki, ("127.0.0.1", 1), _extra=extra)
        else:
            server_config(pki, ("127.0.0.1", 1), _extra=extra)
