"""Plain counters that the tunnel updates and that metrics and ``stats()`` read.

Theory of operation: the forwarding code adds to plain Python ints on a
``Counters`` object (one per client certificate CN), once per batch of
datagrams where it can. Nothing here touches ``prometheus-client``: the
Prometheus collector in ``ut.metrics`` reads these objects at scrape time, so
counting costs the hot path an attribute add, not a lock and a label lookup.

Direction: ``up`` is home -> cloud (client -> server), ``down`` is cloud -> home.
A client reads datagrams ``up`` from its UDP socket and writes them ``down``;
a server reads ``down`` from WireGuard and writes ``up`` to it.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Any

# Seconds. TLS handshakes take from about 1 ms on loopback to seconds on a bad uplink.
HANDSHAKE_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
# Seconds spent inside the process between a datagram's arrival and its hand-off.
FORWARD_BUCKETS: tuple[float, ...] = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
)

DIRECTIONS = ("up", "down")

# Every reason a datagram can be lost, and the path it is lost on (docs/metrics.md):
# "in"  = read from the role's UDP socket, lost before a lane carried it (dir = dir_in);
# "out" = read from a lane, lost before it left the role's UDP socket (dir = dir_out);
# "socket" = lost by the kernel at the role's full UDP socket, never read, or (TUN
#            offloads) read but not cut into packets (dir = dir_in; outside the in/out
#            identity, which starts at the datagrams handed to the session).
# A fixed vocabulary keeps ``ut_udp_drop_total{reason}`` bounded and lets
# "UDP in = UDP out + drops + in flight" be checked per direction.
DROP_PATH: dict[str, str] = {
    "udp_socket_full": "socket",  # the kernel dropped it at our full UDP socket (Linux)
    "oldest": "in",  # session queue full (packets or bytes): the oldest datagram made room
    "budget": "in",  # server: every session's queue together at limits.queue_budget_bytes
    "stale": "in",  # waited in the session queue longer than queue.max_delay_ms / max_age_seconds
    "aqm": "in",  # dropped by the session queue's CoDel (queue.aqm): a standing queue
    "oversize": "in",  # datagram larger than one PDU can carry (logged as pdu_too_large)
    "no_lane": "in",  # still queued when the session closed (idle, linger, shutdown)
    "lane_closed": "in",  # handed to a lane that closed before writing it out
    "no_session": "out",  # DATA frame read from a lane with no session to deliver it to
    "no_peer": "out",  # client: no local WireGuard peer has sent yet, so no address to reply to
    "udp_write_error": "out",  # the UDP send failed (ECONNREFUSED, ENOBUFS, EMSGSIZE, ...)
    "spoofed": "out",  # TUN mode, server: a packet whose source the client's CN does not own
    "offload": "socket",  # TUN mode, server: a super-packet it could not cut for its client
}
DROP_REASONS: tuple[str, ...] = tuple(DROP_PATH)

# Every reason ``protocol_error()`` is called with (``ut_protocol_errors_total{reason}``),
# exported at 0 from the start like the drop reasons, so the first error is an
# increase that rate() sees. tests/test_metrics.py checks the code uses no other.
PROTOCOL_ERROR_REASONS: tuple[str, ...] = (
    # a frame that breaks the PDU format (ut.errors.FrameError)
    "bad_magic", "bad_version", "bad_type", "too_long", "truncated", "bad_seq",
    # a control message that does not parse (ut.errors.ControlError), or is out of place
    # (ut.laneproto: each closes its lane)
    "empty", "bad_length", "bad_value", "bad_utf8", "unknown_control", "unexpected_hello",
    "data_after_goodbye", "control_after_goodbye",
    # a lane's opening (HELLO) refused (the client refuses a wrong server HELLO too),
    # or a lane pushed out
    "hello_timeout", "bad_certificate", "data_before_hello", "bad_hello",
    "lane_id_out_of_range", "evicted",
    # an error without a reason of its own
    "protocol_error",
)

# Every reason the server refuses a new session or lane at one of its resource bounds
# (``ut_limit_refusals_total{reason}``, issue 19, docs/metrics.md), exported at 0.
LIMIT_REFUSAL_REASONS: tuple[str, ...] = (
    "sessions_per_cn",  # limits.max_sessions_per_cn sessions of this CN, none lingering
    "sessions",  # limits.max_sessions in all, none lingering
    "lanes",  # limits.max_lanes lanes open in all
    "fds",  # near the file descriptor limit (RLIMIT_NOFILE less a reserve)
    "accept_error",  # accept() itself failed (EMFILE, ENFILE, ENOBUFS, ...)
    "accept_rate",  # held in the listen backlog by limits.accept_rate (accepted late)
    "web_fds",  # a web face connection or relay near the file descriptor limit
)


class Histogram:
    """Cumulative-by-bucket histogram with fixed upper bounds (Prometheus ``le``)."""

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # last slot is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, n: int = 1) -> None:
        """Record ``n`` observations of ``value`` (a batch shares one measurement)."""
        self.counts[bisect_left(self.bounds, value)] += n
        self.sum += value * n
        self.count += n

    def cumulative(self) -> list[tuple[str, int]]:
        """``[(le, cumulative_count), ...]`` ending with ``("+Inf", count)``."""
        out, running = [], 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            running += n
            out.append((repr(float(bound)), running))
        out.append(("+Inf", running + self.counts[-1]))
        return out

    def quantile(self, q: float) -> float:
        """Upper bound of the bucket holding quantile ``q`` (0 when empty)."""
        if not self.count:
            return 0.0
        target, running = q * self.count, 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            running += n
            if running >= target:
                return bound
        return float("inf")


class Counters:
    """Cumulative counts for one client CN (monotonic: they outlive sessions)."""

    __slots__ = (
        "client_cn", "udp_in_packets", "udp_in_bytes", "udp_out_packets", "udp_out_bytes",
        "drops", "lane_tx_frames", "lane_tx_bytes", "lane_rx_frames", "lane_rx_bytes",
        "lane_reconnects", "sessions_active", "lanes_active", "forward_latency",
        "reorder_skipped", "reorder_late",
    )

    def __init__(self, client_cn: str, max_lanes: int) -> None:
        self.client_cn = client_cn
        self.udp_in_packets = 0
        self.udp_in_bytes = 0
        self.udp_out_packets = 0
        self.udp_out_bytes = 0
        self.drops: dict[str, int] = {}
        # Indexed by lane_id; lane ids are < max_lanes, so this is bounded.
        self.lane_tx_frames = [0] * max_lanes
        self.lane_tx_bytes = [0] * max_lanes
        self.lane_rx_frames = [0] * max_lanes
        self.lane_rx_bytes = [0] * max_lanes
        self.lane_reconnects = 0
        self.sessions_active = 0
        self.lanes_active = 0
        self.forward_latency = {d: Histogram(FORWARD_BUCKETS) for d in DIRECTIONS}
        # Resequencing of the datagrams this role receives from lanes (its output dir):
        # numbers given up after waiting for them, and datagrams that came after that.
        # skipped - late = datagrams that never came (lost with a lane that died).
        self.reorder_skipped = 0
        self.reorder_late = 0

    def drop(self, reason: str, n: int = 1) -> None:
        """Count ``n`` datagrams lost for ``reason`` (a fixed, code-chosen word)."""
        self.drops[reason] = self.drops.get(reason, 0) + n

    @property
    def dropped(self) -> int:
        return sum(self.drops.values())


@dataclass
class TunnelStats:
    """Everything one running Client or Server counts.

    ``by_cn`` is keyed by the authenticated client CN (the client's own CN on the
    client side); ``""`` collects what is lost before a peer is authenticated.
    """

    role: str
    max_lanes: int
    implementation: str = "unknown"
    by_cn: dict[str, Counters] = field(default_factory=dict)
    handshake_seconds: Histogram = field(default_factory=lambda: Histogram(HANDSHAKE_BUCKETS))
    handshake_failures: dict[str, int] = field(default_factory=dict)
    protocol_errors: dict[str, int] = field(default_factory=dict)
    # New sessions or lanes refused at a resource bound (server), by LIMIT_REFUSAL_REASONS.
    limit_refusals: dict[str, int] = field(default_factory=dict)
    # Connections the server answered as a web site (tls.client_auth: proof), by answer.
    web_face: dict[str, int] = field(default_factory=dict)
    # Live sessions: key -> object with ``counters`` and ``queue`` (len() = queue length).
    sessions: dict[Any, Any] = field(default_factory=dict)

    @property
    def dir_in(self) -> str:
        """Direction of datagrams this role reads from its UDP socket."""
        return "up" if self.role == "client" else "down"

    @property
    def dir_out(self) -> str:
        """Direction of datagrams this role writes to its UDP socket."""
        return "down" if self.role == "client" else "up"

    def counters(self, client_cn: str) -> Counters:
        c = self.by_cn.get(client_cn)
        if c is None:
            c = self.by_cn[client_cn] = Counters(client_cn, self.max_lanes)
        return c

    def handshake_failed(self, reason: str) -> None:
        self.handshake_failures[reason] = self.handshake_failures.get(reason, 0) + 1

    def web_answer(self, answer: str) -> None:
        self.web_face[answer] = self.web_face.get(answer, 0) + 1

    def protocol_error(self, reason: str) -> None:
        self.protocol_errors[reason] = self.protocol_errors.get(reason, 0) + 1

    def limit_refused(self, reason: str) -> None:
        self.limit_refusals[reason] = self.limit_refusals.get(reason, 0) + 1

    def queue_len(self, client_cn: str | None = None) -> int:
        return sum(
            len(s.queue) for s in self.sessions.values()
            if client_cn is None or s.counters.client_cn == client_cn
        )

    def snapshot(self) -> dict[str, Any]:
        """A JSON-friendly copy of every count (what ``Client.stats()`` returns)."""
        def tot(attr: str) -> int:
            return sum(getattr(c, attr) for c in self.by_cn.values())

        drops: dict[str, int] = {}
        for c in self.by_cn.values():
            for reason, n in c.drops.items():
                drops[reason] = drops.get(reason, 0) + n
        lane_tx = [0] * self.max_lanes
        lane_rx = [0] * self.max_lanes
        for c in self.by_cn.values():
            for i in range(self.max_lanes):
                lane_tx[i] += c.lane_tx_frames[i]
                lane_rx[i] += c.lane_rx_frames[i]
        return {
            "role": self.role,
            "implementation": self.implementation,
            "sessions_active": tot("sessions_active"),
            "lanes_active": tot("lanes_active"),
            "udp_in_packets": tot("udp_in_packets"),
            "udp_in_bytes": tot("udp_in_bytes"),
            "udp_out_packets": tot("udp_out_packets"),
            "udp_out_bytes": tot("udp_out_bytes"),
            "drops": drops,
            "dropped": sum(drops.values()),
            "lane_tx_frames": lane_tx,
            "lane_rx_frames": lane_rx,
            "lane_reconnects": tot("lane_reconnects"),
            "reorder_skipped": tot("reorder_skipped"),
            "reorder_late": tot("reorder_late"),
            "queue_len": self.queue_len(),
            "handshakes": self.handshake_seconds.count,
            "handshake_failures": dict(self.handshake_failures),
            "protocol_errors": dict(self.protocol_errors),
            "limit_refusals": dict(self.limit_refusals),
            "web_face": dict(self.web_face),
            "by_cn": {
                cn: {
                    "udp_in_packets": c.udp_in_packets,
                    "udp_out_packets": c.udp_out_packets,
                    "dropped": c.dropped,
                    "sessions_active": c.sessions_active,
                    "lanes_active": c.lanes_active,
                }
                for cn, c in self.by_cn.items()
            },
        }
