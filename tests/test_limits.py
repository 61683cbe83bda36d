"""The server's resource bounds (issue 19, point 2; ``limits:``): sessions per CN and
in all, lanes in all, pending connections, the queued-bytes budget. Each is met with a
counted refusal (ERR ``limit``, ``ut_limit_refusals_total{reason}``) or, for the budget,
counted drops (``budget``), while what is established goes on. In-process servers and
hand-driven lanes on loopback; the budget's shedding runs on both fast paths."""

from __future__ import annotations

import asyncio
import socket

import pytest

import ut
from ut import fastpath
from ut._testbase.rawlane import RawLane
from ut._testbase.tunnelkit import (
    capture_events,
    run_on,
    server_config,
    use_implementation,
    wait_for,
)
from ut.control import ERR_LIMIT, Err, Hello, control_frame, decode_control


def _controls(frames) -> list:
    return [decode_control(p) for t, _f, p in frames if t == fastpath.TYPE_CTRL]


async def _hello(pki, server, sid: int, lane_id: int = 0, name: str = "home") -> tuple[RawLane, list]:
    """Open a lane, say HELLO, return it with the control messages of the answer (the
    server's HELLO, or ERR and a close)."""
    lane = await RawLane.open(pki, server, name)
    lane.send(control_frame(Hello(sid, lane_id, 5)))
    if not await lane.read_some(timeout=5):
        return lane, []
    msgs = _controls(lane.frames)
    if msgs and isinstance(msgs[0], Err):
        await lane.frames_until_closed(timeout=5)
    return lane, _controls(lane.frames)


def _cfg(pki, wg, **limits):
    return server_config(pki, wg, session_linger_seconds=30, _extra={"limits": limits})


class _Wg:
    """WireGuard's stand-in: a UDP socket the sessions send to, which can also send
    datagrams into a session's port (what WireGuard sends a client)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.address = self.sock.getsockname()

    def send_to(self, addr, payload: bytes, n: int) -> None:
        for _ in range(n):
            self.sock.sendto(payload, addr)

    def close(self) -> None:
        self.sock.close()


def test_sessions_per_cn_refused_with_err_limit_lingering_give_way(pki):
    async def main():
        wg = _Wg()
        async with ut.Server(_cfg(pki, wg.address, max_sessions_per_cn=2)) as server:
            with capture_events() as cap:
                a, ma = await _hello(pki, server, 1)
                b, mb = await _hello(pki, server, 2)
                assert isinstance(ma[0], Hello) and isinstance(mb[0], Hello)
                # Both sessions have their lane: a third session of this CN is refused.
                c, mc = await _hello(pki, server, 3)
                assert [m.code for m in mc if isinstance(m, Err)] == [ERR_LIMIT], mc
                assert set(server.sessions) == {("home", 1), ("home", 2)}
                # Another CN is not concerned.
                d, md = await _hello(pki, server, 1, name="other")
                assert isinstance(md[0], Hello)
                # A lane of an existing session still joins it.
                e, me = await _hello(pki, server, 1, lane_id=1)
                assert isinstance(me[0], Hello)
                # Session 1 loses its lanes and lingers: a new session takes its place.
                a.close()
                e.close()
                assert await wait_for(lambda: server.sessions[("home", 1)].active_lanes == 0)
                f, mf = await _hello(pki, server, 4)
                assert isinstance(mf[0], Hello), mf
                assert ("home", 1) not in server.sessions and ("home", 4) in server.sessions
                assert server.stats()["limit_refusals"] == {"sessions_per_cn": 1}
                refused = cap.named("lane_refused")
                assert [r["reason"] for r in refused] == ["sessions_per_cn"]
                assert any(e["event"] == "session_close" and e["reason"] == "limit"
                           for e in cap.events)
            for lane in (b, c, d, f):
                lane.close()
        wg.close()

    run_on("uvloop", main())


def test_sessions_in_all_and_lanes_in_all(pki):
    async def main():
        wg = _Wg()
        async with ut.Server(_cfg(pki, wg.address, max_sessions=2, max_lanes=3)) as server:
            a, ma = await _hello(pki, server, 1)
            b, mb = await _hello(pki, server, 1, name="other")
            c, mc = await _hello(pki, server, 2, name="third")
            assert [m.code for m in mc if isinstance(m, Err)] == [ERR_LIMIT]
            d, md = await _hello(pki, server, 1, lane_id=1)  # third lane: fits
            assert isinstance(md[0], Hello)
            e, me = await _hello(pki, server, 1, lane_id=2)  # fourth lane: over
            assert [m.code for m in me if isinstance(m, Err)] == [ERR_LIMIT]
            assert server.lanes_total == 3
            # A lane that takes the place of one of its session's lanes adds none.
            f, mf = await _hello(pki, server, 1, lane_id=1)
            assert isinstance(mf[0], Hello)
            assert await wait_for(lambda: server.lanes_total == 3)
            assert server.stats()["limit_refusals"] == {"sessions": 1, "lanes": 1}
            assert server.stats()["lanes_active"] == 3
            for lane in (a, b, c, d, e, f):
                lane.close()
            assert await wait_for(lambda: server.lanes_total == 0)
        wg.close()

    run_on("uvloop", main())


def test_max_pending_comes_from_the_config(pki):
    async def main():
        wg = _Wg()
        async with ut.Server(_cfg(pki, wg.address, max_pending=3)) as server:
            assert server.max_pending == 3
            idle = [await asyncio.open_connection(*server.address[:2]) for _ in range(5)]
            assert await wait_for(lambda: server.stats()["handshake_failures"].get("evicted") == 2)
            for _r, w in idle:
                w.close()
        wg.close()

    run_on("uvloop", main())


@pytest.mark.parametrize("impl", ["compiled", "pure"])
def test_queue_budget_sheds_the_longest_queues_counted_as_budget(pki, impl):
    """Three sessions with no lane (lingering) get datagrams from WireGuard: their queues
    together stay within limits.queue_budget_bytes, the fullest giving first, and every
    datagram shed is counted as ``budget``."""
    budget = 200_000

    async def main():
        wg = _Wg()
        cfg = server_config(pki, wg.address, session_linger_seconds=30,
                            _extra={"limits": {"queue_budget_bytes": budget},
                                    "queue": {"max_age_seconds": 0}})
        async with ut.Server(cfg) as server:
            lanes = [(await _hello(pki, server, sid))[0] for sid in (1, 2, 3)]
            for lane in lanes:
                lane.close()
            assert await wait_for(lambda: all(s.active_lanes == 0 for s in server.sessions.values()))
            ports = {sid: server.sessions[("home", sid)].udp.address for sid in (1, 2, 3)}
            # Session 1 a little, sessions 2 and 3 far more than the budget.
            wg.send_to(ports[1], b"a" * 1000, 20)
            for _ in range(10):
                wg.send_to(ports[2], b"b" * 1000, 20)
                wg.send_to(ports[3], b"c" * 1000, 20)
                await asyncio.sleep(0.01)
            s = server.stats()
            assert await wait_for(lambda: server.stats()["udp_in_packets"] == 420)
            s = server.stats()
            queued = {sid: server.sessions[("home", sid)].queue.nbytes for sid in (1, 2, 3)}
            assert server.budget.nbytes == sum(queued.values()) <= budget + 20 * 1000
            assert queued[1] == 20_000  # the light session lost nothing
            assert s["drops"].get("budget", 0) > 0
            assert s["drops"].get("budget", 0) == 420 - s["queue_len"]
            assert abs(queued[2] - queued[3]) <= 20_000
        wg.close()

    with use_implementation(impl):
        run_on("uvloop", main())
