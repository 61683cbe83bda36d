"""Prometheus metrics: read the tunnel's counters at scrape time, serve them in the loop.

Theory of operation: the tunnel counts into plain ints on ``ut.stats`` objects
and never calls ``prometheus-client`` on the hot path. At scrape time
``families()`` reads a ``TunnelStats`` into plain ``Family`` rows (the one
place that decides names, labels and aggregation); ``render()`` writes them
as Prometheus text, and ``TunnelCollector`` hands the same rows to a
``prometheus_client`` registry for programs that want that instead.

The endpoint (``MetricsServer``; its HTTP side, h11 and its limits, is
``ut.metrics_http``) runs on the tunnel's own event loop (no thread), so a
scrape reads the counters between two callbacks of the forwarding code: every
scrape is a consistent snapshot and there is no lock anywhere. The price is
that a scrape pauses forwarding while it renders, which is why ``render``
exists: with 100 client CNs it is several times cheaper than
``generate_latest`` on the same series (bench/metrics_cost.py; figures in
docs/metrics.md).

Metric names and labels are listed in ``docs/metrics.md`` (the spec's names are
part of the contract: SPEC.md "Metrics").
"""

from __future__ import annotations

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

from . import metrics_http
from ._version import __version__
from .logs import event
from .metrics_http import HttpEndpoint
from .stats import (
    DROP_PATH,
    DROP_REASONS,
    FORWARD_BUCKETS,
    LIMIT_REFUSAL_REASONS,
    PROTOCOL_ERROR_REASONS,
    Counters,
    Histogram,
    TunnelStats,
)
from .tls import REASONS as _TLS_REASONS

# Every reason ``handshake_failed()`` is called with: failure_reason()'s words, and the
# server's "evicted" (a pending handshake pushed out by a newer connection).
# With tls.client_auth: proof, a refused proof counts here too (ut.proof.PROOF_REASONS).
HANDSHAKE_FAILURE_REASONS: tuple[str, ...] = tuple(dict.fromkeys(
    (*_TLS_REASONS, "evicted", "bad_proof", "clock_skew")))
# The web face's answers (ut.webface.ANSWERS), kept here so metrics need no cryptography.
WEB_FACE_ANSWERS: tuple[str, ...] = ("plain", "fallback", "site")

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
    "ut_limit_refusals_total": (
        "counter", "New sessions or lanes the server refused at one of its resource bounds "
                   "(limits:, file descriptors), by reason."),
    "ut_web_face_connections_total": (
        "counter", "Connections that were not clients, answered as a web site "
                   "(tls.client_auth: proof), by answer: plain, fallback or site."),
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
    limits = Family("ut_limit_refusals_total", ("reason",))
    web = Family("ut_web_face_connections_total", ("answer",))
    if stats.role == "server":
        for reason, n in sorted({**dict.fromkeys(LIMIT_REFUSAL_REASONS, 0),
                                 **stats.limit_refusals}.items()):
            limits.add((reason,), n)
        for answer, n in sorted({**dict.fromkeys(WEB_FACE_ANSWERS, 0), **stats.web_face}.items()):
            web.add((answer,), n)
    return [info, configured, sessions, lanes, lanes_twin, queue, in_pk, in_by, out_pk, out_by,
            drops, reconnects, reorder_skipped, reorder_late, frames, nbytes, latency,
            handshakes, failures, errors, limits, web]


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


# -- the endpoint -------------------------------------------------------------

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


class MetricsServer(HttpEndpoint):
    """A running metrics endpoint; make one with ``start_metrics_server``.

    A scrape returns ``render(families(stats))`` followed by whatever else is
    registered in ``registry`` (the server's own ``CollectorRegistry`` unless the
    caller passed one): an embedding program may add its own metrics there.
    The HTTP side and its limits (``max_request_bytes``, ``read_timeout``,
    ``write_timeout``, ``linger_timeout``, ``max_connections``) are
    ``ut.metrics_http.HttpEndpoint``'s.
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(
        self,
        stats: TunnelStats,
        path: str = "/metrics",
        *,
        per_client_cn: bool = True,
        per_lane_id: bool = False,
        registry: CollectorRegistry | None = None,
        max_request_bytes: int = metrics_http.MAX_REQUEST_BYTES,
        read_timeout: float = metrics_http.READ_TIMEOUT_SECONDS,
        write_timeout: float = metrics_http.WRITE_TIMEOUT_SECONDS,
        linger_timeout: float = metrics_http.LINGER_TIMEOUT_SECONDS,
        max_connections: int = metrics_http.MAX_CONNECTIONS,
    ) -> None:
        super().__init__(
            path, max_request_bytes=max_request_bytes, read_timeout=read_timeout,
            write_timeout=write_timeout, linger_timeout=linger_timeout,
            max_connections=max_connections)
        self.stats = stats
        self.per_client_cn = per_client_cn
        self.per_lane_id = per_lane_id
        self.registry = CollectorRegistry() if registry is None else registry
        self._guard = _NameGuard()
        self.registry.register(self._guard)

    def exposition(self) -> bytes:
        """The response body of one scrape (read now, on the calling thread)."""
        fams = families(self.stats, per_client_cn=self.per_client_cn,
                        per_lane_id=self.per_lane_id)
        return render(fams) + generate_latest(self.registry)

    def body(self) -> bytes:
        return self.exposition()

    async def close(self) -> None:
        """Stop listening, drop open connections, release the tunnel's names."""
        await super().close()
        try:
            self.registry.unregister(self._guard)
        except KeyError:
            pass

    async def __aenter__(self) -> MetricsServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


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
