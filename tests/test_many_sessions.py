"""Many concurrent sessions against one server on loopback (issue 5).

120 ``ut.Client`` objects in one loop (one lane each): 60 certificate CNs with two
clients each, so sessions differ by CN *and*, within a CN, by session id. Each session
gets its own UDP socket on the server, and each client's WireGuard stand-in gets back
exactly its own datagrams: no cross-talk, even when all of them send at once.
"""

from __future__ import annotations

import asyncio
import resource
import time
from collections import Counter

import pytest

import ut
from ut._testbase.tunnelkit import (
    LOOP_KINDS,
    UdpEcho,
    UdpPeer,
    client_config,
    run_on,
    server_config,
)

CNS = 60
PER_CN = 2
ROUNDS = 20




@pytest.mark.parametrize("loop_kind", LOOP_KINDS)
def test_120_sessions_each_with_its_own_port_and_no_cross_talk(pki, loop_kind):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    certs = {f"c{i:02d}": pki.client(f"c{i:02d}") for i in range(CNS)}

    async def main():
        echo = UdpEcho().start()
        ports_seen: dict[bytes, set] = {}
        orig = echo._on_batch

        def spy(batch):  # which server UDP port each tag came from
            for data, addr in batch:
                ports_seen.setdefault(data.split(b"|")[0], set()).add(addr[1])
            orig(batch)

        echo.port.on_batch = spy
        cfg = server_config(pki, echo.address, lanes=1)
        async with ut.Server(cfg) as server:
            clients, peers, tags = [], [], []
            try:
                t0 = time.monotonic()
                for cn, cert in certs.items():
                    for j in range(PER_CN):
                        c = ut.Client(client_config(pki, server.address[:2], cert=cert, lanes=1))
                        await c.start()
                        clients.append(c)
                        peers.append(await UdpPeer.open(c.udp_address[:2]))
                        tags.append(f"{cn}-{j}".encode())
                # Everyone at once: the first datagram of each dials its lane.
                for rnd in range(ROUNDS):
                    for peer, tag in zip(peers, tags, strict=True):
                        peer.send(tag + b"|" + rnd.to_bytes(2, "big"))
                    await asyncio.sleep(0.005)
                got = await asyncio.gather(*(p.drain(ROUNDS, timeout=15) for p in peers))
                took = time.monotonic() - t0
                n = len(clients)
                print(f"\n{n} sessions up and {n * ROUNDS} datagrams echoed in {took:.2f}s "
                      f"({loop_kind})")
                for tag, datagrams in zip(tags, got, strict=True):
                    assert {d.split(b"|")[0] for d in datagrams} == {tag}, (tag, datagrams[:3])
                    assert sorted(int.from_bytes(d.split(b"|")[1], "big") for d in datagrams) \
                        == list(range(ROUNDS)), tag
                assert len(server.sessions) == n == CNS * PER_CN
                keys = {(c.session.client_cn, c.session.session_id) for c in clients}
                assert set(server.sessions) == keys
                # One UDP socket per session, towards WireGuard, and each tag used only its own.
                local_ports = {s.udp.address[1] for s in server.sessions.values()}
                assert len(local_ports) == n
                assert all(len(ports) == 1 for ports in ports_seen.values())
                assert len({next(iter(p)) for p in ports_seen.values()}) == n
                stats = server.stats()
                assert stats["sessions_active"] == n and stats["lanes_active"] == n
                per_cn = Counter(cn for cn, _sid in server.sessions)
                assert set(per_cn.values()) == {PER_CN} and len(per_cn) == CNS
                assert {cn: v["sessions_active"] for cn, v in stats["by_cn"].items()} == {
                    cn: PER_CN for cn in certs}
                assert stats["dropped"] == 0 and stats["handshake_failures"] == {}
                for c in clients:
                    s = c.stats()
                    assert s["udp_in_packets"] == s["udp_out_packets"] == ROUNDS
            finally:
                for p in peers:
                    p.close()
                await asyncio.gather(*(c.close() for c in clients))
            assert not server.sessions or all(s.active_lanes == 0 for s in server.sessions.values())
        echo.close()

    run_on(loop_kind, main(), timeout=120)
