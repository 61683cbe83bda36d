"""One lane: a TCP+TLS connection carrying PDU frames (the asyncio protocol).

The lane only moves bytes. Incoming bytes land straight in the deframer's own
buffer (``BufferedProtocol``), whole frames go to the lane's *owner* in one
list per read, and the owner hands the lane one pre-encoded buffer per batch
to write. What the frames mean is the owner's business (``ut.session``).
"""

from __future__ import annotations

import asyncio
import fcntl
import random
import socket
import struct
import sys
from typing import Any, NamedTuple, Protocol

from . import fastpath
from .control import Goodbye, control_frame
from .shaping import pad_length

# Above this many bytes waiting in the TLS transport the lane reports itself
# busy and the picker skips it, so a backlog builds in the session queue
# (where drop-oldest applies), not in per-lane buffers.
# 64 KiB: a burst (LANE_BURST_BYTES in ut.session) and change. 256 KiB carried no
# more on the benchmark bed (A/B in bench/README.md) and held 4x as much per lane
# outside the drop-oldest queue.
WRITE_HIGH_WATER = 64 * 1024
WRITE_LOW_WATER = 16 * 1024

# Dead-path detection (hardening, issue 5). Without these a lane whose path
# died keeps "working" for as long as TCP retransmits (about 15 minutes with
# Linux's default tcp_retries2) and comes back only when an exponentially
# backed-off retransmission happens to get through. TCP_USER_TIMEOUT closes a
# lane whose written data stays unacknowledged this long (Linux also applies it
# to zero-window probes, so a peer that stops reading is caught too); kernel
# keepalive probes notice a silent dead path on a lane with nothing to send
# (e.g. the server side of a lane while the client is quiet). Keepalives are
# empty TCP segments, not protocol heartbeats: the PDU stream is unchanged.
# Module constants for now; proposed config keys: tcp.user_timeout_seconds
# and tcp.keepalive_seconds (see docs/security.md).
LANE_USER_TIMEOUT_SECONDS = 30.0
LANE_KEEPALIVE_IDLE_SECONDS = 30
LANE_KEEPALIVE_INTERVAL_SECONDS = 10
LANE_KEEPALIVE_COUNT = 3


# Kernel backlog bound for ``tcp.skip_slow_lanes``: a lane socket reports itself
# writable only while less than this is written but not yet sent. A lane whose TCP
# slowed down (loss recovery, a smaller window) then fills its user-space buffer to
# WRITE_HIGH_WATER within a burst or two, pauses, and the picker gives its datagrams to
# the other lanes instead of queueing them behind the slow one (where, with
# resequencing, they would hold back every lane's datagrams).
LANE_NOTSENT_LOWAT = 32 * 1024

_TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25 if sys.platform.startswith("linux") else None)
# struct tcp_info (linux/tcp.h): ca_state at byte 1; rto at 8; rtt, rttvar (microseconds)
# at 68, 72. (Unsent bytes come from SIOCOUTQNSD, a cheaper call made per burst.)
_TCP_INFO = getattr(socket, "TCP_INFO", None) if sys.platform.startswith("linux") else None
_TCP_INFO_LEN = 104
_TCP_CA_LOSS = 4  # retransmission timeout: the lane sends nothing new until it recovers
# ioctl SIOCOUTQNSD (linux/sockios.h): bytes in a TCP socket's send queue not yet sent.
_SIOCOUTQNSD = 0x894B if sys.platform.startswith("linux") else None


_INT = struct.Struct("i")
_INT_ZERO = bytes(4)


class TcpState(NamedTuple):
    """What the kernel says about a lane's TCP connection (Linux ``TCP_INFO``)."""

    in_loss: bool  # in RTO recovery: stalled for at least a retransmission timeout
    rto_seconds: float  # the retransmission timeout now
    rtt_seconds: float  # smoothed round-trip time
    rttvar_seconds: float  # its mean deviation


def set_notsent_lowat(sock: Any, nbytes: int) -> None:
    """``TCP_NOTSENT_LOWAT`` on a lane socket, where the platform has it (Linux, macOS)."""
    if sock is None or _TCP_NOTSENT_LOWAT is None or not nbytes:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_NOTSENT_LOWAT, nbytes)
    except OSError:
        pass


def tcp_state(sock: Any) -> TcpState | None:
    """The kernel's view of a lane's TCP connection, or None where it cannot be read."""
    if sock is None or _TCP_INFO is None:
        return None
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_LEN)
    except OSError:
        return None
    if len(raw) < 76:
        return None
    rto = struct.unpack_from("=I", raw, 8)[0]
    rtt, rttvar = struct.unpack_from("=II", raw, 68)
    return TcpState(raw[1] == _TCP_CA_LOSS, rto * 1e-6, rtt * 1e-6, rttvar * 1e-6)


class LaneOwner(Protocol):
    def lane_frames(self, lane: Lane, frames: list) -> None: ...
    def lane_writable(self, lane: Lane, writable: bool) -> None: ...
    def lane_lost(self, lane: Lane, exc: BaseException | None) -> None: ...
    def lane_broken(self, lane: Lane, err: Exception) -> None: ...


def set_tcp_options(sock: socket.socket | None, nodelay: bool) -> None:
    """Apply ``tcp.tcp_nodelay`` (before connecting, or on the listening socket)."""
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1 if nodelay else 0)
    except OSError:
        pass  # not a TCP socket (tests may use socketpairs); nothing to tune


def set_sock_buf(sock: socket.socket | None, buf_bytes: int) -> None:
    """Apply ``tcp.sock_buf`` (0 keeps kernel autotuning) to a *connected* lane socket.

    Called after the TCP handshake on purpose: Linux picks the window scale it offers in
    the SYN from the receive buffer it may grow to, so a small ``SO_RCVBUF`` set before
    connecting gives a SYN with window scale 0 (a window capped at 64 KiB for the life of
    the lane, and a TCP fingerprint no ordinary client has). Set afterwards, the buffers
    still bound what the lane holds, and the handshake looks like everybody else's.
    """
    if sock is None or not buf_bytes:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buf_bytes)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buf_bytes)
    except OSError:
        pass


def tune_connected_lane(sock: Any, tcp: Any) -> None:
    """What both roles apply to a lane socket once the TCP handshake is done:
    ``tcp.sock_buf`` (after the SYN, see ``set_sock_buf``) and, with
    ``tcp.skip_slow_lanes``, the unsent-backlog bound ``TCP_NOTSENT_LOWAT``."""
    set_sock_buf(sock, tcp.sock_buf)
    if tcp.skip_slow_lanes:
        set_notsent_lowat(sock, LANE_NOTSENT_LOWAT)


def set_lane_liveness(sock: socket.socket | None) -> None:
    """Keepalive and ``TCP_USER_TIMEOUT`` on a lane socket (see the constants above).

    Read at call time, so a test or an embedding program may lower the module
    constants before lanes open. Options the platform lacks are skipped.
    """
    if sock is None:
        return
    opts = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    # Each lane gets its own idle time, up to a quarter off: lanes fall idle together
    # when traffic stops, and equal timers would send their probes in lock-step.
    keepidle = max(1, round(LANE_KEEPALIVE_IDLE_SECONDS * random.uniform(0.75, 1.25)))
    for name, value in (
        ("TCP_KEEPIDLE", keepidle),
        ("TCP_KEEPINTVL", LANE_KEEPALIVE_INTERVAL_SECONDS),
        ("TCP_KEEPCNT", LANE_KEEPALIVE_COUNT),
        ("TCP_USER_TIMEOUT", int(LANE_USER_TIMEOUT_SECONDS * 1000)),
    ):
        if hasattr(socket, name) and value:
            opts.append((socket.IPPROTO_TCP, getattr(socket, name), int(value)))
    for level, opt, value in opts:
        try:
            sock.setsockopt(level, opt, value)
        except OSError:
            pass  # not TCP, or not supported here


class Lane(asyncio.BufferedProtocol):
    """A TCP+TLS connection carrying framed datagrams for one session."""

    def __init__(
        self, owner: LaneOwner, lane_id: int = -1, peer: Any = None, read_chunk: int = 16384
    ) -> None:
        self.owner = owner
        self.read_chunk = read_chunk  # tcp.tcp_buf: the largest read handed to the deframer
        self.sock: Any = None  # the TCP socket under TLS (options, TCP_INFO)
        self.lane_id = lane_id
        self.peer = peer
        self.client_cn = ""  # server side: the verified certificate CN
        self.transport: asyncio.Transport | None = None
        self.deframer = fastpath.Deframer()
        self.ready = False  # HELLO exchanged: may carry DATA
        self.pad_writes = False  # the peer understands PAD frames: end each write with one
        self.writable = True  # transport below its high-water mark
        self.closing = False
        self.tx_frames = 0
        self.tx_bytes = 0
        self.tx_pad_bytes = 0  # PAD frames written (shaping.padding), not in tx_bytes
        self.rx_frames = 0
        self.rx_bytes = 0
        self.rx_bytes_counted = 0  # part of rx_bytes already added to the session's counters
        self.close_reason = ""
        self.lost = asyncio.get_running_loop().create_future()

    # -- wiring ---------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)  # type: ignore[attr-defined]
        if self.peer is None:
            self.peer = transport.get_extra_info("peername")
        self.sock = transport.get_extra_info("socket")

    def get_buffer(self, sizehint: int) -> memoryview:
        chunk = self.read_chunk
        return self.deframer.get_buffer(chunk)[:chunk]

    def buffer_updated(self, nbytes: int) -> None:
        self.rx_bytes += nbytes
        try:
            frames = self.deframer.buffer_updated(nbytes)
        except fastpath.FrameError as err:
            self.owner.lane_broken(self, err)
            return
        if frames:
            self.rx_frames += len(frames)
            self.owner.lane_frames(self, frames)
        if self.deframer.error is not None and not self.closing:
            # (not if a frame before the bad header already broke the lane: one
            # protocol error per lane)
            self.owner.lane_broken(self, self.deframer.error)

    def eof_received(self) -> bool:
        try:
            self.deframer.eof()
        except fastpath.FrameError as err:
            self.owner.lane_broken(self, err)
            return False
        # The peer is gone: leave the picker now. Over TLS the transport is
        # already shutting down and would drop later writes without a word
        # (asyncio's and uvloop's SSL protocols discard app data once
        # shutdown starts), so nothing more may be handed to this lane.
        # ``lane_lost`` is idempotent; connection_lost calls it again.
        self.closing = True
        self.ready = False
        self.owner.lane_lost(self, None)
        return False  # close the transport

    def pause_writing(self) -> None:
        self.writable = False
        self.owner.lane_writable(self, False)

    def resume_writing(self) -> None:
        self.writable = True
        self.owner.lane_writable(self, True)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.ready = False
        if not self.lost.done():
            self.lost.set_result(exc)
        self.owner.lane_lost(self, exc)

    # -- writing --------------------------------------------------------
    def write(self, data: bytes, frames: int, pad_bytes: int = 0) -> bool:
        """Write ``frames`` already-encoded frames in one TLS write; the last
        ``pad_bytes`` of ``data`` are a PAD frame (counted apart, in ``tx_pad_bytes``).

        Returns False (and writes nothing) when the lane is closing or its
        transport is: the caller must count those frames as dropped
        (``lane_closed``), since a closing TLS transport discards writes silently.
        """
        transport = self.transport
        if transport is None or self.closing or transport.is_closing():
            return False
        self.tx_frames += frames
        self.tx_bytes += len(data) - pad_bytes
        self.tx_pad_bytes += pad_bytes
        transport.write(data)
        return True

    def send_control(self, msg: Any, flags: int = 0, pad: bool | None = None) -> None:
        """Write one control message. It ends with a PAD frame when ``pad`` is true, or,
        for ``pad=None``, when this lane pads its writes (``pad_writes``)."""
        if self.transport is not None and not self.transport.is_closing():
            frame = control_frame(msg, flags)
            # Lane totals count every frame both ways (DATA and CTRL), like rx_*;
            # padding is counted apart.
            self.tx_frames += 1
            self.tx_bytes += len(frame)
            if self.pad_writes if pad is None else pad:
                padding = fastpath.pad_frame(pad_length(len(frame)))
                self.tx_pad_bytes += len(padding)
                frame += padding
            self.transport.write(frame)

    def close(self, goodbye_reason: int | None = None, reason: str = "") -> None:
        """Close gracefully: optional GOODBYE, flush what is buffered, TLS close."""
        if self.closing:
            return
        self.closing = True
        self.ready = False
        self.close_reason = self.close_reason or reason
        if self.transport is None:
            return
        if goodbye_reason is not None:
            self.send_control(Goodbye(goodbye_reason))
        self.transport.close()

    def abort(self, reason: str = "") -> None:
        """Drop the connection now (protocol error, hostile peer)."""
        self.closing = True
        self.ready = False
        self.close_reason = self.close_reason or reason
        if self.transport is not None:
            self.transport.abort()

    @property
    def write_buffer_size(self) -> int:
        return self.transport.get_write_buffer_size() if self.transport else 0

    def unsent_bytes(self) -> int:
        """Bytes written to this lane and not yet sent: the TLS transport's buffer plus
        the kernel's unsent queue (Linux ``SIOCOUTQNSD``). What a new datagram waits
        behind before it even leaves."""
        n = self.transport.get_write_buffer_size() if self.transport else 0
        if _SIOCOUTQNSD is not None and self.sock is not None:
            try:
                n += _INT.unpack(fcntl.ioctl(self.sock.fileno(), _SIOCOUTQNSD, _INT_ZERO))[0]
            except (OSError, ValueError):
                pass
        return n
