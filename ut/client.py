"""The client role: a local UDP port for WireGuard, N lanes dialled to the server.

The first datagram dials the first missing lane at once; once the server has
answered its HELLO (so its TLS 1.3 session tickets have arrived), the other
lanes follow, each after its own random delay (``LANE_STAGGER_SECONDS``), and
resume that TLS session (``ut.tls.ClientContext``): N lanes opening in
lock-step with N full handshakes is a pattern no browser makes. Datagrams wait
in the session queue until a lane has exchanged HELLO. Lanes lost while other
lanes carry traffic are re-dialled after such a delay, resuming too; when none
is left the first again goes alone and at once. Dialling that fails backs off
with full jitter, its cap held low for the first minutes of an outage and only then
growing exponentially (``dial_delays``). After
``idle_seconds`` without payload the lanes close, one by one, each at its own
random moment over the next few seconds (``IDLE_CLOSE_SPREAD_SECONDS``); the
next datagram rebuilds them. The session id is fixed for the life of a ``Client``, so the server keeps
the same UDP port towards its WireGuard for us across lane rebuilds.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import ssl
import time
from collections.abc import Callable, Iterator
from typing import Any

from . import fastpath
from ._version import __version__
from .addr import format_addr, parse_addr
from .config import Config
from .control import GOODBYE_IDLE, GOODBYE_SHUTDOWN
from .lane import Lane
from .laneproto import LaneMachine
from .logs import event
from .session import Session, session_options
from .stats import TunnelStats
from .tls import ClientContext, client_context, failure_reason, own_cn, sends_sni
from .transport import TlsTransport, client_transport
from .udp import UdpPort, open_udp_socket

#: Each lane after the first of a session waits a uniform random time in this range
#: (seconds) before it dials: lanes then open like a browser's connections, spread
#: over a fraction of a second, not in lock-step. The first lane never waits.
LANE_STAGGER_SECONDS: tuple[float, float] = (0.010, 0.250)
#: When a session goes idle, each lane closes at a uniform random moment within this
#: many seconds (at most a quarter of ``tcp.idle_seconds``), not all in the same
#: instant: N lanes sending GOODBYE and FIN together would be a give-away too.
IDLE_CLOSE_SPREAD_SECONDS = 5.0


#: The first retry after a failed dial comes within this many seconds (jittered), not
#: after the whole ``dial_backoff_min_seconds``: most failures are a lane lost to a
#: blip or a server that restarts, and are over by then.
FAST_RETRY_SECONDS = 1.0


#: For this long after dialling started to fail, the cap of the waits stays at
#: ``dial_backoff_min_seconds``; only then does it double towards the max. A server
#: restart or a short outage is over within minutes, and a cap that had already grown
#: to 40 s would hold traffic back long after the server is back (seen from a random
#: moment, what is left of a wait uniform below a cap is a third of the cap on average).
DIAL_HOLD_SECONDS = 120.0


def dial_delays(
    min_seconds: float,
    max_seconds: float,
    hold_seconds: float = DIAL_HOLD_SECONDS,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[float]:
    """Waits between failed dial rounds: "full jitter" backoff that holds its cap low
    for the first minutes of an outage.

    Each wait is uniform in [0, cap]. The first cap is min(FAST_RETRY_SECONDS,
    min_seconds); then it is min_seconds for as long as ``hold_seconds`` have not passed
    (on ``clock``) since the generator was made, and from then on it doubles with each
    wait up to max_seconds (min_seconds = 5, max_seconds = 60: 1, then 5 for two minutes,
    then 10, 20, 40, 60, 60, ...).

    Why: after an outage shorter than ``hold_seconds``, the server is noticed a median
    0.29 x min_seconds after it is back (1.5 s for 5 s), whereas with a cap doubling from
    the start a 35 s outage ends under a cap of 20-40 s: a median of 15 s, a mean of 18 s
    (``bench/recovery.py --simulate``). Random waits keep
    many clients that lost the same server from dialling it back in lock-step, and an
    outage that lasts longer than the hold still backs off to one dial per max_seconds.

    >>> import itertools
    >>> caps = [1.0, 5.0, 5.0]  # every wait is below its cap
    >>> all(w <= c for w, c in zip(itertools.islice(dial_delays(5.0, 60.0), 3), caps))
    True
    """
    start = clock()
    yield random.uniform(0.0, min(FAST_RETRY_SECONDS, min_seconds))
    cap = min_seconds
    while True:
        yield random.uniform(0.0, cap)
        if clock() - start >= hold_seconds:
            cap = min(cap * 2, max_seconds)


class _RefusedByServer(Exception):
    """The server closed a lane right after TLS, before its HELLO: it refused us."""

    TEXT = (
        "the server closed the connection right after the TLS handshake: it refused this "
        "client's certificate (wrong CA, expired or revoked); see the server's "
        "tls_handshake_fail log line for its reason"
    )

    def __init__(self, cause: BaseException | None) -> None:
        super().__init__(self.TEXT)
        self.cause = cause if isinstance(cause, ssl.SSLError) else None


class ClientSession(Session):
    role = "client"

    def __init__(self, client: Client, **kw: Any) -> None:
        super().__init__(client.loop, client._stats, **kw)
        self.client = client
        self.cfg = client.config
        self.peer: Any = None  # last local UDP sender: replies go there
        self.tun = False  # TUN mode: packets come from and go to a TUN device (ut.tun)
        self.udp: UdpPort | None = None
        self.target_lanes = self.n_lanes  # lowered if the server accepts fewer
        self.idle = True  # no lanes wanted until the first datagram
        self.active_lanes = 0
        self._dialer: asyncio.Task | None = None
        self._acks: dict[Lane, asyncio.Future] = {}
        self._lost_slots: set[int] = set()
        self._idle_closes: list[asyncio.TimerHandle] = []  # lanes still to close (idle)

    # -- UDP side -----------------------------------------------------------
    def on_udp_batch(self, batch: list) -> None:
        self.peer = batch[-1][1]
        self.push_datagrams([d for d, _ in batch])

    def udp_target(self) -> tuple[Any, Any] | None:
        if self.tun:
            return self.udp, None
        return None if self.peer is None else (self.udp, self.peer)

    # -- dialling -----------------------------------------------------------
    def wants_lanes(self) -> None:
        self.idle = False
        if self._idle_closes:  # traffic came back while lanes were closing one by one
            for handle in self._idle_closes:
                handle.cancel()
            self._idle_closes = []
        if self._dialer is None and not self.closed and self.active_lanes < self.target_lanes:
            self._dialer = self.loop.create_task(self._dial_loop())

    def _missing_slots(self) -> list[int]:
        return [i for i in range(self.target_lanes) if self.lanes[i] is None]

    async def _dial_loop(self) -> None:
        delays = self._dial_delays()
        try:
            while not self.closed and not self.idle:
                slots = self._missing_slots()
                if not slots:
                    return
                results = await self._dial_round(slots)
                if self.closed or self.idle:
                    return
                ok = sum(1 for r in results if r is True)
                if ok == len(results):
                    continue  # all up (a lane may have died meanwhile: loop checks)
                if ok:  # the server is there: start the backoff over
                    delays = self._dial_delays()
                delay = next(delays)
                self.log("dial_backoff", logging.DEBUG, seconds=round(delay, 3),
                         failed=len(results) - ok)
                await asyncio.sleep(delay)
        finally:
            self._dialer = None

    def _dial_delays(self) -> Iterator[float]:
        tcp = self.cfg.tcp
        return dial_delays(tcp.dial_backoff_min_seconds, tcp.dial_backoff_max_seconds,
                           clock=self.loop.time)

    async def _dial_round(self, slots: list[int]) -> list[Any]:
        """Dial ``slots``: with no lane up, the first alone and at once, then (once it
        is up and its TLS session known) the rest; each of those after its own delay."""
        results: list[Any] = []
        if self.active_lanes == 0:
            first = await self._dial_one(slots[0])
            results.append(first)
            # The server's HELLO may have lowered target_lanes: dial no more than it takes.
            slots = [i for i in slots[1:] if i < self.target_lanes] if first is True else []
        if slots:
            results += await asyncio.gather(
                *(self._dial_one(i, delay=random.uniform(*LANE_STAGGER_SECONDS)) for i in slots),
                return_exceptions=True,
            )
        return results

    async def _dial_one(self, lane_id: int, delay: float = 0.0) -> bool:
        client = self.client
        tcp = self.cfg.tcp
        loop = self.loop
        if delay > 0:
            await asyncio.sleep(delay)
            if self.closed or self.idle or self.lanes[lane_id] is not None:
                return False
        t0 = loop.time()
        stage = "connect"
        lane: Lane | None = None
        transport = client.transport
        try:
            sock = await transport.connect(loop, client.server_addr)
            try:
                stage = "tls"
                machine = LaneMachine("client", session_id=self.session_id, lane_id=lane_id,
                                      lane_count=self.n_lanes, flags=self.hello_flags(),
                                      padding=self.padding)
                lane = Lane(self, machine, peer=sock.getpeername(), read_chunk=tcp.tcp_buf)
                await transport.secure(loop, lane, sock)
            except BaseException:
                if lane is None or lane.transport is None:
                    sock.close()
                raise
            stage = "hello"
            ack = loop.create_future()
            self._acks[lane] = ack
            lane.send_hello()
            done, _ = await asyncio.wait(
                {ack, lane.lost}, timeout=tcp.hello_timeout_seconds,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if ack not in done:
                if lane.lost in done and lane.rx_bytes == 0:
                    # TLS 1.3: our handshake "finished", then the server refused our
                    # certificate and closed without a word (asyncio and uvloop send no
                    # alert). A lane closed before any byte came back is that refusal.
                    raise _RefusedByServer(lane.lost.result())
                exc = lane.lost.result() if lane.lost in done else TimeoutError("no HELLO reply")
                raise exc or ConnectionResetError("server closed the lane before HELLO")
            # The handshake counts as done when the server has accepted us (its HELLO).
            self.stats.handshake_seconds.observe(loop.time() - t0)
            return True
        except asyncio.CancelledError:
            if lane is not None:
                if stage == "hello" and lane.transport is not None:
                    # Shut down or gone idle while waiting for the server's HELLO:
                    # the server may already have admitted this lane, so say GOODBYE
                    # (after our HELLO, in order) rather than vanish; it then logs
                    # the lane's end as a goodbye, not as a broken connection.
                    lane.close(goodbye_reason=GOODBYE_SHUTDOWN if self.closed else GOODBYE_IDLE,
                               reason="cancelled")
                else:
                    lane.abort("cancelled")
            raise
        except BaseException as exc:  # noqa: BLE001 - every failure is logged and retried
            if lane is not None:
                lane.abort("dial_failed")
            self._dial_failed(lane_id, stage, exc)
            return False
        finally:
            if lane is not None:
                self._acks.pop(lane, None)

    def _dial_failed(self, lane_id: int, stage: str, exc: BaseException) -> None:
        if isinstance(exc, _RefusedByServer):
            reason, text = "refused_by_server", _RefusedByServer.TEXT
            if exc.cause is not None:  # an alert, when the server's TLS stack sent one
                reason, text = failure_reason(exc.cause, side="client")
            self.stats.handshake_failed(reason)
            self.log("tls_handshake_fail", logging.WARNING, lane_id=lane_id, stage=stage,
                     reason=reason, err=text)
            return
        reason, text = failure_reason(exc)
        tls_related = stage != "connect" and (
            isinstance(exc, ssl.SSLError) or reason not in ("closed", "timeout", "other")
        )
        if tls_related:
            self.stats.handshake_failed(reason)
            self.log("tls_handshake_fail", logging.WARNING, lane_id=lane_id, stage=stage,
                     reason=reason, err=text)
        else:
            self.log("lane_dial_fail", logging.WARNING, lane_id=lane_id, stage=stage,
                     reason=reason, err=str(exc) or type(exc).__name__)

    # -- LaneOwner --------------------------------------------------------------
    def lane_hello(self, lane: Lane, hello: Any, flags: int) -> None:
        """The server's HELLO (the lane's machine checked it is for this session and
        lane): the lane is up, unless the server takes fewer lanes than this one's id."""
        ack = self._acks.get(lane)
        if ack is None or ack.done():  # cancelled while the HELLO was in flight
            lane.close(goodbye_reason=GOODBYE_SHUTDOWN if self.closed else GOODBYE_IDLE,
                       reason="cancelled")
            return
        if hello.lane_count < self.target_lanes:
            # The server accepts fewer lanes: stop dialling the rest.
            self.target_lanes = max(1, hello.lane_count)
        if lane.lane_id >= self.target_lanes:
            lane.close(goodbye_reason=GOODBYE_SHUTDOWN, reason="over_server_limit")
            ack.set_result(False)
            return
        ack.set_result(True)
        # The server asked for numbered DATA (it resequences what we send); TUN offloads
        # on the device if the server takes super-packets, off if it does not.
        self.peer_hello(flags)
        if self.tun:
            self.udp.set_peer_offload(self.offload)  # type: ignore[union-attr]
        if lane.lane_id in self._lost_slots:
            self._lost_slots.discard(lane.lane_id)
            self.counters.lane_reconnects += 1
        if self.active_lanes == 0:
            # A client session counts as active while it has a lane up.
            self.counters.sessions_active += 1
        self.active_lanes += 1
        self.lane_up(lane)
        # Its HELLO answered, the lane's TLS 1.3 tickets have arrived: later lanes resume.
        self.client.transport.remember(lane.transport)

    def lane_open_fields(self, lane: Lane) -> dict[str, Any]:
        return {"tls_resumed": self.client.transport.resumed(lane.transport)}

    def after_lane_lost(self, lane: Lane, exc: BaseException | None) -> None:
        self.active_lanes -= 1
        if self.active_lanes == 0:
            self.counters.sessions_active -= 1
        transport = self.client.transport
        if transport.remembered_from(lane.transport):
            # A server drops the session of a connection that ended without a clean TLS
            # close from its cache: offer the next lanes a live lane's session instead.
            live = [other for other in self.lanes if other is not None and other.ready]
            transport.remember(live[0].transport if live else None)
        if lane.close_reason == "peer_goodbye_idle":
            # The server found the session idle (its own idle close): do as for ours,
            # and let the next datagram rebuild the lanes rather than redial now.
            if self.active_lanes == 0:
                self.idle = True
            return
        if not self.closed and not self.idle:
            self._lost_slots.add(lane.lane_id)
            self.wants_lanes()

    # -- idle -----------------------------------------------------------------
    def go_idle(self) -> None:
        self.idle = True
        if self._dialer is not None:
            self._dialer.cancel()
        if self.active_lanes:
            self.log("idle_close", lanes=self.active_lanes,
                     idle_seconds=self.cfg.tcp.idle_seconds)
        spread = min(IDLE_CLOSE_SPREAD_SECONDS, self.cfg.tcp.idle_seconds / 4)
        for handle in self._idle_closes:
            handle.cancel()
        self._idle_closes = []
        for lane in self.lanes:
            if lane is not None:
                self._idle_closes.append(self.loop.call_later(
                    random.uniform(0.0, spread), self._close_idle_lane, lane))

    def _close_idle_lane(self, lane: Lane) -> None:
        if self.idle and lane in self.lanes:
            self.retire(lane, GOODBYE_IDLE, "idle")

    async def close(self) -> None:
        self.closed = True
        for handle in self._idle_closes:
            handle.cancel()
        if self._dialer is not None:
            self._dialer.cancel()
        lanes = [lane for lane in self.lanes if lane is not None]
        self.close_lanes(GOODBYE_SHUTDOWN, "shutdown")
        if lanes:
            await asyncio.wait([lane.lost for lane in lanes], timeout=2.0)
        self.flush_reorder()
        left = self.queue.clear()
        if left:
            self.counters.drop("no_lane", left)


class Client:
    """The client role, run inside the caller's asyncio loop.

    Example::

        cfg = ut.load_config("client.yaml")
        async with ut.Client(cfg) as client:
            print(client.udp_address)  # point WireGuard's Endpoint here
            await asyncio.sleep(60)
            print(client.stats()["udp_in_packets"])
    """

    def __init__(self, config: Config) -> None:
        if config.role != "client":
            raise ValueError(f"{config.source}: role: a Client needs role 'client'")
        self.config = config
        self._stats = TunnelStats(
            role="client", max_lanes=config.tcp.lanes, implementation=fastpath.IMPLEMENTATION
        )
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.session: ClientSession | None = None
        self.ssl_context: ClientContext | None = None
        self.transport: TlsTransport = None  # type: ignore[assignment]  # set by start()
        self.server_addr: tuple[str, int] = config.tcp.server_host_port
        self.server_name = config.tls.server_name or self.server_addr[0]
        self.metrics: Any = None
        self._idle_task: asyncio.Task | None = None
        self._closed = asyncio.Event()

    async def start(self) -> None:
        """Bind the UDP port, start metrics; lanes are dialled on the first datagram."""
        cfg = self.config
        self.loop = asyncio.get_running_loop()
        self.ssl_context = client_context(cfg.tls.ca_cert, cfg.tls.cert, cfg.tls.key,
                                          alpn=cfg.tls.alpn, server_trust=cfg.tls.server_trust)
        self.transport = client_transport(cfg, self.ssl_context, self.server_name)
        client_cn = own_cn(cfg.tls.cert)
        self.session = ClientSession(
            self, client_cn=client_cn, session_id=secrets.randbits(64),
            n_lanes=cfg.tcp.lanes, max_packets=cfg.queue.max_packets,
            max_bytes=cfg.queue.max_bytes, **session_options(cfg),
        )
        self._stats.sessions[self.session.session_id] = self.session
        if cfg.tun.enabled:
            self.session.udp = self._open_tun()
        else:
            sock = open_udp_socket(bind=parse_addr(cfg.udp.listen_addr))
            self.session.udp = UdpPort(self.loop, sock, self.session.on_udp_batch,
                                       self._udp_error, self.session.count_socket_drops)
        self.session.udp.start()
        if cfg.metrics.enabled:
            from .metrics import start_metrics_server

            self.metrics = await start_metrics_server(self._stats, cfg.metrics)
        self._idle_task = self.loop.create_task(self._idle_watch())
        event(
            "start", role="client", version=__version__, implementation=fastpath.IMPLEMENTATION,
            client_cn=client_cn, session_id=f"{self.session.session_id:016x}",
            udp_listen=format_addr(self.udp_address), config=cfg.summary(),
        )
        if not sends_sni(self.server_name):
            event(
                "no_sni", logging.WARNING, role="client", server_name=self.server_name,
                err=(f"the server name {self.server_name!r} is an IP address, which TLS never "
                     "sends as SNI: every lane's ClientHello goes without one, which ordinary "
                     "HTTPS clients do not do and an observer flags; set tls.server_name to the "
                     "DNS name in the server certificate"),
            )

    def _udp_error(self, exc: OSError) -> None:
        event("udp_error", logging.DEBUG, role="client", err=str(exc))

    async def _idle_watch(self) -> None:
        idle = self.config.tcp.idle_seconds
        tick = min(1.0, idle / 4)
        c = self.session.counters  # type: ignore[union-attr]
        seen = -1
        last_active = self.loop.time()
        while True:
            await asyncio.sleep(tick)
            now = self.loop.time()
            activity = c.udp_in_packets + c.udp_out_packets
            if activity != seen:
                seen, last_active = activity, now
            elif now - last_active >= idle and not self.session.idle:  # type: ignore[union-attr]
                self.session.go_idle()  # type: ignore[union-attr]

    @property
    def udp_address(self) -> tuple:
        """The local UDP address WireGuard should send to (after ``start``)."""
        assert self.session is not None and self.session.udp is not None
        return self.session.udp.address

    @property
    def metrics_url(self) -> str | None:
        return self.metrics.url if self.metrics else None

    def stats(self) -> dict[str, Any]:
        """A snapshot of every counter (see ``ut.stats.TunnelStats.snapshot``)."""
        snap = self._stats.snapshot()
        if self.session is not None:
            snap["lanes_ready"] = self.session.lanes_ready
            snap["session_id"] = f"{self.session.session_id:016x}"
        return snap

    def _open_tun(self) -> Any:
        """TUN mode: this end's TUN device (addresses, MTU, routes from ``tun:``); its
        packets go to the lanes as datagrams would (ut.tun)."""
        from .tun import open_port

        tun = self.config.tun
        assert self.session is not None
        port = open_port(self.loop, tun.name, tun.address, tun.mtu, tun.routes,
                         self.session.push_datagrams, offload=tun.offload)
        self.session.tun = True
        self.session.offer_offload = port.vnet
        return port

    async def close(self) -> None:
        """Say GOODBYE on every lane, close them and the UDP port. Idempotent."""
        if self._closed.is_set():
            return
        self._closed.set()
        if self._idle_task is not None:
            self._idle_task.cancel()
        if self.session is not None:
            await self.session.close()
            if self.session.udp is not None:
                self.session.udp.close()
            self._stats.sessions.pop(self.session.session_id, None)
        if self.metrics is not None:
            await self.metrics.close()
        event("stop", role="client")

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def __aenter__(self) -> Client:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
