"""One lane: the asyncio protocol that moves a lane's bytes (the I/O side of a lane).

Incoming bytes land straight in the deframer's own buffer (``BufferedProtocol``). While
the lane is open and a read holds DATA frames only (the common case: the deframer
counts control frames and drops padding), the frames go to the owner in one list, with
no further look: that is the receiving hot path. Anything else goes through the lane's
``LaneMachine`` (``ut.laneproto``), which applies the protocol's rules and says what
happened; the lane turns that into calls on its owner and into bytes to write. The
owner hands the lane one pre-encoded buffer per batch to write.

A lane has one owner for its whole life, the role object that made it: the client's
``ClientSession``, or the ``Server`` (which passes a lane's DATA on to the session the
lane joined). The owner hears, in this order: ``lane_hello`` (the peer's HELLO),
``lane_data`` (any number of times), and ``lane_closed`` exactly once, when the lane
stops being usable for whatever reason (``close_reason`` says which), before the
connection is gone; ``lane_violation`` comes first when a protocol rule was broken.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from . import fastpath
from .control import Hello
from .laneproto import Data, LaneMachine, PeerError, PeerGoodbye, PeerHello, State, Violation
from .tcpsock import unsent_bytes

__all__ = ["Lane", "LaneOwner", "RefusedByWebFace", "WRITE_HIGH_WATER", "WRITE_LOW_WATER"]

# Above this many bytes waiting in the TLS transport the lane reports itself
# busy and the picker skips it, so a backlog builds in the session queue
# (where drop-oldest applies), not in per-lane buffers.
# 64 KiB: a burst (LANE_BURST_BYTES in ut.session) and change. 256 KiB carried no
# more on the benchmark bed (A/B in bench/README.md) and held 4x as much per lane
# outside the drop-oldest queue.
WRITE_HIGH_WATER = 64 * 1024
WRITE_LOW_WATER = 16 * 1024
# A lane closed after an ERR is aborted this long later if the peer never reads it.
ERR_LINGER_SECONDS = 1.0

_OPEN = State.OPEN


class RefusedByWebFace(ConnectionError):
    """A client lane got an HTTP answer where the server's HELLO belongs: the server
    (``tls.client_auth: proof``) did not take its proof and showed its web face."""

    reason = "refused_by_server"

    def __init__(self) -> None:
        super().__init__(
            "the server answered like a web server: it did not accept this client's proof "
            "(a certificate from another CA, an expired one, a clock more than 2 minutes "
            "off, or tls.client_auth differs between the two ends); see the server's "
            "tls_handshake_fail log line (stage proof) for its reason")


class LaneOwner(Protocol):
    """What a lane tells the role object that made it (see the module docstring)."""

    def lane_hello(self, lane: Lane, hello: Hello, flags: int) -> None: ...
    def lane_data(self, lane: Lane, frames: list) -> None: ...
    def lane_writable(self, lane: Lane, writable: bool) -> None: ...
    def lane_violation(self, lane: Lane, violation: Violation) -> None: ...
    def lane_closed(self, lane: Lane) -> None: ...


class Lane(asyncio.BufferedProtocol):
    """A connection carrying framed datagrams for one session: bytes in and out, and the
    lane's protocol state (``proto``)."""

    def __init__(self, owner: LaneOwner, proto: LaneMachine, peer: Any = None,
                 read_chunk: int = 16384) -> None:
        self.owner = owner
        self.proto = proto
        self.read_chunk = read_chunk  # tcp.tcp_buf: the largest read handed to the deframer
        self.sock: Any = None  # the TCP socket under TLS (options, TCP_INFO)
        self.peer = peer
        self.client_cn = ""  # server side: the peer's identity (its certificate CN)
        self.session: Any = None  # server side: the session this lane joined
        self.transport: asyncio.Transport | None = None
        self.deframer = fastpath.Deframer()
        self.writable = True  # transport below its high-water mark
        self.tx_frames = 0
        self.tx_bytes = 0
        self.tx_pad_bytes = 0  # PAD frames written (shaping.padding), not in tx_bytes
        # The TCP segment size (TCP_INFO, read with the lane's state by the session) when
        # each write is one TLS record of its length (not a WebSocket lane): what
        # ut.shaping.fit_padding needs; 0 = unknown.
        self.mss = 0
        self.rx_frames = 0
        self.rx_bytes = 0
        self.rx_bytes_counted = 0  # part of rx_bytes already added to the session's counters
        self.close_reason = ""
        self.close_exc: BaseException | None = None
        self.peer_err: Any = None  # the peer's ERR message, if it sent one
        self.first_bytes = b""  # the start of what the peer sent first
        self._first_read: Any = b""
        self._reported = False  # lane_closed has been called
        self.lost = asyncio.get_running_loop().create_future()

    @property
    def lane_id(self) -> int:
        return self.proto.lane_id

    @property
    def ready(self) -> bool:
        """HELLO exchanged and nobody closing: the lane may carry DATA."""
        return self.proto.state is _OPEN

    @property
    def closing(self) -> bool:
        """The lane is done (or going): nothing more may be written to it."""
        return self._reported or self.proto.state in (State.CLOSING, State.PEER_CLOSING, State.CLOSED)

    @property
    def pad_writes(self) -> bool:
        return self.proto.pad_writes

    # -- asyncio protocol -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)  # type: ignore[attr-defined]
        if self.peer is None:
            self.peer = transport.get_extra_info("peername")
        self.sock = transport.get_extra_info("socket")

    def get_buffer(self, sizehint: int) -> memoryview:
        chunk = self.read_chunk
        view = self.deframer.get_buffer(chunk)[:chunk]
        if not self.rx_bytes:
            self._first_read = view  # to recognise a web server's answer (_violated)
        return view

    def feed(self, data: bytes) -> None:
        """Bytes read before this lane became its transport's protocol (a client's
        HELLO that came with its proof, ``ut.gate``): handled as if just read."""
        view = memoryview(data)
        while view and not self._reported:
            buf = self.get_buffer(len(view))
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            view = view[n:]
            self.buffer_updated(n)

    def buffer_updated(self, nbytes: int) -> None:
        if not self.rx_bytes:
            self.first_bytes = bytes(self._first_read[:min(nbytes, 8)])
            self._first_read = b""  # no export of the deframer's buffer left behind
        self.rx_bytes += nbytes
        deframer = self.deframer
        try:
            frames = deframer.buffer_updated(nbytes)
        except fastpath.FrameError:  # the deframer failed before: the lane is ending
            return
        if frames:
            self.rx_frames += len(frames)
            if self.proto.state is _OPEN and not deframer.controls:
                self.owner.lane_data(self, frames)  # the hot path: DATA only
            else:
                self._judge(frames)
        err = deframer.error
        if err is not None and self.proto.state is not State.CLOSED:
            self._violated(self.proto.violated(err.reason, str(err)))

    def eof_received(self) -> bool:
        try:
            self.deframer.eof()
        except fastpath.FrameError as err:
            if self.proto.state is not State.CLOSED:
                self._violated(self.proto.violated(err.reason, str(err)))
            return False
        # The peer is gone. Over TLS the transport is already shutting down and would
        # drop later writes without a word (asyncio's and uvloop's SSL protocols discard
        # app data once shutdown starts), so nothing more may be handed to this lane.
        self.proto.connection_lost()
        self._report("peer_closed")
        return False  # close the transport

    def pause_writing(self) -> None:
        self.writable = False
        self.owner.lane_writable(self, False)

    def resume_writing(self) -> None:
        self.writable = True
        self.owner.lane_writable(self, True)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.proto.connection_lost()
        if not self.lost.done():
            self.lost.set_result(exc)
        self._report("error" if exc else "peer_closed", exc)

    # -- what the machine said -----------------------------------------------------------
    def _judge(self, frames: list) -> None:
        """Frames that need the machine's judgement (a control frame, or a lane not open
        yet); it stops after a HELLO so the owner answers it before the rest is judged."""
        done = 0
        while done < len(frames):
            events, done = self.proto.receive(frames, done)
            self._events(events)

    def _events(self, events: list) -> None:
        owner = self.owner
        for ev in events:
            kind = type(ev)
            if kind is Data:
                owner.lane_data(self, ev.frames)
            elif kind is PeerHello:
                owner.lane_hello(self, ev.hello, ev.flags)
            elif kind is PeerGoodbye:
                # The peer is leaving: stop writing to this lane now, and close our side
                # too (a peer that said GOODBYE and then holds the connection open gets
                # nothing more out of it).
                self._report(f"peer_goodbye_{ev.reason}")
                self._close_transport()
            elif kind is PeerError:
                self.peer_err = ev.err
                self._report(f"peer_error_{ev.err.code_name}")
                self._close_transport()
            else:  # a Violation: always the last event
                self._violated(ev)

    def violate(self, reason: str, text: str) -> None:
        """A rule broken above the machine (e.g. a numbered frame too short for its
        number, found by the resequencer): end the lane as for any violation."""
        if self.proto.state is not State.CLOSED:
            self._violated(self.proto.violated(reason, text))

    def _close_transport(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
            # A peer that never reads our close must not keep the connection either.
            asyncio.get_running_loop().call_later(ERR_LINGER_SECONDS, self.abort)

    def _violated(self, violation: Violation) -> None:
        """A protocol rule was broken: count and log it (the owner), say ERR, close."""
        if self.rx_frames == 0 and self.proto.role == "client" and self.first_bytes.startswith(b"HTTP/"):
            # Not a protocol error: the server's web face answered our proof request
            # (tls.client_auth: proof), i.e. it did not take us for a client.
            if not self.lost.done():
                self.lost.set_result(RefusedByWebFace())
            self._report("refused_by_server")
            self.abort()
            return
        self.owner.lane_violation(self, violation)
        self._report(f"protocol_error:{violation.reason}")
        if violation.err_code and self.transport is not None and not self.transport.is_closing():
            self.end_with_err(violation.err_code, violation.text)
        else:
            self.abort()

    def _report(self, reason: str, exc: BaseException | None = None) -> None:
        """Tell the owner, once, that this lane carries nothing more."""
        if self._reported:
            return
        self._reported = True
        self.close_reason = self.close_reason or reason
        self.close_exc = exc
        self.owner.lane_closed(self)

    # -- writing --------------------------------------------------------------------------
    def write(self, data: bytes, frames: int, pad_bytes: int = 0) -> bool:
        """Write ``frames`` already-encoded DATA frames in one TLS write; the last
        ``pad_bytes`` of ``data`` are a PAD frame (counted apart, in ``tx_pad_bytes``).

        Returns False (and writes nothing) when the lane is not open or its transport is
        closing: the caller must count those frames as dropped (``lane_closed``), since a
        closing TLS transport discards writes silently.
        """
        transport = self.transport
        if transport is None or self.proto.state is not _OPEN or transport.is_closing():
            return False
        self.tx_frames += frames
        self.tx_bytes += len(data) - pad_bytes
        self.tx_pad_bytes += pad_bytes
        transport.write(data)
        return True

    def _write_control(self, frame: bytes) -> None:
        """Write a control frame the machine made (with its PAD frame, if any)."""
        if not frame or self.transport is None or self.transport.is_closing():
            return
        # Lane totals count every frame both ways (DATA and CTRL); padding apart.
        size = fastpath.HEADER_LEN + int.from_bytes(frame[5:9], "big")
        self.tx_frames += 1
        self.tx_bytes += size
        self.tx_pad_bytes += len(frame) - size
        self.transport.write(frame)

    def send_hello(self) -> None:
        """Client, once the transport is up: write our HELLO."""
        self._write_control(self.proto.send_hello())

    def accept(self, lane_count: int) -> None:
        """Server, from ``lane_hello``: take the lane (write our HELLO answer)."""
        self._write_control(self.proto.accept(lane_count))

    def end_with_err(self, code: int, text: str, reason: str = "") -> None:
        """Send ERR ``code`` and close; abort if the peer does not read it in time."""
        self._report(reason or f"err_{code}")
        self._write_control(self.proto.refuse(code, text))
        self._close_transport()

    def close(self, goodbye_reason: int | None = None, reason: str = "") -> None:
        """Close on purpose: the owner hears ``lane_closed`` first (nothing more is
        written to this lane), then GOODBYE (with a reason) and a TLS close."""
        if self.proto.state in (State.CLOSING, State.CLOSED) and self._reported:
            return
        frame = self.proto.close(goodbye_reason)
        self._report(reason or "closed")
        self._write_control(frame)
        if self.transport is not None:
            self.transport.close()

    def abort(self, reason: str = "") -> None:
        """Drop the connection now (protocol error, hostile peer)."""
        self.proto.close()
        self._report(reason or "aborted")
        if self.transport is not None:
            self.transport.abort()

    # -- state for the sender -------------------------------------------------------------
    @property
    def write_buffer_size(self) -> int:
        return self.transport.get_write_buffer_size() if self.transport else 0

    def unsent_bytes(self) -> int:
        """Bytes written to this lane and not yet sent: the TLS transport's buffer plus
        the kernel's unsent queue (Linux ``SIOCOUTQNSD``). What a new datagram waits
        behind before it even leaves."""
        n = self.transport.get_write_buffer_size() if self.transport else 0
        return n + unsent_bytes(self.sock)
