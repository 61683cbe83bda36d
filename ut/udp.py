"""A non-blocking UDP socket driven by the event loop's reader callback.

Why not ``asyncio.DatagramProtocol``: it costs one Python call per datagram and
offers no batching. Here one wake-up drains up to ``BATCH_MAX`` datagrams with
``fastpath.recv_batch`` (``recvmmsg`` on Linux) and hands them over as one
list; sends go out with ``fastpath.send_batch`` (``sendmmsg``), and on Linux 4.18+ a
run of equal-size datagrams (WireGuard's full-size packets in a bulk transfer)
goes out as one ``UDP_SEGMENT`` (GSO) message: the kernel routes, filters and
loops it back once per run instead of once per datagram (``bench/gso_probe.py``).
With an ``on_kernel_drops`` callback, reads use ``fastpath.recv_batch_with_drops``: the
kernel's per-socket drop counter rides on the datagrams (``ut/sockdrops.py``), so drop
accounting costs no system call and nothing proportional to the number of ports.
The socket is created synchronously, so a server can open a session's port
inside a callback without awaiting.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import sys
from collections.abc import Callable

from . import fastpath
from .logs import event
from .sockdrops import SocketDropCounter, read_socket_drops, watch_socket

BATCH_MAX = 64  # datagrams read per wake-up: bounds latency added to other work
SOCKET_BUF_BYTES = 4 << 20  # ask the kernel for roomy UDP buffers (it may cap lower)

# UT_NO_GSO=1 turns segmentation offload off (for A/B measurements, or a kernel
# that mishandles it); it also turns itself off per port on the first refusal.
GSO_ENV = "UT_NO_GSO"
# What a kernel or route that cannot segment a UDP_SEGMENT message answers.
_GSO_REFUSALS = (errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP)
_gso_off_logged = False

Address = tuple  # (host, port) or (host, port, flowinfo, scope_id)
BatchHandler = Callable[[list], None]  # receives [(payload, addr), ...]


# Linux's SO_RCVBUFFORCE / SO_SNDBUFFORCE (the socket module does not name them): with
# CAP_NET_ADMIN (root) they pass the net.core.rmem_max / wmem_max caps.
_BUF_FORCE = {socket.SO_RCVBUF: 33, socket.SO_SNDBUF: 32} if sys.platform.startswith("linux") else {}


def _family_for(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def set_socket_buffers(sock: socket.socket, nbytes: int = SOCKET_BUF_BYTES, *, force: bool = False) -> None:
    """Ask the kernel for ``nbytes`` of receive and of send buffer on ``sock``.

    The kernel may grant less (Linux caps both at net.core.rmem_max / wmem_max)
    or refuse; either is accepted silently. With ``force``, a capped size is asked
    again with ``SO_RCVBUFFORCE`` / ``SO_SNDBUFFORCE``, which pass the caps for
    root (CAP_NET_ADMIN) on Linux and fail quietly for everyone else.
    """
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, nbytes)
            # Linux reports twice the size set: less than asked means capped by *mem_max.
            if force and opt in _BUF_FORCE and sock.getsockopt(socket.SOL_SOCKET, opt) < nbytes:
                sock.setsockopt(socket.SOL_SOCKET, _BUF_FORCE[opt], nbytes)
        except OSError:
            pass


def open_udp_socket(
    bind: tuple[str, int] | None = None,
    connect: tuple[str, int] | None = None,
    *,
    force_buffers: bool = False,
) -> socket.socket:
    """A non-blocking UDP socket, bound and/or connected.

    Its buffers are :data:`SOCKET_BUF_BYTES` each where the kernel allows
    (``force_buffers``: see :func:`set_socket_buffers`).
    """
    host = (bind or connect or ("0.0.0.0", 0))[0]
    family = _family_for(host) if host else socket.AF_INET
    if connect is not None and bind is None:
        # Resolve the connect target so the socket family matches it.
        family = socket.getaddrinfo(connect[0], connect[1], type=socket.SOCK_DGRAM)[0][0]
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        set_socket_buffers(sock, force=force_buffers)
        if bind is not None:
            sock.bind(bind)
        if connect is not None:
            sock.connect(connect)
    except BaseException:
        sock.close()
        raise
    return sock


class UdpPort:
    """One UDP socket: batched reads into ``on_batch``, batched writes.

    ``on_error(exc)`` is called for a read error (for example ICMP port
    unreachable reported on a connected socket); the port keeps running.
    ``on_kernel_drops(n)`` is called with datagrams the kernel dropped at the socket
    because it was full (Linux): with the first datagram read after them, and at close.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        on_batch: BatchHandler,
        on_error: Callable[[OSError], None] | None = None,
        on_kernel_drops: Callable[[int], None] | None = None,
    ) -> None:
        self.loop = loop
        self.sock = sock
        self.on_batch = on_batch
        self.on_error = on_error
        self._drops: SocketDropCounter | None = (
            watch_socket(sock, on_kernel_drops) if on_kernel_drops is not None else None
        )
        self._fd = sock.fileno()
        self._reading = False
        self._recv_batch = fastpath.recv_batch
        self._recv_batch_with_drops = fastpath.recv_batch_with_drops
        self._reader = self._on_readable if self._drops is None else self._on_readable_counted
        self._send_batch = fastpath.send_batch
        self.gso = (
            fastpath.HAVE_GSO
            and sock.family in (socket.AF_INET, socket.AF_INET6)
            and os.environ.get(GSO_ENV, "") in ("", "0")
        )

    @property
    def address(self) -> Address:
        return self.sock.getsockname()

    @property
    def closed(self) -> bool:
        return self.sock.fileno() < 0

    def start(self) -> None:
        if not self._reading:
            self.loop.add_reader(self._fd, self._reader)
            self._reading = True

    def pause(self) -> None:
        if self._reading:
            self.loop.remove_reader(self._fd)
            self._reading = False

    def _on_readable(self) -> None:
        try:
            batch = self._recv_batch(self.sock, BATCH_MAX)
        except OSError as exc:
            self._error(exc)
            return
        if batch:
            self.on_batch(batch)

    def _on_readable_counted(self) -> None:
        # _on_readable, plus the kernel's drop counter that came with the datagrams.
        try:
            batch, counter = self._recv_batch_with_drops(self.sock, BATCH_MAX)
        except OSError as exc:
            self._error(exc)
            return
        drops = self._drops
        if counter >= 0 and drops is not None and counter != drops.seen:
            drops.update(counter)  # before the batch: these drops happened first
        if batch:
            self.on_batch(batch)

    def send_many(self, datagrams: list, addr: Address | None = None) -> tuple[int, int]:
        """Send ``datagrams`` (to ``addr``, or the connected peer).

        Returns ``(sent, failed)``. A full socket buffer or an error loses the
        rest of the batch: UDP would lose them too, and the caller counts them.
        """
        total = len(datagrams)
        done = sent = 0  # done = sent + skipped after an error
        while done < total:
            try:
                n = self._send_batch(
                    self.sock, datagrams[done:] if done else datagrams, addr, self.gso
                )
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.ENOBUFS):
                    break
                if self.gso and exc.errno in _GSO_REFUSALS:
                    self._gso_refused(exc)
                    continue  # the same datagrams again, one message each
                self._error(exc)
                done += 1  # the datagram at ``done`` failed: skip it, go on with the rest
                continue
            if n <= 0:
                break
            done += n
            sent += n
        return sent, total - sent

    def _gso_refused(self, exc: OSError) -> None:
        global _gso_off_logged
        self.gso = False
        if not _gso_off_logged:  # once per process: every session's port would say the same
            _gso_off_logged = True
            event("udp_gso_off", logging.INFO, err=repr(exc))

    def _error(self, exc: OSError) -> None:
        if self.on_error is not None:
            self.on_error(exc)
        # uvloop (libuv) stops polling a socket once the kernel flags an error on
        # it -- a connected UDP socket's pending ICMP port unreachable is one --
        # and says nothing: the port would never read again, even after the peer
        # is back (found by tests/test_conservation.py). Register the reader anew
        # once this callback is done; on the stock asyncio loop it changes nothing.
        if self._reading:
            self.loop.call_soon(self._rearm)

    def _rearm(self) -> None:
        if self._reading and self.sock.fileno() >= 0:
            self.pause()
            self.start()

    def close(self) -> None:
        self.pause()
        if self._drops is not None and self.sock.fileno() >= 0:
            # Drops after the last datagram read rode on no datagram: one getsockopt
            # for this socket counts them before the fd goes.
            counter = read_socket_drops(self.sock)
            if counter is not None:
                self._drops.update(counter)
            self._drops = None
        self.sock.close()
