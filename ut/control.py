"""Control messages carried in CTRL frames: HELLO, GOODBYE, ERR (docs/protocol.md).

A CTRL frame's payload is ``Kind (1 byte) | body``, big-endian::

    HELLO   0x01  session_id u64 | lane_id u16 | lane_count u16      (13 bytes in all)
    GOODBYE 0x02  reason u8                                           (2 bytes)
    ERR     0x03  code u16 | message, UTF-8, at most 512 bytes        (3..515 bytes)

Lane life cycle: TLS handshake -> client HELLO (first frame of every lane) -> server
HELLO echoing session_id and lane_id, with lane_count = the most lanes it accepts ->
DATA both ways -> GOODBYE or close. The server answers a bad HELLO with ERR and closes.

Decoding is strict about lengths (a v1 message has exactly its documented size) and lax
about enumerations: an unknown GOODBYE reason or ERR code is still a well-formed message
(its ``*_name`` is ``"unknown"``), so a newer peer's values do not break a lane. An
unknown *kind* raises ``ControlError("unknown_kind")``; callers may ignore it.

Not a hot path: a few messages per lane, so plain Python.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ut import fastpath
from ut.errors import ControlError

__all__ = [
    "KIND_HELLO",
    "KIND_GOODBYE",
    "KIND_ERR",
    "KIND_PAD",
    "GOODBYE_SHUTDOWN",
    "GOODBYE_IDLE",
    "GOODBYE_REPLACED",
    "GOODBYE_ERROR",
    "GOODBYE_REASONS",
    "ERR_BAD_HELLO",
    "ERR_LANE_ID_OUT_OF_RANGE",
    "ERR_PROTOCOL_ERROR",
    "ERR_HELLO_TIMEOUT",
    "ERR_INTERNAL",
    "ERR_LIMIT",
    "ERR_CODES",
    "ERR_MESSAGE_MAX_BYTES",
    "Hello",
    "Goodbye",
    "Err",
    "Pad",
    "ControlMessage",
    "encode_control",
    "control_frame",
    "decode_control",
]

KIND_HELLO = 0x01
KIND_GOODBYE = 0x02
KIND_ERR = 0x03
KIND_PAD = fastpath.KIND_PAD  # 0x04: padding, discarded (docs/protocol.md, "Padding")

GOODBYE_SHUTDOWN = 0  # the peer is stopping
GOODBYE_IDLE = 1  # no payload for idle_seconds; the next datagram rebuilds the lanes
GOODBYE_REPLACED = 2  # a newer lane or session took this one's place
GOODBYE_ERROR = 3  # the peer hit an error and is closing the lane
GOODBYE_REASONS = {
    GOODBYE_SHUTDOWN: "shutdown",
    GOODBYE_IDLE: "idle",
    GOODBYE_REPLACED: "replaced",
    GOODBYE_ERROR: "error",
}

ERR_BAD_HELLO = 1  # the first frame was not a valid HELLO
ERR_LANE_ID_OUT_OF_RANGE = 2  # HELLO lane_id >= the server's lane limit
ERR_PROTOCOL_ERROR = 3  # any other protocol violation
ERR_HELLO_TIMEOUT = 4  # no HELLO arrived in time after the TLS handshake
ERR_INTERNAL = 5  # the server could not serve the lane (e.g. no UDP socket)
ERR_LIMIT = 6  # the server is at a resource bound (limits:); the client retries later
ERR_CODES = {
    ERR_BAD_HELLO: "bad_hello",
    ERR_LANE_ID_OUT_OF_RANGE: "lane_id_out_of_range",
    ERR_PROTOCOL_ERROR: "protocol_error",
    ERR_HELLO_TIMEOUT: "hello_timeout",
    ERR_INTERNAL: "internal",
    ERR_LIMIT: "limit",
}
#: ERR messages longer than this are cut (at a character boundary) when encoded.
ERR_MESSAGE_MAX_BYTES = 512

_HELLO = struct.Struct(">BQHH")
_GOODBYE = struct.Struct(">BB")
_ERR_HEAD = struct.Struct(">BH")


def _check_range(name: str, value: int, low: int, high: int) -> None:
    if not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} {value!r} out of range {low}..{high}")


@dataclass(frozen=True)
class Hello:
    """First frame of every lane (client), and the server's answer on that lane.

    ``lane_count``: from the client, the lanes it means to open; from the server, the most
    lanes it accepts (the client then opens no more than that).
    """

    session_id: int  # u64, chosen at random by the client, one per session
    lane_id: int  # u16, 0 .. lane_count-1
    lane_count: int  # u16, >= 1

    def __post_init__(self) -> None:
        _check_range("session_id", self.session_id, 0, (1 << 64) - 1)
        _check_range("lane_id", self.lane_id, 0, 0xFFFF)
        _check_range("lane_count", self.lane_count, 1, 0xFFFF)


@dataclass(frozen=True)
class Goodbye:
    """Sent before closing a lane on purpose; ``reason`` is a ``GOODBYE_*`` value (u8)."""

    reason: int = GOODBYE_SHUTDOWN

    def __post_init__(self) -> None:
        _check_range("reason", self.reason, 0, 0xFF)

    @property
    def reason_name(self) -> str:
        """The reason as a fixed word (metric/log safe), ``"unknown"`` if not a v1 value."""
        return GOODBYE_REASONS.get(self.reason, "unknown")


@dataclass(frozen=True)
class Err:
    """An error report, sent before the sender closes the lane. ``code`` is an ``ERR_*``
    value (u16); ``message`` is human-readable text, cut to 512 UTF-8 bytes on the wire."""

    code: int
    message: str = ""

    def __post_init__(self) -> None:
        _check_range("code", self.code, 0, 0xFFFF)
        if not isinstance(self.message, str):
            raise TypeError(f"message must be str, not {type(self.message).__name__}")

    @property
    def code_name(self) -> str:
        """The code as a fixed word (metric/log safe), ``"unknown"`` if not a v1 value."""
        return ERR_CODES.get(self.code, "unknown")


@dataclass(frozen=True)
class Pad:
    """Padding: ``length`` bytes that the receiver discards (docs/protocol.md, "Padding").
    Its only job is to change the length of the lane write it ends."""

    length: int = 0

    def __post_init__(self) -> None:
        _check_range("length", self.length, 0, fastpath.MAX_PAYLOAD - 1)


ControlMessage = Hello | Goodbye | Err | Pad


def _truncate_utf8(text: str, limit: int) -> bytes:
    # Unencodable lone surrogates become "?" so the receiver always gets valid UTF-8.
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return data
    cut = limit
    while cut > 0 and (data[cut] & 0xC0) == 0x80:  # data[cut] continues a character
        cut -= 1
    return data[:cut]


def encode_control(msg: ControlMessage) -> bytes:
    """Return the CTRL payload (kind byte and body) for ``msg``.

    >>> encode_control(Goodbye(GOODBYE_IDLE)).hex()
    '0201'
    """
    if isinstance(msg, Hello):
        return _HELLO.pack(KIND_HELLO, msg.session_id, msg.lane_id, msg.lane_count)
    if isinstance(msg, Goodbye):
        return _GOODBYE.pack(KIND_GOODBYE, msg.reason)
    if isinstance(msg, Err):
        return _ERR_HEAD.pack(KIND_ERR, msg.code) + _truncate_utf8(
            msg.message, ERR_MESSAGE_MAX_BYTES
        )
    if isinstance(msg, Pad):
        return bytes([KIND_PAD]) + bytes(msg.length)
    raise TypeError(f"not a control message: {type(msg).__name__}")


def control_frame(msg: ControlMessage, flags: int = 0) -> bytes:
    """Return ``msg`` as a whole CTRL frame, ready to write to a lane.

    ``flags``: the frame's Flags byte; on HELLO, ``fastpath.FLAG_SEQ`` asks the peer for
    numbered DATA frames (docs/protocol.md, "Sequence numbers") and ``fastpath.FLAG_PAD``
    says "I understand PAD frames" ("Padding").
    """
    return fastpath.encode_frame(fastpath.TYPE_CTRL, encode_control(msg), flags)


def decode_control(payload: bytes | bytearray | memoryview) -> ControlMessage:
    """Parse a CTRL payload. Raises ``ControlError`` with reason ``empty``,
    ``unknown_kind``, ``bad_length``, ``bad_utf8`` or ``bad_value`` (e.g. lane_count 0).

    >>> decode_control(bytes.fromhex("0201"))
    Goodbye(reason=1)
    """
    if len(payload) and payload[0] == KIND_PAD:
        return Pad(len(payload) - 1)  # the body is not read: any bytes will do
    data = bytes(payload)
    if not data:
        raise ControlError("empty", "CTRL frame with no payload")
    kind = data[0]
    n = len(data)
    if kind == KIND_HELLO:
        if n != _HELLO.size:
            raise ControlError("bad_length", f"HELLO is {_HELLO.size} bytes, got {n}")
        _, session_id, lane_id, lane_count = _HELLO.unpack(data)
        if lane_count == 0:
            raise ControlError("bad_value", "HELLO lane_count 0")
        return Hello(session_id, lane_id, lane_count)
    if kind == KIND_GOODBYE:
        if n != _GOODBYE.size:
            raise ControlError("bad_length", f"GOODBYE is {_GOODBYE.size} bytes, got {n}")
        return Goodbye(data[1])
    if kind == KIND_ERR:
        limit = _ERR_HEAD.size + ERR_MESSAGE_MAX_BYTES
        if not _ERR_HEAD.size <= n <= limit:
            raise ControlError("bad_length", f"ERR is {_ERR_HEAD.size}..{limit} bytes, got {n}")
        _, code = _ERR_HEAD.unpack_from(data)
        try:
            message = data[_ERR_HEAD.size :].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ControlError("bad_utf8", f"ERR message: {exc.reason} at byte {exc.start}") from None
        return Err(code, message)
    raise ControlError("unknown_kind", f"kind 0x{kind:02x}")
