"""Faults on loopback, and the datagram ledger that must balance after each (issue 5).

Nothing is lost silently: for every fault below, every datagram a WireGuard stand-in
sent is either delivered, counted as dropped (with a reason), still queued, or lost in
flight on a lane that died -- and that last term is counted too, from both ends:

    per end:    udp_in   = lane_tx + drops(in path) + queue_len
                lane_rx  = udp_out + drops(out path)
    per direction, across the ends (lanes are TCP: what one end wrote and the other
    never read was in a socket buffer or on the wire when its lane died):
                lost_up   = client lane_tx - server lane_rx  >= 0
                lost_down = server lane_tx - client lane_rx  >= 0

(docs/metrics.md, "Accounting identity".) Instances that were restarted contribute
their final counts. Faults: a fault proxy between client and server (cut, stall,
corrupt), the WireGuard side's UDP port closing and coming back, the local sender
changing port, server/client/both restarts, and a flood far beyond a throttled link
against a real ``python -m ut`` client process whose RSS is sampled from /proc.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

import ut
from ut._testbase.faultproxy import FaultProxy
from ut._testbase.tunnelkit import (
    UdpEcho,
    UdpPeer,
    capture_events,
    client_config,
    run_on,
    server_config,
    wait_for,
)
from ut.stats import DROP_PATH
from ut.udp import UdpPort, open_udp_socket

ROOT = Path(__file__).resolve().parents[1]
IN_REASONS = {r for r, path in DROP_PATH.items() if path == "in"}
OUT_REASONS = {r for r, path in DROP_PATH.items() if path == "out"}




# ---------------------------------------------------------------------------------------
# The ledger
# ---------------------------------------------------------------------------------------

@dataclass
class EndTotals:
    udp_in: int = 0
    udp_out: int = 0
    lane_tx: int = 0
    lane_rx: int = 0
    drops_in: int = 0
    drops_out: int = 0
    drops_socket: int = 0  # dropped by the kernel at the full UDP socket: never read
    queue: int = 0
    drops: dict | None = None


def totals(snaps: list[dict]) -> EndTotals:
    """Sum the ``stats()`` snapshots of every instance of one role (restarts add up)."""
    t = EndTotals(drops={})
    for s in snaps:
        t.udp_in += s["udp_in_packets"]
        t.udp_out += s["udp_out_packets"]
        t.lane_tx += sum(s["lane_tx_frames"])
        t.lane_rx += sum(s["lane_rx_frames"])
        t.queue += s["queue_len"]
        for reason, n in s["drops"].items():
            assert reason in DROP_PATH, reason
            t.drops[reason] = t.drops.get(reason, 0) + n
            if DROP_PATH[reason] == "in":
                t.drops_in += n
            elif DROP_PATH[reason] == "out":
                t.drops_out += n
            else:
                t.drops_socket += n
    return t


def ledger(client_snaps: list[dict], server_snaps: list[dict]) -> dict:
    """Check every identity; return the terms (``lost_*`` = died in flight on a lane)."""
    c, s = totals(client_snaps), totals(server_snaps)
    for name, e in (("client", c), ("server", s)):
        assert e.udp_in == e.lane_tx + e.drops_in + e.queue, (name, e)
        assert e.lane_rx == e.udp_out + e.drops_out, (name, e)
    lost_up, lost_down = c.lane_tx - s.lane_rx, s.lane_tx - c.lane_rx
    assert lost_up >= 0 and lost_down >= 0, (c, s)
    return {"client": c, "server": s, "lost_up": lost_up, "lost_down": lost_down}


def assert_chain(led: dict, *, peer_sent: int, peer_received: int, echo_received: int,
                 exact: bool = True) -> None:
    """Tie the ledger to what the stand-ins outside the tunnel counted.

    ``exact``: no UDP port was closed, so loopback lost nothing outside the tunnel
    and the outside counts equal the tunnel's (the echo answers every datagram).
    Otherwise datagrams sent into a closed port never got in (``peer_sent`` may be
    larger) or never reached anyone after they left (the receivers' counts may be
    smaller).
    """
    c, s = led["client"], led["server"]
    if exact:
        assert (peer_sent, echo_received, echo_received, peer_received) == (
            c.udp_in + c.drops_socket, s.udp_out, s.udp_in + s.drops_socket, c.udp_out), led
    else:
        assert peer_sent >= c.udp_in, led
        assert echo_received <= s.udp_out and s.udp_in <= echo_received, led
        assert peer_received <= c.udp_out, led


async def settle(*probes, quiet: float = 0.6, timeout: float = 15.0) -> None:
    """Wait until every ``probe()`` value stops changing for ``quiet`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last, since = None, loop.time()
    while loop.time() < deadline:
        now = tuple(p() for p in probes)
        if now != last:
            last, since = now, loop.time()
        elif loop.time() - since >= quiet:
            return
        await asyncio.sleep(0.05)


class Traffic:
    """Numbered datagrams at a steady rate from the current ``UdpPeer``; counts what
    left the socket and what came back (per sequence number)."""

    def __init__(self, size: int = 300) -> None:
        self.size = size
        self.sent = 0
        self.refused = 0
        self.sent_at: dict[int, float] = {}
        self.got: set[int] = set()
        self.peer: UdpPeer | None = None
        self.peers: list[UdpPeer] = []

    def use(self, peer: UdpPeer) -> None:
        self.peer = peer
        self.peers.append(peer)

    def send_one(self) -> None:
        seq = self.sent + self.refused
        try:
            self.peer.send(seq.to_bytes(4, "big") + bytes(self.size - 4))  # type: ignore[union-attr]
        except OSError:  # ECONNREFUSED: the client's port was closed (restart)
            self.refused += 1
            return
        self.sent_at[seq] = time.monotonic()
        self.sent += 1

    async def run(self, rate: float, seconds: float) -> None:
        t0 = time.monotonic()
        n = int(rate * seconds)
        for i in range(n):
            self.send_one()
            await asyncio.sleep(max(0.0, t0 + (i + 1) / rate - time.monotonic()))

    def collect(self) -> int:
        for p in self.peers:
            while not p.inbox.empty():
                self.got.add(int.from_bytes(p.inbox.get_nowait()[:4], "big"))
        return len(self.got)

    def received_after(self, t: float) -> float:
        """Fraction of datagrams sent after monotonic time ``t`` that came back."""
        self.collect()
        late = [s for s, at in self.sent_at.items() if at >= t]
        return sum(1 for s in late if s in self.got) / max(1, len(late))


class LoosePeer(UdpPeer):
    """A UdpPeer on an *unconnected* socket, as WireGuard's is: while the client's port
    is closed (a restart), its datagrams vanish without ICMP errors coming back to it.
    (A connected socket would get them, and on uvloop an error event stops its reader:
    see ``ut.udp.UdpPort._error``.)"""

    def __init__(self, target: tuple[str, int]) -> None:
        self.inbox: asyncio.Queue[bytes] = asyncio.Queue()
        self.target = target
        sock = open_udp_socket(bind=("127.0.0.1", 0))
        self.port = UdpPort(asyncio.get_running_loop(), sock, self._on_batch)
        self.port.start()

    def send(self, data: bytes) -> None:
        self.port.sock.sendto(data, self.target)


class CountingEcho(UdpEcho):
    """A UdpEcho that can go away and come back on the same port."""

    def restart_on(self, addr: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        self.port = UdpPort(loop, open_udp_socket(bind=addr), self._on_batch)
        self.port.start()


# ---------------------------------------------------------------------------------------
# Fault proxy: cut, stall, corrupt
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
def test_lane_cut_midtransfer_client_redials_and_ledger_balances(pki, loop_kind):
    async def main():
        echo = UdpEcho().start()
        async with ut.Server(server_config(pki, echo.address, lanes=3)) as server:
            async with FaultProxy(server.address[:2]) as proxy:
                async with ut.Client(client_config(pki, proxy.address, lanes=3)) as client:
                    traffic = Traffic()
                    traffic.use(await UdpPeer.open(client.udp_address[:2]))
                    run = asyncio.create_task(traffic.run(rate=600, seconds=3.0))
                    await asyncio.sleep(0.8)
                    cut1 = proxy.cut()
                    await asyncio.sleep(0.8)
                    cut2 = proxy.cut()
                    t_after = time.monotonic() + 0.3
                    await run
                    await settle(traffic.collect, lambda: client.stats()["lane_tx_frames"])
                    led = ledger([client.stats()], [server.stats()])
                    assert_chain(led, peer_sent=traffic.sent, peer_received=traffic.collect(),
                                 echo_received=echo.received)
                    print(f"\ncut {cut1}+{cut2} connections: sent {traffic.sent}, back "
                          f"{traffic.collect()}, lost in flight up {led['lost_up']} / down "
                          f"{led['lost_down']}, drops {led['client'].drops} {led['server'].drops}")
                    assert cut1 == cut2 == 3
                    assert client.stats()["lane_reconnects"] >= 6
                    assert traffic.received_after(t_after) >= 0.99  # resumed
                    # What was lost died in flight (counted above), nothing else.
                    assert traffic.sent - traffic.collect() == (
                        led["lost_up"] + led["lost_down"] + led["client"].drops_in
                        + led["client"].drops_out + led["server"].drops_in
                        + led["server"].drops_out)
                    for p in traffic.peers:
                        p.close()
        echo.close()

    run_on(loop_kind, main())


def test_stall_fills_the_queue_drop_oldest_counted_newest_delivered(pki):
    async def main():
        echo = UdpEcho().start()
        async with ut.Server(server_config(pki, echo.address, lanes=2)) as server:
            async with FaultProxy(server.address[:2]) as proxy:
                # AQM off: this is about drop-oldest; after the stall CoDel would drop
                # some of the queue's head as well (tests/test_aqm.py).
                ccfg = client_config(pki, proxy.address, lanes=2,
                                     _extra={"queue": {"max_packets": 300, "aqm": "off"}})
                with capture_events() as cap:
                    async with ut.Client(ccfg) as client:
                        traffic = Traffic(size=1000)
                        traffic.use(await UdpPeer.open(client.udp_address[:2]))
                        traffic.send_one()
                        assert await wait_for(lambda: traffic.collect() == 1, 5)
                        proxy.stall()
                        # 3 MB against ~1 MB of lane buffers and a 300-datagram queue.
                        for _ in range(30):
                            for _ in range(100):
                                traffic.send_one()
                            await asyncio.sleep(0.01)
                        assert await wait_for(lambda: client.stats()["drops"].get("oldest"), 5)
                        stalled = client.stats()
                        assert 0 < stalled["queue_len"] <= 300  # bounded by max_packets
                        proxy.stall(False)
                        await settle(traffic.collect, lambda: client.stats()["queue_len"])
                        led = ledger([client.stats()], [server.stats()])
                        assert_chain(led, peer_sent=traffic.sent,
                                     peer_received=traffic.collect(), echo_received=echo.received)
                        assert led["lost_up"] == led["lost_down"] == 0  # no lane died
                        oldest = led["client"].drops["oldest"]
                        assert traffic.sent - traffic.collect() == oldest
                        # Drop-oldest: the newest 300 all made it, the middle did not.
                        newest = set(range(traffic.sent - 300, traffic.sent))
                        assert newest <= traffic.got
                        warns = cap.named("queue_drop_oldest")
                        assert warns and sum(w["dropped"] for w in warns) <= oldest
                        print(f"\nstall: sent {traffic.sent}, dropped oldest {oldest}, "
                              f"queue at {stalled['queue_len']} once drops began, "
                              f"{len(warns)} debounced warning(s)")
                        traffic.peer.close()
        echo.close()

    run_on("uvloop", main())


@pytest.mark.parametrize("direction", ["up", "down"])
def test_corrupted_bytes_end_the_lane_and_it_is_redialled(pki, direction):
    async def main():
        echo = UdpEcho().start()
        async with ut.Server(server_config(pki, echo.address, lanes=2)) as server:
            async with FaultProxy(server.address[:2]) as proxy:
                async with ut.Client(client_config(pki, proxy.address, lanes=2)) as client:
                    traffic = Traffic()
                    traffic.use(await UdpPeer.open(client.udp_address[:2]))
                    run = asyncio.create_task(traffic.run(rate=500, seconds=2.0))
                    await asyncio.sleep(0.6)
                    proxy.corrupt(1, direction)
                    assert await wait_for(lambda: proxy.corrupted[direction] == 1, 3)
                    t_after = time.monotonic() + 0.5
                    await run
                    await settle(traffic.collect, lambda: client.stats()["lane_tx_frames"])
                    assert client.stats()["lane_reconnects"] >= 1
                    assert traffic.received_after(t_after) >= 0.99
                    led = ledger([client.stats()], [server.stats()])
                    assert_chain(led, peer_sent=traffic.sent, peer_received=traffic.collect(),
                                 echo_received=echo.received)
                    # TLS caught it (bad record MAC): not a PDU protocol error.
                    assert server.stats()["protocol_errors"] == {}
                    traffic.peer.close()
        echo.close()

    run_on("uvloop", main())


# ---------------------------------------------------------------------------------------
# The UDP sides go away and come back
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
def test_wireguard_side_goes_away_and_comes_back(pki, loop_kind):
    """The server's WireGuard port closes (ICMP port unreachable) and reopens: the
    session and its UDP port survive, the errors are logged, traffic resumes.

    Regression: on uvloop the session's UDP reader died with the first ICMP error
    (libuv stops polling a socket with a pending error) and never read again."""

    async def main():
        echo = CountingEcho().start()
        wg_addr = echo.address
        cfg = server_config(pki, wg_addr, lanes=2)
        with capture_events() as cap:
            async with ut.Server(cfg) as server:
                async with ut.Client(client_config(pki, server.address[:2], lanes=2)) as client:
                    traffic = Traffic()
                    traffic.use(await UdpPeer.open(client.udp_address[:2]))
                    await traffic.run(rate=400, seconds=0.5)
                    key = ("home", client.session.session_id)
                    port_before = server.sessions[key].udp.address
                    echo.close()  # WireGuard gone
                    received_before = echo.received
                    await traffic.run(rate=400, seconds=1.0)
                    assert await wait_for(lambda: cap.named("udp_error"), 3)
                    echo.restart_on(wg_addr)  # and back
                    t_back = time.monotonic()
                    await traffic.run(rate=400, seconds=1.0)
                    await settle(traffic.collect, lambda: echo.received)
                    assert traffic.received_after(t_back + 0.05) >= 0.99
                    assert list(server.sessions) == [key]
                    assert server.sessions[key].udp.address == port_before
                    led = ledger([client.stats()], [server.stats()])
                    # Datagrams the kernel took while the port was closed never reached
                    # an echo: outside the tunnel, so the outside counts are only <=.
                    assert_chain(led, peer_sent=traffic.sent, peer_received=traffic.collect(),
                                 echo_received=echo.received, exact=False)
                    assert led["lost_up"] == led["lost_down"] == 0
                    errs = led["server"].drops.get("udp_write_error", 0)
                    print(f"\nWireGuard away 1 s: {errs} counted udp_write_error, "
                          f"{led['server'].udp_out - echo.received} more left the socket "
                          f"into the closed port; echo got {received_before} before")
                    traffic.peer.close()
            assert cap.named("udp_error"), "the ICMP errors are logged (debounced)"
        echo.close()

    run_on(loop_kind, main())


def test_local_sender_goes_away_and_comes_back_on_a_new_port(pki):
    async def main():
        echo = UdpEcho().start()
        async with ut.Server(server_config(pki, echo.address, lanes=2)) as server:
            async with ut.Client(client_config(pki, server.address[:2], lanes=2)) as client:
                first = await UdpPeer.open(client.udp_address[:2])
                first_addr = first.port.address
                for i in range(50):
                    first.send(b"one" + bytes([i]))
                assert len(await first.drain(50, timeout=5)) == 50
                # A burst, then the sender vanishes before the replies are back.
                for i in range(200):
                    first.send(b"one" + bytes([i % 256]))
                first.close()
                await asyncio.sleep(0.3)
                second = await UdpPeer.open(client.udp_address[:2])
                assert second.port.address != first_addr
                for i in range(100):
                    second.send(b"two" + bytes([i]))
                got = await second.drain(100, timeout=5)
                assert len(got) == 100 and all(d.startswith(b"two") for d in got)
                assert client.session.peer[1] == second.port.address[1]
                await asyncio.sleep(0.2)
                led = ledger([client.stats()], [server.stats()])
                c = led["client"]
                assert c.udp_in == 350 and echo.received == 350
                # 350 replies left the client's socket; 150 reached someone.
                assert c.udp_out == 350 and led["lost_down"] == 0 and c.drops_out == 0
                second.close()
        echo.close()

    run_on("uvloop", main())


# ---------------------------------------------------------------------------------------
# Restarts
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["server", "client", "both"])
def test_restart_resumes_by_itself(pki, which):
    async def main():
        echo = UdpEcho().start()
        linger = 0.5
        scfg = server_config(pki, echo.address, lanes=2, session_linger_seconds=linger)
        server = ut.Server(scfg)
        await server.start()
        srv_addr = server.address[:2]
        client = ut.Client(client_config(pki, srv_addr, lanes=2))
        await client.start()
        udp_addr = client.udp_address[:2]
        server_snaps, client_snaps = [], []
        traffic = Traffic()
        traffic.use(LoosePeer(udp_addr))
        with capture_events() as cap:
            try:
                await traffic.run(rate=400, seconds=0.8)
                old_sid = client.session.session_id
                run = asyncio.create_task(traffic.run(rate=400, seconds=2.5))
                await asyncio.sleep(0.3)
                if which in ("server", "both"):
                    await server.close()
                    server_snaps.append(server.stats())
                if which in ("client", "both"):
                    await client.close()
                    client_snaps.append(client.stats())
                await asyncio.sleep(0.4)  # down for a moment
                if which in ("server", "both"):
                    server = ut.Server(server_config(
                        pki, echo.address, lanes=2, session_linger_seconds=linger,
                        listen_addr=f"{srv_addr[0]}:{srv_addr[1]}"))
                    await server.start()
                if which in ("client", "both"):
                    client = ut.Client(client_config(
                        pki, srv_addr, lanes=2,
                        _extra={"udp": {"listen_addr": f"{udp_addr[0]}:{udp_addr[1]}"}}))
                    await client.start()
                t_back = time.monotonic() + 0.6  # re-dial backoff is 0.1-0.5 s here
                await run
                await settle(traffic.collect, lambda: client.stats()["lane_tx_frames"])
                assert traffic.received_after(t_back) >= 0.99, which
                if which == "server":
                    assert client.session.session_id == old_sid
                    assert client.stats()["lane_reconnects"] >= 2
                else:
                    assert client.session.session_id != old_sid  # a new session
                new_key = ("home", client.session.session_id)
                if which == "client":
                    # The old session lingers on the server, then ends by itself.
                    assert await wait_for(lambda: list(server.sessions) == [new_key], 5)
                    ends = [e for e in cap.named("session_close") if e["role"] == "server"]
                    assert ends and ends[0]["reason"] == "linger"
                    assert ends[0]["session_id"] == f"{old_sid:016x}"
                else:
                    assert list(server.sessions) == [new_key]
                led = ledger(client_snaps + [client.stats()], server_snaps + [server.stats()])
                assert_chain(led, peer_sent=traffic.sent, peer_received=traffic.collect(),
                             echo_received=echo.received, exact=which == "server")
                print(f"\nrestart {which}: sent {traffic.sent}, back {traffic.collect()}, "
                      f"client read {led['client'].udp_in}, lost in flight "
                      f"{led['lost_up']}/{led['lost_down']}, drops client "
                      f"{led['client'].drops} server {led['server'].drops}")
            finally:
                for p in traffic.peers:
                    p.close()
                await client.close()
                await server.close()
                echo.close()

    run_on("uvloop", main(), timeout=60)


# ---------------------------------------------------------------------------------------
# Flood: memory stays bounded by the queue limits (a real client process)
# ---------------------------------------------------------------------------------------

FLOOD_SENDER = r"""
import json, socket, sys, time
from ut import fastpath
target = (sys.argv[1], int(sys.argv[2])); phases = json.loads(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
s.connect(target); s.setblocking(False)
seq = 0; got = set(); out = []
def drain():
    try:
        for d, _a in fastpath.recv_batch(s, 64):
            got.add(int.from_bytes(d[:8], "big"))
    except (BlockingIOError, OSError):
        pass
for size, seconds, max_count in phases:
    end = time.monotonic() + seconds; first = seq
    while time.monotonic() < end and seq - first < max_count:
        batch = [q.to_bytes(8, "big") + bytes(size - 8) for q in range(seq, seq + 32)]
        try:
            n = fastpath.send_batch(s, batch, None)
        except (BlockingIOError, OSError):
            n = 0
        seq += n
        drain()
        if n == 0:
            time.sleep(0.0005)
    out.append([first, seq])
    print(json.dumps({"phase_done": [size, first, seq]}), flush=True)
# The newest: after a pause (the client empties its socket buffer, which the flood
# overran: kernel drops there are outside the tunnel), 200 markers at 1 per ms.
time.sleep(0.3); drain()
tail_first = seq
for _i in range(200):
    try:
        seq += fastpath.send_batch(s, [seq.to_bytes(8, "big") + bytes(1392)], None)
    except (BlockingIOError, OSError):
        pass
    drain(); time.sleep(0.001)
tail_seqs = range(tail_first, seq)
end = time.monotonic() + float(sys.argv[4])
while time.monotonic() < end and (seq - 1) not in got:
    drain(); time.sleep(0.005)
# Lanes deliver out of order: wait until the tail stops growing for a second.
tail = lambda: sum(1 for q in tail_seqs if q in got)
last, since = -1, time.monotonic()
while time.monotonic() < end and time.monotonic() - since < 3.0 and last < len(tail_seqs):
    drain(); time.sleep(0.005)
    if tail() != last:
        last, since = tail(), time.monotonic()
print(json.dumps({"sent": seq, "phases": out, "got": len(got),
                  "last_sent_back": (seq - 1) in got, "tail_sent": len(tail_seqs),
                  "tail_back": tail()}),
      flush=True)
"""


PHASE_SECONDS = 3.0


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def scrape(url: str) -> dict:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    out: dict = {}
    for line in text.splitlines():
        m = re.match(r'^(ut_[a-z_]+)(\{[^}]*\})?\s+(\S+)$', line)
        if m:
            out[(m.group(1), m.group(2) or "")] = float(m.group(3))
    return out


def metric(samples: dict, name: str, **labels: str) -> float:
    total = 0.0
    for (n, lab), v in samples.items():
        if n == name and all(f'{k}="{val}"' in lab for k, val in labels.items()):
            total += v
    return total


@pytest.mark.slow
def test_flood_beyond_the_link_rss_bounded_oldest_dropped_newest_flow(pki, tmp_path):
    """A real ``python -m ut`` client floods a 2 MB/s link (a throttling fault proxy)
    with ~20x what it carries: 1400-byte datagrams (the packet limit binds), then
    60000-byte ones (the byte limit binds). RSS is sampled from /proc throughout."""

    async def main():
        echo = UdpEcho().start()
        # Staleness off on both ends, as the AQM is below: the newest markers wait
        # behind up to 8 MiB at 2 MB/s, which is about queue.max_age_seconds' 3 s; on a
        # busy machine the first of them crossed it and were dropped as stale.
        no_stale = {"queue": {"max_age_seconds": 0}}
        async with ut.Server(server_config(pki, echo.address, lanes=5, _extra=no_stale)) as server:
            async with FaultProxy(server.address[:2], rate_bps=2_000_000) as proxy:
                cert, key = pki.client("home")
                cfg = {
                    "role": "client",
                    "tcp": {"server_addr": f"127.0.0.1:{proxy.address[1]}", "lanes": 5,
                            "dial_backoff_min_seconds": 0.1, "dial_backoff_max_seconds": 0.5},
                    "udp": {"listen_addr": "127.0.0.1:0"},
                    # AQM off: drop-oldest alone is under test. With CoDel a queue that
                    # stands for seconds is also dropped from at its head, the newest
                    # markers included once they get there (tests/test_aqm.py).
                    "queue": {"max_packets": 4096, "max_bytes": 8 * 1024 * 1024,
                              "aqm": "off", "max_age_seconds": 0},
                    "metrics": {"listen_addr": "127.0.0.1:0"},
                    "tls": {"ca_cert": str(pki.ca), "cert": str(cert), "key": str(key),
                            "server_name": pki.server_name},
                }
                path = tmp_path / "client.yaml"
                path.write_text(json.dumps(cfg))
                env = {**os.environ, "PYTHONPATH": str(ROOT)}
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "ut", "-config", str(path),
                    stderr=subprocess.PIPE, env=env, cwd=str(ROOT))
                sender = None
                try:
                    udp = metrics_url = None
                    while udp is None or metrics_url is None:
                        line = await asyncio.wait_for(proc.stderr.readline(), 20)
                        assert line, "client exited"
                        ev = json.loads(line)
                        if ev.get("event") == "metrics_listen":
                            metrics_url = f"http://{ev['addr']}{ev['path']}"
                        if ev.get("event") == "start":
                            udp = ev["udp_listen"]
                    drain = asyncio.create_task(proc.stderr.read())  # keep the pipe empty
                    host, port = udp.rsplit(":", 1)
                    rss = [(0.0, rss_mib(proc.pid))]
                    phases = [[1400, PHASE_SECONDS, 2_000_000], [60000, PHASE_SECONDS, 200_000]]
                    sender = await asyncio.create_subprocess_exec(
                        sys.executable, "-c", FLOOD_SENDER, host, port, json.dumps(phases), "20",
                        stdout=subprocess.PIPE, env=env, cwd=str(ROOT))
                    t0 = time.monotonic()
                    lines: list[str] = []
                    phase_ends: list[float] = []

                    async def read_sender():
                        async for raw in sender.stdout:
                            lines.append(raw.decode())
                            if "phase_done" in lines[-1]:
                                phase_ends.append(time.monotonic() - t0)

                    out = asyncio.create_task(read_sender())
                    while not out.done() and time.monotonic() - t0 < 60:
                        await asyncio.sleep(0.25)
                        rss.append((round(time.monotonic() - t0, 2), rss_mib(proc.pid)))
                    await asyncio.wait_for(out, 10)
                    result = json.loads(lines[-1])
                    result["phase_ends"] = phase_ends
                    await asyncio.sleep(1.2)  # the kernel's socket drop count is read each second
                    m = scrape(metrics_url)
                    proc.terminate()
                    await asyncio.wait_for(proc.wait(), 10)
                    drain.cancel()
                finally:
                    for p in (proc, sender):
                        if p is not None and p.returncode is None:
                            p.kill()
                            await p.wait()
        echo.close()
        return rss, result, m

    rss, result, m = run_on("uvloop", main(), timeout=120)
    peak = max(r for _t, r in rss)
    base = rss[0][1]
    udp_in = metric(m, "ut_udp_in_packets_total", dir="up")
    oldest = metric(m, "ut_udp_drop_total", dir="up", reason="oldest")
    stale = metric(m, "ut_udp_drop_total", dir="up", reason="stale")
    socket_full = metric(m, "ut_udp_drop_total", dir="up", reason="udp_socket_full")
    drops_up = metric(m, "ut_udp_drop_total", dir="up") - socket_full  # those were never read
    lane_up = metric(m, "ut_lane_frames_total", dir="up")
    queue = metric(m, "ut_queue_len")
    series = " ".join(f"{t:g}s:{r:.0f}" for t, r in rss[::4])
    print(f"\nflood: sent {result['sent']} datagrams, client read {udp_in:.0f}, carried "
          f"{lane_up:.0f}, dropped oldest {oldest:.0f}, by the kernel at the full socket "
          f"{socket_full:.0f}, stale {stale:.0f}; RSS MiB base {base:.0f} peak {peak:.0f}"
          f"\nRSS over time (MiB): {series}\nreplies {result['got']}; the {result['tail_sent']}"
          f" newest (sent after the flood): {result['tail_back']} back")
    assert peak < 512, "over the 512 MiB budget"
    # A plateau, not a climb: through the last 1.5 seconds of each phase RSS moves
    # by less than a few MiB while hundreds of thousands of datagrams are shed.
    for end in result["phase_ends"]:
        window = [r for t, r in rss if end - 1.5 <= t <= end]
        assert window and max(window) - min(window) < 6, (end, window)
    # Bounded by the queue limits: 8 MiB of queue + 5 lanes x (64 KiB high water +
    # 1 MiB flush batch) + buffers and interpreter noise.
    assert peak - base < 80, (base, peak)
    assert udp_in == lane_up + drops_up + queue  # the client's own ledger
    # Loopback loses nothing on the way: what the client did not read, the kernel
    # dropped at its full socket, and the client counted it.
    assert result["sent"] == udp_in + socket_full, (result["sent"], udp_in, socket_full)
    assert oldest > 0.5 * udp_in, "most of a 20x flood must be shed as oldest"
    # Drop-oldest: the newest datagrams, queued behind up to 8 MiB of flood, all arrive.
    assert result["tail_sent"] == 200 and result["tail_back"] == 200, result
