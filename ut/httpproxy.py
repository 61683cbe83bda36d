"""Reaching the server through an HTTP proxy: ``CONNECT host:port`` (``tcp.proxy``).

Some networks let nothing out but HTTP(S) through a proxy. A client with ``tcp.proxy:
http://proxy:3128`` (or ``env``: the usual ``HTTPS_PROXY``/``https_proxy`` variable)
opens each lane's TCP connection to the proxy and asks it for a tunnel to the server
(``CONNECT``, RFC 9110 section 9.3.6); TLS, WebSocket and the lane then run through that
tunnel as over a direct connection. h11 writes the request and reads the answer.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
from urllib.parse import unquote, urlsplit

import h11

__all__ = ["ProxyError", "connect_through", "parse_proxy"]

_HEAD_LIMIT = 16384


class ProxyError(ConnectionError):
    """The proxy did not open the tunnel (its status and reason are in the message)."""


def parse_proxy(value: str | None, environ: dict[str, str] | None = None
                ) -> tuple[str, int, str | None] | None:
    """``(host, port, basic-auth credentials or None)`` for ``tcp.proxy``: ``None`` or
    ``""`` (direct), ``env`` (``HTTPS_PROXY`` / ``https_proxy``, direct if unset), or an
    ``http://[user:password@]host:port`` URL. ``ValueError`` for anything else."""
    if not value:
        return None
    if value == "env":
        env = os.environ if environ is None else environ
        value = env.get("HTTPS_PROXY") or env.get("https_proxy") or ""
        if not value:
            return None
    url = urlsplit(value if "://" in value else f"http://{value}")
    if url.scheme != "http" or not url.hostname:
        raise ValueError(f"a proxy must be http://host:port, got {value[:60]!r}")
    auth = None
    if url.username is not None:
        auth = f"{unquote(url.username)}:{unquote(url.password or '')}"
    return url.hostname, url.port or 8080, auth


async def connect_through(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                          target: tuple[str, int], auth: str | None, timeout: float) -> bytes:
    """Ask the proxy connected on ``sock`` for a tunnel to ``target``; returns any bytes
    the proxy sent past its answer (normally none). ``ProxyError`` if it refuses."""
    host, port = target
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=_HEAD_LIMIT)
    headers = [("Host", authority)]
    if auth is not None:
        headers.append(("Proxy-Authorization",
                        "Basic " + base64.b64encode(auth.encode()).decode("ascii")))
    await loop.sock_sendall(sock, conn.send(h11.Request(method="CONNECT", target=authority,
                                                        headers=headers)))
    deadline = loop.time() + timeout
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise ProxyError(f"the proxy's answer to CONNECT is not HTTP: {exc}") from None
        if isinstance(event, h11.Response):
            if not 200 <= event.status_code < 300:
                reason = event.reason.decode("latin-1", "replace")[:60]
                raise ProxyError(f"the proxy refused CONNECT {authority}: "
                                 f"{event.status_code} {reason}")
            return bytes(conn.trailing_data[0])
        if isinstance(event, h11.InformationalResponse):
            continue
        if event is h11.NEED_DATA:
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError("the proxy did not answer CONNECT in time")
            data = await asyncio.wait_for(loop.sock_recv(sock, 4096), left)
            if not data:
                raise ProxyError("the proxy closed the connection instead of answering CONNECT")
            conn.receive_data(data)
        else:
            raise ProxyError(f"unexpected answer from the proxy: {event!r}"[:120])
