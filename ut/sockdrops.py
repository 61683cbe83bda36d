"""Datagrams the kernel dropped at our UDP sockets before we could read them.

When the process falls behind (a busy core, a burst larger than the socket's receive
buffer), Linux drops datagrams at the full socket and counts them per socket (the
socket's ``sk_drops``, the ``drops`` column of ``/proc/net/udp``). ut-tunnel never sees
those datagrams, so it reads the counter instead, so that every lost datagram shows up in
``ut_udp_drop_total`` (reason ``udp_socket_full``).

Theory of operation (issue 19: no work proportional to the number of sessions)
------------------------------------------------------------------------------
* ``enable_drop_counter`` sets ``SO_RXQ_OVFL`` on a socket: from then on the kernel
  attaches the socket's cumulative drop count (a u32) to every datagram it queues there,
  as a control message, once that count is non-zero. The batched receive
  (``fastpath.recv_batch_with_drops``) reads it with the datagrams, no system call of its
  own; ``SocketDropCounter.update`` turns the cumulative value into new drops.
* So drops show with the **next datagram queued after them** (a burst that overflows the
  socket and then silence shows nothing until more comes). When the port closes,
  ``read_socket_drops`` reads the same counter once with ``getsockopt(SO_MEMINFO)`` (one
  system call for that one socket, Linux 4.12+), so the drops of a session's last burst
  are counted too.
* Nothing is polled and no table is read: the previous design re-read the whole
  ``/proc/self/net/udp`` every second and at every port close, 18-86 ms per read at
  4,000-8,000 sockets (issue 19). ``read_drop_table`` still reads that table, for tests
  and diagnostics only; nothing in the tunnel calls it.

Elsewhere than Linux there is no such counter: nothing is counted, as before.
"""

from __future__ import annotations

import socket
import struct
import sys
from collections.abc import Callable

LINUX = sys.platform.startswith("linux")
SO_RXQ_OVFL = 40  # asm-generic/socket.h: attach sk_drops to each datagram received
SO_MEMINFO = 55  # asm-generic/socket.h: the socket's memory figures, sk_drops among them
_MEMINFO = struct.Struct("=9I")  # SK_MEMINFO_VARS (linux/sock_diag.h) u32s, Linux 4.12+
_MEMINFO_DROPS = 8  # SK_MEMINFO_DROPS
COUNTER_MASK = 0xFFFFFFFF  # the kernel's counter is a u32 and wraps

# The process's own network namespace (``/proc/net`` is ``/proc/self/net``).
PROC_TABLES = ("/proc/self/net/udp", "/proc/self/net/udp6")
_INODE, _DROPS = 9, 12  # columns of a socket's line in those tables


def enable_drop_counter(sock: socket.socket) -> bool:
    """Ask the kernel to attach ``sock``'s drop count to each datagram received
    (``SO_RXQ_OVFL``); True if it will (Linux), False where there is no such option."""
    if not LINUX:
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)
    except OSError:
        return False
    return True


def read_socket_drops(sock: socket.socket) -> int | None:
    """Datagrams the kernel has dropped at ``sock`` since it was created (u32, wrapping),
    read now with one ``getsockopt(SO_MEMINFO)``; None where that is not available (not
    Linux, Linux before 4.12, a closed socket)."""
    if not LINUX:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, _MEMINFO.size)
    except OSError:
        return None
    if len(raw) < _MEMINFO.size:
        return None
    return _MEMINFO.unpack_from(raw)[_MEMINFO_DROPS]


class SocketDropCounter:
    """One socket's kernel drop counter and what has been reported of it.

    ``update(counter)`` takes the kernel's cumulative count (from a datagram's
    ``SO_RXQ_OVFL`` control message or from ``read_socket_drops``) and calls
    ``on_drops(n)`` with the drops not reported yet. O(1), no system call.
    """

    __slots__ = ("seen", "on_drops")

    def __init__(self, on_drops: Callable[[int], None], seen: int = 0) -> None:
        self.seen = seen  # drops before we watched are not ours to count
        self.on_drops = on_drops

    def update(self, counter: int) -> None:
        delta = (counter - self.seen) & COUNTER_MASK
        if delta:
            self.seen = counter
            self.on_drops(delta)


def watch_socket(sock: socket.socket, on_drops: Callable[[int], None]) -> SocketDropCounter | None:
    """Start counting ``sock``'s kernel drops into ``on_drops``: a ``SocketDropCounter``
    for its reads to update, or None where the kernel offers no per-socket counter."""
    if not enable_drop_counter(sock):
        return None
    return SocketDropCounter(on_drops, read_socket_drops(sock) or 0)


def read_drop_table(paths: tuple[str, ...] = PROC_TABLES) -> dict[int, int]:
    """Socket inode -> datagrams the kernel dropped at that socket (empty if unknown).

    Reads the whole table: O(sockets in the namespace). For tests and diagnostics only,
    never on a per-session path (issue 19)."""
    table: dict[int, int] = {}
    for path in paths:
        try:
            with open(path) as f:
                next(f, None)  # the header
                for line in f:
                    fields = line.split()
                    if len(fields) > _DROPS:
                        table[int(fields[_INODE])] = int(fields[_DROPS])
        except (OSError, ValueError):
            continue  # no IPv6, or not Linux
    return table
