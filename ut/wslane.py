"""Lanes over WebSocket (``tcp.transport: wss`` / ``ws``): RFC 6455 under the lane.

A WebSocket lane carries the same byte stream of PDUs as a TLS lane: each lane write
goes out as one binary message, and the receiver concatenates the payloads of whatever
binary messages arrive into the lane's deframer (a PDU may span messages; nothing
depends on message boundaries). The WebSocket protocol itself -- the HTTP/1.1 Upgrade,
framing, masking, ping/pong, close -- is ``websockets``' sans-I/O ``ClientProtocol`` and
``ServerProtocol`` (its C speed-up masks 16 KiB in microseconds; measured in
``bench/README.md``, "Issue 18": about 0.6 CPU-s/GB for both ends together, where
``wsproto`` took 4.3).

``WsLink`` sits between the real transport (TLS, or plain TCP behind a reverse proxy
that terminated TLS) and the ``ut.lane.Lane``: to the real transport it is the
protocol, to the lane it is the transport (``write``, ``close``, ``abort``,
``is_closing``, buffer sizes and limits, ``get_extra_info``, flow control passed
through). The handshake helpers (``upgrade_request``, ``finish_upgrade``,
``accept_upgrade``) put the client proof (``ut.proof``) in the Upgrade request.
"""

from __future__ import annotations

import asyncio
from typing import Any

from websockets.client import ClientProtocol
from websockets.exceptions import InvalidHandshake, InvalidMessage
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

__all__ = ["MAX_MESSAGE", "UpgradeRefused", "WsLink", "accept_upgrade", "finish_upgrade",
           "upgrade_request"]

# Largest message accepted: a lane write is at most a burst (64 KiB) plus padding.
MAX_MESSAGE = 1 << 20


class WsLink(asyncio.Protocol):
    """One lane's WebSocket: protocol of the real transport, transport of the lane."""

    # A lane write becomes a WebSocket header and a payload, not one TLS record of the
    # write's length: ut.shaping.fit_padding's arithmetic does not hold (ut.session).
    one_record_per_write = False

    def __init__(self, ws: ClientProtocol | ServerProtocol, transport: Any) -> None:
        self.ws = ws
        self.raw = transport  # the TLS (or TCP) transport below
        self.lane: Any = None
        self._closing = False

    def attach(self, lane: Any, pending: bytes = b"") -> None:
        """Make ``lane`` the reader of this link (``lane.connection_made(self)``), then
        handle ``pending`` (bytes read past the handshake)."""
        self.lane = lane
        self.raw.set_protocol(self)
        lane.connection_made(self)
        if pending:
            self.data_received(pending)

    # -- to the lane: a transport ----------------------------------------------------
    def write(self, data: bytes) -> None:
        ws = self.ws
        ws.send_binary(data)
        self.raw.writelines(ws.data_to_send())

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self.ws.state is State.OPEN:
            self.ws.send_close()
            self.raw.writelines(self.ws.data_to_send())
        self.raw.close()

    def abort(self) -> None:
        self._closing = True
        self.raw.abort()

    def is_closing(self) -> bool:
        return self._closing or self.raw.is_closing()

    def get_write_buffer_size(self) -> int:
        return int(self.raw.get_write_buffer_size())

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.raw.set_write_buffer_limits(high=high, low=low)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.raw.get_extra_info(name, default)

    def get_protocol(self) -> Any:
        return self.lane

    # -- from the real transport: a protocol ------------------------------------------
    def data_received(self, data: bytes) -> None:
        ws = self.ws
        ws.receive_data(data)
        lane = self.lane
        for frame in ws.events_received():
            if not isinstance(frame, Frame):
                continue  # the handshake's Request/Response: already handled
            if frame.opcode in (Opcode.BINARY, Opcode.CONT) and frame.data:
                lane.feed(frame.data)
            elif frame.opcode is Opcode.CLOSE:
                self._closing = True
        out = ws.data_to_send()  # pongs, the close reply
        if out:
            self.raw.writelines(out)
        if ws.state is State.CLOSED or ws.close_expected():
            self._closing = True
            lane.eof_received()
            self.raw.close()

    def eof_received(self) -> bool:
        self.ws.receive_eof()
        if self.lane is not None:
            self.lane.eof_received()
        return False

    def pause_writing(self) -> None:
        if self.lane is not None:
            self.lane.pause_writing()

    def resume_writing(self) -> None:
        if self.lane is not None:
            self.lane.resume_writing()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._closing = True
        if self.lane is not None:
            self.lane.connection_lost(exc)


# ---------------------------------------------------------------- the handshake


def upgrade_request(host: str, target: str, authorization: str) -> tuple[ClientProtocol, bytes]:
    """The client's protocol object and its Upgrade request for ``target`` on ``host``,
    carrying ``authorization`` (the client proof)."""
    ws = ClientProtocol(parse_uri(f"wss://{host}{target}"), max_size=MAX_MESSAGE)
    request = ws.connect()
    if "User-Agent" in request.headers:  # names the library
        del request.headers["User-Agent"]
    request.headers["Authorization"] = authorization
    ws.send_request(request)
    return ws, b"".join(ws.data_to_send())


class UpgradeRefused(ConnectionError):
    """The server did not switch to WebSocket: its web face answered (a refused proof, a
    wrong ``tcp.ws_path``, or a proxy in between that does not pass WebSocket)."""

    reason = "refused_by_server"


def finish_upgrade(ws: ClientProtocol, data: bytes) -> bytes:
    """Judge the server's answer to the Upgrade request (``data``: its head and whatever
    followed): the bytes past it on ``101 Switching Protocols``; ``UpgradeRefused`` on
    any other answer."""
    ws.receive_data(data)
    for event in ws.events_received():
        if isinstance(event, Response):
            if event.status_code == 101 and ws.handshake_exc is None:
                return b""  # frames that followed are in the protocol's buffer
            raise UpgradeRefused(
                f"the server answered HTTP {event.status_code} to the WebSocket upgrade: "
                "it did not accept this client's proof, or tcp.ws_path is not the "
                "server's (a proxy in between may also refuse WebSocket)")
    raise UpgradeRefused("the server's answer to the WebSocket upgrade is not HTTP")


def accept_upgrade(head: bytes) -> tuple[ServerProtocol, bytes] | None:
    """The server's protocol object and its ``101`` for the Upgrade request ``head``, or
    None if ``head`` is not a valid WebSocket upgrade."""
    ws = ServerProtocol(max_size=MAX_MESSAGE)
    try:
        ws.receive_data(head)
        events = ws.events_received()
    except (InvalidHandshake, InvalidMessage, ValueError):
        return None
    if not events or not isinstance(events[0], Request):
        return None
    response = ws.accept(events[0])
    if response.status_code != 101:
        return None
    if "Server" in response.headers:
        del response.headers["Server"]  # names the library; an upgrade needs none
    ws.send_response(response)
    return ws, b"".join(ws.data_to_send())
