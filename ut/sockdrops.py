"""Datagrams the kernel dropped at our UDP sockets before we could read them.

When the process falls behind (a busy core, a burst larger than the socket's receive
buffer), Linux drops datagrams at the full socket and counts them per socket: the
``drops`` column of ``/proc/net/udp`` and ``/proc/net/udp6``. ut-tunnel never sees those
datagrams, so it reads the counters instead, so that every lost datagram shows up in
``ut_udp_drop_total`` (reason ``udp_socket_full``).

One ``SocketDropWatcher`` per event loop reads the table once a second for all the
loop's UDP ports (a server has one per session), and once more when a port closes.
Elsewhere than Linux there is no such table, and nothing is read.
"""

from __future__ import annotations

import asyncio
import os
import sys
import weakref
from collections.abc import Callable

# The process's own network namespace (``/proc/net`` is ``/proc/self/net``).
PROC_TABLES = ("/proc/self/net/udp", "/proc/self/net/udp6")
POLL_SECONDS = 1.0
_INODE, _DROPS = 9, 12  # columns of a socket's line in those tables


def read_drop_table(paths: tuple[str, ...] = PROC_TABLES) -> dict[int, int]:
    """Socket inode -> datagrams the kernel dropped at that socket (empty if unknown)."""
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


class WatchedSocket:
    """One socket's drop counter and what has been reported of it."""

    __slots__ = ("inode", "seen", "on_drops")

    def __init__(self, fd: int, on_drops: Callable[[int], None], table: dict[int, int]) -> None:
        self.inode = os.fstat(fd).st_ino
        self.seen = table.get(self.inode, 0)  # drops before we watched are not ours to count
        self.on_drops = on_drops

    def update(self, table: dict[int, int]) -> None:
        now = table.get(self.inode)
        if now is not None and now > self.seen:
            delta, self.seen = now - self.seen, now
            self.on_drops(delta)


class SocketDropWatcher:
    """Reads the kernel's drop counters of a loop's watched sockets every ``POLL_SECONDS``."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.watched: dict[int, WatchedSocket] = {}  # fd -> socket
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, fd: int, on_drops: Callable[[int], None]) -> None:
        self.watched[fd] = WatchedSocket(fd, on_drops, read_drop_table())
        if self._timer is None:
            self._timer = self.loop.call_later(POLL_SECONDS, self._tick)

    def unwatch(self, fd: int) -> None:
        """Stop watching ``fd``; call before closing it, so its last drops are counted."""
        w = self.watched.pop(fd, None)
        if w is not None:
            w.update(read_drop_table())
        if not self.watched and self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def poll(self) -> None:
        """Count new drops now (also done every ``POLL_SECONDS``)."""
        if self.watched:
            table = read_drop_table()
            for w in list(self.watched.values()):
                w.update(table)

    def _tick(self) -> None:
        # Next tick first: a callback that raises must not stop the counting for good.
        self._timer = self.loop.call_later(POLL_SECONDS, self._tick) if self.watched else None
        self.poll()


_watchers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, SocketDropWatcher] = (
    weakref.WeakKeyDictionary()
)


def watcher_for(loop: asyncio.AbstractEventLoop) -> SocketDropWatcher | None:
    """The loop's watcher; None where the kernel keeps no per-socket table (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    w = _watchers.get(loop)
    if w is None:
        w = _watchers[loop] = SocketDropWatcher(loop)
    return w
