"""What metrics cost: one scrape with many client CNs, and one counter add on the hot path.

    python bench/metrics_cost.py [--cns 100] [--lanes 5]

The tunnel counts into plain ints on ``ut.stats.Counters`` (one attribute add,
once per batch of datagrams where it can) and builds Prometheus families only
at scrape time. This script measures both sides and, for comparison, what
``prometheus_client.Counter.inc()`` would cost if the hot path called it.
Figures are quoted in docs/metrics.md.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import timeit
import urllib.request
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client import CollectorRegistry, Counter, generate_latest  # noqa: E402

from ut.metrics import TunnelCollector, families, render, start_metrics_server  # noqa: E402
from ut.stats import DROP_REASONS, TunnelStats  # noqa: E402


class _Session:
    def __init__(self, counters, queued: int) -> None:  # type: ignore[no-untyped-def]
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


def time_ms(fn, runs: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
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
        ref_best, ref_med = time_ms(lambda reg=reg: generate_latest(reg), max(3, runs // 3))
        print(f"  per_client_cn={per_cn!s:5} per_lane_id={per_lane!s:5}: {series:5d} series, "
              f"{len(body) / 1024:6.1f} KiB: served (render) {best:6.2f} / {med:6.2f} ms; "
              f"generate_latest(TunnelCollector) {ref_best:7.2f} / {ref_med:7.2f} ms")


def http_scrape_cost(stats: TunnelStats, runs: int) -> None:
    cfg = SimpleNamespace(enabled=True, listen_addr="127.0.0.1:0", path="/metrics",
                          per_client_cn=True, per_lane_id=False)

    def get(url: str) -> int:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return len(resp.read())

    async def go() -> None:
        server = await start_metrics_server(stats, cfg)
        assert server is not None
        samples = []
        for _ in range(runs):
            t0 = time.perf_counter()
            await asyncio.to_thread(get, server.url)
            samples.append((time.perf_counter() - t0) * 1000)
        await server.close()
        print(f"  whole HTTP GET over loopback (urllib client, per_client_cn=True): "
              f"{min(samples):6.2f} / {statistics.median(samples):6.2f} ms")

    asyncio.run(go())


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
    args = ap.parse_args()
    print(f"Python {sys.version.split()[0]}")
    stats = busy_stats(args.cns, args.lanes)
    scrape_cost(stats, args.runs)
    http_scrape_cost(stats, max(5, args.runs // 3))
    hot_path_cost(args.number)


if __name__ == "__main__":
    main()
