"""Resequencing through real tunnels (issue 14): HELLO negotiation, and order restored
when one lane lags the others (a fault proxy holds one lane's bytes back)."""

from __future__ import annotations

import asyncio

import pytest

import ut
from ut._testbase.faultproxy import FaultProxy
from ut._testbase.tunnelkit import (
    UdpEcho,
    UdpPeer,
    client_config,
    run_on,
    server_config,
    tunnel,
    wait_for,
)


@pytest.mark.parametrize("client_reseq, server_reseq", [
    (True, True), (True, False), (False, True), (False, False)])
def test_each_end_numbers_only_what_its_peer_asked_for(pki, client_reseq, server_reseq):
    async def main():
        async with tunnel(pki, lanes=2, client_tcp={"resequence": client_reseq},
                          server_tcp={"resequence": server_reseq}) as t:
            for i in range(20):
                t.peer.send(b"x%d" % i)
            got = await t.peer.drain(20)
            assert sorted(got) == sorted(b"x%d" % i for i in range(20))
            client_session = t.client.session
            (server_session,) = t.server.sessions.values()
            # FLAG_SEQ on a HELLO asks the other end for numbered DATA.
            assert client_session.tx_numbered is server_reseq
            assert server_session.tx_numbered is client_reseq
            assert client_session.tx_seq == (20 if server_reseq else 0)
            assert server_session.tx_seq == (20 if client_reseq else 0)

    run_on("uvloop", main())


def test_numbering_is_off_with_hash_picking(pki):
    async def main():
        async with tunnel(pki, lanes=2, client_tcp={"lane_pick": "hash"},
                          server_tcp={"lane_pick": "hash"}) as t:
            t.peer.send(b"\x04" + bytes(40))
            assert await t.peer.recv()
            assert t.client.session.tx_seq == 0  # asked for, but hash keeps flows on one lane

    run_on("uvloop", main())


async def _lagging_lane_run(pki, resequence: bool, n: int = 600) -> tuple[list[int], dict]:
    echo = UdpEcho().start()
    server = ut.Server(server_config(pki, echo.address, lanes=3, resequence=resequence))
    await server.start()
    proxy = await FaultProxy(server.address[:2]).start()
    client = ut.Client(client_config(pki, proxy.address, lanes=3, resequence=resequence))
    await client.start()
    peer = await UdpPeer.open(client.udp_address[:2])
    try:
        peer.send(b"warm-up")
        assert await peer.recv() == b"warm-up"
        assert await wait_for(lambda: client.session.lanes_ready == 3 and len(proxy.live) == 3)
        proxy.live[0].lag_ms = 25.0  # one lane lags both ways
        for i in range(n):
            # (larger than REORDER_PASS_BYTES: small datagrams are not held)
            peer.send(i.to_bytes(4, "big") + bytes(600))
            if i % 4 == 3:
                await asyncio.sleep(0.002)  # small bursts, so every lane gets some
        got = await peer.drain(n, timeout=15)
        return [int.from_bytes(d[:4], "big") for d in got], client.stats()
    finally:
        peer.close()
        await client.close()
        await proxy.close()
        await server.close()
        echo.close()


def _inversions(order: list[int]) -> int:
    return sum(1 for a, b in zip(order, order[1:], strict=False) if b < a)


def test_a_lagging_lane_does_not_reorder_datagrams(pki):
    order, stats = run_on("uvloop", _lagging_lane_run(pki, True))
    assert sorted(order) == list(range(600)), "datagrams missing or doubled"
    # The wait starts short and learns the lag from the first gaps (the lag is in the
    # proxy, so the lanes' TCP round trips cannot tell it): after that, all in order.
    assert order[200:] == list(range(order[200], 600)), order
    # Every number given up came late: nothing was lost (loopback lanes do not die).
    assert stats["reorder_skipped"] == stats["reorder_late"]


def test_without_resequencing_the_same_lag_reorders(pki):
    # The control experiment: the lag above really reorders datagrams, all along.
    order, stats = run_on("uvloop", _lagging_lane_run(pki, False))
    assert sorted(order) == list(range(600))
    assert _inversions(order[200:]) > 5
    assert stats["reorder_skipped"] == 0
