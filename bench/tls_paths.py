#!/usr/bin/env python3
"""Where TLS time goes: uvloop's SSL transport vs asyncio's vs a raw non-blocking SSLSocket.

One process runs both ends of a loopback TLS stream (the product's own mutual-TLS
contexts from ``ut.tls``, certificates made by ``ut.pki`` in a temporary directory,
so TLS 1.3 with client certificates, as on a lane) and pushes a fixed amount of data
one way, client to server, in writes of a fixed size. What it measures is the CPU
time of that one process (``getrusage(RUSAGE_SELF)``, user + sys, so the kernel's TCP
work on both ends counts too) per GB carried, for three ways of driving TLS:

    uvloop      loop.create_server/create_connection(ssl=...) on uvloop: uvloop's SSL
                transport (memory BIOs, OpenSSL via the ssl module's SSLObject)
    asyncio     the same on the stock asyncio event loop (its sslproto, also memory BIOs)
    sslsocket   ssl.SSLSocket set non-blocking on uvloop, driven by add_reader/add_writer:
                SSL_write/SSL_read straight on the socket, no memory BIOs, no transport

The receiver only counts bytes (a BufferedProtocol with a preallocated 64 KiB buffer,
or ``recv_into`` the same buffer); the sender writes one constant chunk again and again
and obeys flow control (pause_writing/resume_writing with the product's 64 KiB high
water mark, or SSLWantWriteError). Write sizes: 1420 bytes (one WireGuard datagram per
write), 14200 (a batch of 10) and 65536 (a full burst). Handshakes and connection setup
are not measured. 1 GB = 1e9 bytes, 1 MB = 1e6 bytes.

    python bench/tls_paths.py [--quick] [--rounds 3] [--mib N] [--max-seconds 20]
                              [--sizes 1420,14200,65536] [--paths uvloop,asyncio,sslsocket]
                              [--json FILE]

Each round measures every (size, path) once, paths in an order rotated by round so
no path always runs first; the table shows the median over rounds. On a shared,
noisy machine absolute numbers drift from run to run: compare the ratios within one
run ("vs uvloop": a path's CPU s/GB divided by uvloop's, same size and same round,
then the median of those ratios). "CPU/wall" near 100 % means the process had a core
to itself; much lower means it waited (for the CPU or for the other end) and MB/s
then says little, while CPU s/GB still holds. The kernel splits a process's CPU time
into user and sys by sampling at clock ticks, so on short runs (``--quick``) trust
the user+sys total, not the split.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import resource
import select
import socket
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import uvloop

ROOT = Path(__file__).resolve().parent.parent

SERVER_NAME = "tls-bench.test"  # only ever a name in the certificate; never resolved
CLIENT_NAME = "bench"
WRITE_HIGH_WATER = 64 * 1024  # ut.lane's write buffer limits: the product's flow control
WRITE_LOW_WATER = 16 * 1024
RECV_BUF = 64 * 1024
SIZES = (1420, 14200, 65536)
PATHS = ("uvloop", "asyncio", "sslsocket")
SMALL_WRITE = 1420  # gets less data by default: it is the slowest per byte
GRACE_SECONDS = 30.0  # after the time limit, how long the receiver may take to catch up
HANDSHAKE_SECONDS = 10.0


# ------------------------------------------------------------------ TLS setup


def make_contexts(directory: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) contexts exactly as the product builds them, from a fresh PKI."""
    # Imported here so the checkout's ``ut`` wins over any installed copy.
    sys.path.insert(0, str(ROOT))
    from ut.pki import init_pki, issue_client
    from ut.tls import client_context, server_context

    paths = init_pki(directory, SERVER_NAME)
    client_cert, client_key = issue_client(directory, CLIENT_NAME)
    server_ctx = server_context(paths["ca"], paths["server_cert"], paths["server_key"])
    client_ctx = client_context(paths["ca"], client_cert, client_key)
    return server_ctx, client_ctx


def set_nodelay(sock: socket.socket | None) -> None:
    # The product sets TCP_NODELAY on every lane (ut.lane.set_tcp_options); without it
    # small writes would wait for Nagle and the comparison would be about timers.
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# ------------------------------------------------------------ shared pieces


class Counter:
    """Counts received bytes; ``done`` resolves once everything the sender sent arrived."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.received = 0
        self.target: int | None = None  # known only when the sender stops
        self.done: asyncio.Future[None] = loop.create_future()

    def add(self, n: int) -> None:
        self.received += n
        if self.target is not None and self.received >= self.target and not self.done.done():
            self.done.set_result(None)

    def expect(self, total: int) -> None:
        self.target = total
        self.add(0)

    def fail(self, exc: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(exc)


class SenderBase:
    """Writes ``chunk`` until ``total`` bytes went out or ``halt()`` (the time limit)."""

    def __init__(self, chunk: bytes, total: int, counter: Counter) -> None:
        self.chunk = chunk
        self.total = total
        self.counter = counter
        self.sent = 0
        self.stopped = False  # set by the time limit; checked once per write (cheap)
        self.finished = False

    def halt(self) -> None:
        self.stopped = True

    def finish(self) -> None:
        if not self.finished:
            self.finished = True
            self.counter.expect(self.sent)

    def start(self) -> None:
        raise NotImplementedError


@dataclass
class Sample:
    path: str
    size: int
    round: int
    bytes: int
    wall_s: float
    user_s: float
    sys_s: float
    stopped_early: bool
    tls_version: str
    cipher: str

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s

    def per_gb(self, seconds: float) -> float:
        return seconds / (self.bytes / 1e9) if self.bytes else float("nan")

    def row(self) -> dict[str, object]:
        out: dict[str, object] = asdict(self)
        out["mb_per_s"] = self.bytes / 1e6 / self.wall_s if self.wall_s else float("nan")
        out["cpu_s_per_gb"] = self.per_gb(self.cpu_s)
        out["user_s_per_gb"] = self.per_gb(self.user_s)
        out["sys_s_per_gb"] = self.per_gb(self.sys_s)
        out["cpu_over_wall"] = self.cpu_s / self.wall_s if self.wall_s else float("nan")
        return out


def _rusage() -> tuple[float, float]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime, ru.ru_stime


async def timed_transfer(
    loop: asyncio.AbstractEventLoop, sender: SenderBase, counter: Counter, max_seconds: float
) -> tuple[int, float, float, float, bool]:
    """Run one transfer; (bytes, wall, user, sys, stopped_early). Both ends count."""
    timer = loop.call_later(max_seconds, sender.halt)
    user0, sys0 = _rusage()
    t0 = time.perf_counter()
    sender.start()
    try:
        await asyncio.wait_for(counter.done, max_seconds + GRACE_SECONDS)
    finally:
        timer.cancel()
    t1 = time.perf_counter()
    user1, sys1 = _rusage()
    return counter.received, t1 - t0, user1 - user0, sys1 - sys0, sender.stopped


# ------------------------------------------- transport paths (uvloop, asyncio)


class TransportSender(SenderBase, asyncio.Protocol):
    """Client end: ``transport.write(chunk)`` until paused, like a lane writing frames."""

    def __init__(self, chunk: bytes, total: int, counter: Counter) -> None:
        super().__init__(chunk, total, counter)
        # Any, not asyncio.WriteTransport: uvloop's SSL transport is not registered as
        # one (isinstance is False) although it has the whole write API.
        self.transport: Any = None
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        set_nodelay(transport.get_extra_info("socket"))
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.finished:
            self.counter.fail(exc or ConnectionError("sender lost its connection"))

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        # Not pumping from inside the transport's own flush: a fresh callback keeps
        # the SSL protocol's state machine out of re-entrant writes.
        asyncio.get_running_loop().call_soon(self.pump)

    def start(self) -> None:
        self.pump()

    def pump(self) -> None:
        assert self.transport is not None
        write, chunk, n = self.transport.write, self.chunk, len(self.chunk)
        while not self.paused:
            if self.sent >= self.total or self.stopped:
                self.finish()
                return
            write(chunk)  # calls pause_writing() itself once the buffer passes high water
            self.sent += n


class CountingReceiver(asyncio.BufferedProtocol):
    """Server end: decrypted bytes land in one preallocated buffer and are only counted."""

    def __init__(self, counter: Counter, connected: asyncio.Future[asyncio.BaseTransport]) -> None:
        self.counter = counter
        self.connected = connected
        self.view = memoryview(bytearray(RECV_BUF))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        set_nodelay(transport.get_extra_info("socket"))
        if not self.connected.done():
            self.connected.set_result(transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view

    def buffer_updated(self, nbytes: int) -> None:
        self.counter.add(nbytes)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.counter.fail(exc or ConnectionError("receiver lost its connection"))


def _tls_info(transport: asyncio.BaseTransport) -> tuple[str, str]:
    obj = transport.get_extra_info("ssl_object")
    cipher = obj.cipher() if obj is not None else None
    return (obj.version() or "?") if obj is not None else "?", cipher[0] if cipher else "?"


async def run_transport_path(
    ctxs: tuple[ssl.SSLContext, ssl.SSLContext], chunk: bytes, total: int, max_seconds: float
) -> tuple[tuple[int, float, float, float, bool], tuple[str, str]]:
    """uvloop or asyncio, whichever loop runs this: both ends via create_server/connection."""
    server_ctx, client_ctx = ctxs
    loop = asyncio.get_running_loop()
    counter = Counter(loop)
    connected: asyncio.Future[asyncio.BaseTransport] = loop.create_future()
    server = await loop.create_server(
        lambda: CountingReceiver(counter, connected), "127.0.0.1", 0, ssl=server_ctx
    )
    port = server.sockets[0].getsockname()[1]
    client_tr, sender = await loop.create_connection(
        lambda: TransportSender(chunk, total, counter),
        "127.0.0.1",
        port,
        ssl=client_ctx,
        server_hostname=SERVER_NAME,
    )
    # The server's connection_made comes after *its* end of the handshake.
    server_tr = await asyncio.wait_for(connected, HANDSHAKE_SECONDS)
    try:
        result = await timed_transfer(loop, sender, counter, max_seconds)
        return result, _tls_info(client_tr)
    finally:
        # abort, not close: a graceful TLS shutdown is not what is measured, and
        # the receiver's connection_lost must not fail the (finished) counter.
        client_tr.abort()
        server_tr.abort()
        server.close()
        await server.wait_closed()


# ------------------------------------------------------- SSLSocket path (uvloop)


class SocketSender(SenderBase):
    """Client end: ``sslsock.send(chunk)`` until SSLWantWriteError, then add_writer."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sock: ssl.SSLSocket, chunk: bytes, total: int,
        counter: Counter,
    ) -> None:
        super().__init__(chunk, total, counter)
        self.loop = loop
        self.sock = sock
        self.fd = sock.fileno()

    def start(self) -> None:
        self.pump()

    def _writable(self) -> None:
        self.loop.remove_writer(self.fd)
        self.pump()

    def pump(self) -> None:
        send, chunk = self.sock.send, self.chunk
        try:
            while True:
                if self.sent >= self.total or self.stopped:
                    self.finish()
                    return
                # No SSL_MODE_ENABLE_PARTIAL_WRITE in CPython: SSL_write reports the whole
                # chunk or an error; after SSLWantWriteError the retry must pass the same
                # bytes, which a constant chunk always does.
                self.sent += send(chunk)
        except ssl.SSLWantWriteError:
            self.loop.add_writer(self.fd, self._writable)
        except Exception as exc:  # a callback's exception would only be logged
            self.counter.fail(exc)


class SocketReceiver:
    """Server end: on readable, ``recv_into`` until SSLWantReadError.

    Draining to SSLWantReadError (not just one read per wake-up) matters: OpenSSL may
    already hold decrypted or undecrypted record bytes (``pending()``) that no new
    readability event would ever announce.
    """

    def __init__(self, sock: ssl.SSLSocket, counter: Counter) -> None:
        self.sock = sock
        self.counter = counter
        self.view = memoryview(bytearray(RECV_BUF))

    def readable(self) -> None:
        recv_into, view, add = self.sock.recv_into, self.view, self.counter.add
        try:
            while True:
                n = recv_into(view)
                if not n:
                    raise ConnectionError("sender closed the connection")
                add(n)
        except ssl.SSLWantReadError:
            pass
        except Exception as exc:
            self.counter.fail(exc)


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    """(client, server) ends of one loopback TCP connection."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    for sock in (client, server):
        set_nodelay(sock)
    return client, server


def _handshake(socks: list[ssl.SSLSocket]) -> None:
    """Finish both handshakes with select (not measured, so simplicity wins)."""
    pending = list(socks)
    deadline = time.monotonic() + HANDSHAKE_SECONDS
    while pending:
        want_read, want_write = [], []
        for sock in list(pending):
            try:
                sock.do_handshake()
                pending.remove(sock)
            except ssl.SSLWantReadError:
                want_read.append(sock)
            except ssl.SSLWantWriteError:
                want_write.append(sock)
        if pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("TLS handshake (sslsocket path) took too long")
            select.select(want_read, want_write, [], left)


async def run_sslsocket_path(
    ctxs: tuple[ssl.SSLContext, ssl.SSLContext], chunk: bytes, total: int, max_seconds: float
) -> tuple[tuple[int, float, float, float, bool], tuple[str, str]]:
    server_ctx, client_ctx = ctxs
    loop = asyncio.get_running_loop()
    raw_client, raw_server = _tcp_pair()
    client = client_ctx.wrap_socket(
        raw_client, server_side=False, server_hostname=SERVER_NAME, do_handshake_on_connect=False
    )
    server = server_ctx.wrap_socket(raw_server, server_side=True, do_handshake_on_connect=False)
    try:
        for sock in (client, server):
            sock.setblocking(False)
        _handshake([client, server])
        counter = Counter(loop)
        receiver = SocketReceiver(server, counter)
        sender = SocketSender(loop, client, chunk, total, counter)
        loop.add_reader(server.fileno(), receiver.readable)
        try:
            result = await timed_transfer(loop, sender, counter, max_seconds)
        finally:
            loop.remove_reader(server.fileno())
            loop.remove_writer(client.fileno())
        cipher = client.cipher()
        return result, (client.version() or "?", cipher[0] if cipher else "?")
    finally:
        client.close()
        server.close()


# ---------------------------------------------------------------- the runs

Runner = Callable[
    [tuple[ssl.SSLContext, ssl.SSLContext], bytes, int, float],
    Awaitable[tuple[tuple[int, float, float, float, bool], tuple[str, str]]],
]


def _stock_loop() -> asyncio.AbstractEventLoop:
    # Never uvloop here, whatever policy someone installed: the stock loop is the point.
    policy = asyncio.get_event_loop_policy()
    loop = (
        asyncio.DefaultEventLoopPolicy().new_event_loop()
        if isinstance(policy, uvloop.EventLoopPolicy)
        else asyncio.new_event_loop()
    )
    assert not isinstance(loop, uvloop.Loop), "the asyncio path must run on the stock loop"
    return loop


PATH_SETUP: dict[str, tuple[Callable[[], asyncio.AbstractEventLoop], Runner]] = {
    "uvloop": (uvloop.new_event_loop, run_transport_path),
    "asyncio": (_stock_loop, run_transport_path),
    "sslsocket": (uvloop.new_event_loop, run_sslsocket_path),
}


def measure(
    path: str, size: int, total: int, max_seconds: float, rnd: int,
    ctxs: tuple[ssl.SSLContext, ssl.SSLContext],
) -> Sample:
    """One (path, size) measurement on a fresh event loop of the path's kind."""
    new_loop, runner = PATH_SETUP[path]
    loop = new_loop()
    try:
        (nbytes, wall, user, sys_s, early), (version, cipher) = loop.run_until_complete(
            runner(ctxs, b"\x5a" * size, total, max_seconds)
        )
    finally:
        loop.close()
    return Sample(path, size, rnd, nbytes, wall, user, sys_s, early, version, cipher)


def rotated(items: list[str], by: int) -> list[str]:
    k = by % len(items)
    return items[k:] + items[:k]


def run_all(args: argparse.Namespace) -> list[Sample]:
    samples: list[Sample] = []
    with tempfile.TemporaryDirectory(prefix="ut-tls-bench-") as tmp:
        ctxs = make_contexts(tmp)
        for rnd in range(args.rounds):
            for size in args.sizes:
                mib = args.mib if args.mib is not None else (64 if size == SMALL_WRITE else 256)
                total = mib * 1024 * 1024
                for path in rotated(args.paths, rnd):
                    s = measure(path, size, total, args.max_seconds, rnd, ctxs)
                    row = s.row()
                    print(
                        f"round {rnd + 1}/{args.rounds} size {size:>6} {path:<9} "
                        f"{row['mb_per_s']:8.1f} MB/s {row['cpu_s_per_gb']:7.3f} CPU s/GB"
                        f"{'  (time limit)' if s.stopped_early else ''}",
                        file=sys.stderr,
                        flush=True,
                    )
                    samples.append(s)
    return samples


# ----------------------------------------------------------------- summary


def summarize(samples: list[Sample], paths: list[str], sizes: list[int]) -> list[dict[str, object]]:
    """Median per (size, path), and the median of same-round CPU ratios to uvloop."""
    by_key = {(s.size, s.path, s.round): s.row() for s in samples}
    rounds = sorted({s.round for s in samples})
    out: list[dict[str, object]] = []
    for size in sizes:
        for path in paths:
            rows = [by_key[(size, path, r)] for r in rounds if (size, path, r) in by_key]
            if not rows:
                continue
            entry: dict[str, object] = {"size": size, "path": path, "rounds": len(rows)}
            for key in ("mb_per_s", "cpu_s_per_gb", "user_s_per_gb", "sys_s_per_gb", "cpu_over_wall"):
                entry[key] = statistics.median(float(row[key]) for row in rows)  # type: ignore[arg-type]
            ratios = [
                float(by_key[(size, path, r)]["cpu_s_per_gb"])  # type: ignore[arg-type]
                / float(by_key[(size, "uvloop", r)]["cpu_s_per_gb"])  # type: ignore[arg-type]
                for r in rounds
                if (size, path, r) in by_key and (size, "uvloop", r) in by_key
            ]
            entry["cpu_vs_uvloop"] = statistics.median(ratios) if ratios else None
            entry["stopped_early"] = any(row["stopped_early"] for row in rows)
            out.append(entry)
    return out


def markdown(summary: list[dict[str, object]], samples: list[Sample], args: argparse.Namespace) -> str:
    versions = sorted({f"{s.tls_version} {s.cipher}" for s in samples})
    lines = [
        f"TLS paths, one process both ends, loopback; Python {platform.python_version()}, "
        f"uvloop {uvloop.__version__}, {ssl.OPENSSL_VERSION}; {', '.join(versions)}; "
        f"{args.rounds} round(s), medians",
        "",
        "| write size | path | MB/s | CPU s/GB | user s/GB | sys s/GB | CPU/wall | CPU vs uvloop |",
        "|---:|:---|---:|---:|---:|---:|---:|---:|",
    ]
    for e in summary:
        ratio = e["cpu_vs_uvloop"]
        lines.append(
            f"| {e['size']} | {e['path']}{' *' if e['stopped_early'] else ''} "
            f"| {e['mb_per_s']:.1f} | {e['cpu_s_per_gb']:.3f} | {e['user_s_per_gb']:.3f} "
            f"| {e['sys_s_per_gb']:.3f} | {100 * float(e['cpu_over_wall']):.0f} % "  # type: ignore[arg-type]
            f"| {'' if ratio is None else f'{ratio:.2f}x'} |"
        )
    if any(e["stopped_early"] for e in summary):
        lines += ["", f"\\* hit the {args.max_seconds:g} s time limit in some round: figures from what was sent"]
    return "\n".join(lines)


# --------------------------------------------------------------------- CLI


def _csv(kind: type, allowed: tuple[object, ...] | None = None) -> Callable[[str], list]:
    def parse(text: str) -> list:
        values = [kind(part) for part in text.split(",") if part.strip()]
        if not values or (allowed is not None and any(v not in allowed for v in values)):
            raise argparse.ArgumentTypeError(f"expected a comma-separated list from {allowed}")
        return values

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--rounds", type=int, default=3, help="rounds, path order rotated (default 3)")
    p.add_argument(
        "--mib", type=int, default=None,
        help="MiB sent per measurement (default 256, and 64 for 1420-byte writes)",
    )
    p.add_argument(
        "--max-seconds", type=float, default=20.0,
        help="time limit per measurement; stops early and reports what was sent (default 20)",
    )
    p.add_argument("--quick", action="store_true", help="1 round, 16 MiB per measurement")
    p.add_argument(
        "--sizes", type=_csv(int), default=list(SIZES),
        help="write sizes in bytes, comma-separated (default 1420,14200,65536)",
    )
    p.add_argument(
        "--paths", type=_csv(str, PATHS), default=list(PATHS),
        help="paths to compare (default uvloop,asyncio,sslsocket; ratios need uvloop)",
    )
    p.add_argument("--json", metavar="FILE", help="also write the raw numbers here")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds = 1
        if args.mib is None:
            args.mib = 16
    if args.rounds < 1 or (args.mib is not None and args.mib < 1) or args.max_seconds <= 0:
        p.error("--rounds, --mib and --max-seconds must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    samples = run_all(args)
    summary = summarize(samples, args.paths, args.sizes)
    print(markdown(summary, samples, args))
    if args.json:
        doc = {
            "python": platform.python_version(),
            "uvloop": uvloop.__version__,
            "openssl": ssl.OPENSSL_VERSION,
            "config": {
                "rounds": args.rounds,
                "mib": args.mib,
                "max_seconds": args.max_seconds,
                "sizes": args.sizes,
                "paths": args.paths,
            },
            "samples": [s.row() for s in samples],
            "summary": summary,
        }
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
