"""udpmon's sockets: addresses as its command line takes them, name resolution, and
non-blocking UDP sockets with roomy buffers (made by ``ut.udp``)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from ut.addr import parse_addr
from ut.udp import open_udp_socket

# Datagrams read per readable callback: a burst of replies holds the loop for at most
# this many reads, so the probe's sender stays on schedule.
READ_BATCH = 512


def parse_cli_addr(
    text: str, *, default_host: str | None = None, need_port: bool = True
) -> tuple[str, int]:
    """``"host:port"``, ``"[v6]:port"``, ``":port"`` or ``"port"`` -> ``(host, port)``.

    ``":port"`` and ``"port"`` take ``default_host`` (an error without one). Without
    a port (``"127.0.0.1"``, ``"::1"``, ``"[::1]"``) the port is 0 unless
    ``need_port``. :func:`ut.addr.parse_addr` checks host and port; it raises
    ``ValueError``.

    >>> parse_cli_addr("9000", default_host="0.0.0.0")
    ('0.0.0.0', 9000)
    """
    return parse_addr(text, default_host=default_host, default_port=None if need_port else 0)


async def resolve(
    host: str, port: int, family: int = 0, passive: bool = False
) -> tuple[int, tuple[Any, ...]]:
    """The first ``(family, sockaddr)`` that ``getaddrinfo`` gives for UDP to
    ``host:port`` (``passive``: an address to bind to). A name that does not resolve
    raises ``OSError("cannot resolve ...")``, which the CLI prints as it is."""
    loop = asyncio.get_running_loop()
    flags = socket.AI_PASSIVE if passive else 0
    try:
        infos = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_DGRAM, flags=flags)
    except socket.gaierror as e:
        raise OSError(f"cannot resolve {host!r}: {e.strerror or e}") from None
    if not infos:
        raise OSError(f"cannot resolve {host!r}")
    fam, _, _, _, sockaddr = infos[0]
    return fam, sockaddr


# force_buffers: bursts at high rates must not overflow udpmon's own sockets, so as root
# they may pass net.core.rmem_max / wmem_max (ut.udp.set_socket_buffers).


async def open_bound_socket(host: str, port: int) -> socket.socket:
    """A non-blocking UDP socket bound to ``host:port`` (port 0: a free one)."""
    _, sockaddr = await resolve(host, port, passive=True)
    return open_udp_socket(bind=sockaddr, force_buffers=True)


async def open_connected_socket(
    host: str, port: int, bind: tuple[str, int] | None = None
) -> socket.socket:
    """A non-blocking UDP socket connected to ``host:port``; it sends from ``bind``
    when given (resolved in the target's address family)."""
    family, sockaddr = await resolve(host, port)
    local = None
    if bind is not None:
        _, local = await resolve(bind[0], bind[1], family=family, passive=True)
    return open_udp_socket(bind=local, connect=sockaddr, force_buffers=True)
