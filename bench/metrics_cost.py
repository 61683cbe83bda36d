"""What metrics cost: one scrape with many client CNs, and one counter add on the hot path.

    python bench/metrics_cost.py [--cns 100] [--lanes 5] [--only render|http|hot]

The tunnel counts into plain ints on ``ut.stats.Counters`` (one attribute add,
once per batch of datagrams where it can) and builds Prometheus families only
at scrape time. This script measures both sides and, for comparison, what
``prometheus_client.Counter.inc()`` would cost if the hot path called it. The
HTTP part scrapes the real endpoint from another process and reports the CPU
time the serving process spends per scrape (the time the tunnel's loop is
busy) and the scraper's latency, for the 100-CN body and a small one (where
the HTTP side's own cost shows), and, for comparison, prometheus-client's
own threaded server on the same series (``--only threaded``).
Figures are quoted in docs/metrics.md.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import timeit
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client import CollectorRegistry, Counter, generate_latest  # noqa: E402

from ut.metrics import TunnelCollector, families, render, start_metrics_server  # noqa: E402
from ut.runtime import loop_name, run  # noqa: E402
from ut.stats import DROP_REASONS, Counters, TunnelStats  # noqa: E402


class _Session:
    def __init__(self, counters: Counters, queued: int) -> None:
        self.counters = counters
        self.queue = [b""] * queued


def busy_stats(n_cns: int, lanes: int) -> TunnelStats:
    """A server with ``n_cns`` clients, every counter and histogram non-zero."""
    st = TunnelStats(role="server", max_lanes=lanes, implementation="compiled")
    for i in range(n_cns):
        c = st.counters(f"client-{i:04d}.example.net")
        c.sessions_active, c.lanes_active = 1, lanes
        c.udp_in_packets, c.udp_in_bytes = 10**6 + i, 10**9 + i
        c.udp_out_packets, c.udp_out_bytes = 10**6 - i, 10**9 - i
        for j, reason in enumerate(DROP_REASONS):
            c.drop(reason, i + j)
        for lane in range(lanes):
            c.lane_tx_frames[lane] = c.lane_rx_frames[lane] = 1000 + lane
            c.lane_tx_bytes[lane] = c.lane_rx_bytes[lane] = 10**6 + lane
        c.lane_reconnects = i
        for d in ("up", "down"):
            for k in range(20):
                c.forward_latency[d].observe(0.00004 * (k + 1), 3)
        st.sessions[i] = _Session(c, i % 7)
    for k in range(50):
        st.handshake_seconds.observe(0.002 * (k + 1))
    return st


def time_ms(fn: Callable[[], object], runs: int) -> tuple[float, float]:
    """(best, median) milliseconds over ``runs`` calls; best is the least noisy."""
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    return min(samples), statistics.median(samples)


def scrape_cost(stats: TunnelStats, runs: int) -> None:
    print(f"Scrape of {len(stats.by_cn)} client CNs, {stats.max_lanes} lanes: time the loop is "
          f"busy building the body (best / median of {runs} runs)")
    for per_cn, per_lane in ((True, False), (True, True), (False, False), (False, True)):
        def served(per_cn: bool = per_cn, per_lane: bool = per_lane) -> bytes:
            return render(families(stats, per_client_cn=per_cn, per_lane_id=per_lane))

        reg = CollectorRegistry()
        reg.register(TunnelCollector(stats, per_client_cn=per_cn, per_lane_id=per_lane))
        body = served()
        series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
        best, med = time_ms(served, runs)
        ref_best, ref_med = time_ms(partial(generate_latest, reg), max(3, runs // 3))
        print(f"  per_client_cn={per_cn!s:5} per_lane_id={per_lane!s:5}: {series:5d} series, "
              f"{len(body) / 1024:6.1f} KiB: served (render) {best:6.2f} / {med:6.2f} ms; "
              f"generate_latest(TunnelCollector) {ref_best:7.2f} / {ref_med:7.2f} ms")


# The scraper runs in a process of its own, so that its CPU time and its share of the
# GIL stay out of the figures: what the tunnel's process spends per scrape is all the
# server's. It says "ready", waits for "go", scrapes ``n`` times one after the other
# (a new connection each, as Prometheus does with Connection: close), and prints the
# latencies in ms.
_SCRAPER = r"""
import socket, sys, time
host, port, path, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
print("ready", flush=True)
sys.stdin.readline()
latencies = []
for _ in range(n):
    t0 = time.perf_counter()
    with socket.create_connection((host, port)) as sock:
        sock.sendall(request)
        got = bytearray()
        while chunk := sock.recv(1 << 20):
            got += chunk
    latencies.append((time.perf_counter() - t0) * 1000)
    assert got.startswith((b"HTTP/1.1 200 ", b"HTTP/1.0 200 ")), bytes(got[:80])
print(" ".join(f"{x:.4f}" for x in latencies), flush=True)
"""


async def _scrape_from_another_process(port: int, runs: int) -> tuple[float, float]:
    """(CPU ms of this process per scrape, the scraper's median latency in ms)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _SCRAPER, "127.0.0.1", str(port), "/metrics", str(runs),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    assert (await proc.stdout.readline()).strip() == b"ready"
    cpu0 = time.process_time()
    proc.stdin.write(b"go\n")
    line = await proc.stdout.readline()
    cpu = (time.process_time() - cpu0) * 1000 / runs
    await proc.wait()
    return cpu, statistics.median(float(x) for x in line.split())


def http_scrape_cost(stats: TunnelStats, runs: int, loops: list[str]) -> None:
    """CPU time of the tunnel's process per HTTP scrape (the loop is busy that long),
    and the scraper's latency, with the scraper in another process."""
    print(f"Whole HTTP scrapes over loopback, scraper in another process ({runs} scrapes; "
          f"CPU: the serving process's, per scrape; latency: the scraper's median)")
    cases = (("per_client_cn=True ", True, None), ("per_client_cn=False", False, None),
             ("2-byte body        ", False, b"x\n"))  # the last one: the HTTP side alone

    async def endpoint(per_cn: bool, body: bytes | None) -> tuple[float, float, int]:
        cfg = SimpleNamespace(enabled=True, listen_addr="127.0.0.1:0", path="/metrics",
                              per_client_cn=per_cn, per_lane_id=False)
        server = await start_metrics_server(stats, cfg)
        assert server is not None
        if body is not None:
            server.exposition = lambda: body  # type: ignore[method-assign]
        size = len(server.exposition())
        try:
            return (*await _scrape_from_another_process(server.port, runs), size)
        finally:
            await server.close()

    for loop in loops:
        for title, per_cn, body in cases:
            cpu, latency, size = run(endpoint(per_cn, body), loop)
            print(f"  {loop:7s} {title} ({size / 1024:5.1f} KiB): "
                  f"CPU {cpu:6.3f} ms/scrape, latency {latency:6.3f} ms")


def threaded_scrape_cost(stats: TunnelStats, runs: int) -> None:
    """The alternative not taken: prometheus-client's own server (a wsgiref server in a
    thread of its own, generate_latest on a TunnelCollector). Its CPU is spent under
    the GIL the tunnel's loop needs too."""
    from prometheus_client import start_http_server

    print(f"prometheus_client.start_http_server, same scraper ({runs} scrapes)")
    for title, per_cn in (("per_client_cn=True ", True), ("per_client_cn=False", False)):
        reg = CollectorRegistry()
        reg.register(TunnelCollector(stats, per_client_cn=per_cn))
        started = start_http_server(0, addr="127.0.0.1", registry=reg)
        if not isinstance(started, tuple):  # prometheus-client < 0.20 returns nothing
            print("  (needs prometheus-client >= 0.20)")
            return
        server, thread = started
        try:
            cpu, latency = asyncio.run(
                _scrape_from_another_process(server.server_address[1], runs))
        finally:
            server.shutdown()
            server.server_close()
            thread.join(5)
        print(f"  thread  {title}: CPU {cpu:6.3f} ms/scrape, latency {latency:6.3f} ms")


def hot_path_cost(number: int) -> None:
    st = TunnelStats(role="client", max_lanes=5)
    c = st.counters("alice")
    h = c.forward_latency["up"]
    reg = CollectorRegistry()
    plain = Counter("bench_plain", "x", registry=reg)
    labelled = Counter("bench_labelled", "x", ["client_cn", "dir"], registry=reg)
    child = labelled.labels("alice", "up")
    cases = [
        ("empty loop (baseline)", "pass"),
        ("Counters attribute add: c.udp_in_packets += 1", "c.udp_in_packets += 1"),
        ("per batch: packets += n; bytes += nbytes", "c.udp_in_packets += 32; c.udp_in_bytes += 45000"),
        ("Counters.drop('oldest', n)", "c.drop('oldest', 3)"),
        ("Histogram.observe(v, n) per batch", "h.observe(0.0003, 32)"),
        ("prometheus_client Counter.inc()", "plain.inc()"),
        ("prometheus_client labelled child .inc()", "child.inc()"),
        ("prometheus_client .labels(cn, dir).inc()", "labelled.labels('alice', 'up').inc()"),
    ]
    env = {"c": c, "h": h, "plain": plain, "child": child, "labelled": labelled}
    print(f"Hot-path cost per call (best of 5 x {number:,} calls):")
    for title, stmt in cases:
        best = min(timeit.repeat(stmt, globals=env, number=number, repeat=5))
        print(f"  {title:52s} {best / number * 1e9:7.1f} ns")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cns", type=int, default=100)
    ap.add_argument("--lanes", type=int, default=5)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--number", type=int, default=1_000_000)
    ap.add_argument("--http-runs", type=int, default=200,
                    help="scrapes per HTTP measurement")
    ap.add_argument("--only", choices=("render", "http", "threaded", "hot"), action="append",
                    help="run only these parts (repeatable; default all)")
    args = ap.parse_args()
    parts = set(args.only or ("render", "http", "threaded", "hot"))
    print(f"Python {sys.version.split()[0]}")
    stats = busy_stats(args.cns, args.lanes)
    if "render" in parts:
        scrape_cost(stats, args.runs)
    if "http" in parts:
        loops = ["uvloop", "asyncio"] if loop_name() == "uvloop" else ["asyncio"]
        http_scrape_cost(stats, args.http_runs, loops)
    if "threaded" in parts:
        threaded_scrape_cost(stats, max(10, args.http_runs // 10))
    if "hot" in parts:
        hot_path_cost(args.number)


if __name__ == "__main__":
    main()
