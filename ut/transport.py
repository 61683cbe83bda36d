"""How lane bytes travel: the transport seam.

A lane (``ut.lane.Lane``) reads and writes a byte stream of frames; what carries that
stream is a *lane transport*. Today there is one, ``TlsTransport``: TLS over TCP with
mutual certificates, on asyncio's (or uvloop's) SSL transport. A second one (WebSocket
over TLS), a web face for connections that are not clients, or authentication after the
handshake plug in here, without touching sessions or the hot path: all a lane needs is
an asyncio transport (``write``, ``close``, ``abort``, ``is_closing``,
``get_write_buffer_size``, ``set_write_buffer_limits``, ``get_extra_info("socket")``)
driving its ``BufferedProtocol``, plus the peer's identity.

The interface, both roles:

* client: ``sock = await t.connect(loop, addr)`` (stage "connect": TCP), then
  ``await t.secure(loop, protocol, sock)`` (stage "tls": the lane's transport is up when
  it returns), then ``t.resumed(transport)``/``t.remember(transport)`` for session reuse
  (``t.remembered_from(transport)`` when a lane ends: offer a live lane's session instead);
* server: ``t.accepted(sock)`` (socket options on an accepted TCP connection), then
  ``await t.accept(loop, protocol, sock)``, then ``t.peer_identity(transport)`` (the
  client's name: its certificate CN).
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any, Protocol

from .tcpsock import set_lane_liveness, set_tcp_options, tune_connected_lane
from .tls import ClientContext, peer_cn

__all__ = ["LaneTransport", "TlsTransport"]


class LaneTransport(Protocol):
    """What carries a lane's byte stream (see the module docstring)."""

    name: str

    async def connect(self, loop: asyncio.AbstractEventLoop, addr: tuple[str, int]) -> socket.socket: ...

    async def secure(self, loop: asyncio.AbstractEventLoop, protocol: asyncio.BaseProtocol,
                     sock: socket.socket) -> asyncio.BaseTransport: ...

    def accepted(self, sock: socket.socket) -> None: ...

    async def accept(self, loop: asyncio.AbstractEventLoop, protocol: asyncio.BaseProtocol,
                     sock: socket.socket) -> asyncio.BaseTransport: ...

    def peer_identity(self, transport: Any) -> str: ...

    def resumed(self, transport: Any) -> bool | None: ...

    def remember(self, transport: Any) -> None: ...

    def remembered_from(self, transport: Any) -> bool: ...


class TlsTransport:
    """Lanes as TLS over TCP, mutual certificates (the design's transport).

    ``ssl_context`` is ``ut.tls.client_context`` or ``server_context``; ``tcp`` the
    ``tcp:`` config section (timeouts, ``tcp_nodelay``, ``sock_buf``, ...). A client passes
    ``server_hostname`` (the name verified and sent as SNI).
    """

    name = "tls"

    def __init__(self, ssl_context: Any, tcp: Any, *, server_hostname: str | None = None) -> None:
        self.ssl_context = ssl_context
        self.tcp = tcp
        self.server_hostname = server_hostname
        self._remembered_from: Any = None  # the lane transport whose session is offered

    # -- client ---------------------------------------------------------------------
    async def connect(self, loop: asyncio.AbstractEventLoop, addr: tuple[str, int]) -> socket.socket:
        """A TCP connection to ``addr`` (host, port) with the lane's socket options."""
        tcp = self.tcp
        infos = await loop.getaddrinfo(*addr, type=socket.SOCK_STREAM)
        family, _, _, _, sockaddr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            set_tcp_options(sock, tcp.tcp_nodelay)
            set_lane_liveness(sock)  # notice a dead path (TCP_USER_TIMEOUT, keepalive)
            await asyncio.wait_for(loop.sock_connect(sock, sockaddr), tcp.connect_timeout_seconds)
            tune_connected_lane(sock, tcp)  # after the SYN: the usual window scale
        except BaseException:
            sock.close()
            raise
        return sock

    async def secure(self, loop: asyncio.AbstractEventLoop, protocol: asyncio.BaseProtocol,
                     sock: socket.socket) -> asyncio.BaseTransport:
        """The TLS handshake over ``sock``; ``protocol`` (the lane) gets the transport."""
        transport, _ = await loop.create_connection(
            lambda: protocol, sock=sock, ssl=self.ssl_context,
            server_hostname=self.server_hostname,
            ssl_handshake_timeout=self.tcp.connect_timeout_seconds,
        )
        return transport

    def resumed(self, transport: Any) -> bool | None:
        """Whether the lane resumed an earlier TLS session (None: not known)."""
        obj = transport.get_extra_info("ssl_object") if transport is not None else None
        return None if obj is None else bool(obj.session_reused)

    def remember(self, transport: Any) -> None:
        """Offer this lane's TLS session to the next lanes (call once its peer has
        answered, so TLS 1.3 tickets have arrived); ``None`` offers nothing."""
        if not isinstance(self.ssl_context, ClientContext):
            return
        obj = transport.get_extra_info("ssl_object") if transport is not None else None
        session = obj.session if obj is not None else None
        self.ssl_context.resume_session = session
        self._remembered_from = transport if session is not None else None

    def remembered_from(self, transport: Any) -> bool:
        """Whether the session offered to new lanes is ``transport``'s. The server issues
        stateful tickets (``ut.tls.server_context``) and forgets a connection's session
        when it ends without a clean TLS close, so a lane that dies should not keep
        offering its own."""
        return transport is not None and transport is self._remembered_from

    # -- server ---------------------------------------------------------------------
    def accepted(self, sock: socket.socket) -> None:
        """Socket options on an accepted connection, before its TLS handshake."""
        set_tcp_options(sock, self.tcp.tcp_nodelay)
        # After the TCP handshake, so the SYN-ACK offered the usual window scale (a
        # listener's small SO_RCVBUF would have been inherited before it).
        tune_connected_lane(sock, self.tcp)
        set_lane_liveness(sock)

    async def accept(self, loop: asyncio.AbstractEventLoop, protocol: asyncio.BaseProtocol,
                     sock: socket.socket) -> asyncio.BaseTransport:
        """The server's TLS handshake over an accepted ``sock``."""
        transport, _ = await loop.connect_accepted_socket(
            lambda: protocol, sock, ssl=self.ssl_context,
            ssl_handshake_timeout=self.tcp.connect_timeout_seconds,
        )
        return transport

    def peer_identity(self, transport: Any) -> str:
        """The client's name: its verified certificate's CN (``ValueError`` if none)."""
        return peer_cn(transport)
