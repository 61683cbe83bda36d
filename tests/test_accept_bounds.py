"""New connections in bounded loop time (issue 19, point 7's flood target): at most
``limits.accept_rate`` accepted a second (a token bucket of ``limits.accept_burst``), the
rest waiting in the listen backlog, counted (``ut_limit_refusals_total{reason=
"accept_rate"}``) and logged once per window; at most ``ACCEPT_BATCH`` accepted per loop
pass; and a client whose connection waited still gets its session. In-process servers,
real TCP and TLS on loopback, both event loops."""

from __future__ import annotations

import asyncio
import socket

import pytest

import ut
from ut._testbase.rawlane import RawLane
from ut._testbase.tunnelkit import UdpEcho, capture_events, run_on, server_config, wait_for
from ut.control import Hello
from ut.server import ACCEPT_BATCH


def _connect_now(address, n: int) -> list[socket.socket]:
    """``n`` TCP connections made without yielding to the loop: when it runs again, all
    of them wait in the server's listen backlog. They never start TLS."""
    conns = []
    for _ in range(n):
        s = socket.create_connection(address[:2], timeout=5)
        conns.append(s)
    return conns


@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
def test_accept_rate_holds_connections_in_the_backlog_counted_logged_once(pki, loop_kind):
    rate, burst, n = 40, 5, 60

    async def main():
        echo = UdpEcho().start()
        cfg = server_config(pki, echo.address, connect_timeout_seconds=30,
                            _extra={"limits": {"accept_rate": rate, "accept_burst": burst}})
        async with ut.Server(cfg) as server:
            with capture_events() as cap:
                conns = _connect_now(server.address, n)
                loop = asyncio.get_running_loop()
                t0 = loop.time()
                await asyncio.sleep(0.5)
                accepted = len(server._pending)
                took = loop.time() - t0
                # The burst at once, then the rate: never more, and the backlog moves.
                assert accepted <= burst + rate * took + 2, (accepted, took)
                assert accepted >= burst + rate * 0.5 * 0.5, (accepted, took)
                # A client behind them waits its turn, then gets its session.
                lane = await RawLane.open(pki, server)
                reply = await lane.hello(1, 0, 1)
                assert isinstance(reply, Hello)
                assert len(server._pending) >= n  # everything before it was accepted
                held = server.stats()["limit_refusals"].get("accept_rate", 0)
                assert held >= n - burst - 5, held
                paced = cap.named("accept_paced")
                assert len(paced) == 1, [e["event"] for e in cap.events][-5:]  # debounced
                assert paced[0]["reason"] == "accept_rate" and paced[0]["count"] == 1
                lane.close()
                for s in conns:
                    s.close()
        echo.close()

    run_on(loop_kind, main(), timeout=30)


@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
def test_a_backlog_is_accepted_a_batch_per_loop_pass(pki, loop_kind):
    n = 6 * ACCEPT_BATCH

    async def main():
        echo = UdpEcho().start()
        cfg = server_config(pki, echo.address, connect_timeout_seconds=30,
                            _extra={"limits": {"accept_burst": 1000, "accept_rate": 100000}})
        async with ut.Server(cfg) as server:
            loop = asyncio.get_running_loop()
            seen: list[int] = [len(server._pending)]

            def watch() -> None:  # the pending count after each loop pass
                seen.append(len(server._pending))
                if len(seen) < 5000 and seen[-1] < n:
                    loop.call_soon(watch)

            conns = _connect_now(server.address, n)
            loop.call_soon(watch)
            assert await wait_for(lambda: len(server._pending) >= n, timeout=10)
            steps = [b - a for a, b in zip(seen, seen[1:], strict=False)]
            assert max(steps) <= ACCEPT_BATCH, steps
            assert sum(1 for s in steps if s > 0) >= n // ACCEPT_BATCH, steps
            for s in conns:
                s.close()
        echo.close()

    run_on(loop_kind, main(), timeout=30)
