"""One lane: a TCP+TLS connection carrying PDU frames (the asyncio protocol).

The lane only moves bytes. Incoming bytes land straight in the deframer's own
buffer (``BufferedProtocol``), whole frames go to the lane's *owner* in one
list per read, and the owner hands the lane one pre-encoded buffer per batch
to write. What the frames mean is the owner's business (``ut.session``).
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any, Protocol

from . import fastpath
from .control import Goodbye, control_frame

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


class LaneOwner(Protocol):
    def lane_frames(self, lane: Lane, frames: list) -> None: ...
    def lane_writable(self, lane: Lane, writable: bool) -> None: ...
    def lane_lost(self, lane: Lane, exc: BaseException | None) -> None: ...
    def lane_broken(self, lane: Lane, err: Exception) -> None: ...


def set_tcp_options(sock: socket.socket | None, nodelay: bool, buf_bytes: int) -> None:
    """Apply ``tcp.tcp_nodelay`` and ``tcp.tcp_buf`` (0 keeps kernel autotuning)."""
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1 if nodelay else 0)
        if buf_bytes:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buf_bytes)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buf_bytes)
    except OSError:
        pass  # not a TCP socket (tests may use socketpairs); nothing to tune


def set_lane_liveness(sock: socket.socket | None) -> None:
    """Keepalive and ``TCP_USER_TIMEOUT`` on a lane socket (see the constants above).

    Read at call time, so a test or an embedding program may lower the module
    constants before lanes open. Options the platform lacks are skipped.
    """
    if sock is None:
        return
    opts = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    for name, value in (
        ("TCP_KEEPIDLE", LANE_KEEPALIVE_IDLE_SECONDS),
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

    def __init__(self, owner: LaneOwner, lane_id: int = -1, peer: Any = None) -> None:
        self.owner = owner
        self.lane_id = lane_id
        self.peer = peer
        self.client_cn = ""  # server side: the verified certificate CN
        self.transport: asyncio.Transport | None = None
        self.deframer = fastpath.Deframer()
        self.ready = False  # HELLO exchanged: may carry DATA
        self.writable = True  # transport below its high-water mark
        self.closing = False
        self.tx_frames = 0
        self.tx_bytes = 0
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

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.deframer.get_buffer(sizehint)

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
    def write(self, data: bytes, frames: int) -> bool:
        """Write ``frames`` already-encoded frames in one TLS write.

        Returns False (and writes nothing) when the lane is closing or its
        transport is: the caller must count those frames as dropped
        (``lane_closed``), since a closing TLS transport discards writes silently.
        """
        transport = self.transport
        if transport is None or self.closing or transport.is_closing():
            return False
        self.tx_frames += frames
        self.tx_bytes += len(data)
        transport.write(data)
        return True

    def send_control(self, msg: Any) -> None:
        if self.transport is not None and not self.transport.is_closing():
            frame = control_frame(msg)
            # Lane totals count every frame both ways (DATA and CTRL), like rx_*.
            self.tx_frames += 1
            self.tx_bytes += len(frame)
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
