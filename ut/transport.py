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
from typing import TYPE_CHECKING, Any, Protocol

from .tcpsock import set_lane_liveness, set_tcp_options, tune_connected_lane
from .tls import ClientContext, peer_cn

if TYPE_CHECKING:  # tls.client_auth: proof only; cryptography is imported when used
    from .gate import ProofGate
    from .proof import ClientProver

__all__ = ["LaneTransport", "TlsTransport", "client_transport", "server_transport"]


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

    def __init__(self, ssl_context: Any, tcp: Any, *, server_hostname: str | None = None,
                 prover: ClientProver | None = None, gate: ProofGate | None = None) -> None:
        self.ssl_context = ssl_context
        self.tcp = tcp
        self.server_hostname = server_hostname
        # tls.client_auth: proof. Client: the proof written first on each lane; server:
        # the gate that takes the handshake and sends non-clients to the web face.
        self.prover = prover
        self.gate = gate
        self.kind = getattr(tcp, "transport", "tls")  # tls / wss / ws (docs/config.md)
        # Client: (host, port, credentials) of the HTTP proxy lanes go through, or None.
        self.proxy: tuple[str, int, str | None] | None = None
        self._remembered_from: Any = None  # the lane transport whose session is offered

    # -- client ---------------------------------------------------------------------
    async def connect(self, loop: asyncio.AbstractEventLoop, addr: tuple[str, int]) -> socket.socket:
        """A TCP connection to ``addr`` (host, port) with the lane's socket options; with
        ``tcp.proxy``, a tunnel to it through the HTTP proxy (``CONNECT``)."""
        tcp = self.tcp
        proxy = self.proxy
        target = addr
        if proxy is not None:
            addr = proxy[:2]
        infos = await loop.getaddrinfo(*addr, type=socket.SOCK_STREAM)
        family, _, _, _, sockaddr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            set_tcp_options(sock, tcp.tcp_nodelay)
            set_lane_liveness(sock)  # notice a dead path (TCP_USER_TIMEOUT, keepalive)
            await asyncio.wait_for(loop.sock_connect(sock, sockaddr), tcp.connect_timeout_seconds)
            tune_connected_lane(sock, tcp)  # after the SYN: the usual window scale
            if proxy is not None:
                from .httpproxy import connect_through

                extra = await connect_through(loop, sock, target, proxy[2],
                                              tcp.connect_timeout_seconds)
                if extra:  # a proxy must not speak for the server before TLS starts
                    raise ConnectionError("the proxy sent data after opening the tunnel")
        except BaseException:
            sock.close()
            raise
        return sock

    async def secure(self, loop: asyncio.AbstractEventLoop, protocol: asyncio.BaseProtocol,
                     sock: socket.socket) -> asyncio.BaseTransport:
        """The TLS handshake over ``sock``; ``protocol`` (the lane) gets the transport
        (with ``tcp.transport: wss``, a WebSocket link over it)."""
        if self.kind == "wss":
            return await self._secure_ws(loop, protocol, sock)
        transport, _ = await loop.create_connection(
            lambda: protocol, sock=sock, ssl=self.ssl_context,
            server_hostname=self.server_hostname,
            ssl_handshake_timeout=self.tcp.connect_timeout_seconds,
        )
        if self.prover is not None:
            # The proof goes first, bound to this TLS connection; the lane's HELLO follows
            # in the same flight (no round trip added).
            obj = transport.get_extra_info("ssl_object")
            binding = (obj.get_channel_binding("tls-unique") if obj is not None else None) or b""
            host = self.server_hostname or str(sock.getpeername()[0])
            transport.write(self.prover.request(host, binding))
        return transport

    async def _secure_ws(self, loop: asyncio.AbstractEventLoop, protocol: asyncio.BaseProtocol,
                         sock: socket.socket) -> Any:
        """TLS, then the WebSocket upgrade (carrying the proof, unbound: a reverse proxy
        may terminate TLS); the lane reads and writes through a ``ut.wslane.WsLink``."""
        from .gate import HeadReader
        from .wslane import UpgradeRefused, WsLink, finish_upgrade, upgrade_request

        reader = HeadReader(judge_early=False)
        transport, _ = await loop.create_connection(
            lambda: reader, sock=sock, ssl=self.ssl_context,
            server_hostname=self.server_hostname,
            ssl_handshake_timeout=self.tcp.connect_timeout_seconds,
        )
        try:
            host = self.server_hostname or str(sock.getpeername()[0])
            assert self.prover is not None  # wss needs tls.client_auth: proof (config)
            target, authorization = self.prover.proof(host, b"", prefix=self.tcp.ws_path)
            ws, request = upgrade_request(host, target, authorization)
            transport.write(request)
            await asyncio.wait_for(asyncio.shield(reader.done), self.tcp.hello_timeout_seconds)
            if not reader.done.result() and not reader.buf:
                raise UpgradeRefused("the server closed the connection instead of answering "
                                     "the WebSocket upgrade")
            finish_upgrade(ws, bytes(reader.buf))
        except BaseException:
            transport.abort()
            raise
        link = WsLink(ws, transport)
        link.attach(protocol)
        return link

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
        """The server's TLS handshake over an accepted ``sock`` (with a gate: the
        handshake and the client's proof; ``ut.gate.NotAClient`` if it is not a client)."""
        if self.gate is not None:
            return await self.gate.accept(loop, protocol, sock, self.ssl_context)
        transport, _ = await loop.connect_accepted_socket(
            lambda: protocol, sock, ssl=self.ssl_context,
            ssl_handshake_timeout=self.tcp.connect_timeout_seconds,
        )
        return transport

    def peer_identity(self, transport: Any) -> str:
        """The client's name: its verified certificate's CN (``ValueError`` if none);
        with a gate, the CN its proof carried (set on the lane by the gate)."""
        if self.gate is not None:
            cn = getattr(transport.get_protocol(), "client_cn", "")
            if not cn:
                raise ValueError("no proven identity")
            return str(cn)
        return peer_cn(transport)


def client_transport(config: Any, ssl_context: Any, server_hostname: str | None) -> TlsTransport:
    """The client's lane transport for ``config`` (``tls.client_auth`` says whether each
    lane starts with a proof)."""
    prover = None
    if config.tls.client_auth == "proof":
        from .proof import ClientProver

        prover = ClientProver(config.tls.ca_cert, config.tls.cert, config.tls.key)
    if config.tcp.transport == "wss":
        # A WebSocket upgrade is HTTP/1.1: offering h2 would let a proxy in front pick it.
        ssl_context.set_alpn_protocols(["http/1.1"])
    t = TlsTransport(ssl_context, config.tcp, server_hostname=server_hostname, prover=prover)
    if config.tcp.proxy:
        from .httpproxy import parse_proxy

        t.proxy = parse_proxy(config.tcp.proxy)
    return t


def server_transport(config: Any, count_web_answer: Any = None) -> TlsTransport:
    """The server's lane transport for ``config``: its TLS context, and with
    ``tls.client_auth: proof`` the gate and web face (``fallback:``);
    ``count_web_answer(answer)`` counts the web face's answers."""
    from .addr import parse_addr
    from .tls import server_context

    tls = config.tls
    if tls.client_auth != "proof":
        ctx = server_context(tls.ca_cert, tls.cert, tls.key, alpn=tls.alpn)
        return TlsTransport(ctx, config.tcp)
    from .gate import ProofGate
    from .proof import ProofVerifier
    from .webface import WebFace

    fb = config.fallback
    face = WebFace(
        parse_addr(fb.addr, allow_port_zero=False) if fb.addr else None,
        parse_addr(fb.h2_addr, allow_port_zero=False) if fb.h2_addr else None,
        count=count_web_answer or (lambda answer: None),
    )
    ctx = server_context(tls.ca_cert, tls.cert, tls.key, alpn=face.alpn(tls.alpn),
                         client_auth="proof")
    gate = ProofGate(ProofVerifier(tls.ca_cert), face, config.tcp)
    return TlsTransport(ctx, config.tcp, gate=gate)
