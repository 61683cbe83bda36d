"""The server role: accepts mTLS lanes, groups them into sessions, talks to WireGuard.

Connections are accepted by our own loop over ``sock_accept`` and handed to the
lane transport (``ut.transport.TlsTransport.accept``: ``loop.connect_accepted_socket(
ssl=...)``), so that a refused handshake raises here, to be timed, classified and
logged (``create_server(ssl=...)`` would swallow it; ``start_tls`` after a paused plain
protocol loses the ClientHello on uvloop, which starts reading before ``pause_reading``
takes effect). After TLS, the first frame must be a HELLO within
``hello_timeout_seconds``; each lane's ``LaneMachine`` judges it, and the ``Server``
(every server lane's one owner) admits the lane into its session, passing its DATA on
to that session from then on. Sessions are keyed by
(certificate CN, session id): the CN comes from the verified certificate, so
one client can never join another's session. Each session owns one connected
UDP socket towards ``udp.wg_udp_addr``, opened once, so WireGuard sees one
stable source port per session; the session lingers ``session_linger_seconds``
after its last lane so a returning client keeps that port.

Bounds (issue 19, ``limits:``; docs/config.md): sessions per CN and in all (a lingering
session gives way to a new one before anything is refused), lanes in all, connections
pending TLS + HELLO (the oldest is dropped), new connections accepted per second (a
token bucket, ``accept_rate`` / ``accept_burst``: the rest wait in the listen backlog,
so a flood of handshakes, each refused or not, gets a bounded share of the loop), at
most ``ACCEPT_BATCH`` accepted per loop pass, queued bytes in all (``ut.budget``), and
file descriptors: a lane or session whose descriptor would be among the top
``FD_RESERVE`` of ``RLIMIT_NOFILE`` is refused, and the web face stops
``WEB_FD_RESERVE`` below the limit, so metrics scrapes and established sessions keep
working at the limit. A refusal after HELLO is ERR ``limit``; each is counted in
``ut_limit_refusals_total{reason}`` and logged at most once per reason and window
(``lane_refused``, ``accept_paced``, ``web_refused``).

Mass events (issue 19, point 4): lingering sessions end in batches of ``LINGER_BATCH``
per loop pass from one ordered list (one timer, not one per session); lanes whose
connection is gone stop being picked at once and have the rest of their bookkeeping done
``LOST_BATCH`` per pass; the per-lane and per-session log lines go through a
``LineBudget`` (a summary line once there are many); ``close`` gives lanes
``CLOSE_GRACE_SECONDS`` to take their GOODBYE and then aborts them.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import functools
import logging
import resource
import select
import socket
import ssl
import time
from typing import Any

from . import fastpath
from ._version import __version__
from .addr import format_addr, parse_addr
from .budget import shed
from .config import Config
from .control import (
    ERR_BAD_HELLO,
    ERR_HELLO_TIMEOUT,
    ERR_INTERNAL,
    ERR_LIMIT,
    GOODBYE_IDLE,
    GOODBYE_SHUTDOWN,
    Hello,
)
from .gate import NotAClient
from .lane import Lane
from .laneproto import LaneMachine, State, Violation
from .logbudget import LineBudget
from .logs import Debounced, event
from .proof import PROOF_REASONS
from .session import Session, hello_flags, session_options
from .stats import TunnelStats
from .tcpsock import set_tcp_options
from .tls import failure_reason
from .transport import TlsTransport, server_transport
from .udp import UdpPort, open_udp_socket

# Connections the kernel holds for us beyond what has been accepted (it caps this at
# net.core.somaxconn, 4096 on current kernels): what limits.accept_rate leaves unaccepted
# waits there rather than being dropped at the SYN.
LISTEN_BACKLOG = 4096
# New connections accepted per loop pass at most, then the loop serves everything else
# once before accepting more: each accepted connection costs a lane, a task and, in the
# next passes, a TLS handshake (~0.6 ms of CPU on loopback with P-256 certificates), so a
# backlog of hundreds taken in one pass would hold the established sessions for as long.
ACCEPT_BATCH = 8
# Most connections allowed at once that have not yet finished TLS + HELLO
# (hardening, issue 5). Measured cost of one such connection: ~300 KiB RSS on
# the stock asyncio loop (its SSL protocol allocates a 256 KiB read buffer per
# connection), ~50 KiB on uvloop; 2000 idle TCP connections took an asyncio
# server from 38 to 640 MiB, past the 512 MiB budget. Timeouts alone bound how
# long each one lives, not how many arrive meanwhile. At the cap the *oldest*
# pending connection is dropped to admit the new one: a real client finishes
# TLS + HELLO in milliseconds, so a slowloris crowd has to churn the whole cap
# within that time to push it out, whereas refusing the newest would let
# 512 idle sockets lock every client out until their timeouts. The default of
# limits.max_pending.
MAX_PENDING_LANES = 512
# File descriptors kept free for what must work at the limit: metrics scrapes, a log
# file. Lanes and session sockets never take one numbered in the top FD_RESERVE of
# RLIMIT_NOFILE (the kernel hands out the lowest free number, so a number that high
# means the ones below are all taken).
FD_RESERVE = 64
# The web face (tls.client_auth: proof: connections that are not clients, and the relays
# of those to fallback.addr, two descriptors each) stops this far below the limit: near
# it, visitors are turned away first, while clients' lanes (a session's lane coming back)
# still get the FD_RESERVE descriptors above, and scrapes the top FD_RESERVE.
WEB_FD_RESERVE = 2 * FD_RESERVE
# Lingering sessions ended per loop pass at most: 5,000 ending in one pass stalled the
# loop for tens of milliseconds (bench/results/issue19-abuse.md).
LINGER_BATCH = 200
# Lanes whose connection is gone, whose session bookkeeping (unregister, its line, the
# linger) is done per loop pass at most, and as many whose transport (SSL object and
# buffers) is dropped: thousands reset together are reported in a few passes, and each
# lane's share was ~10 us of each (bench/results/issue19-bounds2.md).
LOST_BATCH = 200
# Server.close(): how long lanes whose GOODBYE is written may take to close cleanly
# before they are aborted (a peer that never reads its socket would hold the exit).
CLOSE_GRACE_SECONDS = 0.5
# Per-lane and per-session log lines: at most this many per window, then a summary.
MASS_LOG_BURST = 200
MASS_LOG_WINDOW_SECONDS = 1.0
MASS_EVENTS = frozenset({"lane_open", "lane_close", "session_open", "session_close"})
# One tls_handshake_fail / lane_refused line per reason per window.
REFUSAL_LOG_WINDOW_SECONDS = 5.0
# The server closes a session's lanes after this many times tcp.idle_seconds without
# payload: later than an honest client (which closes its idle lanes after idle_seconds),
# so it never races one into redialling, but it does end lanes a client left hanging.
SERVER_IDLE_FACTOR = 2.0


def _close_if_cancelled(conn: socket.socket, task: asyncio.Task) -> None:
    if task.cancelled():
        conn.close()




def fd_ceiling(reserve: int = FD_RESERVE) -> int:
    """The lowest descriptor number a lane or session socket may not have: the soft
    ``RLIMIT_NOFILE`` less ``reserve`` (never below half the limit)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return 1 << 30
    return max(soft - reserve, soft // 2)


class LimitReached(Exception):
    """A new session or lane would pass one of the server's bounds (``reason``)."""

    def __init__(self, reason: str, text: str) -> None:
        super().__init__(text)
        self.reason = reason


class ServerSession(Session):
    role = "server"

    def __init__(self, server: Server, sock: socket.socket | None, **kw: Any) -> None:
        super().__init__(server.loop, server._stats, budget=server.budget, **kw)
        self.server = server
        self.key = (self.client_cn, self.session_id)
        self.active_lanes = 0
        self._lost_lanes: list[Lane] = []  # connection gone, bookkeeping deferred
        self._udp_err_log = Debounced(5.0)
        self.udp: Any
        if sock is None:  # TUN mode: the shared device, by address (ut.tunserver)
            self.udp = server.tun_hub.port_for(self)
            self.offer_offload = server.tun_hub.port.vnet
        else:
            self.udp = UdpPort(self.loop, sock, self.on_udp_batch, self._udp_error,
                               self.count_socket_drops)
        self.udp.start()
        self.counters.sessions_active += 1
        self.log("session_open", udp_local=format_addr(self.udp.address))

    def log(self, name: str, level: int = logging.INFO, **fields: Any) -> None:
        # Lines that come one per lane or session go through the server's line budget.
        if name in MASS_EVENTS and not self.server.log_budget.allow(name, fields.get("reason")):
            return
        super().log(name, level, **fields)

    def over_budget(self) -> None:
        self.server.shed_queues()

    def on_udp_batch(self, batch: list) -> None:
        self.push_datagrams([d for d, _ in batch])

    def udp_target(self) -> tuple[Any, Any] | None:
        return self.udp, None  # connected socket: always towards WireGuard

    def _udp_error(self, exc: OSError) -> None:
        # ICMP unreachable from a closed WireGuard port lands here on a later read.
        due = self._udp_err_log.hit()
        if due:
            self.log("udp_error", logging.WARNING, err=str(exc), count=due)

    def lane_closed(self, lane: Lane) -> None:
        # The peer ended the lane (its connection lost, EOF, GOODBYE or ERR; not a close
        # of ours: those unregister at once, before their GOODBYE): stop picking the lane
        # now, O(1), and leave the rest to the server's batches (Server.lane_lost_later),
        # so that thousands of lanes ending in one pass do not hold it. Nothing is written
        # to a lane the picker skips.
        if ((lane.lost.done() or lane.close_reason.startswith("peer_"))
                and self.lanes[lane.lane_id] is lane and not self.closed):
            self.picker.set_ready(lane.lane_id, False)
            self._lost_lanes.append(lane)
            self.server.lane_lost_later(self)
            return
        super().lane_closed(lane)

    def end_lost(self) -> int:
        """The deferred bookkeeping of every lane lost and not yet unregistered; returns
        how many. Runs before anything that reads the lanes (a lane taking the same slot,
        the session's close)."""
        lost = self._lost_lanes
        if not lost:
            return 0
        self._lost_lanes = []
        for lane in lost:
            super().lane_closed(lane)
        return len(lost)

    def admit(self, lane: Lane) -> None:
        self.end_lost()  # a lost lane in the slot this one takes is unregistered first
        self.active_lanes += 1
        self.server.lanes_total += 1
        self.server.stop_linger(self)
        self.lane_up(lane)

    def after_lane_lost(self, lane: Lane, exc: BaseException | None) -> None:
        self.active_lanes -= 1
        self.server.lanes_total -= 1
        if self.active_lanes == 0 and not self.closed:
            self.server.start_linger(self)

    def close(self, reason: str) -> None:
        if self.closed:
            return
        self.end_lost()
        self.closed = True
        self.server.stop_linger(self)
        self.close_lanes(GOODBYE_SHUTDOWN, reason)
        self.flush_reorder()
        self.udp.close()
        left = self.queue.clear()
        if left:
            self.counters.drop("no_lane", left)
        self.counters.sessions_active -= 1
        self.log("session_close", reason=reason)


class Server:
    """The server role, run inside the caller's asyncio loop.

    Example::

        cfg = ut.load_config("server.yaml")
        async with ut.Server(cfg) as server:
            print(server.address)  # where clients dial
            await server.wait_closed()
    """

    def __init__(self, config: Config) -> None:
        if config.role != "server":
            raise ValueError(f"{config.source}: role: a Server needs role 'server'")
        self.config = config
        self._stats = TunnelStats(
            role="server", max_lanes=config.tcp.lanes, implementation=fastpath.IMPLEMENTATION
        )
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.wg_addr = parse_addr(config.udp.wg_udp_addr)
        self.sessions: dict[tuple[str, int], ServerSession] = {}
        self.ssl_context: ssl.SSLContext | None = None
        self.transport: TlsTransport | None = None
        self.metrics: Any = None
        self.tun_hub: Any = None  # TUN mode (tun.enabled): the shared device (ut.tunserver)
        self._listen_sock: socket.socket | None = None
        self._accept_task: asyncio.Task | None = None
        self._idle_task: asyncio.Task | None = None
        self._handshakes: set[asyncio.Task] = set()
        # Lanes accepted but not yet through TLS + HELLO, oldest first (dicts
        # keep insertion order): value = the HELLO timer once TLS is done.
        self._pending: dict[Lane, asyncio.TimerHandle | None] = {}
        self._pending_tasks: dict[Lane, asyncio.Task] = {}
        self.limits = config.limits
        self.max_pending = config.limits.max_pending
        # Every session's queue counts towards this (ut.budget).
        self.budget = fastpath.QueueBudget(config.limits.queue_budget_bytes)
        self.sessions_per_cn: dict[str, int] = {}
        self.lanes_total = 0  # lanes admitted into a session (HELLO done), all sessions
        # Sessions with no lane, in the order they began to linger, which is the order
        # they expire in (the linger is one constant): value = when.
        self._lingering: dict[ServerSession, float] = {}
        self._lingering_by_cn: dict[str, dict[ServerSession, None]] = {}
        self._linger_timer: asyncio.Handle | None = None
        # Sessions with a lane lost and not yet unregistered (ServerSession.lane_closed),
        # once per lost lane, oldest first.
        self._lost: collections.deque[ServerSession] = collections.deque()
        self._lost_handle: asyncio.Handle | None = None
        # Lanes whose connection is gone and whose transport is still to drop (_release).
        self._releases: collections.deque[Lane] = collections.deque()
        self._release_handle: asyncio.Handle | None = None
        self._fd_ceiling = 1 << 30  # set by start() from RLIMIT_NOFILE
        self.log_budget = LineBudget(MASS_LOG_BURST, MASS_LOG_WINDOW_SECONDS, "server")
        # Refusals are logged at most once per reason per window (with a count),
        # so a flood of garbage connections cannot flood the log.
        self._refusal_logs: dict[tuple[str, str], Debounced] = {}
        self._closed = asyncio.Event()

    async def start(self) -> None:
        """Listen for lanes and serve metrics."""
        cfg = self.config
        self.loop = asyncio.get_running_loop()
        self._fd_ceiling = fd_ceiling()
        if cfg.tun.enabled:
            from .tunserver import TunHub

            self.tun_hub = TunHub(self.loop, cfg)
        self.transport = server_transport(cfg, self._stats.web_answer)
        self.ssl_context = self.transport.ssl_context
        if self.transport.gate is not None:
            face = self.transport.gate.face
            face.fd_ceiling = fd_ceiling(WEB_FD_RESERVE)
            face.refused = self._web_refused
        host, port = parse_addr(cfg.tcp.listen_addr)
        infos = await self.loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                            flags=socket.AI_PASSIVE)
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            set_tcp_options(sock, cfg.tcp.tcp_nodelay)
            sock.bind(addr)
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._listen_sock = sock
        self._accept_task = self.loop.create_task(self._accept_loop())
        self._idle_task = self.loop.create_task(self._idle_watch())
        if cfg.metrics.enabled:
            from .metrics import start_metrics_server

            self.metrics = await start_metrics_server(self._stats, cfg.metrics)
        event(
            "start", role="server", version=__version__, implementation=fastpath.IMPLEMENTATION,
            tcp_listen=format_addr(self.address), config=cfg.summary(),
        )

    @property
    def address(self) -> tuple:
        """The bound TCP address (useful with port 0)."""
        assert self._listen_sock is not None
        return self._listen_sock.getsockname()

    @property
    def metrics_url(self) -> str | None:
        return self.metrics.url if self.metrics else None

    # -- accepting ------------------------------------------------------------
    async def _accept_loop(self) -> None:
        sock = self._listen_sock
        assert sock is not None
        cfg = self.config
        tcp = cfg.tcp
        transport = self.transport
        assert transport is not None
        flags = hello_flags(tcp.resequence, self.tun_hub is not None and self.tun_hub.port.vnet)
        loop = self.loop
        # limits.accept_rate: a token bucket of accept_burst connections refilled at
        # accept_rate a second. Without a token nothing is accepted: connections wait in
        # the listen backlog (their clients' TLS handshake timer runs meanwhile), so a
        # flood of handshakes, even ones refused right after (a CN at its session cap),
        # takes at most that share of the loop and of a core.
        rate = float(self.limits.accept_rate)
        burst = float(self.limits.accept_burst)
        tokens, filled_at = burst, loop.time()
        backlog = select.poll()  # is a connection waiting? (poll: no FD_SETSIZE limit)
        backlog.register(sock.fileno(), select.POLLIN)
        batch = 0
        while True:
            now = loop.time()
            tokens = min(burst, tokens + (now - filled_at) * rate)
            filled_at = now
            if tokens < 1.0:
                waiting = bool(backlog.poll(0))
                await asyncio.sleep((1.0 - tokens) / rate)
                batch = 0
                if waiting:  # held back (accepted late, not refused): counted, logged
                    self._stats.limit_refused("accept_rate")
                    self._log_refusal(
                        "accept_paced", "accept_rate",
                        err=f"more than {self.limits.accept_rate} new connections a second "
                            f"(limits.accept_rate, burst {self.limits.accept_burst}): the rest "
                            "wait in the listen backlog")
                continue
            if batch >= ACCEPT_BATCH:
                batch = 0
                await asyncio.sleep(0)  # one pass for the established sessions
            try:
                conn, peer = await loop.sock_accept(sock)
            except asyncio.CancelledError:
                raise
            except OSError as exc:  # EMFILE and friends: wait, do not spin
                self._stats.limit_refused("accept_error")
                self._log_refusal("accept_fail", errno.errorcode.get(exc.errno or 0, "other"),
                                  logging.ERROR, err=str(exc))
                await asyncio.sleep(0.1)
                continue
            tokens -= 1.0
            batch += 1
            if conn.fileno() >= self._fd_ceiling:
                # Near RLIMIT_NOFILE: keep the reserve for scrapes and what is established.
                conn.close()
                self._stats.limit_refused("fds")
                self._log_refusal("lane_refused", "fds", peer=format_addr(peer),
                                  err=f"file descriptors near the limit ({self._fd_ceiling}"
                                      f" + {FD_RESERVE} reserved): connection closed")
                continue
            transport.accepted(conn)
            while len(self._pending) >= self.max_pending:
                self._evict_oldest_pending()
            # The client sends HELLO right after its handshake, and the lane may
            # get it before the handshake's await returns: it is pending from the start.
            machine = LaneMachine("server", max_lanes=tcp.lanes, flags=flags,
                                  padding=cfg.shaping.padding)
            lane = Lane(self, machine, peer=peer, read_chunk=tcp.tcp_buf)
            lane.lost.add_done_callback(functools.partial(self._release_later, lane))
            self._pending[lane] = None
            task = self.loop.create_task(self._handshake(lane, conn, peer))
            self._pending_tasks[lane] = task
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)
            # A task cancelled before it ever ran (evicted in a burst of accepts)
            # never reaches its own clean-up: close its socket here.
            task.add_done_callback(functools.partial(_close_if_cancelled, conn))

    async def _idle_watch(self) -> None:
        """Close the lanes of sessions that carried no payload for ``SERVER_IDLE_FACTOR``
        × ``tcp.idle_seconds`` (docs/config.md): the client closes idle lanes itself
        well before that; this catches clients that do not (a dead or hostile one holding
        lanes open). The session lingers as after any lane loss."""
        idle = self.config.tcp.idle_seconds * SERVER_IDLE_FACTOR
        tick = min(1.0, idle / 4)
        while True:
            await asyncio.sleep(tick)
            deadline = time.perf_counter() - idle
            for session in list(self.sessions.values()):
                if session.active_lanes and session.active_at < deadline:
                    session.log("idle_close", lanes=session.active_lanes, idle_seconds=idle)
                    session.close_lanes(GOODBYE_IDLE, "idle")

    def _log_refusal(self, name: str, reason: str, level: int = logging.WARNING,
                     **fields: Any) -> None:
        key = (name, reason)
        deb = self._refusal_logs.get(key)
        if deb is None:
            deb = self._refusal_logs[key] = Debounced(REFUSAL_LOG_WINDOW_SECONDS)
        due = deb.hit()
        if due:
            event(name, level, role="server", reason=reason, count=due, **fields)

    def _web_refused(self) -> None:
        """The web face closed a connection (or did not open a relay) near the limit."""
        self._stats.limit_refused("web_fds")
        self._log_refusal("web_refused", "web_fds",
                          err=f"file descriptors near the limit (web connections stop "
                              f"{WEB_FD_RESERVE} below it): connection closed")

    def _evict_oldest_pending(self) -> None:
        """Make room under ``max_pending``: drop the connection pending longest."""
        lane = next(iter(self._pending))
        timer = self._pending.pop(lane)
        if timer is not None:
            timer.cancel()
        task = self._pending_tasks.pop(lane, None)
        tls_done = lane.transport is not None
        if task is not None and not task.done() and not tls_done:
            task.cancel()  # mid-TLS: _handshake closes the socket
        else:
            lane.abort("evicted")
        if tls_done:
            self._stats.protocol_error("evicted")
        else:
            self._stats.handshake_failed("evicted")
        self._log_refusal("lane_evicted", "evicted", peer=format_addr(lane.peer),
                          tls_done=tls_done, pending=len(self._pending),
                          err=f"more than {self.max_pending} connections without TLS + HELLO")

    async def _handshake(self, lane: Lane, conn: socket.socket, peer: Any) -> None:
        tcp = self.config.tcp
        t0 = self.loop.time()
        try:
            await self.transport.accept(self.loop, lane, conn)  # type: ignore[union-attr]
        except asyncio.CancelledError:
            self._pending.pop(lane, None)
            conn.close()
            raise
        except NotAClient as exc:  # tls.client_auth: proof
            self._pending.pop(lane, None)
            if not exc.handed_off:
                conn.close()
            if exc.reason in PROOF_REASONS:  # it knew the CA: a client, refused
                self._stats.handshake_failed(exc.reason)
                self._log_refusal("tls_handshake_fail", exc.reason, peer=format_addr(peer),
                                  stage="proof", err=exc.text)
            elif not exc.handed_off:
                self._stats.handshake_failed(exc.reason)
            return
        except BaseException as exc:  # noqa: BLE001 - a refused peer must never stop us
            self._pending.pop(lane, None)
            conn.close()
            reason, text = failure_reason(exc, side="server")
            self._stats.handshake_failed(reason)
            self._log_refusal("tls_handshake_fail", reason, peer=format_addr(peer), err=text)
            return
        finally:
            self._pending_tasks.pop(lane, None)
        self._stats.handshake_seconds.observe(self.loop.time() - t0)
        if lane.proto.state is State.CONNECTING:
            lane.proto.transport_up()
        if lane in self._pending and self._pending[lane] is None and not lane.closing:
            self._pending[lane] = self.loop.call_later(
                tcp.hello_timeout_seconds, self._no_hello, lane)

    def _no_hello(self, lane: Lane) -> None:
        if lane in self._pending:
            self._refuse(lane, ERR_HELLO_TIMEOUT, "hello_timeout", "no HELLO in time")

    def _refuse(self, lane: Lane, code: int, reason: str, text: str) -> None:
        """Refuse a lane that has not joined a session: counted, logged, ERR, closed."""
        timer = self._pending.pop(lane, None)
        if timer is not None:
            timer.cancel()
        self._stats.protocol_error(reason)
        self._log_refusal("lane_refused", reason, peer=format_addr(lane.peer),
                          client_cn=lane.client_cn or None, err=text)
        lane.end_with_err(code, text, reason)

    def _refuse_limit(self, lane: Lane, refusal: LimitReached) -> None:
        """Refuse a lane at one of the bounds: counted by reason, logged, ERR limit."""
        self._stats.limit_refused(refusal.reason)
        self._log_refusal("lane_refused", refusal.reason, peer=format_addr(lane.peer),
                          client_cn=lane.client_cn or None, err=str(refusal),
                          sessions=len(self.sessions), lanes=self.lanes_total)
        lane.end_with_err(ERR_LIMIT, str(refusal), f"limit_{refusal.reason}")

    # -- bounds -----------------------------------------------------------------
    def _make_room(self, client_cn: str) -> None:
        """Room for one more session of ``client_cn``, a lingering one giving way if
        need be (its own CN's first); ``LimitReached`` when every session has lanes."""
        limits = self.limits
        if self.sessions_per_cn.get(client_cn, 0) >= limits.max_sessions_per_cn:
            if not self._end_oldest_lingering(self._lingering_by_cn.get(client_cn)):
                raise LimitReached("sessions_per_cn", f"{limits.max_sessions_per_cn} sessions "
                                   f"of this client (limits.max_sessions_per_cn), each with lanes")
        if len(self.sessions) >= limits.max_sessions:
            if not self._end_oldest_lingering(self._lingering):
                raise LimitReached("sessions", f"{limits.max_sessions} sessions in all "
                                   "(limits.max_sessions), each with lanes")

    def _end_oldest_lingering(self, lingering: dict | None) -> bool:
        if not lingering:
            return False
        self.end_session(next(iter(lingering)), "limit")
        return True

    def shed_queues(self) -> None:
        """The session queues together are over ``limits.queue_budget_bytes``: drop the
        oldest datagrams of the longest ones (``ut.budget.shed``), each counted."""
        for session, n in shed(self.budget, self.sessions.values()):
            session.count_budget(n)

    def start_linger(self, session: ServerSession) -> None:
        """``session`` lost its last lane: it ends ``session_linger_seconds`` from now
        unless a lane comes back (``stop_linger``)."""
        when = self.loop.time() + self.config.tcp.session_linger_seconds
        self._lingering[session] = when
        self._lingering_by_cn.setdefault(session.client_cn, {})[session] = None
        if self._linger_timer is None:
            self._linger_timer = self.loop.call_at(when, self._end_lingering)

    def stop_linger(self, session: ServerSession) -> None:
        if self._lingering.pop(session, None) is None:
            return
        by_cn = self._lingering_by_cn[session.client_cn]
        del by_cn[session]
        if not by_cn:
            del self._lingering_by_cn[session.client_cn]

    def _end_lingering(self) -> None:
        """End the sessions whose linger is over, oldest first, ``LINGER_BATCH`` per loop
        pass; come back for the rest (next pass) or at the next one's time."""
        self._linger_timer = None
        now = self.loop.time()
        for _ in range(LINGER_BATCH):
            if not self._lingering:
                return
            session, when = next(iter(self._lingering.items()))
            if when > now:
                self._linger_timer = self.loop.call_at(when, self._end_lingering)
                return
            self.stop_linger(session)
            if session.active_lanes == 0:  # a lane that came back took it off the list
                self.end_session(session, "linger")
        if self._lingering:
            self._linger_timer = self.loop.call_soon(self._end_lingering)

    def _release_later(self, lane: Lane, _lost: asyncio.Future) -> None:
        """``lane``'s connection is gone: drop its transport in a later pass,
        ``LOST_BATCH`` lanes per pass (``_release``).

        uvloop's SSL protocol keeps the lane's bound get_buffer/buffer_updated and the
        lane keeps the transport: a reference cycle that only Python's full collection
        frees, which after a flood of refused connections (thousands of dead lanes, each
        with its SSL object and buffers) held the loop ~200 ms in one go
        (bench/results/issue19-bounds2.md). With the transport dropped, reference
        counting frees each lane; in batches, so that thousands lost together are not
        all freed in one pass. Nothing uses a lost lane's transport (every use in
        ``ut.lane`` checks for None)."""
        self._releases.append(lane)
        if self._release_handle is None:
            self._release_handle = self.loop.call_soon(self._release)

    def _release(self) -> None:
        self._release_handle = None
        releases = self._releases
        for _ in range(min(LOST_BATCH, len(releases))):
            releases.popleft().transport = None
        if releases:
            self._release_handle = self.loop.call_soon(self._release)

    def lane_lost_later(self, session: ServerSession) -> None:
        """A lane of ``session`` lost its connection: its bookkeeping is done in a later
        pass, ``LOST_BATCH`` lanes per pass (``_end_lost``)."""
        self._lost.append(session)
        if self._lost_handle is None:
            self._lost_handle = self.loop.call_soon(self._end_lost)

    def _end_lost(self) -> None:
        self._lost_handle = None
        lost, done = self._lost, 0
        while lost and done < LOST_BATCH:
            done += lost.popleft().end_lost() or 1
        if lost:
            self._lost_handle = self.loop.call_soon(self._end_lost)

    # -- LaneOwner: the server owns every lane it accepts ------------------------
    def lane_hello(self, lane: Lane, hello: Hello, flags: int) -> None:
        """A valid client HELLO (its lane machine checked it): admit the lane into the
        session (client CN, session id), making the session if it is new."""
        if lane not in self._pending:
            return  # evicted or refused while the HELLO was in flight
        timer = self._pending.pop(lane)
        if timer is not None:
            timer.cancel()
        try:
            lane.client_cn = self.transport.peer_identity(lane.transport)  # type: ignore[union-attr]
        except ValueError as exc:  # a certificate with no CN cannot be keyed
            self._refuse(lane, ERR_BAD_HELLO, "bad_certificate", f"no usable CN: {exc}")
            return
        key = (lane.client_cn, hello.session_id)
        session = self.sessions.get(key)
        replaces = session is not None and session.lanes[hello.lane_id] is not None
        try:
            if self.lanes_total >= self.limits.max_lanes and not replaces:
                raise LimitReached("lanes", f"{self.limits.max_lanes} lanes in all "
                                   "(limits.max_lanes)")
            if session is None:
                self._make_room(lane.client_cn)
                session = self._new_session(lane.client_cn, hello.session_id)
        except LimitReached as refusal:
            self._refuse_limit(lane, refusal)
            return
        except OSError as exc:
            event("session_open_fail", logging.ERROR, role="server",
                  client_cn=lane.client_cn, err=str(exc))
            lane.end_with_err(ERR_INTERNAL, "cannot open UDP towards WireGuard",
                              "udp_open_failed")
            return
        lane.session = session
        # FLAG_SEQ on the client's HELLO: it resequences, so number what we send it
        # (docs/protocol.md, "Sequence numbers"); FLAG_PAD, read by the lane's machine:
        # it understands PAD frames, so our writes to it end with one.
        session.peer_hello(flags)
        lane.accept(self.config.tcp.lanes)
        session.admit(lane)

    def lane_data(self, lane: Lane, frames: list) -> None:
        session = lane.session
        if session is not None:
            session.lane_data(lane, frames)

    def lane_writable(self, lane: Lane, writable: bool) -> None:
        session = lane.session
        if session is not None:
            session.lane_writable(lane, writable)

    def lane_violation(self, lane: Lane, violation: Violation) -> None:
        session = lane.session
        if session is not None:
            session.lane_violation(lane, violation)
            return
        # Before HELLO: a refusal, counted and logged (debounced) like the others.
        self._stats.protocol_error(violation.reason)
        self._log_refusal("lane_refused", violation.reason, peer=format_addr(lane.peer),
                          client_cn=lane.client_cn or None, err=violation.text)

    def lane_closed(self, lane: Lane) -> None:
        timer = self._pending.pop(lane, None)
        if timer is not None:
            timer.cancel()
        session = lane.session
        if session is not None:
            session.lane_closed(lane)

    def _new_session(self, client_cn: str, session_id: int) -> ServerSession:
        cfg = self.config
        if self.tun_hub is not None:  # TUN mode: no UDP socket of its own
            return self._add_session(ServerSession(
                self, None, client_cn=client_cn, session_id=session_id, n_lanes=cfg.tcp.lanes,
                max_packets=cfg.queue.max_packets, max_bytes=cfg.queue.max_bytes,
                **session_options(cfg)))
        try:
            sock = open_udp_socket(connect=self.wg_addr)
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                raise LimitReached("fds", f"no file descriptor for a new session: {exc}") from exc
            raise
        if sock.fileno() >= self._fd_ceiling:
            sock.close()
            raise LimitReached("fds", f"file descriptors near the limit ({self._fd_ceiling}"
                               f" + {FD_RESERVE} reserved): no new session")
        try:
            session = ServerSession(
                self, sock, client_cn=client_cn, session_id=session_id, n_lanes=cfg.tcp.lanes,
                max_packets=cfg.queue.max_packets, max_bytes=cfg.queue.max_bytes,
                **session_options(cfg),
            )
        except BaseException:
            sock.close()
            raise
        return self._add_session(session)

    def _add_session(self, session: ServerSession) -> ServerSession:
        client_cn = session.client_cn
        self.sessions[session.key] = session
        self._stats.sessions[session.key] = session
        self.sessions_per_cn[client_cn] = self.sessions_per_cn.get(client_cn, 0) + 1
        return session

    def end_session(self, session: ServerSession, reason: str) -> None:
        self.stop_linger(session)
        if self.sessions.get(session.key) is session:
            del self.sessions[session.key]
            self._stats.sessions.pop(session.key, None)
            n = self.sessions_per_cn[session.client_cn] - 1
            if n:
                self.sessions_per_cn[session.client_cn] = n
            else:
                del self.sessions_per_cn[session.client_cn]
        session.close(reason)

    # -- life cycle -------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """A snapshot of every counter (see ``ut.stats.TunnelStats.snapshot``)."""
        snap = self._stats.snapshot()
        snap["queue_budget"] = {"nbytes": self.budget.nbytes, "max_bytes": self.budget.max_bytes}
        snap["sessions"] = [
            {"client_cn": s.client_cn, "session_id": f"{s.session_id:016x}",
             "lanes": s.active_lanes, "udp_local": format_addr(s.udp.address)}
            for s in self.sessions.values()
        ]
        return snap

    async def close(self) -> None:
        """Stop accepting, say GOODBYE on every lane, close every session. Idempotent."""
        if self._closed.is_set():
            return
        self._closed.set()
        if self._accept_task is not None:
            self._accept_task.cancel()
        if self._idle_task is not None:
            self._idle_task.cancel()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        if self._lost_handle is not None:  # each session's close does its own
            self._lost_handle.cancel()
            self._lost_handle = None
        if self._release_handle is not None:
            self._release_handle.cancel()
            self._release_handle = None
        self._releases.clear()
        if self._listen_sock is not None:
            self._listen_sock.close()
        for task in list(self._handshakes):
            task.cancel()
        for lane in list(self._pending):
            lane.abort("shutdown")
        if self.transport is not None and self.transport.gate is not None:
            self.transport.gate.face.close()
        lanes = [lane for s in self.sessions.values() for lane in s.lanes if lane is not None]
        for session in list(self.sessions.values()):
            self.end_session(session, "shutdown")
        if lanes:
            # GOODBYE is written: a peer that reads closes within a round trip or two;
            # one that does not (gone, or its loop stuck) must not hold the exit.
            await asyncio.wait([lane.lost for lane in lanes], timeout=CLOSE_GRACE_SECONDS)
            late = [lane for lane in lanes if not lane.lost.done()]
            for lane in late:
                lane.abort("shutdown")
            if late:
                await asyncio.wait([lane.lost for lane in late], timeout=0.2)
        self.log_budget.close()
        if self.tun_hub is not None:
            self.tun_hub.close()
        if self.metrics is not None:
            await self.metrics.close()
        event("stop", role="server")

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
