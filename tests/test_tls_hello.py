"""Issue 15, "stealth on the wire": what a passive observer or a DPI engine sees of a
lane's TLS start is an ordinary HTTPS client's.

- ALPN: the client offers ``tls.alpn`` (default ``h2, http/1.1``); the server selects
  by *its own* preference (Python's callback is OpenSSL's ``SSL_select_next_proto``
  with the server's list first); no overlap, or a client offering nothing (an older
  ut-tunnel), still connects, with nothing selected.
- SNI: Python never sends an IP address as SNI; a client that would send none warns
  at start-up (``no_sni``) and ``ut-tunnel check`` says so too.
- The ClientHello: its JA4 equals ``curl``'s on the same OpenSSL. Measured here on
  OpenSSL 3.0 (curl 7.88.1, Debian 12), with both sending the same SNI:

  ============  ======================================  ====================
  hello         JA4                                     note
  ============  ======================================  ====================
  curl          t13d3112h2_e8f1e7e78f70_b26ce05bbdd6
  ut before     t13d181100_85036bcba153_d41ae481755e    Python's own hello
  ut now        t13d3112h2_e8f1e7e78f70_b26ce05bbdd6    ut.tls._like_curl
  ============  ======================================  ====================

  Every JA4 part matches, and so do the cipher order, the extension order, the
  groups, the key share and the record length. What cannot match (not part of JA4):
  curl's supported_versions also offers TLS 1.1 and 1.0 where ours starts at 1.2 (the
  spec's minimum; we keep it), and the padding extension is 4 bytes longer to make up
  for it. A *resumed* lane's hello differs from the first lane's only by the
  pre_shared_key extension (0x0029, as any resuming client's) and, as OpenSSL pads
  only hellos shorter than 512 bytes, by the padding it no longer needs.
- Lanes after the first resume its TLS session (the server still knows the client's
  CN: OpenSSL keeps the peer certificate in the session), a session the server refuses
  costs a full handshake, and those lanes dial each after its own random delay.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import re
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import yaml

import ut
from ut import client as ut_client
from ut import tls
from ut._testbase import ja4 as J
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
from ut.check import check_config

LOOPS = ("asyncio", "uvloop")
HELLO_NAME = "vpn.example.com"  # the SNI both curl and ut send to the hello trap

PSK = 0x0029
PADDING = 0x0015

# ------------------------------------------------------------------ JA4 itself


def test_ja4_spec_examples():
    """The worked example of FoxIO's JA4.md: the cipher hash, the extension hash with
    and without signature algorithms."""
    ciphers = [0x1301, 0x1302, 0x1303, 0xC02B, 0xC02F, 0xC02C, 0xC030, 0xCCA9, 0xCCA8,
               0xC013, 0xC014, 0x009C, 0x009D, 0x002F, 0x0035]
    exts = [0x001B, 0x0000, 0x0033, 0x0010, 0x4469, 0x0017, 0x002D, 0x000D, 0x0005, 0x0023,
            0x0012, 0x002B, 0xFF01, 0x000B, 0x000A, 0x0015]
    sigs = [0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601]
    hello = J.ClientHello(0x0303, ciphers, exts, sni="x", alpn=[b"h2"], sig_algs=sigs,
                          supported_versions=[0x0304, 0x0303])
    assert J.ja4(hello) == "t13d1516h2_8daaf6152771_e5627efa2ab1"
    hello.sig_algs = []
    assert J.ja4(hello).endswith("_6d807ffa2a79")


def _record(ciphers: list[int], exts: list[tuple[int, bytes]]) -> bytes:
    body = b"\x03\x03" + bytes(32) + b"\x00"
    body += (2 * len(ciphers)).to_bytes(2, "big")
    body += b"".join(c.to_bytes(2, "big") for c in ciphers) + b"\x01\x00"
    ext_bytes = b"".join(t.to_bytes(2, "big") + len(v).to_bytes(2, "big") + v for t, v in exts)
    body += len(ext_bytes).to_bytes(2, "big") + ext_bytes
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + len(hs).to_bytes(2, "big") + hs


def test_ja4_ignores_grease_and_reads_alpn():
    alpn = b"\x00\x03\x02h2"  # one protocol, "h2"
    versions = b"\x04\x3a\x3a\x03\x04"  # GREASE, TLS 1.3
    raw = _record([0x0A0A, 0x1301], [(0x2A2A, b""), (0x0010, alpn), (0x002B, versions)])
    hello = J.parse_client_hello(raw)
    assert hello.ciphers == [0x1301] and hello.extensions == [0x0010, 0x002B]
    assert J.ja4(raw).startswith("t13i0102h2_")


# ------------------------------------------------------------------ ALPN


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext,
               name: str = "localhost") -> tuple[str | None, str | None, str]:
    """One blocking handshake over loopback: (server's ALPN, client's ALPN, client CN)."""
    got: dict[str, Any] = {}
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)

        def serve() -> None:
            conn, _ = listener.accept()
            with server_ctx.wrap_socket(conn, server_side=True) as s:
                got["alpn"], got["cn"] = s.selected_alpn_protocol(), tls.peer_cn(s)
                s.sendall(b"k")
                s.recv(1)

        thread = threading.Thread(target=serve)
        thread.start()
        with client_ctx.wrap_socket(socket.create_connection(listener.getsockname()),
                                    server_hostname=name) as c:
            c.recv(1)
            client_alpn = c.selected_alpn_protocol()
            c.sendall(b"k")
        thread.join(10)
    return got["alpn"], client_alpn, got["cn"]


@pytest.mark.parametrize("server_alpn, client_alpn, selected", [
    (("h2", "http/1.1"), ("h2", "http/1.1"), "h2"),
    (("h2", "http/1.1"), ("http/1.1", "h2"), "h2"),        # the server's preference wins
    (("http/1.1", "h2"), ("h2", "http/1.1"), "http/1.1"),
    (("h2", "http/1.1"), (), None),                        # an older ut-tunnel: no ALPN
    (("h2",), ("spdy/3",), None),                          # no overlap: still connects
    ((), ("h2", "http/1.1"), None),                        # a server that selects nothing
])
def test_alpn_selection(pki, server_alpn, client_alpn, selected):
    cert, key = pki.client("home")
    server_ctx = tls.server_context(pki.ca, pki.server_cert, pki.server_key, alpn=server_alpn)
    client_ctx = tls.client_context(pki.ca, cert, key, alpn=client_alpn)
    assert _handshake(server_ctx, client_ctx) == (selected, selected, "home")


@pytest.mark.parametrize("loop", LOOPS)
def test_tunnel_lanes_select_configured_alpn(pki, loop):
    async def main():
        async with tunnel(pki, lanes=2,
                          server_tcp={"_extra": {"tls": {"alpn": ["http/1.1", "h2"]}}}) as t:
            t.peer.send(b"x")
            assert await t.peer.recv()
            (session,) = t.server.sessions.values()
            lanes = [lane for lane in session.lanes if lane is not None]
            assert lanes
            for lane in lanes:
                obj = lane.transport.get_extra_info("ssl_object")
                assert obj.selected_alpn_protocol() == "http/1.1"

    run_on(loop, main())


# ------------------------------------------------------------------ SNI


@pytest.mark.parametrize("server_name, warns", [(None, True), ("localhost", False)])
def test_client_warns_when_it_would_send_no_sni(pki, server_name, warns):
    async def main():
        cfg = client_config(pki, ("127.0.0.1", 9), _extra={"tls": {"server_name": server_name}})
        with capture_events() as cap:
            client = ut.Client(cfg)
            await client.start()
            await client.close()
        return cap.named("no_sni")

    found = run_on("asyncio", main())
    if not warns:
        assert found == []
        return
    (ev,) = found
    assert ev["server_name"] == "127.0.0.1"
    assert "tls.server_name" in ev["err"] and "DNS name" in ev["err"]


def test_check_warns_when_the_client_would_send_no_sni(pki, tmp_path):
    cert, key = pki.client("home")
    path = tmp_path / "client.yaml"
    path.write_text(yaml.safe_dump({
        "role": "client", "tcp": {"server_addr": "203.0.113.7:443"},
        "tls": {"ca_cert": str(pki.ca), "cert": str(cert), "key": str(key)},
    }))
    out = io.StringIO()
    assert check_config(str(path), out=out, err=io.StringIO()) == 0
    assert "no SNI" in out.getvalue() and "tls.server_name" in out.getvalue()


def test_sends_sni():
    assert tls.sends_sni("vpn.example.com") and tls.sends_sni("localhost")
    assert not tls.sends_sni("203.0.113.7") and not tls.sends_sni("::1")
    assert not tls.sends_sni(None)


# ------------------------------------------------------------------ hello capture


class HelloTrap:
    """A loopback TCP listener that keeps the first ClientHello of each connection
    (its raw bytes, as read from TCP) and then hangs up."""

    def __init__(self) -> None:
        self.raw: list[bytes] = []
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> tuple[str, int]:
        self.server = await asyncio.start_server(self._on_conn, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[:2]

    async def _on_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            self.raw.append(await _read_hello(reader))
        except (ValueError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def _read_hello(reader: asyncio.StreamReader) -> bytes:
    """The TLS records up to the end of the first ClientHello."""
    buf = b""
    while len(buf) < 65536:
        try:
            J.parse_client_hello(buf)
            return buf
        except ValueError:
            pass
        chunk = await reader.read(65536)
        if not chunk:
            break
        buf += chunk
    J.parse_client_hello(buf)  # raises: what there is is no ClientHello
    return buf


async def _trap_one(dial: Callable[[tuple[str, int]], Awaitable[Any]]) -> bytes:
    trap = HelloTrap()
    addr = await trap.start()
    try:
        await dial(addr)
        assert await wait_for(lambda: trap.raw, timeout=10), "no ClientHello arrived"
        return trap.raw[0]
    finally:
        trap.close()


async def _curl_dial(addr: tuple[str, int]) -> None:
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sk", "--max-time", "5", "--resolve", f"{HELLO_NAME}:{addr[1]}:{addr[0]}",
        f"https://{HELLO_NAME}:{addr[1]}/",
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    await proc.wait()


def _ut_dialer(pki: Any) -> Callable[[tuple[str, int]], Awaitable[Any]]:
    async def dial(addr: tuple[str, int]) -> None:
        # A real client with its default configuration: its first datagram dials.
        cfg = client_config(pki, addr, lanes=1, _extra={"tls": {"server_name": HELLO_NAME}})
        client = ut.Client(cfg)
        await client.start()
        peer = await UdpPeer.open(client.udp_address[:2])
        try:
            peer.send(b"x")
            await asyncio.sleep(0.5)
        finally:
            peer.close()
            await client.close()

    return dial


def _curl_openssl() -> str | None:
    """curl's OpenSSL major.minor, or None without curl or with another TLS library."""
    if shutil.which("curl") is None:
        return None
    out = subprocess.run(["curl", "--version"], capture_output=True, text=True).stdout
    m = re.search(r"\bOpenSSL/(\d+\.\d+)", out)
    return m.group(1) if m else None


def _short_list(values: list[int]) -> str:
    return ",".join(f"{v:04x}" for v in values)


def test_client_hello_matches_curls(pki):
    """ut's ClientHello has curl's JA4 (both through this host's OpenSSL)."""
    ours = ".".join(str(n) for n in ssl.OPENSSL_VERSION_INFO[:2])
    theirs = _curl_openssl()
    if theirs != ours:
        pytest.skip(f"needs curl on OpenSSL {ours} (Python's); found {theirs or 'none'}")

    async def main():
        return await _trap_one(_curl_dial), await _trap_one(_ut_dialer(pki))

    curl_raw, ut_raw = run_on("asyncio", main())
    curl, hello = J.parse_client_hello(curl_raw), J.parse_client_hello(ut_raw)
    print(f"\ncurl JA4 {J.ja4(curl)}\nut   JA4 {J.ja4(hello)}")
    assert J.ja4(hello) == J.ja4(curl), (J.ja4_r(hello), J.ja4_r(curl))
    # Beyond JA4: the same order of ciphers and extensions, the same groups, ALPN and SNI.
    assert _short_list(hello.ciphers) == _short_list(curl.ciphers)
    assert _short_list(hello.extensions) == _short_list(curl.extensions)
    assert hello.groups == curl.groups and hello.sig_algs == curl.sig_algs
    assert hello.alpn == curl.alpn == [b"h2", b"http/1.1"] and hello.sni == curl.sni == HELLO_NAME
    assert len(hello.session_id) == len(curl.session_id) == 32  # TLS 1.3 middlebox mode
    # What cannot match: we never offer TLS below 1.2 (curl may offer 1.1 and 1.0).
    assert hello.supported_versions == [0x0304, 0x0303]
    assert curl.supported_versions[:2] == [0x0304, 0x0303]
    # The padding extension evens that out: the records have the same length.
    assert len(ut_raw) == len(curl_raw)


# ------------------------------------------------------------------ resumption


class HelloTap:
    """A loopback TCP relay in front of a server that keeps each connection's ClientHello."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.raw: list[bytes] = []
        self.server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> tuple[str, int]:
        self.server = await asyncio.start_server(self._on_conn, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[:2]

    async def _on_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        try:
            hello = await _read_hello(reader)
            self.raw.append(hello)
            up_writer.write(hello)
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        except (ValueError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            up_writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def tapped_tunnel(pki: Any, lanes: int) -> AsyncIterator[tuple[Any, HelloTap]]:
    """A server with a UDP echo behind it, a HelloTap in front, and a client on the tap."""
    echo = UdpEcho().start()
    server = ut.Server(server_config(pki, echo.address, lanes=lanes))
    await server.start()
    tap = HelloTap(server.address[:2])
    tap_addr = await tap.start()
    client = ut.Client(client_config(pki, tap_addr, lanes=lanes))
    await client.start()
    peer = await UdpPeer.open(client.udp_address[:2])
    try:
        yield client, server, peer, tap
    finally:
        peer.close()
        await client.close()
        tap.close()
        await server.close()
        echo.close()


_RAW_HELLOS: list[bytes] = []


def _client_opens(cap: Any) -> list[dict]:
    return [e for e in cap.named("lane_open") if e["role"] == "client"]


@pytest.mark.parametrize("loop", LOOPS)
def test_later_lanes_resume_the_first_lanes_session(pki, loop):
    async def main():
        with capture_events() as cap:
            async with tapped_tunnel(pki, lanes=4) as (client, server, peer, tap):
                peer.send(b"x")
                assert await peer.recv()
                assert await wait_for(lambda: client.session.lanes_ready == 4)
                (session,) = server.sessions.values()
                assert await wait_for(lambda: session.lanes_ready == 4)
                server_lanes = [lane for lane in session.lanes if lane is not None]
                resumed = [lane.transport.get_extra_info("ssl_object").session_reused
                           for lane in server_lanes]
                # The server knows who a resumed lane belongs to (the CN is in the session).
                cns = [lane.client_cn for lane in server_lanes]
                hellos = [J.parse_client_hello(raw) for raw in tap.raw]
                _RAW_HELLOS[:] = tap.raw
        return _client_opens(cap), sorted(resumed), cns, hellos

    opens, resumed, cns, hellos = run_on(loop, main())
    assert [e["lane_id"] for e in opens][0] == 0
    assert [e["tls_resumed"] for e in opens] == [False, True, True, True]
    assert resumed == [False, True, True, True]
    assert cns == ["home"] * 4
    # The hellos: the first without a PSK, the others with one, and otherwise the same.
    first, *later = hellos
    assert len(later) == 3 and PSK not in first.extensions
    for hello in later:
        assert hello.extensions[-1] == PSK  # RFC 8446: pre_shared_key comes last
        assert _without(hello.extensions, PSK, PADDING) == _without(first.extensions, PADDING)
        assert (hello.ciphers, hello.groups, hello.sig_algs, hello.alpn, hello.sni) == (
            first.ciphers, first.groups, first.sig_algs, first.alpn, first.sni)
    # The server issues stateful tickets (a short id, not the whole session with the
    # client certificate in it): a resuming hello is a browser-sized one.
    sizes = [len(raw) for raw in _RAW_HELLOS]
    assert all(size <= 640 for size in sizes), sizes


def _without(values: list[int], *drop: int) -> list[int]:
    return [v for v in values if v not in drop]


@pytest.mark.parametrize("loop", LOOPS)
def test_reconnect_resumes_and_a_refused_session_costs_a_full_handshake(pki, loop):
    async def reopen(t: Any, lane_id: int) -> None:
        session = t.client.session
        old = session.lanes[lane_id]
        old.abort("test")
        assert await wait_for(lambda: session.lanes[lane_id] not in (None, old)
                              and session.lanes_ready == 3)

    async def main():
        with capture_events() as cap:
            async with tunnel(pki, lanes=3) as t:
                t.peer.send(b"x")
                assert await t.peer.recv()
                assert await wait_for(lambda: t.client.session.lanes_ready == 3)
                await reopen(t, 1)  # resumes
                # A server whose ticket keys changed (a restart, say) refuses the session:
                # the lane still opens, with a full handshake, and the next one resumes again.
                t.server.transport.ssl_context = tls.server_context(
                    t.pki.ca, t.pki.server_cert, t.pki.server_key,
                    client_auth=t.server.config.tls.client_auth)
                await reopen(t, 2)
                await reopen(t, 1)
                t.peer.send(b"y")
                assert await t.peer.recv() == b"y"
                (session,) = t.server.sessions.values()
                assert len(t.server.sessions) == 1 and session.lanes_ready == 3
        return [(e["lane_id"], e["tls_resumed"]) for e in _client_opens(cap)]

    opens = run_on(loop, main())
    assert opens[3:] == [(1, True), (2, False), (1, True)]


# ------------------------------------------------------------------ stagger


def test_lanes_dial_after_the_first_each_after_a_delay(pki, monkeypatch):
    """The first lane dials at once and alone; the rest only once it is up, each after
    its own delay from LANE_STAGGER_SECONDS."""
    lo, hi = ut_client.LANE_STAGGER_SECONDS
    assert 0 < lo < hi <= 0.5
    monkeypatch.setattr(ut_client, "LANE_STAGGER_SECONDS", (0.3, 0.3))
    dials: list[tuple[int, float, int]] = []
    real_dial = ut_client.ClientSession._dial_one

    async def spy(self: Any, lane_id: int, delay: float = 0.0) -> bool:
        dials.append((lane_id, delay, self.active_lanes))
        return await real_dial(self, lane_id, delay)

    monkeypatch.setattr(ut_client.ClientSession, "_dial_one", spy)
    opened: list[tuple[float, int]] = []

    class Opens(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            fields = getattr(record, "ut", {})
            if fields.get("event") == "lane_open" and fields.get("role") == "client":
                opened.append((record.created, fields["lane_id"]))

    async def main():
        handler = Opens()
        logging.getLogger("ut").addHandler(handler)
        try:
            async with tunnel(pki, lanes=4) as t:
                t.peer.send(b"x")
                assert await t.peer.recv()
                assert await wait_for(lambda: t.client.session.lanes_ready == 4)
        finally:
            logging.getLogger("ut").removeHandler(handler)

    with capture_events():  # the ut logger at debug level, so the handler sees lane_open
        run_on("asyncio", main())
    assert dials[0] == (0, 0.0, 0)  # the first lane: no delay, nothing up yet
    assert sorted(d[0] for d in dials[1:]) == [1, 2, 3]
    assert all(delay == 0.3 and up >= 1 for _, delay, up in dials[1:])
    (t0, first), *rest = opened
    assert first == 0 and len(rest) == 3
    assert all(t - t0 >= 0.29 for t, _ in rest)


def test_default_stagger_gives_each_lane_its_own_delay(pki, monkeypatch):
    lo, hi = ut_client.LANE_STAGGER_SECONDS
    assert 0 < lo < hi <= 0.5  # a fraction of a second: the first datagrams wait for lane 0 only
    delays: dict[int, float] = {}
    real_dial = ut_client.ClientSession._dial_one

    async def spy(self: Any, lane_id: int, delay: float = 0.0) -> bool:
        delays[lane_id] = delay
        return await real_dial(self, lane_id, delay)

    monkeypatch.setattr(ut_client.ClientSession, "_dial_one", spy)

    async def main():
        async with tunnel(pki, lanes=5) as t:
            t.peer.send(b"x")
            assert await t.peer.recv()
            assert await wait_for(lambda: t.client.session.lanes_ready == 5)

    run_on("uvloop", main())
    later = [delays[i] for i in (1, 2, 3, 4)]
    assert delays[0] == 0.0 and all(lo <= d <= hi for d in later)
    assert len(set(later)) == 4  # not in lock-step
