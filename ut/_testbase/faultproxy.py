"""A fault-injecting TCP proxy for tests: client -> proxy -> server, on loopback.

It sits between a ut client and a ut server (asyncpg's test suite uses the same
idea) and forwards bytes both ways, untouched unless told otherwise. TLS runs
end to end through it, so the proxy sees only ciphertext; its faults are the
ones a network path can cause:

* ``delay_ms``     added one-way latency per forwarded chunk (both directions);
* ``conn.lag_ms``  extra latency on one connection only (a lane that lags the others);
* ``rate_bps``     a shared per-direction throughput cap (bytes/s) over all connections,
                   so the proxy is a thin link and queues build up behind it;
* ``stall()``      stop forwarding (and reading) in both directions: the kernel buffers
                   fill and the senders' TCP windows close, as on a wedged path;
* ``cut()``        reset (RST) or close (FIN) every connection now, mid-transfer;
* ``corrupt(n)``   flip one byte in each of the next ``n`` chunks of a direction (TLS
                   then fails its record MAC and the lane dies);
* ``refuse``       new connections are reset at once (the server is unreachable).

Example::

    proxy = await FaultProxy(server.address[:2]).start()
    client = ut.Client(client_config(pki, proxy.address))
    ...
    proxy.cut()            # every lane dies; the client re-dials through the proxy
    proxy.stall()          # nothing moves until proxy.stall(False)
    await proxy.close()

Everything is bounded: each direction holds at most one read chunk (64 KiB) in
the proxy, and stalled reads leave the rest in the kernel. Only 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

CHUNK = 64 * 1024
THROTTLED_CHUNK = 16 * 1024  # smaller reads when rate-limited, for a smoother rate

DIRECTIONS = ("up", "down")  # up: client -> server, down: server -> client


@dataclass
class ProxiedConn:
    """One client connection and its server-side twin."""

    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    tasks: list[asyncio.Task] = field(default_factory=list)
    bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DIRECTIONS, 0))
    closed: bool = False
    lag_ms: float = 0.0  # extra one-way latency of this connection alone
    # Every byte forwarded, per direction, when the proxy records (FaultProxy(record=True)).
    seen: dict[str, bytearray] = field(default_factory=lambda: {d: bytearray() for d in DIRECTIONS})

    def abort(self) -> None:
        self.closed = True
        for w in (self.client, self.server):
            with contextlib.suppress(Exception):
                w.transport.abort()

    def close(self) -> None:
        self.closed = True
        for w in (self.client, self.server):
            with contextlib.suppress(Exception):
                w.close()


class FaultProxy:
    """A TCP proxy from 127.0.0.1:<port> to ``target`` with faults on demand."""

    def __init__(self, target: tuple[str, int], *, delay_ms: float = 0.0,
                 rate_bps: float = 0.0, listen_port: int = 0, record: bool = False) -> None:
        self.target = target
        self.record = record  # keep a copy of every byte forwarded (ProxiedConn.seen)
        self.delay_ms = delay_ms
        self.rate_bps = rate_bps
        self.refuse = False
        self.listen_port = listen_port
        self.conns: list[ProxiedConn] = []
        self.accepted = 0
        self.bytes = dict.fromkeys(DIRECTIONS, 0)
        self._server: asyncio.Server | None = None
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._corrupt = dict.fromkeys(DIRECTIONS, 0)
        self.corrupted = dict.fromkeys(DIRECTIONS, 0)
        self._next_free = dict.fromkeys(DIRECTIONS, 0.0)
        self._handlers: set[asyncio.Task] = set()

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.listen_port)
        return self

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[:2]

    @property
    def live(self) -> list[ProxiedConn]:
        return [c for c in self.conns if not c.closed]

    # -- faults ----------------------------------------------------------------
    def stall(self, on: bool = True) -> None:
        """Stop (``on``) or resume forwarding in both directions."""
        if on:
            self._flowing.clear()
        else:
            self._flowing.set()

    @property
    def stalled(self) -> bool:
        return not self._flowing.is_set()

    def cut(self, how: str = "reset") -> int:
        """End every live connection now: ``"reset"`` (RST) or ``"close"`` (FIN).
        Returns how many were cut."""
        live = self.live
        for c in live:
            c.abort() if how == "reset" else c.close()
        return len(live)

    def corrupt(self, count: int = 1, direction: str = "up") -> None:
        """Flip one byte in each of the next ``count`` chunks sent ``direction``."""
        self._corrupt[direction] += count

    # -- plumbing --------------------------------------------------------------
    async def _handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None  # a connection handler runs in its own task
        self._handlers.add(task)
        try:
            if self.refuse:
                cwriter.transport.abort()
                return
            try:
                sreader, swriter = await asyncio.wait_for(
                    asyncio.open_connection(*self.target), 5)
            except (OSError, asyncio.TimeoutError):
                cwriter.transport.abort()
                return
            self.accepted += 1
            conn = ProxiedConn(cwriter, swriter)
            self.conns.append(conn)
            conn.tasks = [
                asyncio.create_task(self._pump(conn, creader, swriter, "up")),
                asyncio.create_task(self._pump(conn, sreader, cwriter, "down")),
            ]
            await asyncio.wait(conn.tasks, return_when=asyncio.FIRST_COMPLETED)
            # One side ended: give the other a moment to flush, then end both.
            await asyncio.wait(conn.tasks, timeout=1.0)
            for t in conn.tasks:
                t.cancel()
            conn.close()
        finally:
            self._handlers.discard(task)

    async def _pump(self, conn: ProxiedConn, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter, direction: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            while not conn.closed:
                await self._flowing.wait()
                data = await reader.read(THROTTLED_CHUNK if self.rate_bps else CHUNK)
                if not data:
                    with contextlib.suppress(Exception):
                        writer.write_eof()
                    return
                if self.delay_ms or conn.lag_ms:
                    await asyncio.sleep((self.delay_ms + conn.lag_ms) / 1000.0)
                if self._corrupt[direction] > 0:
                    self._corrupt[direction] -= 1
                    self.corrupted[direction] += 1
                    buf = bytearray(data)
                    buf[len(buf) // 2] ^= 0xFF
                    data = bytes(buf)
                await self._flowing.wait()  # a stall also holds a chunk already read
                if conn.closed:
                    return
                writer.write(data)
                if self.record:
                    conn.seen[direction] += data
                conn.bytes[direction] += len(data)
                self.bytes[direction] += len(data)
                await writer.drain()
                if self.rate_bps:
                    start = max(loop.time(), self._next_free[direction])
                    self._next_free[direction] = start + len(data) / self.rate_bps
                    await asyncio.sleep(max(0.0, self._next_free[direction] - loop.time()))
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            conn.abort()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self._flowing.set()
        for c in self.conns:
            c.abort()
        for t in list(self._handlers):
            t.cancel()
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=2)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
