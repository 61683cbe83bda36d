"""Prometheus metrics: read the tunnel's counters at scrape time, serve them in the loop.

Theory of operation: the tunnel counts into plain ints on ``ut.stats`` objects
and never calls ``prometheus-client`` on the hot path. At scrape time
``families()`` reads a ``TunnelStats`` into plain ``Family`` rows (the one
place that decides names, labels and aggregation); ``render()`` writes them
as Prometheus text, and ``TunnelCollector`` hands the same rows to a
``prometheus_client`` registry for programs that want that instead.

The endpoint runs on the tunnel's own event loop (no thread), so a scrape reads
the counters between two callbacks of the forwarding code: every scrape is a
consistent snapshot and there is no lock anywhere. The price is that a scrape
pauses forwarding while it renders, which is why ``render`` exists: with 100
client CNs it is several times cheaper than ``generate_latest`` on the same
series (bench/metrics_cost.py; figures in docs/metrics.md).

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
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
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
    PROTOCOL_ERROR_REASONS,
    Counters,
    Histogram,
    TunnelStats,
)
from .tls import REASONS as _TLS_REASONS

# Every reason ``handshake_failed()`` is called with: failure_reason()'s words, and the
# server's "evicted" (a pending handshake pushed out by a newer connection).
HANDSHAKE_FAILURE_REASONS: tuple[str, ...] = (*_TLS_REASONS, "evicted")

__all__ = [
    "DROP_REASONS",
    "METRICS",
    "METRIC_NAMES",
    "Family",
    "MetricsServer",
    "TunnelCollector",
    "families",
    "render",
    "start_metrics_server",
]

# Every metric family this module exposes, exactly as it appears in the text
# format (counters carry their ``_total``; histograms add _bucket/_sum/_count):
# name -> (type, help).
METRICS: dict[str, tuple[str, str]] = {
    "ut_build_info": ("gauge", "Build and run information; the value is always 1."),
    "ut_lanes_configured": ("gauge", "Lanes per session the configuration asks for (tcp.lanes)."),
    "ut_sessions_active": ("gauge", "Sessions currently open."),
    # The spec's name: a gauge despite the _total suffix (docs/metrics.md).
    "ut_lanes_active_total": (
        "gauge", "Lanes currently open. A gauge despite the _total suffix (the spec's name); "
                 "ut_lanes_active is the same value under a conventional name."),
    "ut_lanes_active": ("gauge", "Lanes currently open (= ut_lanes_active_total)."),
    "ut_queue_len": ("gauge", "Datagrams waiting in session queues for a lane."),
    "ut_udp_in_packets_total": ("counter", "Datagrams read from the UDP socket."),
    "ut_udp_in_bytes_total": ("counter", "Payload bytes of datagrams read from the UDP socket."),
    "ut_udp_out_packets_total": ("counter", "Datagrams written to the UDP socket."),
    "ut_udp_out_bytes_total": ("counter", "Payload bytes of datagrams written to the UDP socket."),
    "ut_udp_drop_total": ("counter", "Datagrams lost, by reason (docs/metrics.md lists them)."),
    "ut_lane_reconnect_total": ("counter", "Lanes re-established after one was lost."),
    "ut_reorder_skipped_total": (
        "counter", "Sequence numbers given up after waiting for them (resequencing); "
                   "minus ut_reorder_late_total: datagrams that never came."),
    "ut_reorder_late_total": (
        "counter", "Datagrams delivered after their sequence number had been given up."),
    "ut_lane_frames_total": (
        "counter", "DATA PDUs (one datagram each) written to or read from lanes."),
    "ut_lane_bytes_total": (
        "counter", "PDU bytes (headers included) written to or read from lanes."),
    "ut_forward_latency_seconds": (
        "histogram",
        "Time inside the process: datagram read to frame handed to a lane (the role's "
        "input dir), frame read to datagram written (its output dir)."),
    "ut_tls_handshake_seconds": ("histogram", "Duration of successful TLS handshakes (lanes)."),
    "ut_tls_handshake_failures_total": (
        "counter", "TLS handshakes refused or failed, by reason."),
    "ut_protocol_errors_total": (
        "counter", "Protocol errors on lanes (bad frames, bad control messages), by reason."),
}
METRIC_NAMES: dict[str, str] = {name: typ for name, (typ, _) in METRICS.items()}


class Family:
    """One metric family as plain data; ``render`` and ``TunnelCollector`` both read it.

    ``rows`` holds ``(label values, number)``, or ``(label values, Histogram)``
    for histograms, in the order of ``labelnames``.
    """

    __slots__ = ("name", "type", "help", "labelnames", "rows")

    def __init__(self, name: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.type, self.help = METRICS[name]
        self.labelnames = tuple(labelnames)
        self.rows: list[tuple[tuple[str, ...], Any]] = []

    def add(self, values: Sequence[str], value: Any) -> None:
        self.rows.append((tuple(values), value))


def _merged(hists: Sequence[Histogram]) -> Histogram:
    """One histogram holding every observation of ``hists`` (same bounds)."""
    out = Histogram(hists[0].bounds if hists else FORWARD_BUCKETS)
    for h in hists:
        out.counts = [a + b for a, b in zip(out.counts, h.counts, strict=True)]
        out.sum += h.sum
        out.count += h.count
    return out


def families(
    stats: TunnelStats, *, per_client_cn: bool = True, per_lane_id: bool = False
) -> list[Family]:
    """Every metric family for ``stats``, read now (the one place that decides what
    is exported: names, labels, aggregation)."""
    dir_in, dir_out = stats.dir_in, stats.dir_out
    cn = ("client_cn",) if per_client_cn else ()
    # One group per CN, or one group holding every CN.
    groups: list[tuple[tuple[str, ...], list[Counters]]]
    if per_client_cn:
        groups = [((name,), [c]) for name, c in sorted(stats.by_cn.items())]
    else:
        groups = [((), list(stats.by_cn.values()))]

    info = Family("ut_build_info", ("version", "implementation", "role"))
    info.add((__version__, stats.implementation, stats.role), 1)
    configured = Family("ut_lanes_configured")
    configured.add((), stats.max_lanes)

    sessions = Family("ut_sessions_active", cn)
    lanes = Family("ut_lanes_active_total", cn)
    lanes_twin = Family("ut_lanes_active", cn)
    queue = Family("ut_queue_len", cn)
    queued: dict[str, int] = {}
    for s in list(stats.sessions.values()):
        key = s.counters.client_cn
        queued[key] = queued.get(key, 0) + len(s.queue)
    in_pk = Family("ut_udp_in_packets_total", (*cn, "dir"))
    in_by = Family("ut_udp_in_bytes_total", (*cn, "dir"))
    out_pk = Family("ut_udp_out_packets_total", (*cn, "dir"))
    out_by = Family("ut_udp_out_bytes_total", (*cn, "dir"))
    drops = Family("ut_udp_drop_total", (*cn, "dir", "reason"))
    reconnects = Family("ut_lane_reconnect_total", cn)
    reorder_skipped = Family("ut_reorder_skipped_total", (*cn, "dir"))
    reorder_late = Family("ut_reorder_late_total", (*cn, "dir"))
    lane_labels = (*cn, "dir", "lane_id") if per_lane_id else (*cn, "dir")
    frames = Family("ut_lane_frames_total", lane_labels)
    nbytes = Family("ut_lane_bytes_total", lane_labels)
    latency = Family("ut_forward_latency_seconds", (*cn, "dir"))

    for labels, cs in groups:
        sessions.add(labels, sum(c.sessions_active for c in cs))
        lanes.add(labels, sum(c.lanes_active for c in cs))
        lanes_twin.add(labels, sum(c.lanes_active for c in cs))
        queue.add(labels, sum(queued.get(c.client_cn, 0) for c in cs))
        in_pk.add((*labels, dir_in), sum(c.udp_in_packets for c in cs))
        in_by.add((*labels, dir_in), sum(c.udp_in_bytes for c in cs))
        out_pk.add((*labels, dir_out), sum(c.udp_out_packets for c in cs))
        out_by.add((*labels, dir_out), sum(c.udp_out_bytes for c in cs))
        # Every known reason, zeros too, so rate() and increase() see the first drop.
        merged = dict.fromkeys(DROP_REASONS, 0)
        for c in cs:
            for reason, n in c.drops.items():
                merged[reason] = merged.get(reason, 0) + n
        for reason, n in merged.items():
            d = dir_out if DROP_PATH.get(reason) == "out" else dir_in
            drops.add((*labels, d, reason), n)
        reconnects.add(labels, sum(c.lane_reconnects for c in cs))
        reorder_skipped.add((*labels, dir_out), sum(c.reorder_skipped for c in cs))
        reorder_late.add((*labels, dir_out), sum(c.reorder_late for c in cs))
        # Frames a role writes to lanes carry its input direction; frames it reads, its output.
        for d, f_attr, b_attr in (
            (dir_in, "lane_tx_frames", "lane_tx_bytes"),
            (dir_out, "lane_rx_frames", "lane_rx_bytes"),
        ):
            f_lists = [getattr(c, f_attr) for c in cs]
            b_lists = [getattr(c, b_attr) for c in cs]
            if per_lane_id:
                for lane_id in range(max(map(len, f_lists), default=0)):
                    key = (*labels, d, str(lane_id))
                    frames.add(key, sum(v[lane_id] for v in f_lists if lane_id < len(v)))
                    nbytes.add(key, sum(v[lane_id] for v in b_lists if lane_id < len(v)))
            else:
                frames.add((*labels, d), sum(map(sum, f_lists)))
                nbytes.add((*labels, d), sum(map(sum, b_lists)))
        for d in (dir_in, dir_out):
            hists = [c.forward_latency[d] for c in cs]
            latency.add((*labels, d), hists[0] if len(hists) == 1 else _merged(hists))

    handshakes = Family("ut_tls_handshake_seconds")
    handshakes.add((), stats.handshake_seconds)
    # Every known reason, zeros too (as for drops), so the first failure is an increase.
    failures = Family("ut_tls_handshake_failures_total", ("reason",))
    for reason, n in sorted({**dict.fromkeys(HANDSHAKE_FAILURE_REASONS, 0),
                             **stats.handshake_failures}.items()):
        failures.add((reason,), n)
    errors = Family("ut_protocol_errors_total", ("reason",))
    for reason, n in sorted({**dict.fromkeys(PROTOCOL_ERROR_REASONS, 0),
                             **stats.protocol_errors}.items()):
        errors.add((reason,), n)
    return [info, configured, sessions, lanes, lanes_twin, queue, in_pk, in_by, out_pk, out_by,
            drops, reconnects, reorder_skipped, reorder_late, frames, nbytes, latency,
            handshakes, failures, errors]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def render(fams: Iterable[Family]) -> bytes:
    """The Prometheus text format for ``fams``.

    Same series as ``generate_latest`` on a ``TunnelCollector`` (the tests
    compare them), about six times cheaper: label strings are built once per
    row, not per sample, and no intermediate sample objects are made. The scrape runs on the tunnel's loop, so its cost is
    a pause in forwarding; docs/metrics.md has the figures.
    """
    out: list[str] = []
    append = out.append
    escaped: dict[str, str] = {}
    le_strings: dict[tuple[float, ...], list[str]] = {}
    for f in fams:
        name = f.name
        append(f"# HELP {name} {f.help}\n# TYPE {name} {f.type}\n")
        order = sorted(range(len(f.labelnames)), key=f.labelnames.__getitem__)
        names = [f.labelnames[i] for i in order]
        hist = f.type == "histogram"
        split = bisect_left(names, "le") if hist else len(names)
        for values, value in f.rows:
            pairs = []
            for n, i in zip(names, order, strict=True):
                v = values[i]
                e = escaped.get(v)
                if e is None:
                    e = escaped[v] = _escape(v)
                pairs.append(f'{n}="{e}"')
            if not hist:
                append(f"{name}{{{','.join(pairs)}}} {_number(value)}\n" if pairs
                       else f"{name} {_number(value)}\n")
                continue
            les = le_strings.get(value.bounds)
            if les is None:
                les = le_strings[value.bounds] = [le for le, _ in value.cumulative()]
            head = "".join(p + "," for p in pairs[:split])
            tail = "".join("," + p for p in pairs[split:])
            first, rest = f'{name}_bucket{{{head}le="', f'"{tail}}} '
            running = 0
            for le, n in zip(les, value.counts, strict=True):
                running += n
                append(f"{first}{le}{rest}{running}\n")
            lbl = "{" + ",".join(pairs) + "}" if pairs else ""
            append(f"{name}_count{lbl} {running}\n")  # = the +Inf bucket, as generate_latest
            append(f"{name}_sum{lbl} {_number(value.sum)}\n")
    return "".join(out).encode("utf-8")


class TunnelCollector:
    """A ``prometheus_client`` custom collector reading one ``TunnelStats``.

    For programs that export the tunnel's metrics through their own
    ``prometheus_client`` registry; the built-in endpoint serves the same
    series through the faster ``render``. ``per_client_cn`` puts a
    ``client_cn`` label on every per-client metric (off: one series summed
    over all clients). ``per_lane_id`` adds a ``lane_id`` label to
    ``ut_lane_frames_total`` / ``ut_lane_bytes_total`` (off: summed over
    lanes). Label values are bounded: CNs are authenticated certificate names
    (``""`` holds what was lost before authentication), lane ids are below
    ``max_lanes``, reasons come from fixed vocabularies.

    Example::

        registry = CollectorRegistry()
        registry.register(TunnelCollector(stats))  # the tunnel's TunnelStats
        text = generate_latest(registry)
    """

    def __init__(
        self, stats: TunnelStats, *, per_client_cn: bool = True, per_lane_id: bool = False
    ) -> None:
        self.stats = stats
        self.per_client_cn = per_client_cn
        self.per_lane_id = per_lane_id

    def describe(self) -> Iterator[Metric]:
        """Names only, so a registry can refuse a clash without collecting."""
        return _empty_families()

    def collect(self) -> Iterator[Metric]:
        for f in families(self.stats, per_client_cn=self.per_client_cn,
                          per_lane_id=self.per_lane_id):
            m = _CLASSES[f.type](f.name, f.help, labels=f.labelnames)
            if f.type == "histogram":
                for values, h in f.rows:
                    m.add_metric(list(values), h.cumulative(), h.sum)
            else:
                for values, v in f.rows:
                    m.add_metric(list(values), v)
            yield m


_CLASSES: dict[str, Any] = {
    "counter": CounterMetricFamily,
    "gauge": GaugeMetricFamily,
    "histogram": HistogramMetricFamily,
}


def _empty_families() -> Iterator[Metric]:
    for name, (typ, text) in METRICS.items():
        yield _CLASSES[typ](name, text)


# -- HTTP endpoint -------------------------------------------------------------

_REASONS = {
    200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
    408: "Request Timeout", 431: "Request Header Fields Too Large",
}


class _RequestTooLarge(Exception):
    pass


def _split_hostport(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"metrics.listen_addr must be host:port, got {addr!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


class _NameGuard:
    """Registered in the served registry: reserves the tunnel's metric names so a
    clashing collector is refused at ``register()``; yields nothing itself (the
    tunnel's series come from ``render``)."""

    def describe(self) -> Iterator[Metric]:
        return _empty_families()

    def collect(self) -> Iterator[Metric]:
        return iter(())


class MetricsServer:
    """A running metrics endpoint; make one with ``start_metrics_server``.

    A scrape returns ``render(families(stats))`` followed by whatever else is
    registered in ``registry`` (the server's own ``CollectorRegistry`` unless the
    caller passed one): an embedding program may add its own metrics there.
    """

    def __init__(
        self,
        stats: TunnelStats,
        path: str = "/metrics",
        *,
        per_client_cn: bool = True,
        per_lane_id: bool = False,
        registry: CollectorRegistry | None = None,
        max_request_bytes: int = 8192,
        read_timeout: float = 5.0,
        write_timeout: float = 10.0,
        linger_timeout: float = 1.0,
        max_connections: int = 16,
    ) -> None:
        self.stats = stats
        self.path = path
        self.per_client_cn = per_client_cn
        self.per_lane_id = per_lane_id
        self.registry = CollectorRegistry() if registry is None else registry
        self._guard = _NameGuard()
        self.registry.register(self._guard)
        self.max_request_bytes = max_request_bytes
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self.linger_timeout = linger_timeout
        self.max_connections = max_connections
        self.host = ""
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._conns: dict[asyncio.StreamWriter, asyncio.Task] = {}
        self.scrapes = 0  # successful GETs of ``path``, for tests and curiosity

    def exposition(self) -> bytes:
        """The response body of one scrape (read now, on the calling thread)."""
        fams = families(self.stats, per_client_cn=self.per_client_cn,
                        per_lane_id=self.per_lane_id)
        return render(fams) + generate_latest(self.registry)

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
        tasks = list(self._conns.values())
        for writer in list(self._conns):
            writer.transport.abort()  # their handlers see EOF and finish
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=2.0)
            for task in pending:
                task.cancel()
        try:
            await asyncio.wait_for(server.wait_closed(), 5.0)
        except asyncio.TimeoutError:
            pass
        try:
            self.registry.unregister(self._guard)
        except KeyError:
            pass

    async def __aenter__(self) -> MetricsServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- one connection ------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._conns) >= self.max_connections:
            writer.transport.abort()  # no reading, no writing, no waiting
            return
        task = asyncio.current_task()
        assert task is not None
        self._conns[writer] = task
        clean = False
        try:
            clean = await self._serve_one(reader, writer)
        except (ConnectionError, OSError, asyncio.TimeoutError):
            pass
        finally:
            self._conns.pop(writer, None)
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
        body = self.exposition()
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
    Returns None when metrics are disabled. Nothing global is touched: each
    server renders its own ``stats`` and owns a ``CollectorRegistry`` for extra
    metrics (or serves the caller's ``registry`` after the tunnel's series), so
    several tunnels in one process never clash. ``limits`` overrides
    ``MetricsServer``'s connection limits and timeouts.

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
    server = MetricsServer(
        stats, path,
        per_client_cn=bool(getattr(metrics_cfg, "per_client_cn", True)),
        per_lane_id=bool(getattr(metrics_cfg, "per_lane_id", False)),
        registry=registry, **limits,
    )
    try:
        await server.start(host, port)
    except BaseException:
        server.registry.unregister(server._guard)
        raise
    event("metrics_listen", logging.INFO, role=stats.role, addr=f"{server.host}:{server.port}",
          path=path, per_client_cn=server.per_client_cn, per_lane_id=server.per_lane_id)
    return server
