"""The server's gate for ``tls.client_auth: proof``: is a new connection a client?

``ProofGate.accept`` replaces the TLS handshake of ``TlsTransport.accept``:

1. wait for the first byte (``MSG_PEEK``, at most the face's ``header_timeout``, nginx's 60 s); a
   first byte that is not a TLS handshake goes to the web face's ``plain`` answer;
2. the TLS handshake, with no CertificateRequest (the context verifies nothing);
3. the first request head, at most ``PROOF_WAIT_SECONDS`` (or ``tcp.hello_timeout_seconds``
   if shorter) after the handshake,
   judged by ``ut.proof.ProofVerifier`` against this connection's channel binding;
4. a proven client: the lane becomes the transport's protocol, its identity (the
   certificate's CN) is set, and the bytes after the head (its HELLO) are fed to it;
   anything else: the web face takes the connection and what it sent (``WebFace.take``)
   and ``NotAClient`` says why (``handed_off``: the connection is no longer ours to close).

A refusal is counted and logged by the server, as for a handshake refusal.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import Any

from .proof import HEAD_LIMIT, PROOF_START, ProofVerifier, head_end
from .webface import WebFace

__all__ = ["HeadReader", "NotAClient", "ProofGate"]

_TLS_HANDSHAKE = 0x16  # the content type of a TLS handshake record
# A client writes its proof right behind its last handshake message, so it arrives within
# a round trip or one retransmission; longer silence is a visitor's, and the web face's
# own timers (nginx's 60 s) take over. Kept short so a silent prober is closed when a web
# server would close it (63 s against nginx's 60).
PROOF_WAIT_SECONDS = 3.0


class NotAClient(Exception):
    """The connection went to the web face (or closed): ``reason`` is ``no_proof`` (a
    visitor), ``not_tls``, ``timeout``, ``closed`` or one of ``ut.proof.PROOF_REASONS``."""

    def __init__(self, reason: str, text: str, *, handed_off: bool) -> None:
        super().__init__(text)
        self.reason = reason
        self.text = text
        self.handed_off = handed_off


class HeadReader(asyncio.Protocol):
    """Collects a connection's first bytes until a request head is complete."""

    def __init__(self, judge_early: bool = True) -> None:
        self.buf = bytearray()
        self.done = asyncio.get_running_loop().create_future()
        self.transport: Any = None
        self.judge_early = judge_early  # stop at bytes that cannot start a proof request

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.done.done() and (
            head_end(self.buf) > 0 or len(self.buf) >= HEAD_LIMIT
            or (self.judge_early and not self.buf.startswith(PROOF_START[:len(self.buf)]))
        ):
            self.done.set_result(True)

    def eof_received(self) -> bool:
        if not self.done.done():
            self.done.set_result(False)
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.done.done():
            self.done.set_result(False)


async def _first_byte(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                      timeout: float) -> bytes:
    """The connection's first byte, left in the socket (``b""``: closed or timed out)."""
    ready = loop.create_future()

    def readable() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(sock.fileno(), readable)
    try:
        await asyncio.wait_for(ready, timeout)
    except (TimeoutError, asyncio.TimeoutError):
        return b""
    finally:
        loop.remove_reader(sock.fileno())
    try:
        return sock.recv(1, socket.MSG_PEEK)
    except OSError:
        return b""


class ProofGate:
    """Admits proven clients as lanes, hands everything else to ``face``."""

    def __init__(self, verifier: ProofVerifier, face: WebFace, tcp: Any) -> None:
        self.verifier = verifier
        self.face = face
        self.tcp = tcp
        # tcp.transport: tls (lanes are TLS), wss (WebSocket over our TLS) or ws (WebSocket
        # behind a reverse proxy that terminated TLS: no TLS here).
        self.kind = getattr(tcp, "transport", "tls")
        self.ws_path = getattr(tcp, "ws_path", "") if self.kind != "tls" else ""

    async def accept(self, loop: asyncio.AbstractEventLoop, protocol: Any,
                     sock: socket.socket, ssl_context: ssl.SSLContext) -> Any:
        """``protocol``'s transport once it proved to be a client (``ssl_context`` with no
        CertificateRequest: ``ut.tls.server_context(client_auth="proof")``); else
        ``NotAClient``. For WebSocket lanes the transport is a ``ut.wslane.WsLink``."""
        reader = HeadReader()
        if self.kind == "ws":  # plain HTTP from the reverse proxy on loopback
            transport, _ = await loop.connect_accepted_socket(lambda: reader, sock)
        else:
            first = await _first_byte(loop, sock, self.face.header_timeout)
            if not first:
                raise NotAClient("closed", "closed or silent before TLS", handed_off=False)
            if first[0] != _TLS_HANDSHAKE:
                self.face.plain(loop, sock)
                raise NotAClient("not_tls", "not TLS: answered as a web server", handed_off=True)
            transport, _ = await loop.connect_accepted_socket(
                lambda: reader, sock, ssl=ssl_context,
                ssl_handshake_timeout=self.face.header_timeout,
            )
        t_tls = loop.time()
        try:
            await asyncio.wait_for(asyncio.shield(reader.done),
                                   min(PROOF_WAIT_SECONDS, self.tcp.hello_timeout_seconds))
        except (TimeoutError, asyncio.TimeoutError):
            pass
        except asyncio.CancelledError:
            transport.abort()
            raise
        if transport.is_closing():
            raise NotAClient("closed", "closed before a request", handed_off=False)
        data = bytes(reader.buf)
        if self.kind == "tls":
            obj = transport.get_extra_info("ssl_object")
            binding = (obj.get_channel_binding("tls-unique") if obj is not None else None) or b""
        else:
            binding = b""  # WebSocket proofs are not bound: a proxy may terminate TLS
        result = self.verifier.check(data, host=None, binding=binding, prefix=self.ws_path)
        upgrade = None
        if result.ok and self.kind != "tls":
            from .wslane import accept_upgrade

            upgrade = accept_upgrade(data[:len(data) - len(result.rest)])
            if upgrade is None:
                result = result.__class__(None, "bad_proof", "a proof, but no WebSocket upgrade")
        if not result.ok:
            self.face.take(loop, transport, data, loop.time() - t_tls)
            raise NotAClient(result.reason, result.text, handed_off=True)
        protocol.client_cn = result.cn
        if upgrade is not None:
            from .wslane import WsLink

            ws, answer = upgrade
            transport.write(answer)  # 101 Switching Protocols
            link = WsLink(ws, transport)
            link.attach(protocol, result.rest)
            return link
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if result.rest:  # the client's HELLO, sent with its proof
            protocol.feed(result.rest)
        return transport
