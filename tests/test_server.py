"""Server rules seen from a hand-driven lane: HELLO first and in time, lane limits,
sessions keyed by (certificate CN, session id), one lingering UDP port per session."""

from __future__ import annotations

import asyncio

import pytest

import ut
from ut import fastpath
from ut._testbase.rawlane import RawLane
from ut._testbase.tunnelkit import (
    UdpEcho,
    UdpPeer,
    capture_events,
    client_config,
    run_on,
    server_config,
    wait_for,
)
from ut.control import (
    ERR_HELLO_TIMEOUT,
    ERR_LANE_ID_OUT_OF_RANGE,
    Err,
    Hello,
    control_frame,
    decode_control,
)


def _controls(frames) -> list:
    return [decode_control(p) for t, _f, p in frames if t == fastpath.TYPE_CTRL]


def test_lane_without_hello_is_closed_after_timeout(pki):
    async def main():
        echo = UdpEcho().start()
        cfg = server_config(pki, echo.address, hello_timeout_seconds=0.5)
        async with ut.Server(cfg) as server:
            lane = await RawLane.open(pki, server)
            t0 = asyncio.get_running_loop().time()
            frames = await lane.frames_until_closed(timeout=5)
            waited = asyncio.get_running_loop().time() - t0
            assert 0.3 <= waited < 3, waited
            errs = [m for m in _controls(frames) if isinstance(m, Err)]
            assert errs and errs[0].code == ERR_HELLO_TIMEOUT
            assert server.sessions == {}
            assert server.stats()["protocol_errors"] == {"hello_timeout": 1}
        echo.close()

    run_on("uvloop", main())


@pytest.mark.parametrize("first", ["data", "lane_too_high"])
def test_bad_first_frame_closes_only_that_lane(pki, first):
    async def main():
        echo = UdpEcho().start()
        async with ut.Server(server_config(pki, echo.address, lanes=2)) as server:
            lane = await RawLane.open(pki, server)
            if first == "data":
                lane.send(fastpath.encode_data([b"too early"]))
            else:
                lane.send(control_frame(Hello(7, 2, 2)))  # lane ids are 0 and 1
            frames = await lane.frames_until_closed()
            errs = [m for m in _controls(frames) if isinstance(m, Err)]
            assert errs, frames
            if first == "lane_too_high":
                assert errs[0].code == ERR_LANE_ID_OUT_OF_RANGE
            assert server.sessions == {}
            assert echo.received == 0
            # The server keeps serving: a proper lane still works.
            ok = await RawLane.open(pki, server)
            ok.send(control_frame(Hello(7, 1, 2)))
            reply = ok.deframer.feed(await asyncio.wait_for(ok.reader.read(65536), 5))
            assert _controls(reply) == [Hello(7, 1, 2)]
            ok.close()
        echo.close()

    run_on("uvloop", main())


def test_sessions_never_shared_across_cns_or_session_ids(pki):
    """Same session id from two CNs, and two ids from one CN: three sessions, three ports."""

    async def main():
        echo_ports: dict[bytes, set] = {}
        echo = UdpEcho().start()
        orig = echo._on_batch

        def spy(batch):
            for data, addr in batch:
                echo_ports.setdefault(data, set()).add(addr[1])
            orig(batch)

        echo.port.on_batch = spy
        async with ut.Server(server_config(pki, echo.address, lanes=1)) as server:
            lanes = []
            for name, sid in (("home", 1), ("office", 1), ("home", 2)):
                lane = await RawLane.open(pki, server, name)
                lane.send(control_frame(Hello(sid, 0, 1)))
                lane.send(fastpath.encode_data([f"{name}-{sid}".encode()]))
                lanes.append((name, sid, lane))
            assert await wait_for(lambda: echo.received == 3)
            assert set(server.sessions) == {("home", 1), ("office", 1), ("home", 2)}
            ports = [next(iter(echo_ports[f"{n}-{s}".encode()])) for n, s, _ in lanes]
            assert len(set(ports)) == 3
            # Each reply goes back only on its own session's lane.
            for name, sid, lane in lanes:
                got = lane.deframer.feed(await asyncio.wait_for(lane.reader.read(65536), 5))
                data = [p for t, _f, p in got if t == fastpath.TYPE_DATA]
                if not data:  # the HELLO reply may come alone first
                    got = lane.deframer.feed(await asyncio.wait_for(lane.reader.read(65536), 5))
                    data = [p for t, _f, p in got if t == fastpath.TYPE_DATA]
                assert data == [f"{name}-{sid}".encode()]
                lane.close()
        echo.close()

    run_on("uvloop", main())


def test_session_lingers_and_keeps_its_udp_port_across_lane_rebuild(pki):
    async def main():
        seen_ports: list[int] = []
        echo = UdpEcho().start()
        orig = echo._on_batch

        def spy(batch):
            seen_ports.extend(addr[1] for _d, addr in batch)
            orig(batch)

        echo.port.on_batch = spy
        server_cfg = server_config(pki, echo.address, session_linger_seconds=30)
        async with ut.Server(server_cfg) as server:
            cfg = client_config(pki, server.address[:2], lanes=2, idle_seconds=1)
            with capture_events() as cap:
                async with ut.Client(cfg) as client:
                    peer = await UdpPeer.open(client.udp_address[:2])
                    peer.send(b"a")
                    assert await peer.recv() == b"a"
                    assert await wait_for(lambda: cap.named("idle_close"), 5)
                    assert await wait_for(lambda: client.stats()["lanes_active"] == 0)
                    assert await wait_for(
                        lambda: all(s.active_lanes == 0 for s in server.sessions.values()))
                    assert len(server.sessions) == 1  # lingering, not gone
                    peer.send(b"b")
                    assert await peer.recv() == b"b"
                    peer.close()
            assert len(set(seen_ports)) == 1, seen_ports
        echo.close()

    run_on("uvloop", main())


def test_session_ends_after_linger(pki):
    async def main():
        echo = UdpEcho().start()
        async with ut.Server(server_config(pki, echo.address, session_linger_seconds=0.3)) as srv:
            cfg = client_config(pki, srv.address[:2], lanes=1)
            with capture_events() as cap:
                async with ut.Client(cfg) as client:
                    peer = await UdpPeer.open(client.udp_address[:2])
                    peer.send(b"x")
                    assert await peer.recv() == b"x"
                    peer.close()
                assert await wait_for(lambda: not srv.sessions, 5)
            closes = cap.named("session_close")
            assert closes and closes[0]["reason"] == "linger"
        echo.close()

    run_on("asyncio", main())


def test_server_closes_lanes_that_stay_idle_and_the_client_does_not_redial(pki):
    """Issue 19 (lane hygiene): the server closes a session's lanes after 2 ×
    tcp.idle_seconds without payload (here its own 1 s; the client would wait 60), with
    GOODBYE idle; the client takes that as an idle close: no redial until the next
    datagram, which rebuilds the lanes in the same server session."""
    async def main():
        echo = UdpEcho().start()
        server_cfg = server_config(pki, echo.address, idle_seconds=1, session_linger_seconds=30)
        async with ut.Server(server_cfg) as server:
            cfg = client_config(pki, server.address[:2], lanes=2, idle_seconds=60)
            with capture_events() as cap:
                async with ut.Client(cfg) as client:
                    peer = await UdpPeer.open(client.udp_address[:2])
                    peer.send(b"a")
                    assert await peer.recv() == b"a"
                    assert await wait_for(lambda: client.stats()["lanes_ready"] == 2)
                    assert await wait_for(lambda: client.stats()["lanes_ready"] == 0, 5)
                    (session,) = server.sessions.values()
                    assert session.active_lanes == 0
                    opens = len([e for e in cap.named("lane_open") if e["role"] == "client"])
                    await asyncio.sleep(1.0)  # no redial meanwhile
                    assert len([e for e in cap.named("lane_open") if e["role"] == "client"]) == opens
                    peer.send(b"b")
                    assert await peer.recv() == b"b"
                    assert list(server.sessions.values()) == [session]
                    peer.close()
        echo.close()

    run_on("uvloop", main())

