"""Metrics and logs under real traffic (issue 4): real TLS lanes on loopback, a real
HTTP scrape of both roles with urllib, parsed with ``prometheus_client.parser``.

Each counter moves by exactly what the test sent or dropped; the accounting
identity of docs/metrics.md ("in = handed to lanes + drops + queued") holds at
every scrape; labels switch as configured; handshake failures are counted by
reason; ``promtool check metrics`` accepts a live scrape; the JSON log of a
real run carries the spec's keys and events and never payload or key bytes.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import ut
from ut._testbase.certs import make_test_pki
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
from ut._version import __version__
from ut.logs import LEVEL_ENV, LOGGER_NAME, REQUIRED_KEYS, setup_logging
from ut.metrics import families, render
from ut.stats import DROP_PATH, DROP_REASONS

# promtool lint findings we keep on purpose (docs/metrics.md, "Naming and promtool").
ALLOWED_PROMTOOL = {
    'ut_lanes_active_total non-counter metrics should not have "_total" suffix',
}
HEADER_LEN = 9  # PDU header bytes per frame
# Lane bytes per DATA frame beyond the datagram: the header and, with resequencing (the
# default), the 4-byte sequence number (docs/metrics.md, ut_lane_bytes_total).
DATA_OVERHEAD = HEADER_LEN + 4






def metrics_on(**keys: Any) -> dict:
    """``_extra`` for server_config/client_config: metrics on a free loopback port."""
    return {"metrics": {"enabled": True, "listen_addr": "127.0.0.1:0", **keys}}


# -- scraping -------------------------------------------------------------------------

class Scrape:
    """One parsed scrape: ``value(name, **labels)`` for one exact series."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[tuple[str, frozenset], float] = {}
        self.types: dict[str, str] = {}
        for fam in text_string_to_metric_families(text):
            self.types[fam.name] = fam.type
            for s in fam.samples:
                key = (s.name, frozenset(s.labels.items()))
                assert key not in self.samples, f"duplicate series {key}"
                self.samples[key] = s.value

    def value(self, name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        assert key in self.samples, (name, labels, self.series(name))
        return self.samples[key]

    def series(self, name: str) -> list[tuple[dict[str, str], float]]:
        return [(dict(lbl), v) for (n, lbl), v in self.samples.items() if n == name]

    def total(self, name: str, **labels: str) -> float:
        """Sum of every series of ``name`` whose labels include ``labels``."""
        return sum(v for lbl, v in self.series(name)
                   if all(lbl.get(k) == w for k, w in labels.items()))

    def label_names(self) -> set[str]:
        return {k for (_, lbl) in self.samples for k, _ in lbl}


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        return resp.read().decode()


async def scrape_text(node: Any) -> str:
    """GET the node's metrics URL from a thread, so the loop keeps serving it."""
    assert node.metrics_url, "metrics are not enabled on this node"
    return await asyncio.to_thread(_get, node.metrics_url)


async def scrape(node: Any) -> Scrape:
    return Scrape(await scrape_text(node))


def assert_conserved(s: Scrape, role: str, **cn: str) -> None:
    """docs/metrics.md, accounting identity, in one process (per CN if given):
    in = handed to lanes + drops on the in path + queued (drops at the kernel's full
    socket were never read, so they are not in ``in``)."""
    d_in = "up" if role == "client" else "down"
    udp_in = s.total("ut_udp_in_packets_total", dir=d_in, **cn)
    handed = s.total("ut_lane_frames_total", dir=d_in, **cn)
    drops = s.total("ut_udp_drop_total", dir=d_in, **cn) - s.total(
        "ut_udp_drop_total", dir=d_in, reason="udp_socket_full", **cn)
    queued = s.total("ut_queue_len", **cn)
    assert udp_in == handed + drops + queued, (role, cn, udp_in, handed, drops, queued)


def payloads(sizes: list[int]) -> list[bytes]:
    return [(i.to_bytes(4, "big") + bytes([65 + i % 26]) * size)[:size]
            for i, size in enumerate(sizes)]


async def echo_all(t: Any, datagrams: list[bytes], lanes: int, chunk: int = 10) -> None:
    """Send ``datagrams`` through the client and wait for every echo.

    The first one brings the lanes up; the rest go in chunks once every lane is
    ready on both ends, so that they are striped over all of them.
    """
    t.peer.send(datagrams[0])
    assert await t.peer.recv() == datagrams[0]
    assert await wait_for(lambda: t.client.stats()["lanes_ready"] == lanes
                          and t.server.stats()["lanes_active"] == lanes)
    rest = datagrams[1:]
    for i in range(0, len(rest), chunk):
        part = rest[i:i + chunk]
        for d in part:
            t.peer.send(d)
        got = await t.peer.drain(len(part), timeout=5)
        assert sorted(got) == sorted(part)
    # Handshakes are timed when the TLS layer returns, which may be a loop
    # iteration after HELLO was answered.
    assert await wait_for(lambda: t.client.stats()["handshakes"] == lanes
                          and t.server.stats()["handshakes"] == lanes)


# -- 1, 2b, 3 (per_lane_id on), 7: counters move by exactly what was sent ----------------

SIZES = [1, 0, 2, 100, 1280, 1420, 1500, 60, 9000, 3] + [(i * 37) % 1400 + 1 for i in range(30)]


def test_counters_move_by_exactly_what_was_sent(pki, loop_kind):
    from ut import fastpath

    lanes = 3
    data = payloads(SIZES)
    n, nbytes = len(data), sum(map(len, data))
    extra = {"_extra": metrics_on(per_lane_id=True)}

    async def main():
        async with tunnel(pki, lanes=lanes, server_tcp=dict(extra), client_tcp=dict(extra)) as t:
            await echo_all(t, data, lanes)
            return await scrape(t.client), await scrape(t.server)

    c, s = run_on(loop_kind, main())
    cn = {"client_cn": "home"}

    # UDP both ways, both ends: exactly what was sent.
    assert c.value("ut_udp_in_packets_total", dir="up", **cn) == n
    assert c.value("ut_udp_in_bytes_total", dir="up", **cn) == nbytes
    assert c.value("ut_udp_out_packets_total", dir="down", **cn) == n
    assert c.value("ut_udp_out_bytes_total", dir="down", **cn) == nbytes
    assert s.value("ut_udp_out_packets_total", dir="up", **cn) == n
    assert s.value("ut_udp_out_bytes_total", dir="up", **cn) == nbytes
    assert s.value("ut_udp_in_packets_total", dir="down", **cn) == n
    assert s.value("ut_udp_in_bytes_total", dir="down", **cn) == nbytes
    # A role exports only the directions it handles.
    assert not [lbl for lbl, _ in c.series("ut_udp_in_packets_total") if lbl["dir"] != "up"]
    assert not [lbl for lbl, _ in s.series("ut_udp_in_packets_total") if lbl["dir"] != "down"]

    # Nothing dropped; every reason exported, zeros included.
    for scr, role in ((c, "client"), (s, "server")):
        d_in, d_out = ("up", "down") if role == "client" else ("down", "up")
        for reason in DROP_REASONS:
            d = d_out if DROP_PATH[reason] == "out" else d_in
            assert scr.value("ut_udp_drop_total", dir=d, reason=reason, **cn) == 0, reason
        assert scr.value("ut_queue_len", **cn) == 0
        assert_conserved(scr, role, **cn)

    # Across the two ends, per direction (docs/metrics.md): nothing in flight now.
    assert c.total("ut_udp_in_packets_total", dir="up") == (
        s.total("ut_udp_out_packets_total", dir="up")
        + c.total("ut_udp_drop_total", dir="up") + s.total("ut_udp_drop_total", dir="up"))
    assert s.total("ut_udp_in_packets_total", dir="down") == (
        c.total("ut_udp_out_packets_total", dir="down")
        + c.total("ut_udp_drop_total", dir="down") + s.total("ut_udp_drop_total", dir="down"))

    # Per lane: lane_id 0..lanes-1 on both lane metrics, both directions; sums are
    # N; what one end writes on lane i the other end reads on lane i.
    for scr in (c, s):
        for name in ("ut_lane_frames_total", "ut_lane_bytes_total"):
            for d in ("up", "down"):
                ids = sorted(lbl["lane_id"] for lbl, _ in scr.series(name) if lbl["dir"] == d)
                assert ids == [str(i) for i in range(lanes)], (name, d, ids)
    for d, tx, rx in (("up", c, s), ("down", s, c)):
        frames_tx = [tx.value("ut_lane_frames_total", dir=d, lane_id=str(i), **cn)
                     for i in range(lanes)]
        frames_rx = [rx.value("ut_lane_frames_total", dir=d, lane_id=str(i), **cn)
                     for i in range(lanes)]
        bytes_tx = [tx.value("ut_lane_bytes_total", dir=d, lane_id=str(i), **cn)
                    for i in range(lanes)]
        bytes_rx = [rx.value("ut_lane_bytes_total", dir=d, lane_id=str(i), **cn)
                    for i in range(lanes)]
        assert sum(frames_tx) == n and frames_tx == frames_rx, (d, frames_tx, frames_rx)
        assert sum(bytes_tx) == nbytes + DATA_OVERHEAD * n and bytes_tx == bytes_rx, d
        assert sum(1 for f in frames_tx if f) >= 2, f"no striping {d}: {frames_tx}"

    # Sessions, lanes, handshakes, build info.
    for scr, role in ((c, "client"), (s, "server")):
        assert scr.value("ut_sessions_active", **cn) == 1, role
        assert scr.value("ut_lanes_active_total", **cn) == lanes, role
        assert scr.value("ut_lanes_configured") == lanes, role
        assert scr.value("ut_tls_handshake_seconds_count") == lanes, role
        assert scr.value("ut_tls_handshake_seconds_sum") > 0, role
        assert scr.total("ut_tls_handshake_failures_total") == 0, role
        assert scr.total("ut_protocol_errors_total") == 0, role
        assert scr.value("ut_build_info", version=__version__,
                         implementation=fastpath.IMPLEMENTATION, role=role) == 1
        assert len(scr.series("ut_build_info")) == 1
    assert c.value("ut_lane_reconnect_total", **cn) == 0


def test_forward_latency_histogram_counts_both_directions(pki, loop_kind):
    """Client: reads up, writes down; server: reads down, writes up. Each end
    times both of its directions."""
    lanes = 2
    data = payloads([64] * 20)
    extra = {"_extra": metrics_on()}

    async def main():
        async with tunnel(pki, lanes=lanes, server_tcp=dict(extra), client_tcp=dict(extra)) as t:
            await echo_all(t, data, lanes, chunk=5)
            return await scrape(t.client), await scrape(t.server)

    c, s = run_on(loop_kind, main())
    for scr, role in ((c, "client"), (s, "server")):
        for d in ("up", "down"):
            labels = {"client_cn": "home", "dir": d}
            count = scr.value("ut_forward_latency_seconds_count", **labels)
            assert 0 < count <= len(data), (role, d, count)
            assert scr.value("ut_forward_latency_seconds_sum", **labels) > 0, (role, d)
            buckets = sorted(
                ((float(lbl["le"]), v) for lbl, v in scr.series("ut_forward_latency_seconds_bucket")
                 if lbl["dir"] == d), key=lambda b: b[0])
            counts = [v for _, v in buckets]
            assert counts == sorted(counts) and counts[-1] == count, (role, d, buckets)


# -- 2: drops counted exactly --------------------------------------------------------------

def test_drop_oldest_counted_exactly_with_a_stalled_server(pki, loop_kind):
    """A server that accepts TCP but never answers: no lane ever comes up, the
    queue (100) keeps the newest datagrams and counts every other one."""
    sent, cap = 1000, 100

    async def main():
        stalled: list = []

        async def never_answer(reader, writer):
            stalled.append(writer)

        srv = await asyncio.start_server(never_answer, "127.0.0.1", 0)
        addr = srv.sockets[0].getsockname()[:2]
        cfg = client_config(pki, addr, lanes=2, _extra={
            **metrics_on(),
            "queue": {"max_packets": cap, "max_bytes": 1 << 20},
            "tcp": {"connect_timeout_seconds": 30},
        })
        client = ut.Client(cfg)
        await client.start()
        peer = await UdpPeer.open(client.udp_address[:2])
        try:
            for i in range(sent):
                peer.send(i.to_bytes(4, "big"))
                if i % 100 == 99:
                    await asyncio.sleep(0.01)
            assert await wait_for(lambda: client.stats()["udp_in_packets"] == sent)
            live = await scrape(client)
        finally:
            peer.close()
            await client.close()
            for w in stalled:
                w.close()
            srv.close()
        # After close: the queued datagrams are counted as no_lane, nothing silent.
        closed = Scrape(render(families(client._stats)).decode())
        return live, closed

    live, closed = run_on(loop_kind, main())
    cn = {"client_cn": "home"}
    assert live.value("ut_udp_in_packets_total", dir="up", **cn) == sent
    assert live.value("ut_udp_in_bytes_total", dir="up", **cn) == 4 * sent
    assert live.value("ut_udp_drop_total", dir="up", reason="oldest", **cn) == sent - cap
    assert live.total("ut_udp_drop_total") == sent - cap  # no other reason moved
    assert live.value("ut_queue_len", **cn) == cap
    assert live.total("ut_lane_frames_total") == 0
    assert live.value("ut_lanes_active_total", **cn) == 0
    assert live.value("ut_sessions_active", **cn) == 0
    assert live.value("ut_tls_handshake_seconds_count") == 0
    assert_conserved(live, "client", **cn)  # 1000 = 0 + 900 + 100

    assert closed.value("ut_queue_len", **cn) == 0
    assert closed.value("ut_udp_drop_total", dir="up", reason="no_lane", **cn) == cap
    assert_conserved(closed, "client", **cn)  # 1000 = 0 + 900 + 100 + 0


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="per-socket drop counters are Linux's (SO_RXQ_OVFL)")
def test_kernel_drops_at_the_client_socket_are_counted(pki, loop_kind):
    """The client falls behind (its UDP socket shrunk and not read) while WireGuard sends
    a burst: what the kernel drops at the socket is ``udp_socket_full``, exactly the
    kernel's own count, with a ``udp_socket_drop`` log line; the rest goes through."""
    from ut.sockdrops import read_drop_table

    burst = 300
    extra = {"_extra": metrics_on()}

    async def main():
        async with tunnel(pki, lanes=2, server_tcp=dict(extra), client_tcp=dict(extra)) as t:
            t.peer.send(b"first")
            assert await t.peer.recv() == b"first"
            port = t.client.session.udp
            inode = os.fstat(port.sock.fileno()).st_ino
            port.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            port.pause()
            for i in range(burst):
                t.peer.send(i.to_bytes(4, "big") + bytes(996))
            kernel = read_drop_table()[inode]
            port.start()
            echoes = await t.peer.drain(burst - kernel, timeout=10)
            # The kernel's count rides on the next datagram queued after the drops
            # (SO_RXQ_OVFL, ut/sockdrops.py): WireGuard's next packet brings it.
            t.peer.send(b"after")
            echoes += await t.peer.drain(1, timeout=10)
            for _ in range(50):  # the scrape may race the last read
                s = await scrape(t.client)
                if s.value("ut_udp_drop_total", dir="up", reason="udp_socket_full",
                           client_cn="home") >= kernel:
                    break
                await asyncio.sleep(0.1)
            return s, kernel, len(echoes)

    with capture_events() as cap:
        s, kernel, echoed = run_on(loop_kind, main())
    cn = {"client_cn": "home"}
    assert kernel > 0
    assert s.value("ut_udp_drop_total", dir="up", reason="udp_socket_full", **cn) == kernel
    assert s.value("ut_udp_in_packets_total", dir="up", **cn) == 2 + burst - kernel
    assert echoed == burst - kernel + 1
    assert_conserved(s, "client", **cn)
    lines = cap.named("udp_socket_drop")
    assert lines and lines[0]["dropped"] > 0


# -- 3: labels switch as configured ----------------------------------------------------------

def test_without_client_cn_and_lane_id_labels(pki):
    """per_client_cn false, per_lane_id false (default): neither label anywhere,
    the values are the same sums."""
    lanes = 2
    data = payloads([10] * 12)
    extra = {"_extra": metrics_on(per_client_cn=False)}

    async def main():
        async with tunnel(pki, lanes=lanes, server_tcp=dict(extra), client_tcp=dict(extra)) as t:
            await echo_all(t, data, lanes, chunk=4)
            return await scrape(t.client), await scrape(t.server)

    c, s = run_on("asyncio", main())
    for scr in (c, s):
        names = scr.label_names()
        assert "client_cn" not in names, names
        assert "lane_id" not in names, names
        assert scr.value("ut_sessions_active") == 1
        assert scr.value("ut_lanes_active_total") == lanes
        assert scr.value("ut_queue_len") == 0
    assert c.value("ut_udp_in_packets_total", dir="up") == len(data)
    assert c.value("ut_lane_frames_total", dir="up") == len(data)
    assert c.value("ut_lane_bytes_total", dir="up") == (10 + DATA_OVERHEAD) * len(data)
    assert s.value("ut_udp_out_packets_total", dir="up") == len(data)
    assert s.value("ut_lane_frames_total", dir="down") == len(data)
    assert_conserved(c, "client")
    assert_conserved(s, "server")


def test_two_client_cns_are_separate_series_on_the_server(pki, loop_kind):
    lanes = 2
    sends = {"home": payloads([11] * 3), "office": payloads([222] * 7)}

    async def main():
        echo = UdpEcho().start()
        server = ut.Server(server_config(pki, echo.address, lanes=lanes, _extra=metrics_on()))
        await server.start()
        clients, peers = {}, {}
        try:
            for name in sends:
                cfg = client_config(pki, server.address[:2], cert=pki.client(name),
                                    lanes=lanes, _extra=metrics_on())
                clients[name] = ut.Client(cfg)
                await clients[name].start()
                peers[name] = await UdpPeer.open(clients[name].udp_address[:2])
            for name, data in sends.items():
                for d in data:
                    peers[name].send(d)
                got = await peers[name].drain(len(data))
                assert sorted(got) == sorted(data), name
            assert await wait_for(lambda: server.stats()["lanes_active"] == 2 * lanes
                                  and server.stats()["handshakes"] == 2 * lanes)
            return await scrape(server), {n: await scrape(cl) for n, cl in clients.items()}
        finally:
            for p in peers.values():
                p.close()
            for cl in clients.values():
                await cl.close()
            await server.close()
            echo.close()

    s, cs = run_on(loop_kind, main())
    cns = {lbl["client_cn"] for lbl, _ in s.series("ut_udp_in_packets_total")}
    assert cns == set(sends), cns
    for name, data in sends.items():
        n, nbytes = len(data), sum(map(len, data))
        cn = {"client_cn": name}
        assert s.value("ut_udp_out_packets_total", dir="up", **cn) == n
        assert s.value("ut_udp_out_bytes_total", dir="up", **cn) == nbytes
        assert s.value("ut_udp_in_packets_total", dir="down", **cn) == n
        assert s.value("ut_udp_in_bytes_total", dir="down", **cn) == nbytes
        assert s.value("ut_lane_frames_total", dir="up", **cn) == n
        assert s.value("ut_lane_bytes_total", dir="down", **cn) == nbytes + DATA_OVERHEAD * n
        assert s.value("ut_sessions_active", **cn) == 1
        assert s.value("ut_lanes_active_total", **cn) == lanes
        assert s.value("ut_forward_latency_seconds_count", dir="up", **cn) > 0
        assert_conserved(s, "server", **cn)
        # Each client labels its own series with its own CN, and only that.
        c = cs[name]
        assert {lbl["client_cn"] for lbl, _ in c.series("ut_udp_in_packets_total")} == {name}
        assert c.value("ut_udp_in_packets_total", dir="up", **cn) == n
        assert c.value("ut_udp_out_bytes_total", dir="down", **cn) == nbytes
    assert s.total("ut_sessions_active") == 2
    assert s.value("ut_tls_handshake_seconds_count") == 2 * lanes


# -- 4: handshake failures ------------------------------------------------------------------

def test_handshake_failure_is_counted_by_reason(tmp_path, loop_kind):
    pki = make_test_pki(tmp_path)
    bad = pki.client("intruder", other_ca=True)

    async def main():
        echo = UdpEcho().start()
        async with ut.Server(server_config(pki, echo.address, _extra=metrics_on())) as server:
            cfg = client_config(pki, server.address[:2], cert=bad, lanes=1, _extra=metrics_on())
            async with ut.Client(cfg) as client:
                peer = await UdpPeer.open(client.udp_address[:2])
                peer.send(b"hello")
                assert await wait_for(
                    lambda: server.stats()["handshake_failures"].get("unknown_ca", 0) >= 1)
                await asyncio.sleep(0.2)
                assert server.sessions == {}
                result = await scrape(server), await scrape(client)
                peer.close()
        echo.close()
        return result

    s, c = run_on(loop_kind, main())
    assert s.value("ut_tls_handshake_failures_total", reason="unknown_ca") >= 1
    assert s.value("ut_tls_handshake_seconds_count") == 0
    assert s.total("ut_sessions_active") == 0
    assert s.total("ut_lanes_active_total") == 0
    # Nothing a refused peer sent is attributed to a client CN on the server.
    assert "intruder" not in s.text
    # The client's datagram waits for a lane that never comes: counted, not lost.
    cn = {"client_cn": "intruder"}
    assert c.value("ut_udp_in_packets_total", dir="up", **cn) == 1
    assert c.value("ut_sessions_active", **cn) == 0
    assert c.value("ut_lanes_active_total", **cn) == 0
    assert_conserved(c, "client", **cn)


# -- 5: promtool on a live scrape under traffic -----------------------------------------------

def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("UT_REQUIRE_E2E") == "1":
            pytest.fail("promtool is required (UT_REQUIRE_E2E=1): apt-get install prometheus")
        pytest.skip("promtool not installed (Debian package 'prometheus')")
    return path


@pytest.mark.parametrize("keys", [{}, {"per_client_cn": False, "per_lane_id": True}],
                         ids=["default", "no_cn-lane_id"])
def test_promtool_accepts_live_scrapes_under_traffic(pki, keys):
    tool = promtool()
    lanes = 2
    extra = {"_extra": metrics_on(**keys)}

    async def main():
        async with tunnel(pki, lanes=lanes, server_tcp=dict(extra), client_tcp=dict(extra)) as t:
            t.peer.send(b"warm-up")
            assert await t.peer.recv() == b"warm-up"
            stop = asyncio.Event()

            async def traffic():
                i = 0
                while not stop.is_set():
                    t.peer.send(i.to_bytes(4, "big") * 50)
                    i += 1
                    await asyncio.sleep(0.001)

            task = asyncio.ensure_future(traffic())
            await asyncio.sleep(0.1)
            texts = [await scrape_text(t.client), await scrape_text(t.server)]
            stop.set()
            await task
            return texts

    for text in run_on("asyncio", main()):
        assert 'ut_udp_in_packets_total{' in text
        proc = subprocess.run([tool, "check", "metrics"], input=text.encode(),
                              capture_output=True, timeout=60)
        problems = {line.strip() for line in (proc.stdout + proc.stderr).decode().splitlines()
                    if line.strip()}
        assert problems <= ALLOWED_PROMTOOL, problems
        assert proc.returncode in ((0, 3) if problems else (0,)), proc


# -- 6: JSON logs of a real run ------------------------------------------------------------------

SECRET = b"SECRET-PAYLOAD-1234"


def _pem_body_lines(path: Any) -> list[str]:
    lines = [ln.strip() for ln in open(path).read().splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("-----")]


def test_logs_of_a_real_run(tmp_path, loop_kind, monkeypatch):
    monkeypatch.delenv(LEVEL_ENV, raising=False)
    pki = make_test_pki(tmp_path)
    home = pki.client("home")
    bad = pki.client("intruder", other_ca=True)
    lanes = 2
    logger = logging.getLogger(LOGGER_NAME)
    saved = (list(logger.handlers), logger.level, logger.propagate)
    buf = io.StringIO()

    async def main():
        async with tunnel(pki, lanes=lanes, client_tcp={"idle_seconds": 1}) as t:
            for i in range(5):
                t.peer.send(SECRET + bytes([48 + i]))
            got = await t.peer.drain(5)
            assert sorted(got) == sorted(SECRET + bytes([48 + i]) for i in range(5))
            assert await wait_for(lambda: t.client.stats()["lanes_ready"] == lanes)
            # No payload for idle_seconds: lanes close (idle_close, lane_close).
            assert await wait_for(lambda: t.client.stats()["lanes_ready"] == 0, 5)
            assert await wait_for(lambda: t.server.stats()["lanes_active"] == 0, 5)
            # A refused handshake on the same server.
            cfg = client_config(pki, t.server.address[:2], cert=bad, lanes=1)
            async with ut.Client(cfg) as intruder:
                p = await UdpPeer.open(intruder.udp_address[:2])
                p.send(SECRET)
                assert await wait_for(
                    lambda: t.server.stats()["handshake_failures"].get("unknown_ca", 0) >= 1)
                p.close()

    try:
        assert setup_logging("debug", stream=buf) == logging.DEBUG
        run_on(loop_kind, main())
    finally:
        logger.handlers[:] = saved[0]
        logger.setLevel(saved[1])
        logger.propagate = saved[2]

    text = buf.getvalue()
    lines = [json.loads(line) for line in text.splitlines()]
    assert lines
    for line in lines:
        for key in REQUIRED_KEYS:
            assert key in line, (key, line)
    # Never payload bytes, in any spelling; never key material.
    for needle in (SECRET.decode(), SECRET.hex(), SECRET.hex().upper(), "SECRET-PAYLOAD"):
        assert needle not in text, needle
    for key_file in (home[1], bad[1], pki.server_key):
        body = _pem_body_lines(key_file)
        assert body
        for chunk in body:
            assert chunk not in text, f"key material of {key_file} in the log"

    def named(name: str, role: str | None = None) -> list[dict]:
        return [e for e in lines if e["event"] == name and (role is None or e["role"] == role)]

    starts = named("start")
    assert {e["role"] for e in starts} == {"client", "server"}
    for e in starts:
        assert e["version"] == __version__ and e["implementation"] in ("compiled", "pure")
        assert isinstance(e["config"], dict)
    opened = named("session_open", "server")
    assert [e["client_cn"] for e in opened] == ["home"], opened
    assert re.fullmatch(r"[0-9a-f]{16}", opened[0]["session_id"])
    sid = opened[0]["session_id"]
    assert named("session_close", "server") and named("session_close", "server")[0][
        "session_id"] == sid
    for role in ("client", "server"):
        lane_opens = [e for e in named("lane_open", role) if e["client_cn"] == "home"]
        assert sorted(e["lane_id"] for e in lane_opens) == list(range(lanes)), lane_opens
        assert {e["session_id"] for e in lane_opens} == {sid}
    idle = named("idle_close", "client")
    assert idle and idle[0]["session_id"] == sid
    client_closes = named("lane_close", "client")
    assert sorted(e["lane_id"] for e in client_closes if e["reason"] == "idle") == list(
        range(lanes)), client_closes
    for e in named("lane_close"):
        assert e["reason"], e
        for k in ("tx_frames", "rx_frames", "tx_bytes", "rx_bytes"):
            assert isinstance(e[k], int) and e[k] >= 0, (k, e)
    # Lane totals count every frame: the five datagrams plus one HELLO per lane (the
    # line is written when the lane is retired, before its GOODBYE goes out).
    sent = sum(len(SECRET) + 1 for _ in range(5))
    hello_bytes = HEADER_LEN + 13
    assert sum(e["tx_frames"] for e in client_closes) == 5 + lanes
    assert sum(e["tx_bytes"] for e in client_closes) == sent + DATA_OVERHEAD * 5 + hello_bytes * lanes
    assert sum(e["rx_bytes"] for e in client_closes) >= sent + DATA_OVERHEAD * 5
    fails = named("tls_handshake_fail", "server")
    assert fails and fails[0]["reason"] == "unknown_ca", fails
    assert fails[0]["err"]
    # The refused peer is never given a session or a CN.
    assert all(e["client_cn"] != "intruder" for e in named("session_open"))
