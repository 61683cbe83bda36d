"""The metrics endpoint's HTTP side: h11 parses, a small asyncio protocol does the I/O.

Theory of operation: ``h11`` (the sans-I/O HTTP/1.1 library ``wsproto`` and
``httpcore`` build on) reads the request head and writes the response head;
``_Connection`` only wires ``data_received`` -> ``h11.Connection.receive_data``
and h11's bytes -> the transport, and keeps the clocks. It runs in the tunnel's
own event loop (uvloop or asyncio), with no thread: a scrape reads the counters
between two callbacks of the forwarding code, so every scrape is a consistent
snapshot and there is no lock anywhere.

One request per connection, always answered with ``Connection: close``. A slow
or hostile client holds a bounded amount of memory for a bounded time and never
blocks the loop:

- at most ``max_connections`` connections at once; one more is closed at once,
  unanswered;
- the request head (request line and headers) must be complete within
  ``read_timeout`` seconds of the connection's start, a deadline rather than an
  idle timer, so trickling bytes does not extend it (408 otherwise), and within
  ``max_request_bytes`` bytes (431 otherwise): at most that many bytes are ever
  handed to h11, so the limit holds however the bytes are split into reads;
- the client has ``write_timeout`` seconds to take the whole answer;
- then a lingering close of at most ``linger_timeout`` seconds and 64 KiB of
  discarded input (a request body is never read).

A connection's life, in one table (``_State``)::

    HEAD     reading the request head    -> WRITING: request (200/404/405/500), head
                                            h11 refuses (400, 431, ...), head too
                                            large (431), read deadline (408)
                                         -> gone (abort): EOF or error first
    WRITING  the answer is in the        -> LINGER: the kernel has all of it
             transport's buffer          -> gone (abort): write deadline
    LINGER   our FIN sent; what the      -> gone (close): the client's EOF
             client still sends is       -> gone (abort): linger deadline, or
             read and dropped               more than 64 KiB dropped

The lingering close keeps a response from being destroyed by a reset when the
client had sent more than we read (a POST body): RFC 9112 section 9.6.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from http import HTTPStatus
from typing import cast

import h11

from .logs import event

__all__ = ["HttpEndpoint"]

MAX_REQUEST_BYTES = 8192
READ_TIMEOUT_SECONDS = 5.0
WRITE_TIMEOUT_SECONDS = 10.0
LINGER_TIMEOUT_SECONDS = 1.0
MAX_CONNECTIONS = 16
# Input dropped after the request head (a body, pipelined junk) before we give up
# on a clean close.
LINGER_MAX_BYTES = 65536

_TEXT = "text/plain; charset=utf-8"


class _State(enum.Enum):
    HEAD = "head"
    WRITING = "writing"
    LINGER = "linger"
    GONE = "gone"


class HttpEndpoint:
    """Serves ``body()`` for GET and HEAD of ``path`` over HTTP/1.1, hardened as the
    module docstring says; subclasses override ``body`` (``ut.metrics.MetricsServer``).

    ``scrapes`` counts the successful GETs of ``path``.
    """

    content_type = _TEXT

    def __init__(
        self,
        path: str = "/metrics",
        *,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        read_timeout: float = READ_TIMEOUT_SECONDS,
        write_timeout: float = WRITE_TIMEOUT_SECONDS,
        linger_timeout: float = LINGER_TIMEOUT_SECONDS,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.path = path
        self.max_request_bytes = max_request_bytes
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self.linger_timeout = linger_timeout
        self.max_connections = max_connections
        self.host = ""
        self.port = 0
        self.scrapes = 0
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[_Connection] = set()

    def body(self) -> bytes:
        """The response body of one GET of ``path`` (read now, on the loop)."""
        raise NotImplementedError

    @property
    def connections(self) -> int:
        """Connections open now (at most ``max_connections``)."""
        return len(self._conns)

    @property
    def url(self) -> str:
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}{self.path}"

    async def start(self, host: str, port: int) -> None:
        """Listen on ``host:port`` (port 0 picks a free one); OSError if it cannot bind."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self, loop), host, port)
        sockname = self._server.sockets[0].getsockname()
        self.host, self.port = sockname[0], sockname[1]

    async def close(self) -> None:
        """Stop listening and drop open connections; calling it again does nothing."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for conn in list(self._conns):
            conn.abort()
        # connection_lost() runs from the loop's next iterations.
        for _ in range(100):
            if not self._conns:
                break
            await asyncio.sleep(0)
        try:
            await asyncio.wait_for(server.wait_closed(), 5.0)
        except asyncio.TimeoutError:
            pass


class _Connection(asyncio.Protocol):
    """One client connection: h11 for the bytes, ``_State`` for its life."""

    def __init__(self, endpoint: HttpEndpoint, loop: asyncio.AbstractEventLoop) -> None:
        self._endpoint = endpoint
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._h11 = h11.Connection(
            h11.SERVER, max_incomplete_event_size=endpoint.max_request_bytes)
        self._state = _State.HEAD
        self._fed = 0  # head bytes handed to h11, at most max_request_bytes
        self._dropped = 0  # bytes read after the head and thrown away
        self._peer_eof = False
        self._timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's does not subclass asyncio.Transport).
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        ep = self._endpoint
        if len(ep._conns) >= ep.max_connections:
            self._state = _State.GONE
            transport.abort()  # no reading, no writing, no waiting
            return
        ep._conns.add(self)
        # resume_writing() once the kernel has taken the whole answer.
        transport.set_write_buffer_limits(high=0)
        self._arm(ep.read_timeout)

    def data_received(self, data: bytes) -> None:
        if self._state is _State.HEAD:
            self._feed_head(data)
        elif self._state in (_State.WRITING, _State.LINGER):
            self._drop(len(data))

    def eof_received(self) -> bool:
        if self._state is _State.WRITING:
            self._peer_eof = True  # half-closed: it still reads the answer
            return True
        if self._state is _State.LINGER:
            self._finish(clean=True)
        else:
            self.abort()  # gone before it asked
        return True

    def pause_writing(self) -> None:
        pass  # the write deadline is already running

    def resume_writing(self) -> None:
        if self._state is _State.WRITING:
            self._sent()

    def connection_lost(self, exc: Exception | None) -> None:
        self._state = _State.GONE
        self._disarm()
        self._endpoint._conns.discard(self)

    # -- the request head --------------------------------------------------------
    def _feed_head(self, data: bytes) -> None:
        if not self._fed:
            # Blank lines before the request line are ignored (RFC 9112 section 2.2);
            # h11 would refuse them.
            data = data.lstrip(b"\r\n")
            if not data:
                return
        limit = self._endpoint.max_request_bytes
        chunk = data[: limit - self._fed]
        self._fed += len(chunk)
        self._h11.receive_data(chunk)
        try:
            event = self._h11.next_event()
        except h11.RemoteProtocolError as exc:
            self._reply(exc.error_status_hint)  # 400 mostly; 431, 501 where h11 says so
            return
        if isinstance(event, h11.Request):
            self._answer(event)
            self._drop(len(data) - len(chunk))  # the start of a body we never read
        elif self._fed >= limit:
            self._reply(431)

    def _answer(self, request: h11.Request) -> None:
        method = request.method
        target = request.target.split(b"?", 1)[0]
        ep = self._endpoint
        if method not in (b"GET", b"HEAD"):
            self._reply(405, extra=[("Allow", "GET, HEAD")])
        elif target.decode("latin-1") != ep.path:
            self._reply(404, head_only=method == b"HEAD")
        else:
            try:
                body = ep.body()
            except Exception as exc:  # an embedding program's collector, say
                event("metrics_scrape_error", logging.ERROR, err=f"{type(exc).__name__}: {exc}")
                self._reply(500)
                return
            ep.scrapes += 1
            self._reply(200, body, head_only=method == b"HEAD", content_type=ep.content_type)

    # -- the answer and the close ------------------------------------------------
    def _reply(
        self, status: int, body: bytes | None = None, *, head_only: bool = False,
        extra: list[tuple[str, str]] | None = None, content_type: str = _TEXT,
    ) -> None:
        """Answer and close; ``body`` defaults to the status phrase ("not found\\n")."""
        assert self._transport is not None
        self._disarm()
        self._state = _State.WRITING
        phrase = HTTPStatus(status).phrase
        if body is None:
            body = phrase.lower().encode("ascii") + b"\n"
        headers = [("Content-Type", content_type), ("Content-Length", str(len(body))),
                   ("Connection", "close"), *(extra or ())]
        try:
            head = self._h11.send(h11.Response(
                status_code=status, headers=headers, reason=phrase))
        except h11.LocalProtocolError:  # pragma: no cover - h11 refusing our own answer
            self.abort()
            return
        self._transport.write(head)
        if not head_only:
            # Not through h11.send(Data): it would copy the body once more; the
            # Content-Length above frames it.
            self._transport.write(body)
        if self._transport.get_write_buffer_size() == 0:
            self._sent()
        else:
            self._arm(self._endpoint.write_timeout)

    def _sent(self) -> None:
        """The kernel has the whole answer: half-close, then wait for the client's EOF."""
        assert self._transport is not None
        self._disarm()
        self._state = _State.LINGER
        if self._transport.can_write_eof():
            self._transport.write_eof()
        if self._peer_eof:
            self._finish(clean=True)
        else:
            self._arm(self._endpoint.linger_timeout)

    def _drop(self, n: int) -> None:
        self._dropped += n
        if self._dropped > LINGER_MAX_BYTES:
            self.abort()

    def _finish(self, *, clean: bool) -> None:
        if self._transport is None or self._state is _State.GONE:
            return
        self._state = _State.GONE
        self._disarm()
        if clean:
            self._transport.close()
        else:
            self._transport.abort()

    def abort(self) -> None:
        self._finish(clean=False)

    # -- clocks ---------------------------------------------------------------------
    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._timer = self._loop.call_later(seconds, self._deadline)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _deadline(self) -> None:
        self._timer = None
        if self._state is _State.HEAD:
            self._reply(408)
        else:
            self.abort()  # did not read the answer, or did not hang up, in time
