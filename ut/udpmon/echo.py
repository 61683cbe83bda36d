"""``udpmon echo``: send every UDP datagram back to where it came from.

One non-blocking socket read by the event loop's reader callback, up to
``READ_BATCH`` datagrams per wake-up into one preallocated buffer, each sent back at
once with ``sendto``; a reply the kernel will not take is counted as dropped.
"""

from __future__ import annotations

import asyncio
import math
import socket
import time
from collections.abc import Callable
from typing import Any

from ut.addr import format_addr

from .result import EchoStats
from .sockets import READ_BATCH, open_bound_socket

_MAX_PEERS = 65536  # distinct senders remembered for the summary: bounded memory


class UdpEcho:
    """A UDP echo on the running loop: ``await start()``, then ``await run()``."""

    def __init__(self, host: str, port: int, *, report: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.host, self.port = host, port
        self.report = report
        self.stats = EchoStats()
        self._sock: socket.socket | None = None
        self._buf = bytearray(65536)
        self._mv = memoryview(self._buf)
        self._peers: set[Any] = set()
        self._t0 = 0.0
        self._stop = asyncio.Event()

    async def start(self) -> tuple[str, int]:
        """Bind the socket and start echoing; returns the bound ``(host, port)``."""
        sock = await open_bound_socket(self.host, self.port)
        self._sock = sock
        addr = sock.getsockname()
        self.stats.listen = format_addr(addr) or ""
        self._t0 = time.perf_counter()
        asyncio.get_running_loop().add_reader(sock, self._on_readable)
        return addr[0], addr[1]

    def _on_readable(self) -> None:
        sock, buf, mv, st = self._sock, self._buf, self._mv, self.stats
        assert sock is not None
        recv, send = sock.recvfrom_into, sock.sendto
        n_in = b_in = n_out = b_out = dropped = 0
        peers = self._peers
        for _ in range(READ_BATCH):
            try:
                n, addr = recv(buf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue
            n_in += 1
            b_in += n
            if len(peers) < _MAX_PEERS:
                peers.add(addr)
            try:
                send(mv[:n], addr)
                n_out += 1
                b_out += n
            except OSError:
                dropped += 1
        st.in_datagrams += n_in
        st.in_bytes += b_in
        st.out_datagrams += n_out
        st.out_bytes += b_out
        st.dropped += dropped

    async def run(self, duration: float | None = None, stop: asyncio.Event | None = None) -> EchoStats:
        """Echo until ``duration`` seconds pass or ``stop`` is set; report each second."""
        if stop is not None:
            self._stop = stop
        stop = self._stop
        end = self._t0 + duration if duration is not None else math.inf
        last = (0, 0, 0, 0, 0)
        t = 0
        try:
            while not stop.is_set():
                now = time.perf_counter()
                if now >= end:
                    break
                nxt = min(self._t0 + t + 1, end)
                try:
                    await asyncio.wait_for(stop.wait(), max(nxt - now, 0.0))
                except asyncio.TimeoutError:
                    pass
                if time.perf_counter() >= self._t0 + t + 1 - 1e-4:
                    t += 1
                    st = self.stats
                    cur = (st.in_datagrams, st.in_bytes, st.out_datagrams, st.out_bytes, st.dropped)
                    if self.report is not None:
                        d = [a - b for a, b in zip(cur, last, strict=True)]
                        self.report({
                            "t": t, "in_datagrams": d[0], "in_bytes": d[1],
                            "out_datagrams": d[2], "out_bytes": d[3], "dropped": d[4],
                        })
                    last = cur
        finally:
            self.close()
        return self.stats

    def stop(self) -> None:
        """Make :meth:`run` return (it closes the socket)."""
        self._stop.set()

    def close(self) -> EchoStats:
        """Stop echoing and close the socket (idempotent); returns the totals."""
        if self._sock is not None:
            try:
                asyncio.get_running_loop().remove_reader(self._sock)
            except RuntimeError:
                pass
            self._sock.close()
            self._sock = None
            self.stats.elapsed = time.perf_counter() - self._t0
            self.stats.peers = len(self._peers)
        return self.stats


async def run_echo(
    host: str,
    port: int,
    *,
    duration: float | None = None,
    report: Callable[[dict[str, Any]], None] | None = None,
    stop: asyncio.Event | None = None,
    ready: Callable[[tuple[str, int]], None] | None = None,
) -> EchoStats:
    """Echo every datagram on ``host:port`` until ``duration`` or ``stop``.

    ``report`` gets a dict per second (``t, in_datagrams, in_bytes, out_datagrams,
    out_bytes, dropped`` for that second); ``ready`` gets the bound address (useful
    with port 0). Cancelling the task also stops it.
    """
    echo = UdpEcho(host, port, report=report)
    try:
        addr = await echo.start()
    except BaseException:
        echo.close()
        raise
    if ready is not None:
        ready(addr)
    return await echo.run(duration, stop)
