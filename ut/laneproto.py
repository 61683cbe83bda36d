"""The lane protocol as one state machine, without I/O (docs/protocol.md, "Lane life cycle").

Theory of operation: one ``LaneMachine`` per lane, on each end. It takes the frames a
``Deframer`` produced from the lane's bytes and returns *events* (what the owner of the
lane must act on: a peer's HELLO, DATA to deliver, the peer leaving, a protocol
violation); it turns the owner's decisions (send our HELLO, accept or refuse the peer's,
close with GOODBYE) into the bytes to write. It owns no socket, no clock and no session:
``ut.lane.Lane`` moves the bytes and ``ut.session``/``ut.server``/``ut.client`` decide.
Every rule of the protocol lives here, once::

                 client                                  server
    CONNECTING --send_hello()--> AWAIT_HELLO   CONNECTING --transport_up()--> AWAIT_HELLO
    AWAIT_HELLO --server's HELLO--> OPEN       AWAIT_HELLO --client's HELLO--> OPEN
                                               (accept() writes the answer; refuse() an ERR)
    OPEN --close()--> CLOSING      we said GOODBYE: what is in flight is still delivered
    OPEN --GOODBYE/ERR in--> PEER_CLOSING      the peer left: any later frame is a violation
    any --violation--> CLOSED      the owner counts it, may send the ERR, aborts the lane
    any --connection_lost()--> CLOSED

Rules (each broken one is a ``Violation`` with a fixed reason word, counted as
``ut_protocol_errors_total{reason}`` and logged by the owner; the lane then closes):

* the server's first frame must be a valid client HELLO (``data_before_hello``,
  ``bad_hello``, ``lane_id_out_of_range``); the client's first frame must be the server's
  HELLO for the same session and lane (``data_before_hello``, ``bad_hello``);
* once open: a second HELLO is ``unexpected_hello``; a control kind this version does not
  know is ``unknown_control`` (new kinds are negotiated with HELLO flags, as PAD is); a
  malformed control message is its ``ControlError`` reason;
* after the peer's GOODBYE or ERR: DATA is ``data_after_goodbye``, any control frame
  ``control_after_goodbye``.

PAD frames never get here: the deframer drops them. The hot path does not go through
the machine either: while the lane is ``OPEN`` and a read holds only DATA frames
(``Deframer.controls == 0``), the lane hands the frames straight to its owner.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from ut import fastpath
from ut.control import (
    ERR_BAD_HELLO,
    ERR_LANE_ID_OUT_OF_RANGE,
    ERR_PROTOCOL_ERROR,
    Err,
    Goodbye,
    Hello,
    Pad,
    control_frame,
    decode_control,
)
from ut.errors import ControlError
from ut.shaping import pad_length

__all__ = ["State", "LaneMachine", "Data", "PeerHello", "PeerGoodbye", "PeerError",
           "Violation", "Event"]

TYPE_DATA = fastpath.TYPE_DATA


class State(enum.Enum):
    """Where a lane is in its life (docs/protocol.md, "Lane life cycle")."""

    CONNECTING = "connecting"  # the transport (TCP + TLS) is not up yet
    AWAIT_HELLO = "await_hello"  # transport up, HELLO not exchanged yet
    OPEN = "open"  # HELLO exchanged: DATA both ways
    CLOSING = "closing"  # we close (GOODBYE sent or not): we send nothing more
    PEER_CLOSING = "peer_closing"  # the peer said GOODBYE or ERR: it sends nothing more
    CLOSED = "closed"  # the connection is gone, or a violation ended the lane


# -- events ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Data:
    """DATA frames to deliver, ``(type, flags, payload)`` as the deframer gave them."""

    frames: list


@dataclass(frozen=True, slots=True)
class PeerHello:
    """The peer's HELLO. Server: a client asks to join session ``hello.session_id`` as lane
    ``hello.lane_id`` (answer with ``accept`` or ``refuse``). Client: the server took this
    lane; ``hello.lane_count`` is the most lanes it accepts. ``flags``: FLAG_SEQ, FLAG_PAD."""

    hello: Hello
    flags: int


@dataclass(frozen=True, slots=True)
class PeerGoodbye:
    """The peer said GOODBYE (``reason`` is its reason's word) and will close."""

    reason: str


@dataclass(frozen=True, slots=True)
class PeerError:
    """The peer sent ERR and will close."""

    err: Err


@dataclass(frozen=True, slots=True)
class Violation:
    """A broken protocol rule. ``reason`` is the metric/log word; ``err_code`` the ERR code
    to send before closing (0: send none); ``text`` says what happened."""

    reason: str
    text: str
    err_code: int = ERR_PROTOCOL_ERROR


Event = Data | PeerHello | PeerGoodbye | PeerError | Violation


# -- the machine -------------------------------------------------------------------------

class LaneMachine:
    """One lane's protocol state, on the ``client`` or the ``server`` end.

    ``flags`` are the flags of our HELLO (``FLAG_SEQ`` if we resequence, ``FLAG_PAD`` if
    we understand padding); ``padding`` says whether we pad our writes once the peer
    understands it (``shaping.padding``). Client: ``session_id``, ``lane_id`` and
    ``lane_count`` go into its HELLO. Server: ``max_lanes`` bounds the lane ids it takes.

    >>> c = LaneMachine("client", session_id=7, lane_id=0, lane_count=2)
    >>> s = LaneMachine("server", max_lanes=2)
    >>> s.transport_up()
    >>> events, _ = s.receive(fastpath.Deframer().feed(c.send_hello()))
    >>> [type(e).__name__ for e in events]
    ['PeerHello']
    >>> c.receive(fastpath.Deframer().feed(s.accept(lane_count=2)))[0][0].hello.lane_id
    0
    >>> c.state, s.state
    (<State.OPEN: 'open'>, <State.OPEN: 'open'>)
    """

    __slots__ = ("role", "state", "session_id", "lane_id", "lane_count", "max_lanes",
                 "flags", "padding", "peer_flags", "pad_writes", "violation")

    def __init__(self, role: str, *, session_id: int = 0, lane_id: int = -1,
                 lane_count: int = 1, max_lanes: int = 0xFFFF, flags: int = 0,
                 padding: bool = False) -> None:
        if role not in ("client", "server"):
            raise ValueError(f"role must be 'client' or 'server', not {role!r}")
        self.role = role
        self.state = State.CONNECTING
        self.session_id = session_id
        self.lane_id = lane_id
        self.lane_count = lane_count
        self.max_lanes = max_lanes
        self.flags = flags
        self.padding = padding
        self.peer_flags = 0  # the flags of the peer's HELLO
        self.pad_writes = False  # end our writes with a PAD frame (the peer understands them)
        self.violation: Violation | None = None  # the rule that ended this lane, if one did

    @property
    def is_open(self) -> bool:
        """DATA may be sent (HELLO exchanged, nobody closing)."""
        return self.state is State.OPEN

    # -- our side ------------------------------------------------------------------------
    def send_hello(self) -> bytes:
        """Client, once the transport is up: our HELLO, to write now. It is padded when we
        pad (before we know the server understands PAD: a bare HELLO would be the most
        recognisable write of all, and an older server ignores the PAD frame)."""
        self._expect("client", State.CONNECTING)
        self.state = State.AWAIT_HELLO
        return self._control(Hello(self.session_id, self.lane_id, self.lane_count),
                             self.flags, self.padding)

    def transport_up(self) -> None:
        """Server: the transport is up; the client's HELLO is awaited."""
        self._expect("server", State.CONNECTING)
        self.state = State.AWAIT_HELLO

    def accept(self, lane_count: int) -> bytes:
        """Server, after a ``PeerHello``: take the lane; our HELLO answer (``lane_count`` =
        the most lanes we accept), to write now."""
        if self.role != "server" or self.state is not State.OPEN or self.lane_id < 0:
            raise RuntimeError(f"accept() on a {self.role} lane in state {self.state.value}")
        return self._control(Hello(self.session_id, self.lane_id, lane_count), self.flags)

    def refuse(self, code: int, text: str) -> bytes:
        """Refuse or end the lane with an ERR (for example a server that cannot serve a
        HELLO, or a HELLO that never came): the ERR frame, to write before closing."""
        if self.state is not State.CLOSED:
            self.state = State.CLOSING
        return self._control(Err(code, text))

    def close(self, goodbye_reason: int | None = None) -> bytes:
        """We close the lane: the GOODBYE frame to write first (``b""`` without a reason,
        or before HELLO). What the peer still sends is delivered."""
        # A client waiting for the server's HELLO says GOODBYE too: the server may
        # already have admitted the lane, and should log a goodbye, not a broken lane.
        may_say = self.state is State.OPEN or (self.role == "client" and self.state is State.AWAIT_HELLO)
        if self.state is not State.CLOSED:
            self.state = State.CLOSING
        if goodbye_reason is None or not may_say:
            return b""
        return self._control(Goodbye(goodbye_reason))

    def connection_lost(self) -> None:
        """The transport is gone."""
        self.state = State.CLOSED

    # -- the peer's side -------------------------------------------------------------------
    def receive(self, frames: list, start: int = 0) -> tuple[list[Event], int]:
        """Judge the frames of one read, in order, from ``frames[start]``; return what the
        owner must act on, and the index of the first frame not judged yet.

        Judging stops right after a ``PeerHello``: the owner answers it (``accept`` or
        ``refuse``) before the frames behind it are looked at; call again from the
        returned index. A ``Violation`` is always the last event: the lane is then
        ``CLOSED`` and nothing after the bad frame is judged.
        """
        events: list[Event] = []
        data: list = []
        i, n = start, len(frames)
        while i < n:
            frame = frames[i]
            i += 1
            state = self.state
            if state is State.OPEN or state is State.CLOSING:
                if frame[0] == TYPE_DATA:
                    data.append(frame)
                    continue
                if data:
                    events.append(Data(data))
                    data = []
                event = self._control_in_open(frame)
            elif state is State.PEER_CLOSING:
                kind = "data" if frame[0] == TYPE_DATA else "control"
                event = self.violated(f"{kind}_after_goodbye",
                                      f"a {kind} frame after the peer's GOODBYE or ERR")
            elif state is State.CLOSED:
                return events, n
            else:  # CONNECTING (the server may read before its handshake call returns), AWAIT_HELLO
                event = self._hello_in(frame)
            if event is not None:
                events.append(event)
                if type(event) is Violation:
                    return events, n
                if type(event) is PeerHello:
                    return events, i
        if data:
            events.append(Data(data))
        return events, n

    # -- rules ---------------------------------------------------------------------------
    def _hello_in(self, frame: tuple) -> Event:
        ftype, flags, payload = frame
        if ftype == TYPE_DATA:
            return self.violated("data_before_hello", "the first frame must be HELLO",
                                 ERR_PROTOCOL_ERROR if self.role == "server" else 0)
        try:
            msg = decode_control(payload)
        except ControlError as err:
            return self.violated("bad_hello", str(err), self._err(ERR_BAD_HELLO))
        if not isinstance(msg, Hello):
            return self.violated("bad_hello", f"the first frame must be HELLO, got {type(msg).__name__}",
                                 self._err(ERR_BAD_HELLO))
        if self.role == "server":
            if not 0 <= msg.lane_id < self.max_lanes:
                return self.violated("lane_id_out_of_range",
                                     f"lane id {msg.lane_id} not below this server's {self.max_lanes} lanes",
                                     ERR_LANE_ID_OUT_OF_RANGE)
            self.session_id, self.lane_id, self.lane_count = msg.session_id, msg.lane_id, msg.lane_count
        elif (msg.session_id, msg.lane_id) != (self.session_id, self.lane_id):
            return self.violated("bad_hello", "the server's HELLO is for another session or lane", 0)
        self.state = State.OPEN
        self.peer_flags = flags
        self.pad_writes = self.padding and bool(flags & fastpath.FLAG_PAD)
        return PeerHello(msg, flags)

    def _control_in_open(self, frame: tuple) -> Event | None:
        try:
            msg = decode_control(frame[2])
        except ControlError as err:
            if err.reason == "unknown_kind":
                return self.violated("unknown_control", str(err))
            return self.violated(err.reason, str(err))
        if isinstance(msg, Goodbye):
            if self.state is State.OPEN:
                self.state = State.PEER_CLOSING
            return PeerGoodbye(msg.reason_name)
        if isinstance(msg, Err):
            if self.state is State.OPEN:
                self.state = State.PEER_CLOSING
            return PeerError(msg)
        if isinstance(msg, Pad):  # not from a deframer (it drops them); harmless
            return None
        return self.violated("unexpected_hello", "a second HELLO on an open lane")

    def violated(self, reason: str, text: str, err_code: int = ERR_PROTOCOL_ERROR) -> Violation:
        """A rule broken below the machine (a bad frame header: ``FrameError``), or by a
        frame judged here: the lane is ``CLOSED``; the returned ``Violation`` says why."""
        self.state = State.CLOSED
        self.violation = Violation(reason, text, err_code)
        return self.violation

    def _err(self, code: int) -> int:
        # Only the server answers a bad HELLO with ERR; a client just closes.
        return code if self.role == "server" else 0

    def _expect(self, role: str, state: State) -> None:
        if self.role != role or self.state is not state:
            raise RuntimeError(f"not a {role} lane in state {state.value}: "
                               f"{self.role} lane in state {self.state.value}")

    def _control(self, msg: Any, flags: int = 0, pad: bool | None = None) -> bytes:
        frame = control_frame(msg, flags)
        if self.pad_writes if pad is None else pad:
            frame += fastpath.pad_frame(pad_length(len(frame)))
        return frame
