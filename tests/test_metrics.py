"""Metrics: names, types, labels and values over real HTTP; the endpoint's limits;
promtool on the scrape, the alert rules and the dashboard queries.

Stats are built by hand with known numbers here; traffic-driven checks (each
counter moves by exactly what was sent or dropped) live with the tunnel tests.
Every endpoint test runs under the stock asyncio loop and under uvloop.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import ut
from ut._version import __version__
from ut.metrics import (
    METRIC_NAMES,
    MetricsServer,
    TunnelCollector,
    families,
    render,
    start_metrics_server,
)
from ut.stats import DROP_PATH, DROP_REASONS, FORWARD_BUCKETS, HANDSHAKE_BUCKETS, TunnelStats

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERTS_TEST = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "ut-tunnel.json"
DOC = ROOT / "docs" / "metrics.md"

# SPEC.md "Metrics": these names are part of the contract, exactly as exposed.
SPEC_NAMES = {
    "ut_sessions_active": "gauge",
    "ut_lanes_active_total": "gauge",
    "ut_udp_in_bytes_total": "counter",
    "ut_udp_in_packets_total": "counter",
    "ut_udp_out_bytes_total": "counter",
    "ut_udp_out_packets_total": "counter",
    "ut_udp_drop_total": "counter",
    "ut_tls_handshake_seconds": "histogram",
    "ut_lane_reconnect_total": "counter",
    "ut_queue_len": "gauge",
}
# promtool lint findings we keep on purpose (docs/metrics.md explains each).
ALLOWED_PROMTOOL = {
    'ut_lanes_active_total non-counter metrics should not have "_total" suffix',
}


# -- loops --------------------------------------------------------------------

LOOP_FACTORIES: dict[str, Any] = {"asyncio": asyncio.new_event_loop}
try:
    import uvloop

    LOOP_FACTORIES["uvloop"] = uvloop.new_event_loop
except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
    pass


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Any:
    """``run(coro)`` on a fresh loop of the parametrised kind."""
    if request.param not in LOOP_FACTORIES:
        pytest.skip("uvloop is not installed")
    factory = LOOP_FACTORIES[request.param]

    def _run(coro: Any) -> Any:
        loop = factory()
        try:
            return loop.run_until_complete(asyncio.wait_for(coro, 60))
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    return _run


# -- fixtures: stats with known numbers ------------------------------------------

@dataclass
class MetricsCfg:
    enabled: bool = True
    listen_addr: str = "127.0.0.1:0"
    path: str = "/metrics"
    per_client_cn: bool = True
    per_lane_id: bool = False


class FakeSession:
    def __init__(self, counters: Any, queued: int) -> None:
        self.counters = counters
        self.queue = [b"x"] * queued


def make_stats(role: str = "server") -> TunnelStats:
    st = TunnelStats(role=role, max_lanes=3, implementation="pure")
    a = st.counters("alice")
    a.sessions_active, a.lanes_active = 2, 5
    a.udp_in_packets, a.udp_in_bytes = 10, 1000
    a.udp_out_packets, a.udp_out_bytes = 7, 700
    a.drop("oldest", 2)
    a.drop("udp_write_error", 1)
    a.lane_tx_frames[:] = [3, 4, 1]
    a.lane_tx_bytes[:] = [30, 40, 10]
    a.lane_rx_frames[:] = [2, 2, 3]
    a.lane_rx_bytes[:] = [20, 20, 30]
    a.lane_reconnects = 4
    a.forward_latency["up"].observe(0.0003, 4)
    a.forward_latency["down"].observe(0.02, 1)
    b = st.counters("bob")
    b.sessions_active, b.lanes_active = 1, 3
    b.udp_in_packets, b.udp_in_bytes = 5, 50
    b.udp_out_packets, b.udp_out_bytes = 6, 66
    b.drop("oldest", 1)
    b.drop("oversize", 3)
    b.lane_tx_frames[:] = [1, 0, 0]
    b.lane_tx_bytes[:] = [11, 0, 0]
    b.lane_rx_frames[:] = [0, 5, 0]
    b.lane_rx_bytes[:] = [0, 55, 0]
    b.lane_reconnects = 1
    b.forward_latency["up"].observe(0.0003, 1)
    b.forward_latency["up"].observe(0.003, 2)
    st.handshake_seconds.observe(0.004)
    st.handshake_seconds.observe(3.0)
    st.handshake_failed("unknown_ca")
    st.handshake_failed("unknown_ca")
    st.handshake_failed("expired")
    st.protocol_error("bad_magic")
    st.sessions["a1"] = FakeSession(a, 5)
    st.sessions["a2"] = FakeSession(a, 1)
    st.sessions["b1"] = FakeSession(b, 2)
    return st


# -- helpers --------------------------------------------------------------------

def http(url: str, method: str = "GET", data: bytes | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, method=method, data=data)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, dict(err.headers), err.read()


async def scrape(server: MetricsServer) -> str:
    status, headers, body = await asyncio.to_thread(http, server.url)
    assert status == 200
    assert headers["Content-Type"] == CONTENT_TYPE_LATEST
    assert headers["Connection"] == "close"
    assert int(headers["Content-Length"]) == len(body)
    return body.decode()


def serve_and_scrape(run: Any, stats: TunnelStats, cfg: MetricsCfg) -> str:
    async def go() -> str:
        server = await start_metrics_server(stats, cfg)
        assert server is not None
        try:
            return await scrape(server)
        finally:
            await server.close()

    return run(go())


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in out, f"duplicate series {key}"
            out[key] = s.value
    return out


def exposed_types(text: str) -> dict[str, str]:
    """``# TYPE`` lines: the family names exactly as a scraper sees them."""
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.M))


def value(text_samples: dict, name: str, **labels: str) -> float:
    return text_samples[(name, tuple(sorted(labels.items())))]


def series_of(text_samples: dict, name: str) -> list[dict[str, str]]:
    return [dict(labels) for (n, labels) in text_samples if n == name]


def cumulative(bounds: tuple[float, ...], observations: dict[float, int]) -> list[tuple[str, int]]:
    out = []
    for b in bounds:
        out.append((repr(float(b)), sum(n for v, n in observations.items() if v <= b)))
    out.append(("+Inf", sum(observations.values())))
    return out


def check_histogram(s: dict, name: str, bounds: tuple[float, ...], obs: dict[float, int],
                    **labels: str) -> None:
    for le, n in cumulative(bounds, obs):
        assert value(s, name + "_bucket", le=le, **labels) == n, (name, labels, le)
    assert value(s, name + "_count", **labels) == sum(obs.values())
    assert value(s, name + "_sum", **labels) == pytest.approx(sum(v * n for v, n in obs.items()))


def promtool() -> str | None:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("UT_REQUIRE_E2E") == "1":
            pytest.fail("promtool is required (UT_REQUIRE_E2E=1): bash .ci/run unpacks it "
                        "from Debian's prometheus package")
        pytest.skip("promtool not installed (Debian package 'prometheus')")
    return path


# -- names, types, labels, values ----------------------------------------------------

def test_every_metric_per_client_cn(run: Any) -> None:
    text = serve_and_scrape(run, make_stats("server"), MetricsCfg())
    types = exposed_types(text)
    assert types == METRIC_NAMES
    for name, typ in SPEC_NAMES.items():
        assert types[name] == typ, name
    # The parser agrees on the types (it strips _total from counter family names).
    for fam in text_string_to_metric_families(text):
        exposed = fam.name + "_total" if fam.type == "counter" else fam.name
        assert METRIC_NAMES[exposed] == fam.type
    s = samples(text)

    assert value(s, "ut_build_info", version=__version__,
                 implementation="pure", role="server") == 1
    assert value(s, "ut_lanes_configured") == 3
    for cn, sessions, lanes, queued, reconnects in (("alice", 2, 5, 6, 4), ("bob", 1, 3, 2, 1)):
        assert value(s, "ut_sessions_active", client_cn=cn) == sessions
        assert value(s, "ut_lanes_active_total", client_cn=cn) == lanes
        assert value(s, "ut_queue_len", client_cn=cn) == queued
        assert value(s, "ut_lane_reconnect_total", client_cn=cn) == reconnects
    # Server: reads "down" from UDP, writes "up".
    assert value(s, "ut_udp_in_packets_total", client_cn="alice", dir="down") == 10
    assert value(s, "ut_udp_in_bytes_total", client_cn="alice", dir="down") == 1000
    assert value(s, "ut_udp_out_packets_total", client_cn="alice", dir="up") == 7
    assert value(s, "ut_udp_out_bytes_total", client_cn="alice", dir="up") == 700
    assert value(s, "ut_udp_in_packets_total", client_cn="bob", dir="down") == 5
    assert value(s, "ut_udp_out_bytes_total", client_cn="bob", dir="up") == 66
    assert len(series_of(s, "ut_udp_in_packets_total")) == 2

    # Every reason is exported for every CN (zeros too, so rate() sees the first drop).
    drops = {"alice": {"oldest": 2, "udp_write_error": 1}, "bob": {"oldest": 1, "oversize": 3}}
    for cn, got in drops.items():
        for reason in DROP_REASONS:
            d = "up" if DROP_PATH[reason] == "out" else "down"  # a server's in dir is down
            assert value(s, "ut_udp_drop_total", client_cn=cn, dir=d, reason=reason) == \
                got.get(reason, 0)
    assert len(series_of(s, "ut_udp_drop_total")) == 2 * len(DROP_REASONS)

    # Lanes summed over lane ids (per_lane_id off): tx frames go "down" on a server.
    assert value(s, "ut_lane_frames_total", client_cn="alice", dir="down") == 8
    assert value(s, "ut_lane_frames_total", client_cn="alice", dir="up") == 7
    assert value(s, "ut_lane_bytes_total", client_cn="alice", dir="down") == 80
    assert value(s, "ut_lane_bytes_total", client_cn="bob", dir="up") == 55
    assert all("lane_id" not in labels for labels in series_of(s, "ut_lane_frames_total"))

    check_histogram(s, "ut_forward_latency_seconds", FORWARD_BUCKETS, {0.0003: 4},
                    client_cn="alice", dir="up")
    check_histogram(s, "ut_forward_latency_seconds", FORWARD_BUCKETS, {0.02: 1},
                    client_cn="alice", dir="down")
    check_histogram(s, "ut_forward_latency_seconds", FORWARD_BUCKETS, {0.0003: 1, 0.003: 2},
                    client_cn="bob", dir="up")
    check_histogram(s, "ut_forward_latency_seconds", FORWARD_BUCKETS, {},
                    client_cn="bob", dir="down")
    check_histogram(s, "ut_tls_handshake_seconds", HANDSHAKE_BUCKETS, {0.004: 1, 3.0: 1})
    assert value(s, "ut_tls_handshake_failures_total", reason="unknown_ca") == 2
    assert value(s, "ut_tls_handshake_failures_total", reason="expired") == 1
    assert value(s, "ut_protocol_errors_total", reason="bad_magic") == 1

    # client_cn on every per-client family, and only there.
    per_cn = set(METRIC_NAMES) - {
        "ut_build_info", "ut_lanes_configured", "ut_tls_handshake_seconds",
        "ut_tls_handshake_failures_total", "ut_protocol_errors_total",
        "ut_web_face_connections_total", "ut_limit_refusals_total"}
    for (name, labels) in s:
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        assert ("client_cn" in dict(labels)) == (family in per_cn), name


def test_aggregate_without_client_cn(run: Any) -> None:
    text = serve_and_scrape(run, make_stats("client"), MetricsCfg(per_client_cn=False))
    s = samples(text)
    assert not any("client_cn" in dict(labels) for (_, labels) in s)
    assert exposed_types(text) == METRIC_NAMES
    assert value(s, "ut_sessions_active") == 3
    assert value(s, "ut_lanes_active_total") == 8
    assert value(s, "ut_queue_len") == 8
    assert value(s, "ut_lane_reconnect_total") == 5
    # Client: reads "up" from UDP, writes "down".
    assert value(s, "ut_udp_in_packets_total", dir="up") == 15
    assert value(s, "ut_udp_in_bytes_total", dir="up") == 1050
    assert value(s, "ut_udp_out_packets_total", dir="down") == 13
    assert value(s, "ut_udp_out_bytes_total", dir="down") == 766
    assert value(s, "ut_udp_drop_total", dir="up", reason="oldest") == 3
    assert value(s, "ut_udp_drop_total", dir="up", reason="oversize") == 3
    assert value(s, "ut_udp_drop_total", dir="down", reason="udp_write_error") == 1
    assert value(s, "ut_udp_drop_total", dir="up", reason="no_lane") == 0
    assert value(s, "ut_lane_frames_total", dir="up") == 9  # tx on a client is "up"
    assert value(s, "ut_lane_frames_total", dir="down") == 12
    assert value(s, "ut_lane_bytes_total", dir="up") == 91
    check_histogram(s, "ut_forward_latency_seconds", FORWARD_BUCKETS,
                    {0.0003: 5, 0.003: 2}, dir="up")
    check_histogram(s, "ut_forward_latency_seconds", FORWARD_BUCKETS, {0.02: 1}, dir="down")


@pytest.mark.parametrize("per_cn", [True, False])
def test_per_lane_id(run: Any, per_cn: bool) -> None:
    text = serve_and_scrape(run, make_stats("server"),
                            MetricsCfg(per_client_cn=per_cn, per_lane_id=True))
    s = samples(text)
    if per_cn:
        assert value(s, "ut_lane_frames_total", client_cn="alice", dir="down", lane_id="1") == 4
        assert value(s, "ut_lane_bytes_total", client_cn="bob", dir="up", lane_id="1") == 55
        assert value(s, "ut_lane_frames_total", client_cn="bob", dir="down", lane_id="2") == 0
        assert len(series_of(s, "ut_lane_frames_total")) == 2 * 2 * 3  # cn x dir x lane
    else:
        assert [value(s, "ut_lane_frames_total", dir="down", lane_id=str(i))
                for i in range(3)] == [4, 4, 1]
        assert [value(s, "ut_lane_bytes_total", dir="up", lane_id=str(i))
                for i in range(3)] == [20, 75, 30]
        assert len(series_of(s, "ut_lane_frames_total")) == 2 * 3
    # lane_id appears on the per-lane families only.
    for (name, labels) in s:
        assert ("lane_id" in dict(labels)) == name.startswith(("ut_lane_frames", "ut_lane_bytes"))


def test_empty_stats_aggregate_has_zero_series() -> None:
    """Before any client shows up, aggregate mode still exports zeros (rate() works)."""
    reg = CollectorRegistry()
    reg.register(TunnelCollector(TunnelStats(role="client", max_lanes=5), per_client_cn=False))
    s = samples(generate_latest(reg).decode())
    assert value(s, "ut_sessions_active") == 0
    assert value(s, "ut_udp_in_packets_total", dir="up") == 0
    assert value(s, "ut_udp_drop_total", dir="up", reason="oldest") == 0
    assert value(s, "ut_forward_latency_seconds_count", dir="down") == 0


def test_unknown_drop_reason_still_exported() -> None:
    st = make_stats("client")
    st.counters("alice").drop("surprise", 2)
    reg = CollectorRegistry()
    reg.register(TunnelCollector(st))
    s = samples(generate_latest(reg).decode())
    assert value(s, "ut_udp_drop_total", client_cn="alice", dir="up", reason="surprise") == 2


@pytest.mark.parametrize("per_cn", [True, False])
@pytest.mark.parametrize("per_lane", [True, False])
def test_render_matches_generate_latest(per_cn: bool, per_lane: bool) -> None:
    """The served text (render) and prometheus_client's (TunnelCollector) agree."""
    st = make_stats("client")
    odd = st.counters('quote" back\\slash\nnew line, ünïcode')
    odd.udp_in_packets = 1
    odd.forward_latency["down"].observe(1e9)  # lands in +Inf
    st.handshake_failed("weird reason")
    reg = CollectorRegistry()
    reg.register(TunnelCollector(st, per_client_cn=per_cn, per_lane_id=per_lane))
    reference = generate_latest(reg).decode()
    ours = render(families(st, per_client_cn=per_cn, per_lane_id=per_lane)).decode()
    assert samples(ours) == samples(reference)
    assert exposed_types(ours) == exposed_types(reference) == METRIC_NAMES
    assert re.findall(r"^# HELP .*$", ours, re.M) == re.findall(r"^# HELP .*$", reference, re.M)
    if per_cn:
        assert value(samples(ours), "ut_udp_in_packets_total", dir="up",
                     client_cn='quote" back\\slash\nnew line, ünïcode') == 1


def test_describe_detects_clashes() -> None:
    reg = CollectorRegistry()
    reg.register(TunnelCollector(make_stats()))
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        reg.register(TunnelCollector(make_stats()))


def test_drop_reasons_used_in_code_are_in_the_vocabulary() -> None:
    """``.drop("reason", ...)`` in the package only uses DROP_REASONS words."""
    used = {}
    for path in Path(ut.__file__).parent.glob("*.py"):
        for m in re.finditer(r"""\.drop\(\s*["']([^"']+)["']""", path.read_text()):
            used.setdefault(m.group(1), path.name)
    unknown = {r: f for r, f in used.items() if r not in DROP_REASONS}
    assert not unknown, f"drop reasons missing from ut.stats.DROP_PATH: {unknown}"


# -- server lifecycle ------------------------------------------------------------------

def test_disabled_returns_none(run: Any) -> None:
    async def go() -> None:
        assert await start_metrics_server(make_stats(), MetricsCfg(enabled=False)) is None
        assert await start_metrics_server(make_stats(), None) is None

    run(go())


def test_two_servers_in_one_process(run: Any) -> None:
    async def go() -> None:
        one, two = make_stats("client"), make_stats("server")
        two.counters("carol").udp_in_packets = 99
        a = await start_metrics_server(one, MetricsCfg())
        b = await start_metrics_server(two, MetricsCfg(per_client_cn=False))
        assert a is not None and b is not None and a.port != b.port
        try:
            sa, sb = samples(await scrape(a)), samples(await scrape(b))
            assert value(sa, "ut_udp_in_packets_total", client_cn="alice", dir="up") == 10
            assert ("ut_udp_in_packets_total", (("client_cn", "carol"), ("dir", "down"))) not in sa
            assert value(sb, "ut_udp_in_packets_total", dir="down") == 114
            assert a.scrapes == 1 and b.scrapes == 1
        finally:
            await a.close()
            await b.close()

    run(go())


def test_extra_registry_is_served_after_the_tunnel(run: Any) -> None:
    async def go() -> None:
        reg = CollectorRegistry()
        Counter("app_requests", "An embedding program's own metric.", registry=reg).inc(3)
        server = await start_metrics_server(make_stats(), MetricsCfg(path="stats"), registry=reg)
        assert server is not None and server.registry is reg
        assert server.url.endswith("/stats")
        # The tunnel's names are reserved: a second copy of them is refused.
        with pytest.raises(ValueError, match="Duplicated timeseries"):
            reg.register(TunnelCollector(make_stats()))
        s = samples(await scrape(server))
        assert value(s, "app_requests_total") == 3
        assert value(s, "ut_sessions_active", client_cn="alice") == 2
        await server.close()
        await server.close()  # idempotent
        reg.register(TunnelCollector(make_stats()))  # names released on close

    run(go())


def test_bad_listen_addr(run: Any) -> None:
    async def go() -> None:
        with pytest.raises(ValueError, match="host:port"):
            await start_metrics_server(make_stats(), MetricsCfg(listen_addr="localhost"))

    run(go())


# -- HTTP behaviour ---------------------------------------------------------------------

def test_http_statuses(run: Any) -> None:
    async def go() -> None:
        server = await start_metrics_server(make_stats(), MetricsCfg())
        assert server is not None
        try:
            base = server.url.rsplit("/", 1)[0]
            status, headers, body = await asyncio.to_thread(http, base + "/other")
            assert status == 404 and headers["Connection"] == "close"
            status, headers, body = await asyncio.to_thread(
                http, server.url, "POST", b"x" * 5000)
            assert status == 405 and headers["Allow"] == "GET, HEAD"
            status, _, _ = await asyncio.to_thread(http, server.url, "PUT", b"")
            assert status == 405
            # A query string does not change the path.
            status, _, body = await asyncio.to_thread(http, server.url + "?x=1")
            assert status == 200 and b"ut_sessions_active" in body
            # HEAD: same headers as GET, no body.
            _, get_headers, get_body = await asyncio.to_thread(http, server.url)
            status, headers, body = await asyncio.to_thread(http, server.url, "HEAD")
            assert status == 200 and body == b""
            assert headers["Content-Length"] == str(len(get_body))
            assert headers["Content-Type"] == CONTENT_TYPE_LATEST
            # Garbage and an oversize request head.
            assert (await raw(server, b"HELLO\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
            big = b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"
            assert (await raw(server, big)).startswith(b"HTTP/1.1 431 ")
            many = b"GET /metrics HTTP/1.1\r\n" + b"X-Many: aaaaaaaaaa\r\n" * 1000 + b"\r\n"
            assert (await raw(server, many)).startswith(b"HTTP/1.1 431 ")
            # A bare-LF request from netcat is understood.
            assert (await raw(server, b"GET /metrics HTTP/1.0\n\n")).startswith(b"HTTP/1.1 200 ")
        finally:
            await server.close()

    run(go())


async def raw(server: MetricsServer, request: bytes, timeout: float = 10.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(request)
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


def test_slowloris_does_not_block_a_scrape(run: Any) -> None:
    async def go() -> None:
        server = await start_metrics_server(make_stats(), MetricsCfg(), read_timeout=1.5)
        assert server is not None
        try:
            # One client sends half a request line and stops; another trickles a
            # byte every 50 ms and never finishes its head.
            r1, w1 = await asyncio.open_connection("127.0.0.1", server.port)
            w1.write(b"GET /metr")
            r2, w2 = await asyncio.open_connection("127.0.0.1", server.port)
            w2.write(b"GET /metrics HTTP/1.1\r\n")

            async def trickle() -> None:
                try:
                    while True:
                        w2.write(b"X")
                        await w2.drain()
                        await asyncio.sleep(0.05)
                except (ConnectionError, OSError):
                    pass

            trickler = asyncio.ensure_future(trickle())
            await asyncio.sleep(0.2)
            t0 = time.monotonic()
            assert "ut_sessions_active" in await scrape(server)
            assert time.monotonic() - t0 < 1.0
            # Both slow clients are cut at the read deadline, however they trickle.
            t0 = time.monotonic()
            got1 = await asyncio.wait_for(r1.read(), 5)
            got2 = await asyncio.wait_for(r2.read(), 5)
            assert got1.startswith(b"HTTP/1.1 408 ")
            assert got2 == b"" or got2.startswith(b"HTTP/1.1 408 ")
            assert time.monotonic() - t0 < 1.5 + 1.5  # deadline + linger
            trickler.cancel()
            w1.close()
            w2.close()
        finally:
            await server.close()

    run(go())


def test_connection_limit_and_close_with_idle_clients(run: Any) -> None:
    async def go() -> None:
        server = await start_metrics_server(
            make_stats(), MetricsCfg(), max_connections=2, read_timeout=30)
        assert server is not None
        idle = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2)]
        await asyncio.sleep(0.1)
        # A connection over the limit is closed at once, unanswered.
        try:
            assert await raw(server, b"GET /metrics HTTP/1.1\r\n\r\n") == b""
        except ConnectionResetError:
            pass
        assert server.connections == 2
        # Closing the server does not wait for idle clients' 30 s deadline.
        t0 = time.monotonic()
        await server.close()
        assert time.monotonic() - t0 < 2
        for reader, writer in idle:
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()

    run(go())


def test_standard_answers_from_h11(run: Any) -> None:
    """Where h11 (RFC 9112) is stricter than a lenient parser, its answer is the standard
    one, and blank lines before the request line are still tolerated (RFC 9112 2.2)."""
    async def go() -> None:
        server = await start_metrics_server(make_stats(), MetricsCfg())
        assert server is not None
        try:
            # HTTP/1.1 without Host: 400 (RFC 9112 3.2); HTTP/1.0 needs none.
            assert (await raw(server, b"GET /metrics HTTP/1.1\r\n\r\n")).startswith(
                b"HTTP/1.1 400 ")
            got = await raw(server, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            assert got.startswith(b"HTTP/1.1 200 ") and b"ut_sessions_active" in got
            got = await raw(server, b"\r\n\r\nGET /metrics HTTP/1.0\r\n\r\n")
            assert got.startswith(b"HTTP/1.1 200 ")
            # A transfer coding h11 does not implement: 501, whatever the method.
            got = await raw(server, b"POST /metrics HTTP/1.1\r\nHost: x\r\n"
                                    b"Transfer-Encoding: gzip\r\n\r\n")
            assert got.startswith(b"HTTP/1.1 501 ")
            # A header line without a colon, two spaces in the request line: 400.
            for bad in (b"GET /metrics HTTP/1.1\r\nHost: x\r\nno colon\r\n\r\n",
                        b"GET  /metrics HTTP/1.1\r\nHost: x\r\n\r\n"):
                assert (await raw(server, bad)).startswith(b"HTTP/1.1 400 "), bad
            # HEAD of another path: 404 with its headers and no body.
            got = await raw(server, b"HEAD /other HTTP/1.1\r\nHost: x\r\n\r\n")
            assert got.startswith(b"HTTP/1.1 404 ") and got.endswith(b"\r\n\r\n")
            assert b"Content-Length: 10\r\n" in got and b"Connection: close\r\n" in got
            assert server.scrapes == 2
        finally:
            await server.close()

    run(go())


def test_failing_collector_is_500_and_logged(run: Any) -> None:
    """An embedding program's collector that raises gets the scrape a 500 (and a log
    line), not a dropped connection; the next scrape is served again."""
    from ut._testbase.tunnelkit import capture_events

    class Broken:
        fail = True

        def collect(self) -> Any:
            if Broken.fail:
                raise RuntimeError("collector down")
            return iter(())

    async def go() -> None:
        reg = CollectorRegistry()
        reg.register(Broken())
        server = await start_metrics_server(make_stats(), MetricsCfg(), registry=reg)
        assert server is not None
        try:
            with capture_events() as cap:
                status, headers, body = await asyncio.to_thread(http, server.url)
            assert status == 500 and headers["Connection"] == "close"
            assert body == b"internal server error\n" and server.scrapes == 0
            [ev] = cap.named("metrics_scrape_error")
            assert ev["err"] == "RuntimeError: collector down"
            Broken.fail = False
            assert "ut_sessions_active" in await scrape(server)
        finally:
            await server.close()

    run(go())


async def chunked_raw(server: MetricsServer, request: bytes, sizes: list[int]) -> bytes:
    """Send ``request`` in pieces of ``sizes`` (cycled), one loop turn apart."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        i = k = 0
        while i < len(request):
            writer.write(request[i:i + sizes[k % len(sizes)]])
            await writer.drain()
            await asyncio.sleep(0.001)
            i += sizes[k % len(sizes)]
            k += 1
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


def test_request_head_limit_holds_however_the_head_is_split(run: Any) -> None:
    """A head of exactly ``max_request_bytes`` is served and one byte more is 431,
    whether it comes in one write, a byte at a time or in uneven pieces (the endpoint
    hands h11 at most that many bytes, so the limit does not depend on the reads)."""
    limit = 600

    def head(size: int) -> bytes:
        start, end = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: ", b"\r\n\r\n"
        return start + b"a" * (size - len(start) - len(end)) + end

    async def go() -> None:
        server = await start_metrics_server(make_stats(), MetricsCfg(), max_request_bytes=limit)
        assert server is not None
        try:
            for sizes in ([limit + 1], [1], [7, 1, 130, 2, 61]):
                got = await chunked_raw(server, head(limit), sizes)
                assert got.startswith(b"HTTP/1.1 200 "), (sizes, got[:40])
                got = await chunked_raw(server, head(limit + 1), sizes)
                assert got.startswith(b"HTTP/1.1 431 "), (sizes, got[:40])
            # A body after a head that fits, in the same write, is not part of the head.
            start = b"PUT /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 900\r\nX-Pad: "
            put = start + b"a" * (limit - len(start) - 4) + b"\r\n\r\n"
            assert len(put) == limit
            got = await chunked_raw(server, put + b"b" * 900, [4096])
            assert got.startswith(b"HTTP/1.1 405 ")
            assert server.scrapes == 3
        finally:
            await server.close()

    run(go())


class FakeTransport:
    """Enough of a stream transport for ``ut.metrics_http._Connection``, no socket."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.eof = False
        self.closed = ""

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def write(self, data: bytes) -> None:
        assert not self.eof and not self.closed
        self.out += data

    def get_write_buffer_size(self) -> int:
        return 0

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def close(self) -> None:
        self.closed = self.closed or "close"

    def abort(self) -> None:
        self.closed = self.closed or "abort"


def test_head_split_at_every_byte_without_sockets() -> None:
    """The protocol driven by hand (h11's own test style): the same request split at
    every byte, and in random pieces, gets the same answer; the head limit is exact."""
    import random

    from ut.metrics_http import _Connection

    loop = asyncio.new_event_loop()
    server = MetricsServer(make_stats(), max_request_bytes=200)

    def serve(pieces: list[bytes]) -> FakeTransport:
        conn, transport = _Connection(server, loop), FakeTransport()
        conn.connection_made(transport)  # type: ignore[arg-type]
        for piece in pieces:
            conn.data_received(piece)
        conn.eof_received()
        conn.connection_lost(None)
        return transport

    try:
        request = b"\r\nGET /metrics?x=1 HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n"
        expected = bytes(serve([request]).out)
        assert expected.startswith(b"HTTP/1.1 200 ")
        for i in range(1, len(request)):
            t = serve([request[:i], request[i:]])
            assert bytes(t.out) == expected and t.eof and t.closed == "close", i
        rng = random.Random(16)
        for _ in range(50):
            cuts = sorted(rng.sample(range(1, len(request)), rng.randint(2, 12)))
            pieces = [request[a:b] for a, b in zip([0, *cuts], [*cuts, len(request)], strict=True)]
            assert bytes(serve(pieces).out) == expected, cuts
        # Exactly the limit, a byte at a time: served; one byte more: 431.
        start = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: "
        fits = start + b"a" * (200 - len(start) - 4) + b"\r\n\r\n"
        assert bytes(serve([bytes([b]) for b in fits]).out) == expected
        over = fits[:-4] + b"a\r\n\r\n"
        t = serve([bytes([b]) for b in over])
        assert t.out.startswith(b"HTTP/1.1 431 ") and t.closed == "close"
        assert server.connections == 0
        # EOF before a whole head: no answer, aborted.
        conn, t = _Connection(server, loop), FakeTransport()
        conn.connection_made(t)  # type: ignore[arg-type]
        conn.data_received(b"GET /metr")
        conn.eof_received()
        assert t.out == b"" and t.closed == "abort"
        conn.connection_lost(None)
    finally:
        loop.close()


def test_client_that_does_not_read_the_answer_is_cut(run: Any) -> None:
    """``write_timeout``: an answer the client does not take in time is dropped with its
    connection, and scrapes meanwhile are served."""
    async def go() -> None:
        server = await start_metrics_server(make_stats(), MetricsCfg(), write_timeout=0.5)
        assert server is not None
        # Larger than every socket buffer between the two ends (tcp_wmem/rmem maxima
        # are a few MiB), so it cannot all leave the process.
        big = b"x" * (48 << 20)
        server.exposition = lambda: big  # type: ignore[method-assign]
        try:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            await loop.sock_connect(sock, ("127.0.0.1", server.port))
            await loop.sock_sendall(sock, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            t0 = time.monotonic()
            await asyncio.sleep(0.2)
            assert server.connections == 1
            server.exposition = lambda: b"small\n"  # type: ignore[method-assign]
            assert await scrape(server) == "small\n"
            while server.connections and time.monotonic() - t0 < 5:
                await asyncio.sleep(0.05)
            assert server.connections == 0
            assert time.monotonic() - t0 < 0.5 + 1.5
            sock.close()
        finally:
            await server.close()

    run(go())


def test_lingering_close_is_bounded(run: Any) -> None:
    """After the answer the endpoint reads and drops what the client still sends, for at
    most ``linger_timeout`` seconds and 64 KiB; the client gets the whole answer."""
    async def go() -> None:
        server = await start_metrics_server(make_stats(), MetricsCfg(), linger_timeout=0.5)
        assert server is not None
        try:
            for junk_bytes, within in ((100, 0.5 + 1.0), (16384, 0.4)):
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                t0 = time.monotonic()

                async def chatter(writer: asyncio.StreamWriter = writer,
                                  n: int = junk_bytes) -> None:
                    try:
                        while True:
                            writer.write(b"j" * n)
                            await writer.drain()
                            await asyncio.sleep(0.02)
                    except (ConnectionError, OSError):
                        pass

                # Slow chatter from the start: the clock cuts it. Fast chatter once the
                # answer is read (so a reset cannot destroy it): the byte cap cuts it.
                talker = asyncio.ensure_future(chatter()) if junk_bytes < 1000 else None
                answer = await asyncio.wait_for(reader.read(), 5)  # our FIN ends it
                talker = talker or asyncio.ensure_future(chatter())
                assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"\n")
                length = int(re.search(rb"Content-Length: (\d+)", answer).group(1))  # type: ignore[union-attr]
                assert len(answer.split(b"\r\n\r\n", 1)[1]) == length
                while server.connections and time.monotonic() - t0 < 5:
                    await asyncio.sleep(0.02)
                assert server.connections == 0
                assert time.monotonic() - t0 < within, (junk_bytes, time.monotonic() - t0)
                talker.cancel()
                writer.close()
        finally:
            await server.close()

    run(go())


def test_concurrent_scrapes(run: Any) -> None:
    """Scrapes that overlap (up to the connection limit) all get the whole answer."""
    async def go() -> None:
        server = await start_metrics_server(make_stats(), MetricsCfg(), max_connections=16)
        assert server is not None
        try:
            bodies = await asyncio.gather(*(scrape(server) for _ in range(12)))
            assert len(set(bodies)) == 1 and "ut_sessions_active" in bodies[0]
            # Raw clients that all connect first, then all ask.
            conns = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(16)]
            await asyncio.sleep(0.05)
            assert server.connections == 16
            for _, w in conns:
                w.write(b"GET /metrics HTTP/1.0\r\n\r\n")
            answers = await asyncio.gather(*(asyncio.wait_for(r.read(), 10) for r, _ in conns))
            for _, w in conns:
                w.close()
            assert all(a.startswith(b"HTTP/1.1 200 ") for a in answers)
            assert len({a.split(b"\r\n\r\n", 1)[1] for a in answers}) == 1
            assert server.scrapes == 12 + 16
        finally:
            await server.close()

    run(go())


# -- promtool -------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [MetricsCfg(), MetricsCfg(per_client_cn=False, per_lane_id=True)])
def test_promtool_check_metrics(run: Any, cfg: MetricsCfg) -> None:
    tool = promtool()
    text = serve_and_scrape(run, make_stats(), cfg)
    proc = subprocess.run([tool, "check", "metrics"], input=text.encode(),
                          capture_output=True, timeout=60)
    problems = {line.strip() for line in (proc.stdout + proc.stderr).decode().splitlines()
                if line.strip()}
    assert problems <= ALLOWED_PROMTOOL, problems
    assert proc.returncode in (0, 3 if problems else 0), proc


def test_promtool_rules() -> None:
    tool = promtool()
    check = subprocess.run([tool, "check", "rules", str(ALERTS)], capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 8 rules found" in check.stdout
    test = subprocess.run([tool, "test", "rules", str(ALERTS_TEST)], capture_output=True,
                          text=True, timeout=60)
    assert test.returncode == 0, test.stdout + test.stderr


def _dashboard_exprs() -> list[str]:
    exprs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                exprs.append(node["expr"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(json.loads(DASHBOARD.read_text()))
    return exprs


def test_dashboard_panels_and_queries(tmp_path: Path) -> None:
    dash = json.loads(DASHBOARD.read_text())
    titles = {p["title"] for p in dash["panels"]}
    for wanted in ("Throughput by direction", "Drops by reason", "Lanes and sessions",
                   "Queue length", "TLS handshake latency",
                   "Forwarding latency p95 (in process)", "Lane reconnects"):
        assert wanted in titles
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    exprs = _dashboard_exprs()
    assert len(exprs) >= 10
    # Every ut_ metric the dashboard and the alerts name exists.
    known = set(METRIC_NAMES) | {
        n + s for n, t in METRIC_NAMES.items() if t == "histogram"
        for s in ("_bucket", "_sum", "_count")}
    text = " ".join(exprs) + ALERTS.read_text()
    for name in re.findall(r"\but_[a-z_]+", text):
        assert name in known, name
    # The queries parse: promtool checks them as recording rules.
    tool = promtool()
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:q{i}", "expr": e.replace("$__rate_interval", "5m")
         .replace("$instance", ".*").replace("$client_cn", ".*")}
        for i, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    proc = subprocess.run([tool, "check", "rules", str(path)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_doc_lists_every_metric_and_reason() -> None:
    doc = DOC.read_text()
    for name in METRIC_NAMES:
        assert f"`{name}`" in doc, name
    for reason in DROP_REASONS:
        assert f"`{reason}`" in doc, reason


def test_failure_counters_have_every_reason_at_zero_from_the_start() -> None:
    """The first handshake failure or protocol error must be an increase from 0, not a
    series that appears out of nowhere (which rate() and increase() miss)."""
    from ut.metrics import HANDSHAKE_FAILURE_REASONS, families
    from ut.stats import PROTOCOL_ERROR_REASONS, TunnelStats
    from ut.tls import REASONS as TLS_REASONS

    st = TunnelStats(role="server", max_lanes=5)
    fams = {f.name: f for f in families(st)}
    assert set(TLS_REASONS) <= set(HANDSHAKE_FAILURE_REASONS)
    assert fams["ut_tls_handshake_failures_total"].rows == [
        ((r,), 0) for r in sorted(HANDSHAKE_FAILURE_REASONS)]
    assert fams["ut_protocol_errors_total"].rows == [
        ((r,), 0) for r in sorted(PROTOCOL_ERROR_REASONS)]
    st.handshake_failed("unknown_ca")
    st.protocol_error("bad_magic")
    fams = {f.name: dict(f.rows) for f in families(st)}
    assert fams["ut_tls_handshake_failures_total"][("unknown_ca",)] == 1
    assert fams["ut_protocol_errors_total"][("bad_magic",)] == 1
    assert fams["ut_protocol_errors_total"][("bad_type",)] == 0
    doc = DOC.read_text()
    for reason in (*HANDSHAKE_FAILURE_REASONS, *PROTOCOL_ERROR_REASONS):
        assert f"`{reason}`" in doc, reason


def test_protocol_error_reasons_in_the_code_are_all_listed() -> None:
    """Every reason word the code counts as a protocol error is in PROTOCOL_ERROR_REASONS
    (so it is exported at 0 from the start), and every handshake-failure word is known."""
    from ut.metrics import HANDSHAKE_FAILURE_REASONS
    from ut.stats import PROTOCOL_ERROR_REASONS

    src_dir = Path(__file__).resolve().parent.parent / "ut"
    text = "\n".join(p.read_text() for p in sorted(src_dir.iterdir())
                     if p.suffix in (".py", ".pyx", ".pxi"))
    used = set(re.findall(r'protocol_error\("(\w+)"', text))
    used |= set(re.findall(r'FrameError\("(\w+)"', text))
    used |= set(re.findall(r'ControlError\("(\w+)"', text)) - {"unknown_kind"}  # -> unknown_control
    used |= set(re.findall(r'_reject\(\s*\w+,\s*\w+,\s*"(\w+)"', text))
    assert used, "the patterns found nothing: update this test"
    assert used <= set(PROTOCOL_ERROR_REASONS), used - set(PROTOCOL_ERROR_REASONS)
    failed = set(re.findall(r'handshake_failed\("(\w+)"', text))
    assert failed <= set(HANDSHAKE_FAILURE_REASONS), failed - set(HANDSHAKE_FAILURE_REASONS)


def test_lanes_active_has_a_conventionally_named_twin() -> None:
    from ut.metrics import METRIC_NAMES, families
    from ut.stats import TunnelStats

    assert METRIC_NAMES["ut_lanes_active_total"] == METRIC_NAMES["ut_lanes_active"] == "gauge"
    st = TunnelStats(role="client", max_lanes=5)
    st.counters("home").lanes_active = 3
    fams = {f.name: f.rows for f in families(st)}
    assert fams["ut_lanes_active_total"] == fams["ut_lanes_active"] == [(("home",), 3)]
