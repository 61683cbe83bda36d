"""The web face: what a connection that is not a client gets from a server.

With ``tls.client_auth: proof`` (``ut.proof``) a prober, a scanner or a browser that
connects to the server's port is answered as an HTTPS site would answer it, never by
ut-tunnel's own protocol. Three kinds of answer, counted in
``ut_web_face_connections_total{answer}``:

* ``plain`` — the first byte is not a TLS handshake: answered as nginx answers plain
  HTTP or garbage on its HTTPS port (a ``400`` page, ``Connection: close``; a request
  still incomplete after ``HEADER_TIMEOUT_SECONDS`` is closed without a word).
* ``fallback`` — TLS, and ``fallback.addr`` is set: the connection's decrypted bytes
  (the ones already read included) are relayed both ways to that web server, as trojan
  and Xray do; its timeouts, pages and closes are the answer. ``fallback.h2_addr``
  takes connections that chose HTTP/2 by ALPN (the server only offers ``h2`` when it is
  set: see ``WebFace.alpn``).
* ``site`` — TLS and no fallback: a small built-in static site answering like a stock
  nginx with ``server_tokens off``: ``/`` is a welcome page, other paths ``404``, other
  methods ``405``, garbage ``400`` and close, ``HEADER_TIMEOUT_SECONDS`` for a request
  and ``KEEPALIVE_SECONDS`` between requests.

Nothing in any answer names ut-tunnel. At most ``MAX_CONNECTIONS`` web connections are
kept; a new one beyond that closes the oldest. Near the file descriptor limit a web
connection whose descriptor, or whose relay's descriptor towards the fallback, would be
``fd_ceiling`` or above is closed at once (``refused`` is called): the server sets that
ceiling below its lanes' (``ut.server.WEB_FD_RESERVE``), so at the limit the web face
gives way before a client's lanes and the metrics endpoint do.
"""

from __future__ import annotations

import asyncio
import email.utils
import errno
import socket
import time
from collections.abc import Callable
from typing import Any

import h11

__all__ = [
    "ANSWERS",
    "HEADER_TIMEOUT_SECONDS",
    "KEEPALIVE_SECONDS",
    "MAX_CONNECTIONS",
    "WebFace",
    "page",
]

#: nginx's defaults: ``client_header_timeout`` (also its TLS handshake's) and
#: ``keepalive_timeout``.
HEADER_TIMEOUT_SECONDS = 60.0
KEEPALIVE_SECONDS = 75.0
MAX_CONNECTIONS = 512
ANSWERS: tuple[str, ...] = ("plain", "fallback", "site")
_READ_LIMIT = 16384  # bytes of a request head read before answering 400
_RELAY_HIGH = 256 * 1024  # a relay stops reading one side while the other holds this much

_STARTED = time.time()
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Not Allowed", 502: "Bad Gateway"}
# A request line starts with a method: nginx answers 400 at the first byte that
# cannot be one (ngx_http_parse_request_line), without waiting for a whole line.
_METHOD_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ_-")

WELCOME = b"""<!DOCTYPE html>
<html>
<head>
<title>Welcome to nginx!</title>
<style>
html { color-scheme: light dark; }
body { width: 35em; margin: 0 auto;
font-family: Tahoma, Verdana, Arial, sans-serif; }
</style>
</head>
<body>
<h1>Welcome to nginx!</h1>
<p>If you see this page, the nginx web server is successfully installed and
working. Further configuration is required.</p>

<p>For online documentation and support please refer to
<a href="http://nginx.org/">nginx.org</a>.<br/>
Commercial support is available at
<a href="http://nginx.com/">nginx.com</a>.</p>

<p><em>Thank you for using nginx.</em></p>
</body>
</html>
"""


def page(status: int, detail: str = "") -> bytes:
    """nginx's built-in error page for ``status`` (``server_tokens off``)."""
    title = f"{status} {detail or _REASONS[status]}"
    line = f"<center>{detail}</center>\r\n" if detail else ""
    return (
        f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n"
        f"<center><h1>{status} {_REASONS[status]}</h1></center>\r\n{line}"
        "<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
    ).encode()


def _head(status: int, length: int, *, close: bool, extra: str = "") -> bytes:
    return (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\nServer: nginx\r\n"
        f"Date: {email.utils.formatdate(usegmt=True)}\r\nContent-Type: text/html\r\n"
        f"Content-Length: {length}\r\n{extra}"
        f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n"
    ).encode()


def _response(status: int, *, close: bool, head_only: bool = False, detail: str = "") -> bytes:
    if status == 200:
        extra = (f"Last-Modified: {email.utils.formatdate(_STARTED, usegmt=True)}\r\n")
        etag = f'ETag: "{int(_STARTED):x}-{len(WELCOME):x}"\r\nAccept-Ranges: bytes\r\n'
        head = _head(200, len(WELCOME), close=close, extra=extra)
        head = head[:-2] + etag.encode() + b"\r\n"
        return head if head_only else head + WELCOME
    body = page(status, detail)
    return _head(status, len(body), close=close) + (b"" if head_only else body)


def _garbage(buf: bytes | bytearray) -> bool:
    """Whether ``buf`` (the start of a request) already cannot be HTTP, as nginx judges it."""
    for i, byte in enumerate(buf):
        if byte == 0x20 and i > 0:
            return False  # a method and its space: wait for the line
        if byte not in _METHOD_BYTES:
            return True
    return False


class WebFace:
    """Answers connections that are not clients (see the module docstring).

    ``fallback``/``fallback_h2``: ``(host, port)`` of a plain-HTTP web server (HTTP/1.1
    and HTTP/2 with prior knowledge), or ``None`` for the built-in site. ``count`` is
    called with the answer's kind (``ANSWERS``).
    """

    def __init__(self, fallback: tuple[str, int] | None = None,
                 fallback_h2: tuple[str, int] | None = None,
                 count: Callable[[str], None] = lambda answer: None) -> None:
        self.fallback = fallback
        self.fallback_h2 = fallback_h2
        self.count = count
        # nginx's defaults; tests shorten them (with the reference nginx's).
        self.header_timeout = HEADER_TIMEOUT_SECONDS
        self.keepalive = KEEPALIVE_SECONDS
        self._open: dict[Any, None] = {}  # web connections, oldest first
        self._tasks: set[asyncio.Task] = set()
        # Descriptors numbered this or above are not for the web face (set by the server
        # from RLIMIT_NOFILE); ``refused()`` is called for each connection closed for it.
        self.fd_ceiling = 1 << 30
        self.refused: Callable[[], None] = lambda: None

    def alpn(self, configured: tuple[str, ...]) -> tuple[str, ...]:
        """The ALPN list the server offers: ``configured`` (``tls.alpn``) less ``h2``
        unless an HTTP/2 fallback can answer it (an ordinary server that does not speak
        HTTP/2 does not select it)."""
        if self.fallback_h2 is not None:
            return configured
        return tuple(p for p in configured if p != "h2")

    def __len__(self) -> int:
        return len(self._open)

    # -- bookkeeping -------------------------------------------------------------------
    def _admit(self, handle: Any) -> None:
        while len(self._open) >= MAX_CONNECTIONS:
            oldest = next(iter(self._open))
            del self._open[oldest]
            oldest.abort()
        self._open[handle] = None

    def _forget(self, handle: Any) -> None:
        self._open.pop(handle, None)

    def _over_ceiling(self, sock: socket.socket | None) -> bool:
        if sock is None or sock.fileno() < self.fd_ceiling:
            return False
        self.refused()
        return True

    def close(self) -> None:
        """Drop every web connection (server shutdown)."""
        for handle in list(self._open):
            handle.abort()
        self._open.clear()
        for task in list(self._tasks):
            task.cancel()

    # -- not TLS ----------------------------------------------------------------------
    def plain(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        """Answer a connection whose first byte is not TLS (takes ``sock``)."""
        if self._over_ceiling(sock):
            sock.close()
            return
        self.count("plain")
        task = loop.create_task(self._plain(loop, sock))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _plain(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        handle = _SockHandle(sock)
        self._admit(handle)
        try:
            buf = bytearray()
            deadline = loop.time() + self.header_timeout
            while not _garbage(buf) and b"\n" not in buf and len(buf) < _READ_LIMIT:
                left = deadline - loop.time()
                if left <= 0:
                    return
                try:
                    chunk = await asyncio.wait_for(loop.sock_recv(sock, 4096), left)
                except (TimeoutError, asyncio.TimeoutError, OSError):
                    return
                if not chunk:
                    return
                buf += chunk
            # nginx: a request that parses is "plain HTTP to an HTTPS port"; else 400.
            plain_http = not _garbage(buf) and b" HTTP/" in bytes(buf.split(b"\n", 1)[0])
            answer = _response(400, close=True,
                               detail="The plain HTTP request was sent to HTTPS port" if plain_http else "")
            await asyncio.wait_for(loop.sock_sendall(sock, answer), self.header_timeout)
        except (TimeoutError, asyncio.TimeoutError, OSError):
            pass
        finally:
            self._forget(handle)
            sock.close()

    # -- TLS, not a client ---------------------------------------------------------------
    def take(self, loop: asyncio.AbstractEventLoop, transport: Any, data: bytes,
             waited: float = 0.0) -> None:
        """Answer a TLS connection that is not a client: ``data`` is what it sent so far
        in the ``waited`` seconds since its handshake (its protocol must stop reading into
        anything else; ``take`` sets its own)."""
        if self._over_ceiling(transport.get_extra_info("socket")):
            transport.abort()
            return
        proto = transport.get_extra_info("ssl_object")
        alpn = proto.selected_alpn_protocol() if proto is not None else None
        target = self.fallback_h2 if alpn == "h2" else self.fallback
        if target is None:
            self.count("site")
            site = _Site(self, transport)
            self._admit(site)
            transport.set_protocol(site)
            site.start(data, waited)
            return
        self.count("fallback")
        relay = _Relay(self, transport)
        self._admit(relay)
        transport.set_protocol(relay.front)
        task = loop.create_task(relay.start(loop, target, data))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class _SockHandle:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def abort(self) -> None:
        self.sock.close()


class _Site(asyncio.Protocol):
    """The built-in static site on one TLS connection (h11 parses, we answer)."""

    def __init__(self, face: WebFace, transport: Any) -> None:
        self.face = face
        self.transport = transport
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=_READ_LIMIT)
        self.raw = bytearray()  # the current request's first bytes (for the garbage rule)
        self._request: h11.Request | None = None
        self.timer: asyncio.TimerHandle | None = None

    def start(self, data: bytes, waited: float) -> None:
        self._arm(max(0.0, self.face.header_timeout - waited))
        if data:
            self.data_received(data)

    def _arm(self, seconds: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(seconds, self.abort_quietly)

    def abort_quietly(self) -> None:
        # nginx closes a connection that sent no (complete) request in time, with no answer.
        self.transport.close()

    def abort(self) -> None:
        self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.h11.their_state is h11.IDLE and len(self.raw) < 64:
            self.raw += data[:64]
            if _garbage(self.raw.lstrip(b"\r\n")):
                self._answer(400, close=True)
                return
        try:
            self.h11.receive_data(data)
        except h11.RemoteProtocolError:
            self._answer(400, close=True)
            return
        self._drain()

    def _drain(self) -> None:
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError:
                self._answer(400, close=True)
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                self._request = event
            elif isinstance(event, h11.EndOfMessage) and self._request is not None:
                self._respond(self._request)
                if self.transport.is_closing():
                    return
            elif isinstance(event, h11.ConnectionClosed):
                self.transport.close()
                return

    def _respond(self, req: h11.Request) -> None:
        method = req.method
        path = req.target.split(b"?", 1)[0]
        keep = self._keep_alive(req)
        if method not in (b"GET", b"HEAD"):
            status = 405
        elif path in (b"/", b"/index.html"):
            status = 200
        else:
            status = 404
        self.transport.write(_response(status, close=not keep, head_only=method == b"HEAD"))
        if not keep:
            self.transport.close()
            return
        # h11 tracks the response too; we wrote it ourselves, so start it afresh.
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=_READ_LIMIT)
        self.raw = bytearray()
        self._arm(self.face.keepalive)

    @staticmethod
    def _keep_alive(req: h11.Request) -> bool:
        conn = b",".join(v for k, v in req.headers if k == b"connection").lower()
        if req.http_version == b"1.0":
            return b"keep-alive" in conn
        return b"close" not in conn

    def _answer(self, status: int, *, close: bool) -> None:
        self.transport.write(_response(status, close=close))
        if close:
            self.transport.close()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.face._forget(self)


class _Half(asyncio.Protocol):
    """One side of a relay: what it reads goes to the other side's transport."""

    def __init__(self, relay: _Relay) -> None:
        self.relay = relay
        self.transport: Any = None
        self.other: _Half | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=_RELAY_HIGH)

    def data_received(self, data: bytes) -> None:
        other = self.other
        if other is None or other.transport is None:
            self.relay.pending += data  # the fallback is still connecting
            return
        other.transport.write(data)

    def eof_received(self) -> bool:
        self.relay.end()
        return False

    def pause_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.resume_reading()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.relay.end()


class _Relay:
    """TLS connection <-> fallback web server, bytes both ways, closes both ways."""

    def __init__(self, face: WebFace, transport: Any) -> None:
        self.face = face
        self.front = _Half(self)
        self.front.transport = transport
        self.back = _Half(self)
        self.front.other, self.back.other = self.back, self.front
        self.pending = bytearray()
        self.ended = False

    async def start(self, loop: asyncio.AbstractEventLoop, target: tuple[str, int],
                    data: bytes) -> None:
        self.pending[:0] = data
        try:
            await asyncio.wait_for(self._connect(loop, target), self.face.header_timeout)
        except (OSError, TimeoutError, asyncio.TimeoutError):
            # No fallback to be had: answer as an nginx whose upstream is down would.
            if not self.ended and not self.front.transport.is_closing():
                self.front.transport.write(_response(502, close=True))
                self.front.transport.close()
            self.end()
            return
        if self.ended:
            self.back.transport.close()
            return
        if self.pending:
            self.back.transport.write(bytes(self.pending))
            self.pending.clear()

    async def _connect(self, loop: asyncio.AbstractEventLoop, target: tuple[str, int]) -> None:
        """The relay's connection to the fallback, on a descriptor under the face's
        ceiling (``OSError`` otherwise: the visitor gets the 502 of an upstream down)."""
        infos = await loop.getaddrinfo(*target, type=socket.SOCK_STREAM)
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            if self.face._over_ceiling(sock):
                raise OSError(errno.EMFILE, "file descriptors near the limit: no relay")
            sock.setblocking(False)
            await loop.sock_connect(sock, addr)
            await loop.create_connection(lambda: self.back, sock=sock)
        except BaseException:
            sock.close()
            raise

    def end(self) -> None:
        """One side is gone: flush and close the other."""
        if self.ended:
            return
        self.ended = True
        self.face._forget(self)
        for half in (self.front, self.back):
            if half.transport is not None and not half.transport.is_closing():
                half.transport.close()

    def abort(self) -> None:
        self.ended = True
        for half in (self.front, self.back):
            if half.transport is not None:
                half.transport.abort()
