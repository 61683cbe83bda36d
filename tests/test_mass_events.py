"""Mass events on a server in bounded loop passes (issue 19, point 4): lingering sessions
end in batches, per-session log lines give way to a summary when they come by the
hundred, and a stop does not wait long for peers that never answer a close."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time

import ut
from ut import fastpath
from ut._testbase.tunnelkit import UdpEcho, capture_events, run_on, server_config, wait_for
from ut.control import Hello, control_frame
from ut.server import CLOSE_GRACE_SECONDS, LINGER_BATCH, MASS_LOG_BURST

N = 2 * LINGER_BATCH + 50


def test_lingering_sessions_end_in_batches_and_their_lines_are_summarised(pki):
    async def main():
        echo = UdpEcho().start()
        loop = asyncio.get_running_loop()
        async with ut.Server(server_config(pki, echo.address, session_linger_seconds=0.2)) as server:
            with capture_events() as cap:
                sessions = [server._new_session("home", sid) for sid in range(N)]
                for s in sessions:
                    server.start_linger(s)
                kept = sessions[7]
                kept.active_lanes = 1  # as if a lane had come back and taken it off the list
                server.stop_linger(kept)
                passes = []

                def watch():  # how many sessions each loop pass ended
                    passes.append(N - len(server.sessions))
                    if len(server.sessions) > 1 and len(passes) < 10_000:
                        loop.call_soon(watch)

                await asyncio.sleep(0.15)
                loop.call_soon(watch)
                assert await wait_for(lambda: len(server.sessions) == 1, timeout=5)
                steps = [b - a for a, b in zip(passes, passes[1:], strict=False)]
                assert max(steps) <= LINGER_BATCH, steps
                assert list(server.sessions.values()) == [kept]
                assert server.sessions_per_cn == {"home": 1}
                await asyncio.sleep(1.2)  # the line budget's window ends: its summary
                closes = cap.named("session_close")
                assert len(closes) + len(cap.named("session_open")) <= 2 * MASS_LOG_BURST
                summary = cap.named("log_summary")
                assert summary, [e["event"] for e in cap.events][-5:]
                suppressed = {}
                for line in summary:
                    for key, n in line["suppressed"].items():
                        suppressed[key] = suppressed.get(key, 0) + n
                # Every line is either written or counted.
                assert len(closes) + suppressed.get("session_close:linger", 0) == N - 1
            kept.active_lanes = 0
        echo.close()

    run_on("uvloop", main())


def _silent_peer(addr, pki, ready: threading.Event, stop: threading.Event) -> None:
    """A client that says HELLO and then never reads again (its loop stuck, say)."""
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    cert, key = pki.client("home")
    ctx.load_cert_chain(str(cert), str(key))
    raw = socket.create_connection(addr, timeout=5)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    with ctx.wrap_socket(raw, server_hostname=pki.server_name) as tls:
        tls.sendall(control_frame(Hello(5, 0, 1)))
        tls.recv(4096)  # the server's HELLO
        ready.set()
        stop.wait(10)


def test_stop_does_not_wait_for_peers_that_never_answer_the_close(pki):
    async def main():
        echo = UdpEcho().start()
        cfg = server_config(pki, echo.address, _extra={"tls": {"client_auth": "handshake"}})
        server = ut.Server(cfg)
        await server.start()
        ready, stop = threading.Event(), threading.Event()
        peer = threading.Thread(target=_silent_peer,
                                args=(server.address[:2], pki, ready, stop), daemon=True)
        peer.start()
        try:
            assert await asyncio.get_running_loop().run_in_executor(None, ready.wait, 5)
            assert await wait_for(lambda: server.lanes_total == 1)
            session = next(iter(server.sessions.values()))
            # Fill the lane towards the peer that does not read, so the close cannot finish.
            session.lanes[0].transport.write(fastpath.encode_data([bytes(60000)] * 40))
            t0 = time.monotonic()
            await server.close()
            took = time.monotonic() - t0
            assert took < CLOSE_GRACE_SECONDS + 0.8, took
            assert server.lanes_total == 0
        finally:
            stop.set()
            peer.join(5)
            echo.close()

    run_on("uvloop", main())


async def _lanes(pki, server, sids, ctx) -> list:
    """One lane per session id in ``sids`` (HELLO answered), 16 dials at a time."""
    out: list = []
    todo = iter(sids)

    async def worker() -> None:
        for sid in todo:
            r, w = await asyncio.open_connection(*server.address[:2], ssl=ctx,
                                                 server_hostname=pki.server_name)
            w.write(control_frame(Hello(sid, 0, 1)))
            assert await asyncio.wait_for(r.read(65536), 10)  # the server's HELLO
            if ctx.resume_session is None:
                ctx.resume_session = w.get_extra_info("ssl_object").session
            out.append(w)

    await asyncio.gather(*(worker() for _ in range(16)))
    return out


def test_lanes_reset_together_are_unregistered_in_batches(pki):
    from ut.server import LOST_BATCH
    from ut.tls import client_context

    n = 2 * LOST_BATCH + 50

    async def main():
        echo = UdpEcho().start()
        cfg = server_config(pki, echo.address, session_linger_seconds=30,
                            _extra={"tls": {"client_auth": "handshake"},
                                    "limits": {"max_sessions_per_cn": 1000}})
        loop = asyncio.get_running_loop()
        async with ut.Server(cfg) as server:
            ctx = client_context(pki.ca, *pki.client("home"))
            writers = await _lanes(pki, server, range(n), ctx)
            assert await wait_for(lambda: server.lanes_total == n)
            seen = [server.lanes_total]

            def watch() -> None:  # lanes still counted after each loop pass
                seen.append(server.lanes_total)
                if seen[-1] and len(seen) < 10_000:
                    loop.call_soon(watch)

            for w in writers:  # all at once, no TLS close: a path that died
                w.transport.abort()
            loop.call_soon(watch)
            assert await wait_for(lambda: server.lanes_total == 0, timeout=10)
            steps = [a - b for a, b in zip(seen, seen[1:], strict=False)]
            assert max(steps) <= LOST_BATCH, steps
            assert len(server._lingering) == n  # every session lingers, none lost
            assert all(s.active_lanes == 0 for s in server.sessions.values())
            assert server.stats()["lanes_active"] == 0
            # They all come back into their sessions (the same ids): counted once each.
            writers = await _lanes(pki, server, range(n), ctx)
            assert await wait_for(lambda: server.lanes_total == n)
            assert not server._lingering and len(server.sessions) == n
            assert all(s.active_lanes == 1 for s in server.sessions.values())
            for w in writers:
                w.transport.abort()
        echo.close()

    run_on("uvloop", main(), timeout=60)


def test_lanes_that_end_are_freed_without_waiting_for_the_garbage_collector(pki):
    """A lane's transport is dropped once its connection is gone (in batches), so a lane
    refused at a bound is freed by reference counting: a flood of refused connections
    left thousands of dead lanes with their SSL objects for Python's full collection,
    which then held the loop ~200 ms in one go."""
    import gc

    from ut.lane import Lane
    from ut.tls import client_context

    n = 40

    async def main():
        echo = UdpEcho().start()
        cfg = server_config(pki, echo.address,
                            _extra={"tls": {"client_auth": "handshake"},
                                    "limits": {"max_sessions_per_cn": 1}})
        async with ut.Server(cfg) as server:
            ctx = client_context(pki.ca, *pki.client("home"))
            gc.collect()
            gc.disable()  # what is freed from here on is freed by reference counting
            kept = []
            try:
                for sid in range(n):  # the first gets its session, the others ERR limit
                    r, w = await asyncio.open_connection(*server.address[:2], ssl=ctx,
                                                         server_hostname=pki.server_name)
                    kept.append(w)
                    w.write(control_frame(Hello(sid, 0, 1)))
                    assert await asyncio.wait_for(r.read(65536), 10)  # HELLO, or ERR limit
                    if sid:
                        w.transport.abort()  # refused: gone at once, as a flood does
                assert server.stats()["limit_refusals"]["sessions_per_cn"] == n - 1
                await asyncio.sleep(1.5)  # a refused lane's abort timer (1 s) holds it
                alive = [o for o in gc.get_objects() if isinstance(o, Lane)]
                server_lanes = [lane for lane in alive if lane.owner is server]
                # The one with a session, and the last accepted (the accept loop's local).
                assert len(server_lanes) <= 2, len(server_lanes)
            finally:
                gc.enable()
                kept[0].transport.abort()
        echo.close()

    run_on("uvloop", main(), timeout=60)
