"""Hostile and broken peers against a running ``ut.Server`` on loopback (issue 5).

* Unauthenticated (``tls.client_auth: handshake``): plain TCP garbage, an HTTP request,
  TLS with no / another CA's / an expired certificate -- each refused quickly, logged with a reason, nothing left
  behind. Silent TCP (no ClientHello) and TLS without HELLO are closed after their
  timeouts; hundreds at once do not stop a real client's traffic; the number pending
  at once is capped (oldest evicted).
* Authenticated: a peer that sends broken frames (bad magic, version, type, length,
  truncated then close, DATA before HELLO, lane id out of range, malformed control)
  loses that lane, counted in ``protocol_errors``; its session and the real client's
  keep working.

Attack connections that must not share the server's event loop (TLS handshakes by
the hundred) run in a child process: ``python tests/test_hostile.py attack SPEC``.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import select
import socket
import ssl
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

import ut
from ut import fastpath
from ut._testbase.rawlane import RawLane
from ut._testbase.tunnelkit import (
    LOOP_KINDS,
    UdpEcho,
    UdpPeer,
    capture_events,
    client_config,
    run_on,
    server_config,
    wait_for,
)
from ut.control import (
    ERR_LANE_ID_OUT_OF_RANGE,
    ERR_PROTOCOL_ERROR,
    Err,
    Goodbye,
    Hello,
    control_frame,
)
from ut.proof import ClientProver
from ut.tls import client_context

ROOT = Path(__file__).resolve().parents[1]




def raise_fd_limit(want: int = 8192) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))


def open_fds() -> int:
    """Open file descriptors, less libuv's one-per-loop ``/dev/null`` reserve (opened on
    first use for its EMFILE trick; not a leak)."""
    n = 0
    for f in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{f}") != "/dev/null"
        except OSError:
            pass
    return n


def nothing_left(server: ut.Server) -> bool:
    return (not server._pending and not server._pending_tasks and not server._handshakes
            and not server.sessions)


# ---------------------------------------------------------------------------------------
# Unauthenticated peers, one at a time
# ---------------------------------------------------------------------------------------

async def _plain(server, payload: bytes) -> bytes:
    r, w = await asyncio.open_connection(*server.address[:2])
    w.write(payload)
    try:
        return await asyncio.wait_for(r.read(), 5)
    except (ConnectionError, OSError):
        return b""
    finally:
        w.close()


async def _tls(pki, server, ctx: ssl.SSLContext) -> bytes:
    """Handshake (TLS 1.3: the client finishes before the server judges it), then read:
    a refused client sees EOF or an error, never data."""
    try:
        r, w = await asyncio.open_connection(
            *server.address[:2], ssl=ctx, server_hostname=pki.server_name,
            ssl_handshake_timeout=5)
    except (ssl.SSLError, ConnectionError, OSError):
        return b""
    try:
        return await asyncio.wait_for(r.read(100), 5)
    except (ssl.SSLError, ConnectionError, OSError):
        return b""
    finally:
        w.close()


def _certless_context(pki) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(pki.ca))
    return ctx


# The refusal tests below are about tls.client_auth: handshake (mutual TLS in the
# handshake: a refusal is silent and quick). With proof (the default) the same probes get
# a web server's answers instead: tests/test_probes.py and tests/test_proof.py.
HANDSHAKE = {"tls": {"client_auth": "handshake"}}

REFUSALS = {
    # case: (how, expected reason)
    "tcp_garbage": ("plain", "not_tls"),
    "http_request": ("plain", "not_tls"),
    "tls_no_certificate": ("tls", "no_certificate"),
    "tls_other_ca": ("tls", "unknown_ca"),
    "tls_expired": ("tls", "expired"),
}


@pytest.mark.parametrize("loop_kind", LOOP_KINDS)
@pytest.mark.parametrize("case", list(REFUSALS))
def test_unauthenticated_peer_refused_quickly_with_reason(pki, case, loop_kind):
    how, reason = REFUSALS[case]

    async def main():
        echo = UdpEcho().start()
        cfg = server_config(pki, echo.address, connect_timeout_seconds=3, _extra=HANDSHAKE)
        with capture_events() as cap:
            async with ut.Server(cfg) as server:
                await asyncio.sleep(0.05)
                fds = open_fds()
                t0 = time.monotonic()
                if case == "tcp_garbage":
                    got = await _plain(server, bytes(range(256)) * 4)
                elif case == "http_request":
                    got = await _plain(server, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                elif case == "tls_no_certificate":
                    got = await _tls(pki, server, _certless_context(pki))
                else:
                    cert, key = pki.client(
                        "intruder", other_ca=case == "tls_other_ca", expired=case == "tls_expired")
                    got = await _tls(pki, server, client_context(pki.ca, cert, key))
                took = time.monotonic() - t0
                assert got == b"", got  # refused: not one byte of application data
                assert took < 1.0, f"refusal took {took:.2f}s (connect timeout is 3 s)"
                assert await wait_for(lambda: server.stats()["handshake_failures"], 3)
                assert server.stats()["handshake_failures"] == {reason: 1}
                fails = cap.named("tls_handshake_fail")
                assert [e["reason"] for e in fails] == [reason], fails
                assert fails[0]["peer"].startswith("127.0.0.1:") and fails[0]["err"]
                # Nothing outlives the connection: no pending lane, task, session or fd.
                assert await wait_for(lambda: nothing_left(server), 3), (
                    server._pending, server._handshakes)
                assert await wait_for(lambda: open_fds() <= fds, 3), (open_fds(), fds)
                assert server.stats()["sessions_active"] == 0
        echo.close()

    run_on(loop_kind, main())


@pytest.mark.parametrize("loop_kind", LOOP_KINDS)
def test_silent_tcp_and_partial_tls_closed_after_connect_timeout(pki, loop_kind):
    """No ClientHello at all, or a TLS record header that never gets its body."""

    async def main():
        echo = UdpEcho().start()
        cfg = server_config(pki, echo.address, connect_timeout_seconds=0.5, _extra=HANDSHAKE)
        with capture_events() as cap:
            async with ut.Server(cfg) as server:
                t0 = time.monotonic()
                silent = await _plain(server, b"")
                t_silent = time.monotonic() - t0
                t0 = time.monotonic()
                partial = await _plain(server, b"\x16\x03\x01\x02\x00\x01")  # 512-byte record promised
                t_partial = time.monotonic() - t0
                assert silent == partial == b""
                for took in (t_silent, t_partial):
                    assert 0.4 <= took < 2.0, took
                assert server.stats()["handshake_failures"] == {"timeout": 2}
                assert cap.named("tls_handshake_fail")[0]["reason"] == "timeout"
                assert await wait_for(lambda: nothing_left(server), 3)
        echo.close()

    run_on(loop_kind, main())


# ---------------------------------------------------------------------------------------
# Many at once: the attacker runs in a child process
# ---------------------------------------------------------------------------------------

def attacker_main(spec: dict) -> None:
    """Child process: open connections per ``spec``, print "ready", watch them close.

    spec: host, port, silent (TCP, nothing sent), partial (half a TLS record),
    tls (TLS with a valid client cert, then no HELLO), ca/cert/key/server_name, hold.
    Prints one JSON line: how many the server closed and after how long each.
    """
    addr = (spec["host"], spec["port"])
    ctx = None
    if spec.get("tls"):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=spec["ca"])
        ctx.load_cert_chain(spec["cert"], spec["key"])
    conns: list[tuple[socket.socket, float]] = []
    for kind in ("silent", "partial", "tls"):
        for _ in range(spec.get(kind, 0)):
            s = socket.create_connection(addr, timeout=10)
            if kind == "partial":
                s.sendall(b"\x16\x03\x01\x02\x00\x01")
            elif kind == "tls":
                s = ctx.wrap_socket(s, server_hostname=spec["server_name"])
            s.setblocking(False)
            conns.append((s, time.monotonic()))
    print("ready", len(conns), flush=True)
    open_ = {s.fileno(): (s, t) for s, t in conns}
    closed_after: list[float] = []
    deadline = time.monotonic() + spec["hold"]
    while open_ and time.monotonic() < deadline:
        r, _, _ = select.select(list(open_), [], [], 0.2)
        for fd in r:
            s, t = open_[fd]
            try:
                while True:
                    data = s.recv(65536)
                    if not data:
                        raise ConnectionError("eof")
            except (BlockingIOError, ssl.SSLWantReadError):
                continue  # some bytes (an ERR frame), not closed yet
            except (OSError, ssl.SSLError, ConnectionError):
                closed_after.append(round(time.monotonic() - t, 3))
                del open_[fd]
                s.close()
    print(json.dumps({"closed": len(closed_after), "still_open": len(open_),
                      "closed_after": closed_after}), flush=True)


async def start_attacker(spec: dict) -> asyncio.subprocess.Process:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(Path(__file__).resolve()), "attack", json.dumps(spec),
        stdout=subprocess.PIPE, env=env, cwd=str(ROOT))
    line = await asyncio.wait_for(proc.stdout.readline(), 60)
    assert line.startswith(b"ready"), line
    return proc


async def finish_attacker(proc: asyncio.subprocess.Process, timeout: float) -> dict:
    try:
        out = await asyncio.wait_for(proc.stdout.read(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    return json.loads(out.decode().strip().splitlines()[-1])


async def probe_traffic(peer: UdpPeer, count: int, rate: float) -> dict:
    """Send ``count`` numbered datagrams at ``rate``/s through the tunnel; loss and RTT."""
    clock = time.perf_counter  # uvloop's loop.time() has millisecond steps
    sent_at: dict[int, float] = {}
    rtts: list[float] = []

    async def collect():
        while len(rtts) < count:
            data = await peer.inbox.get()
            seq = int.from_bytes(data[:4], "big")
            if seq in sent_at:
                rtts.append(clock() - sent_at.pop(seq))

    collector = asyncio.create_task(collect())
    t0 = clock()
    for i in range(count):
        sent_at[i] = clock()
        peer.send(i.to_bytes(4, "big") + b"x" * 200)
        await asyncio.sleep(max(0.0, t0 + (i + 1) / rate - clock()))
    try:
        await asyncio.wait_for(asyncio.shield(collector), 3)
    except asyncio.TimeoutError:
        pass
    collector.cancel()
    rtts.sort()
    return {
        "sent": count, "received": len(rtts),
        "loss_pct": round(100.0 * (count - len(rtts)) / count, 2),
        "rtt_p50_ms": round(1000 * statistics.median(rtts), 2) if rtts else None,
        "rtt_p95_ms": round(1000 * rtts[int(0.95 * (len(rtts) - 1))], 2) if rtts else None,
    }


@pytest.mark.slow
def test_slowloris_crowd_against_the_web_face(pki):
    """tls.client_auth: proof (the default): the same 300 connections that never finish
    (150 silent TCP, 50 half a TLS record, 100 TLS with no proof) meet the web face's
    timeouts (nginx's, shortened here to 3 s) while a real client sends."""
    raise_fd_limit()
    cert, key = pki.client("home")
    timeout = 3.0

    async def main():
        echo = UdpEcho().start()
        cfg = server_config(pki, echo.address, hello_timeout_seconds=1.0)
        async with ut.Server(cfg) as server:
            server.transport.gate.face.header_timeout = timeout
            async with ut.Client(client_config(pki, server.address[:2], lanes=2)) as client:
                peer = await UdpPeer.open(client.udp_address[:2])
                peer.send(b"\0\0\0\0warm-up")
                assert await peer.recv()
                spec = {"host": "127.0.0.1", "port": server.address[1], "silent": 150,
                        "partial": 50, "tls": 100, "ca": str(pki.ca), "cert": str(cert),
                        "key": str(key), "server_name": pki.server_name, "hold": 20}
                traffic = asyncio.create_task(probe_traffic(peer, 2400, 400))
                t0 = time.monotonic()
                attacker = await start_attacker(spec)
                opened = time.monotonic() - t0
                result = await finish_attacker(attacker, 25)
                attacked = await traffic
                print(f"\nslowloris vs web face: 300 opened in {opened:.2f}s; under attack "
                      f"{attacked}; closed {result['closed']}, after max "
                      f"{max(result['closed_after'])}s")
                assert result["still_open"] == 0 and result["closed"] == 300, result
                # The gate's wait for a proof (1 s) then the face's header timeout (3 s).
                assert max(result["closed_after"]) < opened + 1.0 + timeout + 3.0, result
                assert attacked["loss_pct"] <= 1.0, attacked
                assert attacked["rtt_p95_ms"] < 250, attacked
                assert await wait_for(lambda: not server._pending and not len(
                    server.transport.gate.face), 5)
                stats = server.stats()
                assert stats["web_face"].get("site") == 100, stats
                assert list(server.sessions) == [("home", client.session.session_id)]
                peer.send(b"\0\0\0\x09after")
                assert await peer.recv()
                peer.close()
        echo.close()

    run_on("uvloop", main(), timeout=90)


@pytest.mark.slow
def test_slowloris_crowd_is_closed_and_real_traffic_keeps_flowing(pki):
    """300 connections that never finish (150 silent TCP, 50 half a TLS record,
    100 TLS with a valid certificate and no HELLO) while a real client sends."""
    raise_fd_limit()
    cert, key = pki.client("home")
    timeout = 3.0

    async def main():
        echo = UdpEcho().start()
        cfg = server_config(pki, echo.address, connect_timeout_seconds=timeout,
                            hello_timeout_seconds=timeout, _extra=HANDSHAKE)
        with capture_events() as cap:
            async with ut.Server(cfg) as server:
                ccfg = client_config(pki, server.address[:2], lanes=2, _extra=HANDSHAKE)
                async with ut.Client(ccfg) as client:
                    peer = await UdpPeer.open(client.udp_address[:2])
                    peer.send(b"\0\0\0\0warm-up")
                    assert await peer.recv()
                    calm = await probe_traffic(peer, 400, 400)

                    spec = {"host": "127.0.0.1", "port": server.address[1], "silent": 150,
                            "partial": 50, "tls": 100, "ca": str(pki.ca), "cert": str(cert),
                            "key": str(key), "server_name": pki.server_name, "hold": 20}
                    # Traffic runs through the whole attack: 300 connections opening
                    # (100 TLS handshakes), held, then closed by the server's timeouts.
                    traffic = asyncio.create_task(probe_traffic(peer, 2400, 400))
                    t0 = time.monotonic()
                    attacker = await start_attacker(spec)
                    opened = time.monotonic() - t0
                    peak = len(server._pending)
                    result = await finish_attacker(attacker, 25)
                    attacked = await traffic
                    print(f"\nslowloris: 300 connections opened in {opened:.2f}s, "
                          f"{peak} pending at once; traffic calm {calm}; "
                          f"under attack {attacked}; closed by the server: "
                          f"{result['closed']}, after max {max(result['closed_after'])}s")
                    assert result["still_open"] == 0, result
                    assert result["closed"] == 300
                    # Bounded: each within its timeout (+ the 1 s grace after ERR, + slack).
                    assert max(result["closed_after"]) < opened + timeout + 3.0, result
                    # The real client was not stopped.
                    assert attacked["loss_pct"] <= 1.0, attacked
                    assert attacked["rtt_p95_ms"] < 250, attacked
                    assert await wait_for(lambda: not server._pending and not server._handshakes, 5)
                    stats = server.stats()
                    assert stats["handshake_failures"].get("timeout") == 200, stats
                    assert stats["protocol_errors"].get("hello_timeout") == 100, stats
                    assert list(server.sessions) == [("home", client.session.session_id)]
                    # Logged with reasons, debounced: a handful of lines, not 300.
                    fails = cap.named("tls_handshake_fail") + cap.named("lane_refused")
                    assert {e["reason"] for e in fails} == {"timeout", "hello_timeout"}
                    assert len(fails) < 20
                    peer.send(b"\0\0\0\x09after")
                    assert await peer.recv()
                    peer.close()
        echo.close()

    run_on("uvloop", main(), timeout=90)


@pytest.mark.parametrize("loop_kind", LOOP_KINDS)
def test_pending_connections_are_capped_oldest_evicted(pki, loop_kind):
    raise_fd_limit()

    async def main():
        echo = UdpEcho().start()
        cfg = server_config(pki, echo.address, connect_timeout_seconds=30,
                            hello_timeout_seconds=30)
        with capture_events() as cap:
            async with ut.Server(cfg) as server:
                server.max_pending = 40
                socks = []
                most = 0
                for _ in range(100):
                    s = socket.create_connection(server.address[:2])
                    socks.append(s)
                    await asyncio.sleep(0.002)
                    most = max(most, len(server._pending))
                assert await wait_for(
                    lambda: server.stats()["handshake_failures"].get("evicted") == 60, 5)
                assert most <= 40 and len(server._pending) == 40

                def closed(s):
                    s.setblocking(False)
                    try:
                        return s.recv(1) == b""
                    except BlockingIOError:
                        return False
                    except OSError:
                        return True

                await asyncio.sleep(0.2)
                state = [closed(s) for s in socks]
                assert state == [True] * 60 + [False] * 40, state  # the oldest went
                evicted = cap.named("lane_evicted")
                assert 1 <= len(evicted) < 5 and evicted[0]["reason"] == "evicted"
                # A real client still gets in (its handshake evicts one more idle socket).
                async with ut.Client(client_config(pki, server.address[:2], lanes=1)) as client:
                    peer = await UdpPeer.open(client.udp_address[:2])
                    peer.send(b"through")
                    assert await peer.recv() == b"through"
                    peer.close()
                for s in socks:
                    s.close()
                assert await wait_for(lambda: not server._pending, 5)
        echo.close()

    run_on(loop_kind, main())


# ---------------------------------------------------------------------------------------
# Authenticated peers sending broken frames
# ---------------------------------------------------------------------------------------

def _hdr(magic=b"UT", ver=1, ftype=1, flags=0, length=0) -> bytes:
    return magic + bytes([ver, ftype, flags]) + length.to_bytes(4, "big")


# case: (bytes sent after an accepted HELLO, or None for pre-HELLO cases; counted reason)
BROKEN = {
    "bad_magic": (_hdr(magic=b"UU"), "bad_magic"),
    "bad_version": (_hdr(ver=2), "bad_version"),
    "bad_type": (_hdr(ftype=0x02), "bad_type"),
    "oversize_length": (_hdr(length=65536) + b"x" * 100, "too_long"),
    "huge_length": (_hdr(length=0xFFFFFFFF), "too_long"),
    "truncated_then_close": (fastpath.encode_data([b"0123456789"])[:12], "truncated"),
    "malformed_control": (fastpath.encode_frame(fastpath.TYPE_CTRL, b"\x01\x00\x00"), "bad_length"),
    "data_before_hello": (None, "data_before_hello"),
    "lane_id_beyond_max": (None, "lane_id_out_of_range"),
}
SERVER_LANES = 4
CLIENT_LANES = 2  # the real client uses lanes 0 and 1; the raw peer takes lane 3


async def _echo_all(peer: UdpPeer, tag: bytes, n: int = 40) -> int:
    for i in range(n):
        peer.send(tag + i.to_bytes(2, "big"))
    got = await peer.drain(n, timeout=5)
    return sum(1 for d in got if d.startswith(tag))


@pytest.mark.parametrize("joins", ["own_session", "real_clients_session"])
@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_frames_close_only_that_lane(pki, case, joins):
    payload, reason = BROKEN[case]

    async def main():
        echo = UdpEcho().start()
        cfg = server_config(pki, echo.address, lanes=SERVER_LANES, session_linger_seconds=30)
        async with ut.Server(cfg) as server:
            ccfg = client_config(pki, server.address[:2], lanes=CLIENT_LANES)
            async with ut.Client(ccfg) as client:
                peer = await UdpPeer.open(client.udp_address[:2])
                assert await _echo_all(peer, b"before") == 40
                real_key = ("home", client.session.session_id)
                if joins == "own_session":
                    name, sid = "office", 0x0FF1CE
                else:
                    name, sid = real_key
                raw = await RawLane.open(pki, server, name)
                if case == "data_before_hello":
                    raw.send(fastpath.encode_data([b"too early"]))
                elif case == "lane_id_beyond_max":
                    raw.send(control_frame(Hello(sid, SERVER_LANES, SERVER_LANES)))
                else:
                    reply = await raw.hello(sid, SERVER_LANES - 1, SERVER_LANES)
                    assert reply == Hello(sid, SERVER_LANES - 1, SERVER_LANES)
                    assert (name, sid) in server.sessions
                    raw.send(payload)
                    if case == "truncated_then_close":
                        await raw.writer.drain()
                        raw.writer.close()  # close_notify + FIN mid-frame
                if case != "truncated_then_close":
                    took = await raw.until_closed()
                    assert took < 2.0, took
                assert await wait_for(lambda: server.stats()["protocol_errors"].get(reason), 3), (
                    server.stats()["protocol_errors"])
                assert server.stats()["protocol_errors"] == {reason: 1}
                if payload is None:  # refused before HELLO: told why
                    errs = [m for m in raw.controls() if isinstance(m, Err)]
                    want = (ERR_PROTOCOL_ERROR if case == "data_before_hello"
                            else ERR_LANE_ID_OUT_OF_RANGE)
                    assert errs and errs[0].code == want, raw.frames
                raw.close()
                # That lane is gone, nothing else: the real session still has its lanes.
                assert await wait_for(
                    lambda: server.sessions[real_key].active_lanes == CLIENT_LANES
                    and client.stats()["lanes_active"] == CLIENT_LANES, 3)
                assert await _echo_all(peer, b"after") == 40
                if joins == "own_session" and payload is not None:
                    # The broken lane's own session survives (lingering) and still works.
                    assert (name, sid) in server.sessions
                    again = await RawLane.open(pki, server, name)
                    await again.hello(sid, 0, SERVER_LANES)
                    again.send(fastpath.encode_data([b"still here"]))
                    loop = asyncio.get_running_loop()
                    deadline = loop.time() + 5
                    while b"still here" not in again.data() and loop.time() < deadline:
                        await again.read_some(deadline - loop.time())
                    assert b"still here" in again.data()
                    again.close()
                assert server.stats()["handshake_failures"] == {}
                peer.close()
        echo.close()

    run_on("uvloop", main())


OUT_OF_PLACE = {
    # Later versions add control kinds only for peers that announce them in HELLO flags
    # (as PAD is): an unknown kind on an open lane is an error, not something to skip.
    "unknown_control": fastpath.encode_frame(fastpath.TYPE_CTRL, b"\x7fwhatever"),
    "unexpected_hello": control_frame(Hello(9, 0, 1)),
    "data_after_goodbye": control_frame(Goodbye(0)) + fastpath.encode_data([b"late"]),
    "control_after_goodbye": control_frame(Goodbye(0)) + control_frame(Goodbye(1)),
}


@pytest.mark.parametrize("loop_kind", LOOP_KINDS)
@pytest.mark.parametrize("reason", sorted(OUT_OF_PLACE))
def test_out_of_place_control_closes_only_that_lane(pki, loop_kind, reason):
    """docs/protocol.md, "Lane life cycle": each rule broken on an open lane is counted
    under its own reason, logged, answered with ERR protocol_error (unless the peer had
    already said GOODBYE, which closed the lane), and closes that lane;
    DATA before it is delivered, nothing after it; the session and its other lane live."""

    async def main():
        echo = UdpEcho().start()
        async with ut.Server(server_config(pki, echo.address, lanes=2)) as server:
            keep = await RawLane.open(pki, server)
            await keep.hello(9, 1, 2)
            raw = await RawLane.open(pki, server)
            await raw.hello(9, 0, 2)
            raw.send(fastpath.encode_data([b"before"]) + OUT_OF_PLACE[reason])
            await raw.until_closed()
            errs = [m for m in raw.controls() if isinstance(m, Err)]
            # After the peer's GOODBYE the server has already closed its side: what
            # follows is counted, with no ERR (nobody is there to read it).
            after_goodbye = reason.endswith("_after_goodbye")
            assert [e.code for e in errs] == ([] if after_goodbye else [ERR_PROTOCOL_ERROR]), (
                raw.controls())
            assert server.stats()["protocol_errors"] == {reason: 1}
            session = server.sessions[("home", 9)]
            assert session.active_lanes == 1
            keep.send(fastpath.encode_data([b"ping"]))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5
            while b"ping" not in keep.data() and loop.time() < deadline:
                assert await keep.read_some(deadline - loop.time())
            # The echo sent back what arrived: "before" (on either lane), never "late".
            got = keep.data() + raw.data()
            assert b"before" in got and b"ping" in got and b"late" not in got
            keep.close()
        echo.close()

    run_on(loop_kind, main())


@pytest.mark.parametrize("loop_kind", LOOP_KINDS)
def test_goodbye_ends_the_lane_even_if_the_peer_keeps_it_open(pki, loop_kind):
    """Issue 19 (server-side lane hygiene): a client that says GOODBYE and then holds its
    connection open gets it closed by the server within about a second."""

    async def main():
        echo = UdpEcho().start()
        async with ut.Server(server_config(pki, echo.address, lanes=1)) as server:
            raw = await RawLane.open(pki, server)
            await raw.hello(9, 0, 1)
            raw.send(control_frame(Goodbye(0)))
            took = await raw.until_closed(timeout=3.0)
            assert took < 2.0
            assert server.sessions[("home", 9)].active_lanes == 0
            assert not server.stats()["protocol_errors"]
            raw.close()
        echo.close()

    run_on(loop_kind, main())


def test_peer_that_stops_reading_is_dropped_by_tcp_user_timeout(pki):
    """An authenticated lane that never reads: the server's writes stall at the lane's
    high-water mark (the picker skips it, other lanes carry the traffic), and
    TCP_USER_TIMEOUT (lowered here to 1 s) ends it once the window stays shut."""
    import ut.tcpsock as lane_mod

    if not hasattr(socket, "TCP_USER_TIMEOUT"):
        pytest.skip("no TCP_USER_TIMEOUT on this platform")

    async def main():
        echo = UdpEcho().start()
        saved = lane_mod.LANE_USER_TIMEOUT_SECONDS
        lane_mod.LANE_USER_TIMEOUT_SECONDS = 1.0
        try:
            cfg = server_config(pki, echo.address, lanes=SERVER_LANES, tcp_buf=4096)
            async with ut.Server(cfg) as server:
                ccfg = client_config(pki, server.address[:2], lanes=CLIENT_LANES)
                async with ut.Client(ccfg) as client:
                    peer = await UdpPeer.open(client.udp_address[:2])
                    assert await _echo_all(peer, b"before") == 40
                    sid = client.session.session_id
                    cert, key = pki.client("home")
                    ctx = client_context(pki.ca, cert, key)
                    # A blocking socket with a tiny receive buffer that we never read.
                    raw = socket.socket()
                    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                    await asyncio.get_running_loop().sock_connect(raw, server.address[:2])
                    raw.setblocking(True)
                    tls = await asyncio.to_thread(
                        ctx.wrap_socket, raw, server_hostname=pki.server_name)
                    proof = ClientProver(pki.ca, cert, key).request(
                        pki.server_name, tls.get_channel_binding("tls-unique") or b"")
                    tls.sendall(proof + control_frame(Hello(sid, SERVER_LANES - 1, SERVER_LANES)))
                    session = server.sessions[("home", sid)]
                    assert await wait_for(lambda: session.active_lanes == CLIENT_LANES + 1, 5)
                    # Big echoes: a third of them head for the lane nobody reads.
                    t0 = time.monotonic()
                    got = 0
                    for _round in range(40):
                        for _ in range(30):
                            peer.send(b"big" + bytes(30000))
                        got += len(await peer.drain(30, timeout=0.5))
                        if session.active_lanes == CLIENT_LANES:
                            break
                    assert await wait_for(lambda: session.active_lanes == CLIENT_LANES, 30)
                    took = time.monotonic() - t0
                    print(f"\nnon-reading lane dropped after {took:.1f}s; "
                          f"{got} big echoes still came back meanwhile")
                    assert got > 0
                    tls.close()
                    assert await _echo_all(peer, b"after") == 40
                    peer.close()
        finally:
            lane_mod.LANE_USER_TIMEOUT_SECONDS = saved
            echo.close()

    run_on("uvloop", main(), timeout=90)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "attack":
        attacker_main(json.loads(sys.argv[2]))
    else:
        sys.exit("usage: test_hostile.py attack SPEC_JSON")
