"""Real tunnels on loopback for tests: a UDP echo, a UDP peer, server and client.

Everything here is real: TLS with certificates from ``ut._testbase.certs``, TCP and
UDP sockets on 127.0.0.1. Tests run a coroutine on a chosen loop kind with
``run_on(kind, coro)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import ut
from ut import runtime
from ut.udp import UdpPort, open_udp_socket

LOOP_KINDS = ("asyncio", "uvloop")


def run_on(kind: str, coro: Any, timeout: float = 60.0) -> Any:
    """Run ``coro`` on a fresh ``kind`` loop, bounded by ``timeout`` seconds."""
    return runtime.run(asyncio.wait_for(coro, timeout), kind)


class UdpEcho:
    """Stands in for WireGuard behind the server: sends every datagram back."""

    def __init__(self) -> None:
        self.received = 0
        self.port: UdpPort | None = None
        self.paused = False

    def start(self) -> UdpEcho:
        loop = asyncio.get_running_loop()
        self.port = UdpPort(loop, open_udp_socket(bind=("127.0.0.1", 0)), self._on_batch)
        self.port.start()
        return self

    def _on_batch(self, batch: list) -> None:
        self.received += len(batch)
        for data, addr in batch:
            self.port.send_many([data], addr)  # type: ignore[union-attr]

    @property
    def address(self) -> tuple[str, int]:
        return self.port.address  # type: ignore[union-attr]

    def close(self) -> None:
        if self.port is not None:
            self.port.close()


class UdpPeer:
    """Stands in for WireGuard in front of the client: sends and collects.

    A raw socket, not an asyncio transport: asyncio's ``sendto`` silently
    skips empty datagrams on Python 3.11, and size 0 is one we test.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.inbox: asyncio.Queue[bytes] = asyncio.Queue()
        self.port = UdpPort(
            asyncio.get_running_loop(), open_udp_socket(connect=target), self._on_batch
        )
        self.port.start()

    def _on_batch(self, batch: list) -> None:
        for data, _addr in batch:
            self.inbox.put_nowait(data)

    @classmethod
    async def open(cls, target: tuple[str, int]) -> UdpPeer:
        return cls(target)

    def send(self, data: bytes) -> None:
        self.port.sock.send(data)

    async def recv(self, timeout: float = 5.0) -> bytes:
        return await asyncio.wait_for(self.inbox.get(), timeout)

    async def drain(self, count: int, timeout: float = 10.0) -> list[bytes]:
        """Collect up to ``count`` datagrams, stopping early after ``timeout``."""
        out: list[bytes] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(out) < count:
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                out.append(await asyncio.wait_for(self.inbox.get(), left))
            except asyncio.TimeoutError:
                break
        return out

    def close(self) -> None:
        self.port.close()


def server_config(pki: Any, wg_addr: tuple[str, int], **tcp: Any) -> ut.Config:
    extra = tcp.pop("_extra", {})
    cfg = {
        "role": "server",
        "tcp": {"listen_addr": "127.0.0.1:0", "lanes": 5, **tcp},
        "udp": {"wg_udp_addr": f"{wg_addr[0]}:{wg_addr[1]}"},
        "metrics": {"enabled": False},
        "tls": {"ca_cert": str(pki.ca), "cert": str(pki.server_cert), "key": str(pki.server_key)},
    }
    _merge(cfg, extra)
    return ut.load_config(cfg)


def client_config(
    pki: Any, server_addr: tuple[str, int], cert: Any = None, **tcp: Any
) -> ut.Config:
    extra = tcp.pop("_extra", {})
    cert_path, key_path = cert if cert is not None else pki.client("home")
    cfg = {
        "role": "client",
        "tcp": {
            "server_addr": f"{server_addr[0]}:{server_addr[1]}", "lanes": 5,
            "dial_backoff_min_seconds": 0.1, "dial_backoff_max_seconds": 0.5, **tcp,
        },
        "udp": {"listen_addr": "127.0.0.1:0"},
        "metrics": {"enabled": False},
        "tls": {"ca_cert": str(pki.ca), "cert": str(cert_path), "key": str(key_path),
                "server_name": pki.server_name},
    }
    _merge(cfg, extra)
    return ut.load_config(cfg)


def _merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v


@dataclass
class Tunnel:
    server: ut.Server
    client: ut.Client
    echo: UdpEcho
    peer: UdpPeer
    pki: Any


@contextlib.asynccontextmanager
async def tunnel(
    pki: Any, *, lanes: int = 5, server_tcp: dict | None = None, client_tcp: dict | None = None
) -> AsyncIterator[Tunnel]:
    """A server with a UDP echo behind it, a client, and a peer in front of it."""
    echo = UdpEcho().start()
    server = ut.Server(server_config(pki, echo.address, lanes=lanes, **(server_tcp or {})))
    await server.start()
    client = ut.Client(client_config(pki, server.address[:2], lanes=lanes, **(client_tcp or {})))
    await client.start()
    peer = await UdpPeer.open(client.udp_address[:2])
    try:
        yield Tunnel(server, client, echo, peer, pki)
    finally:
        peer.close()
        await client.close()
        await server.close()
        echo.close()


async def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.02) -> bool:
    """Poll ``predicate()`` until true or ``timeout`` seconds pass."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval)
    return bool(predicate())


@dataclass
class LogCapture(logging.Handler):
    """Collects the tunnel's structured events (the ``ut`` logger)."""

    events: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        logging.Handler.__init__(self, logging.DEBUG)

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "ut", None)
        if fields is not None:
            self.events.append(dict(fields))

    def named(self, name: str) -> list[dict]:
        return [e for e in self.events if e.get("event") == name]

    def __hash__(self) -> int:
        return id(self)


@contextlib.contextmanager
def capture_events() -> Any:
    logger = logging.getLogger("ut")
    cap = LogCapture()
    old_level = logger.level
    logger.addHandler(cap)
    logger.setLevel(logging.DEBUG)
    try:
        yield cap
    finally:
        logger.removeHandler(cap)
        logger.setLevel(old_level)


# Tunnel tests run under these (loop, fast path) pairs: both loops with the
# compiled path, and the pure twin on uvloop, so one pytest run covers both
# implementations without running every combination.
VARIANTS = ("asyncio-compiled", "uvloop-compiled", "uvloop-pure")


@contextlib.contextmanager
def use_implementation(name: str) -> Any:
    """Point ``ut.fastpath`` at the ``compiled`` or ``pure`` module for a test.

    The tunnel looks names up on ``ut.fastpath`` when it builds lanes, queues and
    ports, so swapping them before a tunnel starts switches its implementation.
    """
    import importlib
    import os

    from ut import fastpath

    if name == "compiled":
        if os.environ.get("UT_NO_EXTENSIONS", "") not in ("", "0"):
            import pytest

            pytest.skip("UT_NO_EXTENSIONS is set: the compiled variant does not apply")
        module = importlib.import_module("ut._fastpath")
    else:
        module = importlib.import_module("ut._purepy")
    saved = {n: getattr(fastpath, n) for n in fastpath.__all__}
    try:
        for n in fastpath.__all__:
            if n != "IMPLEMENTATION" and hasattr(module, n):
                setattr(fastpath, n, getattr(module, n))
        fastpath.IMPLEMENTATION = name
        yield module
    finally:
        for n, v in saved.items():
            setattr(fastpath, n, v)
