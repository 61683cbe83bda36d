"""Hundreds of lanes reconnecting at once (issue 19, point 4): many clients, each with its
own CN, lose every lane in the same instant and redial as clients do. Every one comes
back into its own session (same session, same UDP port towards WireGuard), the server's
counts come back exact, and new connections went through ``limits.accept_rate`` (held in
the backlog, none refused). The figures about time (the server's loop stall, an honest
client's round trip) are ``bench/abuse.py --phases crowd``. In-process server and
clients, real TCP and TLS on loopback."""

from __future__ import annotations

import asyncio

import ut
from ut._testbase.tunnelkit import UdpEcho, client_config, run_on, server_config, wait_for

CLIENTS = 40
LANES = 5


def test_a_crowd_cut_at_once_comes_back_into_its_sessions(pki):
    async def main():
        echo = UdpEcho().start()
        cfg = server_config(pki, echo.address, lanes=LANES, session_linger_seconds=30,
                            _extra={"limits": {"accept_rate": 100, "accept_burst": 16}})
        async with ut.Server(cfg) as server:
            clients = []
            wg = await asyncio.get_running_loop().create_datagram_endpoint(
                asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0))
            try:
                for i in range(CLIENTS):
                    ccfg = client_config(pki, server.address, cert=pki.client(f"crowd-{i}"),
                                         lanes=LANES)
                    client = ut.Client(ccfg)
                    await client.start()
                    clients.append(client)
                    wg[0].sendto(b"\0" * 32, client.udp_address[:2])  # it dials
                total = CLIENTS * LANES
                assert await wait_for(lambda: server.lanes_total == total, timeout=20)
                ports = {key: s.udp.address for key, s in server.sessions.items()}
                assert len(ports) == CLIENTS
                cut = [lane for c in clients for lane in c.session.lanes if lane is not None]
                assert len(cut) == total
                t0 = asyncio.get_running_loop().time()
                for lane in cut:
                    lane.transport.abort()

                def back() -> bool:
                    return all(sum(1 for lane in c.session.lanes
                                   if lane is not None and lane not in cut) == LANES
                               for c in clients)

                assert await wait_for(back, timeout=20)
                took = asyncio.get_running_loop().time() - t0
                print(f"\n{total} lanes of {CLIENTS} clients back in {took:.2f} s")
                assert await wait_for(lambda: server.lanes_total == total, timeout=5)
                # Every client is back in its own session: same keys, same UDP ports.
                assert {key: s.udp.address for key, s in server.sessions.items()} == ports
                assert all(s.active_lanes == LANES for s in server.sessions.values())
                assert not server._lingering
                refusals = server.stats()["limit_refusals"]
                assert refusals.get("accept_rate", 0) > 0, refusals  # the burst was met
                assert not {k: n for k, n in refusals.items() if k != "accept_rate" and n}
            finally:
                for client in clients:
                    await client.close()
                wg[0].close()
        echo.close()

    run_on("uvloop", main(), timeout=60)
