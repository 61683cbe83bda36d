"""Prometheus metrics: a scrape-time collector and a small HTTP endpoint in the loop.

Theory of operation: the tunnel counts into plain ints on ``ut.stats`` objects
and never calls ``prometheus-client`` on the hot path. ``TunnelCollector``
turns a ``TunnelStats`` into metric families only when Prometheus scrapes.
The endpoint runs on the tunnel's own event loop (no thread), so a scrape reads
the counters between two callbacks of the forwarding code: every scrape is a
consistent snapshot, and there is no lock anywhere.

The HTTP side is deliberately small: one GET (or HEAD) per connection,
``Connection: close``, a request head of at most ``max_request_bytes`` read
within ``read_timeout`` seconds, at most ``max_connections`` connections at
once. A slow or hostile client therefore holds a bounded amount of memory for
a bounded time and never blocks the loop.

Metric names and labels are listed in ``docs/metrics.md`` (the spec's names are
part of the contract: SPEC.md "Metrics").
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from ._version import __version__
from .logs import event
from .stats import (
    DROP_PATH,
    DROP_REASONS,
    FORWARD_BUCKETS,
    Counters,
    Histogram,
    TunnelStats,
)

__all__ = [
    "DROP_REASONS",
    "METRIC_NAMES",
    "MetricsServer",
    "TunnelCollector",
    "start_metrics_server",
]

# Every metric family this module exposes, exactly as it appears in the text
# format (counters with their ``_total``; histograms add _bucket/_sum/_count).
METRIC_NAMES: dict[str, str] = {
    "ut_build_info": "gauge",
    "ut_lanes_configured": "gauge",
    "ut_sessions_active": "gauge",
    "ut_lanes_active_total": "gauge",  # spec name; a gauge despite the suffix
    "ut_queue_len": "gauge",
    "ut_udp_in_packets_total": "counter",
    "ut_udp_in_bytes_total": "counter",
    "ut_udp_out_packets_total": "counter",
    "ut_udp_out_bytes_total": "counter",
    "ut_udp_drop_total": "counter",
    "ut_lane_reconnect_total": "counter",
    "ut_lane_frames_total": "counter",
    "ut_lane_bytes_total": "counter",
    "ut_forward_latency_seconds": "histogram",
    "ut_tls_handshake_seconds": "histogram",
    "ut_tls_handshake_failures_total": "counter",
    "ut_protocol_errors_total": "counter",
}


def _merged(hists: Sequence[Histogram]) -> Histogram:
    """One histogram holding every observation of ``hists`` (same bounds)."""
    out = Histogram(hists[0].bounds if hists else FORWARD_BUCKETS)
    for h in hists:
        out.counts = [a + b for a, b in zip(out.counts, h.counts, strict=True)]
        out.sum += h.sum
        out.count += h.count
    return out


class TunnelCollector:
    """A ``prometheus_client`` custom collector reading one ``TunnelStats``.

    ``per_client_cn`` puts a ``client_cn`` label on every per-client metric
    (off: one series summed over all clients). ``per_lane_id`` adds a
    ``lane_id`` label to ``ut_lane_frames_total`` / ``ut_lane_bytes_total``
    (off: summed over lanes). Label values are bounded: CNs are authenticated
    certificate names (``""`` holds what was lost before authentication),
    lane ids are below ``max_lanes``, reasons come from fixed vocabularies.

    Example::

        registry = CollectorRegistry()
        registry.register(TunnelCollector(stats))
        text = generate_latest(registry)
    """

    def __init__(
        self, stats: TunnelStats, *, per_client_cn: bool = True, per_lane_id: bool = False
    ) -> None:
        self.stats = stats
        self.per_client_cn = per_client_cn
        self.per_lane_id = per_lane_id

    # Registries call describe() to detect clashing names without collecting.
    def describe(self) -> Iterator[Metric]:
        for name, typ in METRIC_NAMES.items():
            if typ == "counter":
                yield CounterMetricFamily(name, "")
            elif typ == "gauge":
                yield GaugeMetricFamily(name, "")
            else:
                yield HistogramMetricFamily(name, "")

    def collect(self) -> Iterator[Metric]:
        stats = self.stats
        dir_in, dir_out = stats.dir_in, stats.dir_out
        cn_labels = ["client_cn"] if self.per_client_cn else []

        # One group per CN, or one group holding every CN.
        groups: list[tuple[list[str], list[Counters]]]
        if self.per_client_cn:
            groups = [([cn], [c]) for cn, c in sorted(stats.by_cn.items())]
        else:
            groups = [([], list(stats.by_cn.values()))]

        info = GaugeMetricFamily(
            "ut_build_info", "Build and run information; the value is always 1.",
            labels=["version", "implementation", "role"],
        )
        info.add_metric([__version__, stats.implementation, stats.role], 1)
        yield info
        yield GaugeMetricFamily(
            "ut_lanes_configured", "Lanes per session the configuration asks for (tcp.lanes).",
            value=stats.max_lanes,
        )

        sessions = GaugeMetricFamily(
            "ut_sessions_active", "Sessions currently open.", labels=cn_labels)
        lanes = GaugeMetricFamily(
            "ut_lanes_active_total",
            "Lanes currently open (a gauge: the name is the spec's).", labels=cn_labels)
        queue = GaugeMetricFamily(
            "ut_queue_len", "Datagrams waiting in session queues for a lane.", labels=cn_labels)
        queued: dict[str, int] = {}
        for s in list(stats.sessions.values()):
            cn = s.counters.client_cn
            queued[cn] = queued.get(cn, 0) + len(s.queue)
        for labels, cs in groups:
            sessions.add_metric(labels, sum(c.sessions_active for c in cs))
            lanes.add_metric(labels, sum(c.lanes_active for c in cs))
            queue.add_metric(labels, sum(queued.get(c.client_cn, 0) for c in cs))
        yield sessions
        yield lanes
        yield queue

        dir_labels = [*cn_labels, "dir"]
        in_pk = CounterMetricFamily(
            "ut_udp_in_packets_total", "Datagrams read from the UDP socket.", labels=dir_labels)
        in_by = CounterMetricFamily(
            "ut_udp_in_bytes_total", "Payload bytes of datagrams read from the UDP socket.",
            labels=dir_labels)
        out_pk = CounterMetricFamily(
            "ut_udp_out_packets_total", "Datagrams written to the UDP socket.", labels=dir_labels)
        out_by = CounterMetricFamily(
            "ut_udp_out_bytes_total", "Payload bytes of datagrams written to the UDP socket.",
            labels=dir_labels)
        drops = CounterMetricFamily(
            "ut_udp_drop_total", "Datagrams lost, by reason (docs/metrics.md lists them).",
            labels=[*cn_labels, "dir", "reason"])
        reconnects = CounterMetricFamily(
            "ut_lane_reconnect_total", "Lanes re-established after one was lost.",
            labels=cn_labels)
        for labels, cs in groups:
            in_pk.add_metric([*labels, dir_in], sum(c.udp_in_packets for c in cs))
            in_by.add_metric([*labels, dir_in], sum(c.udp_in_bytes for c in cs))
            out_pk.add_metric([*labels, dir_out], sum(c.udp_out_packets for c in cs))
            out_by.add_metric([*labels, dir_out], sum(c.udp_out_bytes for c in cs))
            merged = dict.fromkeys(DROP_REASONS, 0)
            for c in cs:
                for reason, n in c.drops.items():
                    merged[reason] = merged.get(reason, 0) + n
            for reason, n in merged.items():
                d = dir_out if DROP_PATH.get(reason) == "out" else dir_in
                drops.add_metric([*labels, d, reason], n)
            reconnects.add_metric(labels, sum(c.lane_reconnects for c in cs))
        yield in_pk
        yield in_by
        yield out_pk
        yield out_by
        yield drops
        yield reconnects

        yield from self._lane_families(groups, cn_labels, dir_in, dir_out)

        latency = HistogramMetricFamily(
            "ut_forward_latency_seconds",
            "Time inside the process: datagram read to frame handed to a lane (dir_in), "
            "frame read to datagram written (dir_out).",
            labels=dir_labels)
        for labels, cs in groups:
            for d in (dir_in, dir_out):
                hists = [c.forward_latency[d] for c in cs]
                h = hists[0] if len(hists) == 1 else _merged(hists)
                latency.add_metric([*labels, d], h.cumulative(), h.sum)
        yield latency

        hs = stats.handshake_seconds
        yield HistogramMetricFamily(
            "ut_tls_handshake_seconds", "Duration of successful TLS handshakes (lanes).",
            buckets=hs.cumulative(), sum_value=hs.sum)
        failures = CounterMetricFamily(
            "ut_tls_handshake_failures_total", "TLS handshakes refused or failed, by reason.",
            labels=["reason"])
        for reason, n in sorted(stats.handshake_failures.items()):
            failures.add_metric([reason], n)
        yield failures
        errors = CounterMetricFamily(
            "ut_protocol_errors_total", "Protocol errors on lanes (bad frames, bad control).",
            labels=["reason"])
        for reason, n in sorted(stats.protocol_errors.items()):
            errors.add_metric([reason], n)
        yield errors

    def _lane_families(
        self, groups: list[tuple[list[str], list[Counters]]], cn_labels: list[str],
        dir_in: str, dir_out: str,
    ) -> Iterator[Metric]:
        # Frames a role writes to lanes carry its input direction; frames it reads, its output.
        labels_names = [*cn_labels, "dir"] + (["lane_id"] if self.per_lane_id else [])
        frames = CounterMetricFamily(
            "ut_lane_frames_total", "PDUs written to (tx) or read from (rx) lanes.",
            labels=labels_names)
        nbytes = CounterMetricFamily(
            "ut_lane_bytes_total", "PDU bytes (headers included) written to or read from lanes.",
            labels=labels_names)
        for labels, cs in groups:
            for d, f_attr, b_attr in (
                (dir_in, "lane_tx_frames", "lane_tx_bytes"),
                (dir_out, "lane_rx_frames", "lane_rx_bytes"),
            ):
                if self.per_lane_id:
                    n_lanes = max((len(getattr(c, f_attr)) for c in cs), default=0)
                    for lane_id in range(n_lanes):
                        key = [*labels, d, str(lane_id)]
                        frames.add_metric(key, sum(_at(getattr(c, f_attr), lane_id) for c in cs))
                        nbytes.add_metric(key, sum(_at(getattr(c, b_attr), lane_id) for c in cs))
                else:
                    frames.add_metric([*labels, d], sum(sum(getattr(c, f_attr)) for c in cs))
                    nbytes.add_metric([*labels, d], sum(sum(getattr(c, b_attr)) for c in cs))
        yield frames
        yield nbytes


def _at(values: Sequence[int], i: int) -> int:
    return values[i] if i < len(values) else 0


# -- HTTP endpoint -------------------------------------------------------------

_REASONS = {
    200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
    408: "Request Timeout", 431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


class _RequestTooLarge(Exception):
    pass


def _split_hostport(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"metrics.listen_addr must be host:port, got {addr!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


class MetricsServer:
    """A running metrics endpoint; make one with ``start_metrics_server``."""

    def __init__(
        self,
        registry: CollectorRegistry,
        path: str,
        *,
        collector: TunnelCollector | None = None,
        owns_registry: bool = True,
        max_request_bytes: int = 8192,
        read_timeout: float = 5.0,
        write_timeout: float = 10.0,
        linger_timeout: float = 1.0,
        max_connections: int = 16,
    ) -> None:
        self.registry = registry
        self.path = path
        self.collector = collector
        self._owns_registry = owns_registry
        self.max_request_bytes = max_request_bytes
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self.linger_timeout = linger_timeout
        self.max_connections = max_connections
        self.host = ""
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self.scrapes = 0  # successful GETs of ``path``, for tests and curiosity

    @property
    def url(self) -> str:
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}{self.path}"

    async def start(self, host: str, port: int) -> None:
        # The stream limit bounds one header line; _read_head bounds the whole head.
        self._server = await asyncio.start_server(
            self._handle, host, port, limit=self.max_request_bytes)
        sockname = self._server.sockets[0].getsockname()
        self.host, self.port = sockname[0], sockname[1]

    async def close(self) -> None:
        """Stop listening and drop open connections."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for writer in list(self._conns):
            writer.transport.abort()
        try:
            await asyncio.wait_for(server.wait_closed(), 5.0)
        except asyncio.TimeoutError:
            pass
        if self.collector is not None and not self._owns_registry:
            try:
                self.registry.unregister(self.collector)
            except KeyError:
                pass

    async def __aenter__(self) -> MetricsServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- one connection ------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._conns) >= self.max_connections:
            # No reading, no waiting: a short refusal the kernel can buffer.
            writer.write(self._response(503, b"too many connections\n", head_only=False))
            writer.close()
            return
        self._conns.add(writer)
        clean = False
        try:
            clean = await self._serve_one(reader, writer)
        except (ConnectionError, OSError, asyncio.TimeoutError):
            pass
        finally:
            self._conns.discard(writer)
            if clean:
                writer.close()
            else:
                writer.transport.abort()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; True when the client has read the answer and hung up."""
        try:
            lines = await asyncio.wait_for(_read_head(reader, self.max_request_bytes),
                                           self.read_timeout)
        except asyncio.TimeoutError:
            return await self._reply(reader, writer, 408, b"request timeout\n")
        except (_RequestTooLarge, ValueError, asyncio.LimitOverrunError):
            return await self._reply(reader, writer, 431, b"request too large\n")
        except asyncio.IncompleteReadError:
            return False  # the client went away
        parts = lines[0].split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            return await self._reply(reader, writer, 400, b"bad request\n")
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        head_only = method == b"HEAD"
        if method not in (b"GET", b"HEAD"):
            return await self._reply(reader, writer, 405, b"method not allowed\n",
                                     extra=b"Allow: GET, HEAD\r\n")
        if target.decode("latin-1") != self.path:
            return await self._reply(reader, writer, 404, b"not found\n", head_only=head_only)
        body = generate_latest(self.registry)
        self.scrapes += 1
        return await self._reply(reader, writer, 200, body, head_only=head_only,
                                 content_type=CONTENT_TYPE_LATEST)

    async def _reply(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, status: int,
        body: bytes, *, head_only: bool = False, extra: bytes = b"",
        content_type: str = "text/plain; charset=utf-8",
    ) -> bool:
        writer.write(self._response(status, body, head_only=head_only, extra=extra,
                                    content_type=content_type))
        # drain() returns once the whole response is in the kernel (high-water 0),
        # or raises TimeoutError for a client that does not read it.
        writer.transport.set_write_buffer_limits(high=0)
        await asyncio.wait_for(writer.drain(), self.write_timeout)
        # Lingering close: half-close, then discard what the client still sends
        # (a body we never read) until it hangs up, so that closing does not turn
        # into a reset that destroys the response before the client has read it.
        if writer.can_write_eof():
            writer.write_eof()
        try:
            await asyncio.wait_for(_discard(reader, 65536), self.linger_timeout)
        except (asyncio.TimeoutError, _RequestTooLarge):
            return False
        return True

    @staticmethod
    def _response(
        status: int, body: bytes, *, head_only: bool, extra: bytes = b"",
        content_type: str = "text/plain; charset=utf-8",
    ) -> bytes:
        head = (
            f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
            f"Content-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Connection: close\r\n"
        ).encode("latin-1") + extra + b"\r\n"
        return head if head_only else head + body


async def _read_head(reader: asyncio.StreamReader, max_bytes: int) -> list[bytes]:
    """Request line and header lines, up to the blank line; at most ``max_bytes``."""
    lines: list[bytes] = []
    total = 0
    while True:
        line = await reader.readline()  # ValueError if one line exceeds the stream limit
        if not line.endswith(b"\n"):
            raise asyncio.IncompleteReadError(line, None)
        total += len(line)
        if total > max_bytes:
            raise _RequestTooLarge
        line = line.rstrip(b"\r\n")
        if not line:
            if lines:
                return lines
            continue  # tolerate blank lines before the request line (RFC 9112 2.2)
        lines.append(line)


async def _discard(reader: asyncio.StreamReader, max_bytes: int) -> None:
    """Read and forget until EOF; more than ``max_bytes`` is not worth waiting for."""
    left = max_bytes
    while True:
        chunk = await reader.read(16384)
        if not chunk:
            return
        left -= len(chunk)
        if left < 0:
            raise _RequestTooLarge


async def start_metrics_server(
    stats: TunnelStats, metrics_cfg: Any, *, registry: CollectorRegistry | None = None,
    **limits: Any,
) -> MetricsServer | None:
    """Serve ``stats`` on ``metrics_cfg.listen_addr`` + ``metrics_cfg.path`` in this loop.

    ``metrics_cfg`` is any object with ``enabled``, ``listen_addr`` ("host:port",
    port 0 picks a free one), ``path``, ``per_client_cn`` and ``per_lane_id``.
    Returns None when metrics are disabled. Without ``registry`` each server gets
    its own ``CollectorRegistry`` (several tunnels in one process never clash);
    with one, the tunnel's collector is added to it and removed on ``close()``.
    ``limits`` overrides ``MetricsServer``'s connection limits (tests use it).

    Example::

        server = await start_metrics_server(stats, cfg.metrics)
        print(server.url)  # http://127.0.0.1:5080/metrics
        ...
        await server.close()
    """
    if metrics_cfg is None or not getattr(metrics_cfg, "enabled", True):
        return None
    host, port = _split_hostport(metrics_cfg.listen_addr)
    path = getattr(metrics_cfg, "path", "/metrics") or "/metrics"
    if not path.startswith("/"):
        path = "/" + path
    collector = TunnelCollector(
        stats,
        per_client_cn=bool(getattr(metrics_cfg, "per_client_cn", True)),
        per_lane_id=bool(getattr(metrics_cfg, "per_lane_id", False)),
    )
    owns = registry is None
    if registry is None:
        registry = CollectorRegistry(auto_describe=True)
    registry.register(collector)
    server = MetricsServer(registry, path, collector=collector, owns_registry=owns, **limits)
    try:
        await server.start(host, port)
    except BaseException:
        if not owns:
            registry.unregister(collector)
        raise
    event("metrics_listen", logging.INFO, role=stats.role, addr=f"{server.host}:{server.port}",
          path=path, per_client_cn=collector.per_client_cn, per_lane_id=collector.per_lane_id)
    return server
