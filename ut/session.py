"""A session: the lanes of one client, its queue, and the striping between them.

Theory of operation (both roles share it; ``ut.client`` and ``ut.server`` add
dialling and accepting):

* Datagrams read from UDP go through ``push_datagrams`` into the session's
  ``RingQueue`` (drop-oldest when full) and are flushed to the lanes at once
  when a lane can take them; otherwise they wait there until a lane is ready
  or writable again (``schedule_flush``).
* ``_flush`` pops batches and gives each datagram to the lane the
  ``LanePicker`` names (whole datagrams only, one DATA frame each), then writes
  each lane's frames as one buffer. Lanes are "ready" once HELLO is exchanged
  and "writable" while their TLS write buffer is below its high-water mark; the
  picker only names lanes that are both. With no such lane, datagrams wait in
  the queue.
* DATA frames read from a lane come back through ``lane_data``; their payloads go
  out of the UDP port in one batch per read.
* Resequencing (issue 14, docs/protocol.md "Sequence numbers"): with ``lane_pick: rr``
  and a peer that asked for them (FLAG_SEQ on its HELLO), the datagrams a session
  sends are numbered; what a session receives passes through its ``Resequencer``,
  which releases numbered datagrams in order, waiting for a gap at most an adaptive,
  capped time (a timer calls ``_reorder_expire`` at its deadline).
* Slow lanes (``tcp.skip_slow_lanes``): each burst goes to the ready lane with the
  fewest bytes waiting to be sent (``_least_backlog_lane``); a lane socket takes little
  unsent data (``TCP_NOTSENT_LOWAT``), so a lane whose TCP slowed down pauses; a lane in
  RTO recovery is left out (Linux ``TCP_INFO``, read at most every
  ``LANE_POLL_SECONDS`` while datagrams flow, which also tells the resequencer how long
  a lane may take to repair a loss). With ``queue.aqm`` (or ``queue.max_delay_ms``) a
  lane takes no more than ``LANE_UNSENT_SECONDS`` of its delivery rate (``cap_lanes``),
  so the backlog waits in the session queue where the AQM sees it.
* Stale datagrams (issue 19, ``queue.max_age_seconds``, on by default): a datagram that
  waited longer than that in the session queue (lanes down, a dial backing off) is
  dropped as ``stale`` instead of being sent late: WireGuard resends what matters, and
  an outage's backlog arriving at once only hurts. Only the queue's head is looked at,
  once per batch taken and once per batch pushed (``RingQueue.drop_stale``): O(1) on a
  healthy link, whatever the queue holds. It changes nothing else (no lane cap); the
  stricter ``queue.max_delay_ms`` is the AQM of a slow uplink.
* The queued-bytes budget (issue 19, server, ``limits.queue_budget_bytes``): a session
  made with ``budget=`` counts its queue towards that process-wide budget; a push that
  leaves it exceeded calls ``over_budget`` (the server sheds the longest queues,
  ``ut.budget``), whose drops each session counts as ``budget`` (``count_budget``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from . import fastpath
from .addr import format_addr
from .aqm import CoDel
from .control import GOODBYE_REPLACED
from .errors import FrameError
from .lane import Lane
from .lanecc import LOSS_BASED, CongestionChooser
from .logs import Debounced, event
from .shaping import PAD_FRAME_OVERHEAD, fit_padding, pad_length
from .stats import Counters, TunnelStats
from .tcpsock import congestion_control, set_congestion_control, tcp_state

FLUSH_BATCH_PACKETS = 512  # hash strategy: datagrams per picker pass
FLUSH_BATCH_BYTES = 1 << 20  # bounds one pass's work and the transport overshoot
LANE_BURST_PACKETS = 64  # round-robin: whole datagrams one lane takes in one write
# (the bytes of one write are tcp.tcp_buf, the session's io_chunk)
REORDER_MIN_WAIT_SECONDS = 0.001  # the resequencer's shortest wait for a gap
# Datagrams this small never wait for a gap (Resequencer.pass_bytes): through WireGuard
# they are inner TCP ACKs (96-144 bytes with SACK, IPv6 included) and keepalives (32),
# and holding ACKs only stalls the inner TCP's clock. Inner data segments are larger.
REORDER_PASS_BYTES = 256
# When a gap fills, everything held behind it is released at once: a round trip's worth
# of every lane's datagrams. Sent to WireGuard in one go, that burst overflows a
# userspace WireGuard's UDP socket (wireguard-go keeps the kernel's default 208 KiB
# buffer) and the inner TCP sees real loss. So a release larger than this many
# datagrams goes out in slices of this size, one slice per RELEASE_INTERVAL_SECONDS
# (64 x 1420 bytes per ms: up to ~700 Mbit/s, far above what one session carries here).
RELEASE_BURST_PACKETS = 64
RELEASE_INTERVAL_SECONDS = 0.001
LANE_POLL_SECONDS = 0.02  # how often lanes' TCP_INFO is read while datagrams flow
# queue.aqm (or max_delay_ms) with skip_slow_lanes: a lane with its cap of bytes waiting
# to be sent (TLS buffer + kernel unsent queue) takes no more; if every lane has,
# datagrams wait in the session queue (looked at again every LANE_RETRY_SECONDS), where
# the AQM sees how long they wait. Without the cap a saturated slow uplink queues in the
# lanes' buffers, unseen: loaded ping p50 154 ms on the slow profile against 79 ms with
# a 16 KiB cap (bare link 35), the same goodput (bench/README.md, issue 14). The cap is
# a time: LANE_UNSENT_SECONDS of what the lane delivered lately (TCP_INFO's
# delivery_rate, read every LANE_POLL_SECONDS), at least LANE_MIN_UNSENT; LANE_MAX_UNSENT
# until the first reading. Five lanes with 16 KiB each would hold 33 ms of a 20 Mbit/s
# uplink; a fast lane's few milliseconds are far more bytes than 16 KiB.
LANE_MAX_UNSENT = 16 * 1024
LANE_MIN_UNSENT = 4 * 1024
LANE_UNSENT_SECONDS = 0.004
LANE_CAP_DECAY = 0.9  # per LANE_POLL_SECONDS: a lane's cap follows a falling rate in ~0.2 s
LANE_RETRY_SECONDS = 0.001
DROP_LOG_WINDOW_SECONDS = 5.0  # at most one queue_drop_oldest line per window
TYPE_DATA = fastpath.TYPE_DATA
MAX_PAYLOAD = fastpath.MAX_PAYLOAD
HEADER_LEN = fastpath.HEADER_LEN
SEQ_LEN = fastpath.SEQ_LEN
# With shaping.coalesce_ms, datagrams are held while fewer than this many bytes wait:
# a write this long is no longer "small" (ut/shaping.py).
COALESCE_BYTES = 1024


def session_options(cfg: Any) -> dict[str, Any]:
    """The ``Session`` keyword arguments that come from a ``Config`` (both roles)."""
    tcp = cfg.tcp
    return {
        "lane_pick": tcp.lane_pick,
        "io_chunk": tcp.tcp_buf,
        "resequence": tcp.resequence,
        "resequence_max_wait": tcp.resequence_max_wait_ms / 1000.0,
        "skip_slow_lanes": tcp.skip_slow_lanes,
        "max_queue_delay": cfg.queue.max_delay_ms / 1000.0,
        "max_queue_age": cfg.queue.max_age_seconds,
        "aqm": cfg.queue.aqm == "codel",
        "aqm_target": cfg.queue.aqm_target_ms / 1000.0,
        "aqm_interval": cfg.queue.aqm_interval_ms / 1000.0,
        "congestion": cfg.tcp.congestion,
        "padding": cfg.shaping.padding,
        "coalesce": cfg.shaping.coalesce_ms / 1000.0,
        # A TUN device takes a release at once (the kernel queues it); pacing is for a
        # userspace WireGuard's small UDP socket buffer, and would cap TUN mode's rate.
        "pace_releases": not cfg.tun.enabled,
    }


def hello_flags(resequence: bool, offload: bool = False) -> int:
    """The flags of this version's HELLO: FLAG_SEQ when it resequences (send me numbered
    DATA), FLAG_PAD always (it understands padding), FLAG_OFFLOAD when its TUN device
    gives and takes super-packets behind a virtio_net_hdr (ut.tun, tun.offload)."""
    return ((fastpath.FLAG_SEQ if resequence else 0) | fastpath.FLAG_PAD
            | (fastpath.FLAG_OFFLOAD if offload else 0))


class Session:
    """Queue + picker + lanes for one (client CN, session id)."""

    role = "?"

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        stats: TunnelStats,
        *,
        client_cn: str,
        session_id: int,
        n_lanes: int,
        max_packets: int,
        max_bytes: int,
        lane_pick: str = "rr",
        io_chunk: int = 16384,
        resequence: bool = False,
        resequence_max_wait: float = 0.2,
        skip_slow_lanes: bool = False,
        max_queue_delay: float = 0.0,
        max_queue_age: float = 0.0,
        aqm: bool = False,
        aqm_target: float = 0.005,
        aqm_interval: float = 0.1,
        congestion: str = "system",
        padding: bool = False,
        coalesce: float = 0.0,
        budget: Any = None,
        pace_releases: bool = True,
    ) -> None:
        self.loop = loop
        self.stats = stats
        self.client_cn = client_cn
        self.session_id = session_id
        self.counters: Counters = stats.counters(client_cn)
        # budget: the server's process-wide fastpath.QueueBudget, or None (ut.budget).
        self.queue = fastpath.RingQueue(max_packets, max_bytes, budget)
        self._release_burst = RELEASE_BURST_PACKETS if pace_releases else 1 << 30
        self._budget = budget
        self._budget_log = Debounced(DROP_LOG_WINDOW_SECONDS)
        self.n_lanes = n_lanes
        self.picker = fastpath.LanePicker(n_lanes, lane_pick)
        self._hash = lane_pick == "hash"
        self.lanes: list[Lane | None] = [None] * n_lanes
        self._flush_pending = False
        self._drop_log = Debounced(DROP_LOG_WINDOW_SECONDS)
        self._oversize_log = Debounced(DROP_LOG_WINDOW_SECONDS)
        self._socket_drop_log = Debounced(DROP_LOG_WINDOW_SECONDS)
        self.closed = False
        self.active_at = time.perf_counter()  # last payload either way (time.perf_counter)
        self.io_chunk = io_chunk  # tcp.tcp_buf: the most bytes in one lane write
        # Receiving: ask the peer for numbered DATA (FLAG_SEQ on our HELLO) and put it
        # back in order. The resequencer also serves a peer that numbers unasked.
        self.resequence = resequence
        self.reseq = fastpath.Resequencer(
            max_packets, max_bytes, resequence_max_wait, REORDER_MIN_WAIT_SECONDS,
            REORDER_PASS_BYTES)
        self._reorder_timer: asyncio.TimerHandle | None = None
        self._reorder_timer_at = float("inf")
        self._reorder_seen = (0, 0)  # (skipped, late) already added to the counters
        self._paced: list = []  # released datagrams still to send, in order (slices)
        self._paced_stamp = 0.0
        self._pacer: asyncio.TimerHandle | None = None
        # TUN offloads (tun.offload): we offer them (our HELLO) when our device has them,
        # and use them once the peer's HELLO offered them too (docs/protocol.md).
        self.offer_offload = False
        self.offload = False
        # Sending: number our DATA frames once the peer asked for it (its HELLO).
        self.tx_numbered = False
        self.tx_seq = 0
        # Pad each lane write (shaping.padding) on lanes whose peer understands PAD frames.
        self.padding = padding
        # shaping.coalesce_ms: small datagrams wait up to this long for company, so that
        # they share one write (one TLS record) instead of one record each.
        self.coalesce = coalesce
        self._coalescing: asyncio.TimerHandle | None = None
        self.skip_slow_lanes = skip_slow_lanes
        self._lanes_polled_at = 0.0
        self._lanes_skipped: set[int] = set()  # lane ids left out while in RTO recovery
        # queue.aqm (ut/aqm.py): CoDel decides, as the queue's head leaves, whether to
        # drop it, so that a saturated path's inner TCP slows down instead of queueing.
        self.aqm = CoDel(aqm_target, aqm_interval) if aqm else None
        # The AQM judges waits from here on: what waited for lanes to open (a first
        # dial, a redial) waited for the tunnel to exist, not behind a full path.
        self._aqm_since = 0.0
        self._aqm_log = Debounced(DROP_LOG_WINDOW_SECONDS)
        # With skip_slow_lanes, a lane takes no more than its cap (_lane_caps): the rest
        # waits in the session queue, where its age is known and the AQM (or
        # max_queue_delay) applies (a lane's kernel and TLS buffers would hide it).
        self.cap_lanes = bool(skip_slow_lanes and (max_queue_delay or aqm))
        self.max_queue_delay = max_queue_delay
        # The age past which a queued datagram is dropped as stale: the stricter of the
        # AQM bound (max_queue_delay) and the staleness bound (max_queue_age); 0 = never.
        self.stale_after = min((t for t in (max_queue_delay, max_queue_age) if t > 0), default=0.0)
        self._stale_log = Debounced(DROP_LOG_WINDOW_SECONDS)
        self._lane_caps = [LANE_MAX_UNSENT] * n_lanes  # bytes each lane may hold unsent
        # The queue on the path beyond the lanes (a saturated router's), as the lanes' TCP
        # sees it: round trip above its minimum, and the bytes that is at their rate. The
        # AQM adds it to the session queue's own wait (see _poll_lanes).
        self._path_delay = 0.0
        self._path_bytes = 0
        # tcp.congestion: auto switches the lanes to a loss-based control while the
        # path shows a standing queue (ut/lanecc.py); the host's is remembered to go back.
        self.congestion = CongestionChooser() if congestion == "auto" else None
        self._host_cc: str | None = None
        self._lane_segs: dict[int, tuple[int, int]] = {}  # lane id: (retransmitted, sent)
        self._best_room = 0  # what the lane _least_backlog_lane named may still take
        self._retry: asyncio.TimerHandle | None = None

    # -- HELLO flags (docs/protocol.md, "Sequence numbers" and "Padding") -------
    def hello_flags(self) -> int:
        """Flags for our HELLO: ask for numbered DATA if we resequence; we understand PAD;
        we offer TUN offloads if our device has them."""
        return hello_flags(self.resequence, self.offer_offload)

    def peer_hello(self, flags: int) -> None:
        """Apply the flags of the peer's HELLO: number what we send if it asked; use TUN
        offloads if both ends offer them. (Whether a lane pads is the lane's own
        business: ``LaneMachine.pad_writes``.)"""
        self.tx_numbered = bool(flags & fastpath.FLAG_SEQ)
        self.offload = self.offer_offload and bool(flags & fastpath.FLAG_OFFLOAD)

    # -- log helper ---------------------------------------------------------
    def log(self, name: str, level: int = logging.INFO, **fields: Any) -> None:
        event(
            name, level, role=self.role, client_cn=self.client_cn,
            session_id=f"{self.session_id:016x}", **fields,
        )

    @property
    def lanes_ready(self) -> int:
        return sum(1 for lane in self.lanes if lane is not None and lane.ready)

    # -- UDP -> lanes -------------------------------------------------------
    def push_datagrams(self, datagrams: list) -> None:
        """Queue datagrams read from UDP and schedule a flush."""
        c = self.counters
        queue = self.queue
        nbytes = dropped = oversize = 0
        # Each datagram carries its arrival time through the queue, so the input
        # direction's forwarding latency includes any wait for a writable lane.
        now = time.perf_counter()
        self.active_at = now
        if self.stale_after and len(queue):
            # Lanes down for a while: what waits is dropped as it goes stale, not kept
            # until they come back (one comparison when the head is fresh).
            stale = queue.drop_stale(now - self.stale_after)
            if stale:
                self._count_stale(stale)
        for d in datagrams:
            n = len(d)
            nbytes += n
            if n > MAX_PAYLOAD:
                oversize += 1
                continue
            dropped += queue.push(d, now)
        c.udp_in_packets += len(datagrams)
        c.udp_in_bytes += nbytes
        if oversize:
            self._count_oversize(oversize)
        if dropped:
            self._count_oldest(dropped)
        if self._budget is not None and self._budget.over:
            self.over_budget()
        if len(queue):
            if self.coalesce and queue.nbytes < COALESCE_BYTES:
                if self._coalescing is None:
                    self._coalescing = self.loop.call_later(self.coalesce, self._coalesced)
            elif self.picker.ready_count:
                # Hand the batch to the lanes now rather than on the next loop pass:
                # what else is ready in this pass (a lane's read and its UDP writes,
                # other sessions) would otherwise sit in this batch's forwarding time.
                self._flush()
            else:
                self.schedule_flush()  # when a lane is ready or writable again
        self.wants_lanes()

    def _count_oversize(self, n: int) -> None:
        self.counters.drop("oversize", n)
        due = self._oversize_log.hit(n)
        if due:
            self.log("pdu_too_large", logging.WARNING, dropped=due, limit=MAX_PAYLOAD)

    def count_socket_drops(self, n: int) -> None:
        """The UdpPort's ``on_kernel_drops``: datagrams lost at our full UDP socket."""
        self.counters.drop("udp_socket_full", n)
        due = self._socket_drop_log.hit(n)
        if due:
            self.log("udp_socket_drop", logging.WARNING, dropped=due)

    def _count_stale(self, n: int) -> None:
        # Like a router's AQM (queue.max_delay_ms): the inner TCP sees loss and slows down
        # instead of filling a queue. Or an outage's backlog (queue.max_age_seconds):
        # sent late it would only arrive as one burst of useless datagrams.
        self.counters.drop("stale", n)
        due = self._stale_log.hit(n)
        if due:
            self.log("queue_drop_stale", logging.INFO, dropped=due,
                     max_age_ms=round(self.stale_after * 1000, 1),
                     queue_len=len(self.queue))

    def _count_aqm(self, n: int) -> None:
        # A router's drops on a saturated link, moved into the tunnel: normal operation,
        # visible in ut_udp_drop_total{reason="aqm"}; the log line is for debugging.
        self.counters.drop("aqm", n)
        due = self._aqm_log.hit(n)
        if due:
            self.log("queue_drop_aqm", logging.DEBUG, dropped=due, queue_len=len(self.queue),
                     queue_bytes=self.queue.nbytes)

    def _count_oldest(self, n: int) -> None:
        self.counters.drop("oldest", n)
        due = self._drop_log.hit(n)
        if due:
            self.log(
                "queue_drop_oldest", logging.WARNING, dropped=due,
                queue_len=len(self.queue), queue_bytes=self.queue.nbytes,
            )

    def count_budget(self, n: int) -> None:
        """``n`` of our queued datagrams were shed to keep every session's queues together
        within the process-wide budget (``ut.budget``)."""
        self.counters.drop("budget", n)
        due = self._budget_log.hit(n)
        if due:
            self.log("queue_drop_budget", logging.WARNING, dropped=due,
                     queue_len=len(self.queue), queue_bytes=self.queue.nbytes,
                     budget_bytes=self._budget.max_bytes if self._budget is not None else None)

    def over_budget(self) -> None:
        """Hook: the queues sharing our budget hold more than it (the server sheds)."""

    def wants_lanes(self) -> None:
        """Hook: the client dials here; a server cannot (it waits for lanes)."""

    def schedule_flush(self) -> None:
        if not self._flush_pending and len(self.queue):
            self._flush_pending = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        if self._coalescing is not None:
            self._coalescing.cancel()
            self._coalescing = None
        queue, picker, lanes, c = self.queue, self.picker, self.lanes, self.counters
        aqm = self.aqm
        now = time.perf_counter()
        if (self.skip_slow_lanes or self.resequence) and (
                now - self._lanes_polled_at >= LANE_POLL_SECONDS):
            self._poll_lanes(now)
        chunk = self.io_chunk
        numbered = self.tx_numbered and not self._hash
        batches = []  # (arrival of the batch's oldest datagram, datagrams in the batch)
        # One clock read per flush: a flush lasts well under a millisecond, far below
        # any age bound (max_delay_ms is 20 ms where it is used).
        stale_before = now - self.stale_after if self.stale_after else 0.0
        while len(queue) and picker.ready_count:
            if stale_before:
                # The head is the oldest: one comparison per batch while it is fresh.
                stale = queue.drop_stale(stale_before)
                if stale:
                    self._count_stale(stale)
                    if not len(queue):
                        break
            if aqm is not None:
                dropped = 0
                while aqm.drop_head(now, now - max(queue.head_stamp, self._aqm_since)
                                    + self._path_delay, queue.nbytes + self._path_bytes):
                    queue.pop()
                    dropped += 1
                    if not len(queue):
                        break
                if dropped:
                    self._count_aqm(dropped)
                    if not len(queue):
                        break
            batch_stamp = queue.head_stamp
            sent = 0
            if self._hash:
                per_lane = self._split_by_flow(queue.pop_batch(FLUSH_BATCH_PACKETS, chunk))
            else:
                # Round-robin by burst: the next lane takes up to a burst of whole
                # datagrams (at most tcp_buf bytes) in one write. Per-datagram rotation
                # would cost one TLS record and one send per datagram per lane.
                lane_id = self._least_backlog_lane() if self.skip_slow_lanes else picker.pick(0)
                if self.cap_lanes:
                    if self._best_room <= 0:
                        # Every lane has enough waiting: keep the rest here, where its
                        # age is known, and look again shortly.
                        if self._retry is None:
                            self._retry = self.loop.call_later(
                                LANE_RETRY_SECONDS, self._retry_flush)
                        break
                    per_lane = {lane_id: queue.pop_batch(
                        LANE_BURST_PACKETS, min(chunk, self._best_room))}
                else:
                    per_lane = {lane_id: queue.pop_batch(LANE_BURST_PACKETS, chunk)}
            for lane_id, datagrams in per_lane.items():
                n = len(datagrams)
                lane = lanes[lane_id]
                pad = -1
                if lane.pad_writes:  # type: ignore[union-attr]
                    size = sum(map(len, datagrams)) + n * (
                        HEADER_LEN + SEQ_LEN if numbered else HEADER_LEN)
                    pad = pad_length(size)
                    if lane.mss:  # type: ignore[union-attr]
                        # Padding must not cost a segment of its own: on a lane with
                        # nothing waiting this write goes out at once (ut.shaping).
                        fitted = fit_padding(size, pad, lane.mss)  # type: ignore[union-attr]
                        if fitted != pad and not lane.unsent_bytes():  # type: ignore[union-attr]
                            pad = fitted
                if numbered:
                    data, self.tx_seq = fastpath.encode_data_seq(datagrams, self.tx_seq, pad)
                else:
                    data = fastpath.encode_data(datagrams, pad)
                padding = pad + PAD_FRAME_OVERHEAD if pad >= 0 else 0
                if not lane.write(data, n, padding):  # type: ignore[union-attr]
                    c.drop("lane_closed", n)  # a closing TLS transport would discard them
                    continue
                c.lane_tx_frames[lane_id] += n
                # DATA frames only, as on the receiving side: padding is not counted.
                c.lane_tx_bytes[lane_id] += len(data) - padding
                sent += n
            batches.append((batch_stamp, sent))
        if batches:
            # A batch shares one measurement: its oldest datagram's, an upper bound
            # for the rest.
            now = time.perf_counter()
            hist = c.forward_latency[self.stats.dir_in]
            for stamp, n in batches:
                hist.observe(now - stamp, n)

    def _coalesced(self) -> None:
        self._coalescing = None
        self._flush()

    def _retry_flush(self) -> None:
        self._retry = None
        self._flush()

    def _least_backlog_lane(self) -> int:
        """The ready lane with the least waiting to be sent (ties: round-robin); with lane
        caps, the least as a share of its cap (the cap is a time at the lane's rate, so
        this is the lane whose backlog drains first). Sets ``_best_room``: the bytes that
        lane may still take under its cap.

        Lanes drain at different speeds (one repairs a loss, one has a smaller window);
        plain round-robin gives each the same share, so the slow one builds a backlog and
        its datagrams arrive late, behind the others': reordering, or with resequencing,
        waits for every lane. Joining the shortest queue keeps the lanes' delays even.
        """
        picker, lanes, caps = self.picker, self.lanes, self._lane_caps
        first = picker.pick(0)  # advances round-robin: ties go to the next lane
        best_backlog = lanes[first].unsent_bytes()  # type: ignore[union-attr]
        best, best_load = first, best_backlog / caps[first]
        if best_backlog:
            n = self.n_lanes
            for i in range(1, n):
                lane_id = (first + i) % n
                if not picker.is_ready(lane_id):  # open, HELLO done, writable, not skipped
                    continue
                backlog = lanes[lane_id].unsent_bytes()  # type: ignore[union-attr]
                load = backlog / caps[lane_id]
                if load < best_load:
                    best, best_load, best_backlog = lane_id, load, backlog
                    if not backlog:
                        break
        self._best_room = caps[best] - best_backlog
        return best

    def _poll_lanes(self, now: float) -> None:
        """Read the lanes' TCP state: skip lanes in RTO recovery, and tell the resequencer
        how long a lane may take to repair a loss: the slowest lane's retransmission
        timeout plus its round trip (a gap from a lane that timed out fills no sooner)."""
        self._lanes_polled_at = now
        rto = rtt = 0.0
        stalled = []
        path_delay = float("inf")
        path_rate = retrans = segs = 0
        lane_segs = self._lane_segs
        for lane in self.lanes:
            if lane is None or not lane.ready:
                continue
            st = tcp_state(lane.sock)
            if st is None:
                continue
            if getattr(lane.transport, "one_record_per_write", True):
                lane.mss = st.snd_mss
            if st.delivery_rate:
                # The rate a lane showed lately, not its last sample: in loss repair
                # the sample drops for a round trip, and a cap that followed it would
                # push the whole backlog into the session queue until it overflows.
                # (A stalled lane takes nothing anyway: its backlog does not drain.)
                lane_id = lane.lane_id
                cap = max(LANE_MIN_UNSENT, int(st.delivery_rate * LANE_UNSENT_SECONDS))
                self._lane_caps[lane_id] = max(cap, int(self._lane_caps[lane_id] * LANE_CAP_DECAY))
                if (st.notsent_bytes and st.min_rtt_seconds
                        and st.ack_age_seconds < st.rtt_seconds + LANE_POLL_SECONDS):
                    # The least any backlogged lane waits: the queue they all share.
                    # Only a lane with data waiting to be sent counts: its round trip
                    # grows with what we send. (A lane that only carries the inner TCP's
                    # ACKs sees the queue of the other direction in its round trip,
                    # which drops here would not shrink; one with no ACK for a round
                    # trip has an old rtt: idle, or stalled.)
                    path_delay = min(path_delay, max(0.0, st.rtt_seconds - st.min_rtt_seconds))
                    path_rate += st.delivery_rate
            if self.congestion is not None:
                r0, s0 = lane_segs.get(lane.lane_id, (st.retrans_segs, st.segs_out))
                retrans += max(0, st.retrans_segs - r0)
                segs += max(0, st.segs_out - s0)
                lane_segs[lane.lane_id] = (st.retrans_segs, st.segs_out)
            rto = max(rto, st.rto_seconds)
            rtt = max(rtt, st.rtt_seconds + 4 * st.rttvar_seconds)
            if st.in_loss:
                stalled.append(lane.lane_id)
        if path_rate:
            self._path_delay = path_delay
            self._path_bytes = int(path_delay * path_rate)
            if self.congestion is not None and self.congestion.update(
                    now, path_delay, retrans, segs):
                self._switch_congestion()
        else:
            self._path_delay, self._path_bytes = 0.0, 0
        repair = rto + rtt
        if repair:
            self.reseq.set_rtt_hint(repair)
        if not self.skip_slow_lanes:
            return
        skipped = self._lanes_skipped
        for lane_id in list(skipped):
            if lane_id not in stalled:
                skipped.discard(lane_id)
                lane = self.lanes[lane_id]
                if lane is not None:
                    self.picker.set_ready(lane_id, lane.ready and lane.writable)
        usable = [lane for lane in self.lanes if lane is not None and lane.ready]
        if len(stalled) < len(usable):  # never leave the session with no lane
            for lane_id in stalled:
                skipped.add(lane_id)
                self.picker.set_ready(lane_id, False)

    def _set_lane_congestion(self, lane: Lane) -> str | None:
        """Give ``lane`` the control the chooser's state calls for; return its name."""
        if self.congestion is None or lane.sock is None:
            return None
        if self._host_cc is None:
            self._host_cc = congestion_control(lane.sock)
        names = LOSS_BASED if self.congestion.state == "queued" else (self._host_cc,)
        for name in names:
            if name and set_congestion_control(lane.sock, name):
                return name
        return None

    def _switch_congestion(self) -> None:
        used = {self._set_lane_congestion(lane) for lane in self.lanes
                if lane is not None and lane.ready}
        cc = self.congestion
        assert cc is not None
        self.log("lane_congestion", state=cc.state,
                 congestion=",".join(sorted(n for n in used if n)) or None,
                 path_delay_ms=round(cc.mean_delay * 1000, 1),
                 retransmitted_pct=round(cc.loss * 100, 1))

    def _split_by_flow(self, batch: list) -> dict[int, list]:
        """``lane_pick: hash``: each datagram to the lane its flow key names."""
        picker, flow_key = self.picker, fastpath.flow_key
        per_lane: dict[int, list] = {}
        skip = fastpath.VNET_HDR_LEN if self.offload else 0
        for d in batch:
            # With TUN offloads a packet may sit behind its virtio_net_hdr (a first byte
            # that is no IP version): the flow is the packet's.
            if skip and d and d[0] >> 4 not in (4, 6):
                lane_id = picker.pick(flow_key(memoryview(d)[skip:]))
            else:
                lane_id = picker.pick(flow_key(d))
            bucket = per_lane.get(lane_id)
            if bucket is None:
                per_lane[lane_id] = [d]
            else:
                bucket.append(d)
        return per_lane

    # -- lanes -> UDP -------------------------------------------------------
    def lane_data(self, lane: Lane, frames: list) -> None:
        """DATA frames read from ``lane`` (the lane's machine let only DATA through)."""
        t0 = time.perf_counter()
        self.active_at = t0
        try:
            _others, n, nbytes = self.reseq.feed(frames, t0)
        except FrameError as err:  # a numbered frame too short for its number
            self._deliver()
            lane.violate(err.reason, str(err))
            return
        if n:
            # Per-lane figures count DATA frames and their PDU bytes (header
            # included), the same way as the sending side counts them.
            c = self.counters
            lane_id = lane.lane_id
            c.lane_rx_frames[lane_id] += n
            c.lane_rx_bytes[lane_id] += nbytes + HEADER_LEN * n
        self._deliver()

    def _deliver(self) -> None:
        """Send what the resequencer released; arm its timer for what it holds."""
        reseq = self.reseq
        datagrams, nbytes, stamp = reseq.take()
        if datagrams:
            if self._paced or len(datagrams) > self._release_burst:
                if not self._paced:
                    self._paced_stamp = stamp
                self._paced.extend(datagrams)
                if self._pacer is None:
                    self._send_paced()
            else:
                self._send_released(datagrams, nbytes, stamp)
        seen = (reseq.skipped, reseq.late)
        if seen != self._reorder_seen:
            c = self.counters
            c.reorder_skipped += seen[0] - self._reorder_seen[0]
            c.reorder_late += seen[1] - self._reorder_seen[1]
            self._reorder_seen = seen
        if reseq.held:
            deadline = reseq.deadline
            if deadline < self._reorder_timer_at:
                if self._reorder_timer is not None:
                    self._reorder_timer.cancel()
                self._reorder_timer_at = deadline
                self._reorder_timer = self.loop.call_later(
                    max(0.0, deadline - time.perf_counter()), self._reorder_expire)

    def _send_released(self, datagrams: list, nbytes: int, stamp: float) -> None:
        self.send_udp(datagrams, nbytes)
        # From the arrival of the oldest datagram sent (the wait for a gap included).
        self.counters.forward_latency[self.stats.dir_out].observe(
            time.perf_counter() - stamp, len(datagrams))

    def _send_paced(self) -> None:
        """Send the next slice of a large release; come back for the rest."""
        self._pacer = None
        paced = self._paced
        chunk = paced[:RELEASE_BURST_PACKETS]
        del paced[:RELEASE_BURST_PACKETS]
        self._send_released(chunk, sum(map(len, chunk)), self._paced_stamp)
        if paced:
            self._pacer = self.loop.call_later(RELEASE_INTERVAL_SECONDS, self._send_paced)

    def _reorder_expire(self) -> None:
        self._reorder_timer = None
        self._reorder_timer_at = float("inf")
        self.reseq.expire(time.perf_counter())
        self._deliver()

    def flush_reorder(self) -> None:
        """Give up on every gap and send what is held (the session is closing)."""
        if self._reorder_timer is not None:
            self._reorder_timer.cancel()
            self._reorder_timer = None
            self._reorder_timer_at = float("inf")
        self.reseq.flush(time.perf_counter())
        self._deliver()
        if self._pacer is not None:
            self._pacer.cancel()
        while self._paced:  # closing: no more pacing
            self._send_paced()
        if self._pacer is not None:
            self._pacer.cancel()
            self._pacer = None

    def udp_target(self) -> tuple[Any, Any] | None:
        """``(UdpPort, address or None)`` to send to, or None when nobody to send to."""
        raise NotImplementedError

    def send_udp(self, datagrams: list, nbytes: int) -> None:
        """Send datagrams that came off a lane out of the UDP port, counting them."""
        c = self.counters
        target = self.udp_target()
        if target is None:
            c.drop("no_peer", len(datagrams))
            return
        port, addr = target
        if port.closed:
            # Frames still arriving on a lane after the session closed its UDP
            # port: the vocabulary's "no_session" (not a UDP write error).
            c.drop("no_session", len(datagrams))
            return
        offered = len(datagrams)
        sent, failed = port.send_many(datagrams, addr)
        c.udp_out_packets += sent
        if failed or sent != offered:
            # Some did not go out: a write error, or a port that took packets out of
            # the list itself (TUN server: spoofed ones, counted there). The list's
            # first ``sent`` are what went out.
            c.udp_out_bytes += sum(map(len, datagrams[:sent]))
            if failed:
                c.drop("udp_write_error", failed)
        else:
            c.udp_out_bytes += nbytes

    # -- lane state ---------------------------------------------------------

    def lane_writable(self, lane: Lane, writable: bool) -> None:
        if self.lanes[lane.lane_id] is lane:
            self.picker.set_ready(
                lane.lane_id,
                writable and lane.ready and lane.lane_id not in self._lanes_skipped)
            if writable:
                self.schedule_flush()

    def lane_up(self, lane: Lane) -> None:
        """``lane`` has finished HELLO: register it and start using it."""
        old = self.lanes[lane.lane_id]
        if old is not None and old is not lane:
            self.retire(old, goodbye_reason=GOODBYE_REPLACED, reason="replaced")
        self.lanes[lane.lane_id] = lane
        if self.aqm is not None:  # the lanes' capacity changed: start judging afresh
            self.aqm.reset()
            self._aqm_since = time.perf_counter()
        if self.congestion is not None and self.congestion.state != "clear":
            self._set_lane_congestion(lane)  # a lane that joins mid-transfer
        elif self._host_cc is None and self.congestion is not None:
            self._host_cc = congestion_control(lane.sock)
        self.counters.lanes_active += 1
        self.log("lane_open", lane_id=lane.lane_id, peer=format_addr(lane.peer),
                 **self.lane_open_fields(lane))
        self.picker.set_ready(lane.lane_id, lane.ready and lane.writable)
        self.schedule_flush()

    def lane_open_fields(self, lane: Lane) -> dict[str, Any]:
        """Hook: more fields for the ``lane_open`` log line (the client: TLS resumption)."""
        return {}

    def _unregister(self, lane: Lane, reason: str, exc: BaseException | None = None) -> bool:
        """Stop using ``lane`` at once (before its connection is gone)."""
        if not (0 <= lane.lane_id < self.n_lanes and self.lanes[lane.lane_id] is lane):
            return False
        self.lanes[lane.lane_id] = None
        self.picker.set_ready(lane.lane_id, False)
        self._lanes_skipped.discard(lane.lane_id)
        self.counters.lanes_active -= 1
        self.log(
            "lane_close", lane_id=lane.lane_id, reason=reason,
            err=repr(exc) if exc else None,
            tx_frames=lane.tx_frames, rx_frames=lane.rx_frames,
            tx_bytes=lane.tx_bytes, rx_bytes=lane.rx_bytes, tx_pad_bytes=lane.tx_pad_bytes,
        )
        # What the lane carried and did not deliver will never come: stop waiting for it
        # (datagrams that other lanes still bring come late, and are still delivered).
        if self.reseq.held:
            self.reseq.flush(time.perf_counter())
            self._deliver()
        self.after_lane_lost(lane, exc)
        return True

    def retire(self, lane: Lane, goodbye_reason: int | None, reason: str) -> None:
        """Close ``lane`` on purpose (it reports ``lane_closed`` before its GOODBYE goes
        out, so nothing more is written to it)."""
        lane.close(goodbye_reason=goodbye_reason, reason=reason)

    def lane_closed(self, lane: Lane) -> None:
        """``lane`` carries nothing more (its ``close_reason`` says why): stop using it."""
        reason = lane.close_reason
        if lane.peer_err is not None:
            self.log("peer_error", logging.WARNING, lane_id=lane.lane_id,
                     code=lane.peer_err.code, err=lane.peer_err.message)
        self._unregister(lane, reason, lane.close_exc)

    def after_lane_lost(self, lane: Lane, exc: BaseException | None) -> None:
        """Hook for the roles (client re-dials, server starts lingering)."""

    def lane_violation(self, lane: Lane, violation: Any) -> None:
        """``lane`` broke a protocol rule: count it and say so (the lane then closes)."""
        self.stats.protocol_error(violation.reason)
        self.log("protocol_error", logging.WARNING, lane_id=lane.lane_id,
                 reason=violation.reason, err=violation.text)

    def close_lanes(self, goodbye_reason: int, reason: str) -> None:
        for lane in list(self.lanes):
            if lane is not None:
                self.retire(lane, goodbye_reason, reason)
