"""A lane we drive frame by frame: a real client TLS connection to a real server.

``RawLane.open(pki, server)`` connects with a client certificate from the test PKI and,
when the server runs ``tls.client_auth: proof`` (the default), first sends the client
proof, exactly as ``ut.transport.TlsTransport.secure`` does; after that the test writes
whatever frames it likes (broken ones included) and reads what the server answers.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from ut import fastpath
from ut.control import Hello, control_frame, decode_control
from ut.tls import client_context

__all__ = ["RawLane"]


class RawLane:
    """One TLS connection to ``server`` that speaks only what the test writes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.deframer = fastpath.Deframer()
        self.frames: list = []

    @classmethod
    async def open(cls, pki: Any, server: Any, name: str = "home",
                   cert: tuple[Any, Any] | None = None) -> RawLane:
        cert_path, key_path = cert or pki.client(name)
        ctx = client_context(pki.ca, cert_path, key_path)
        r, w = await asyncio.open_connection(
            *server.address[:2], ssl=ctx, server_hostname=pki.server_name)
        if server.config.tls.client_auth == "proof":
            from ut.proof import ClientProver

            obj = w.get_extra_info("ssl_object")
            binding = obj.get_channel_binding("tls-unique") or b""
            w.write(ClientProver(pki.ca, cert_path, key_path).request(pki.server_name, binding))
        return cls(r, w)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def read_some(self, timeout: float = 5.0) -> bool:
        """Read once into ``frames``; False at EOF, error or timeout."""
        try:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
        except (ConnectionError, OSError, asyncio.TimeoutError, ssl.SSLError):
            return False
        if not data:
            return False
        try:
            self.frames.extend(self.deframer.feed(data))
        except Exception:  # noqa: BLE001 - we only watch
            return False
        return True

    async def frames_until_closed(self, timeout: float = 10.0) -> list:
        """Every frame read until the server closes (or ``timeout``)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline and await self.read_some(deadline - loop.time()):
            pass
        return self.frames

    async def hello(self, session_id: int, lane_id: int, lanes: int) -> Hello:
        """Send a HELLO and return the server's."""
        self.send(control_frame(Hello(session_id, lane_id, lanes)))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while loop.time() < deadline:
            for msg in self.controls():
                if isinstance(msg, Hello):
                    return msg
            if not await self.read_some(deadline - loop.time()):
                break
        raise AssertionError(f"no HELLO reply: {self.frames}")

    async def until_closed(self, timeout: float = 5.0) -> float:
        """Seconds until the server closes; AssertionError if it does not."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        while loop.time() - t0 < timeout:
            if not await self.read_some(timeout - (loop.time() - t0)):
                return loop.time() - t0
        raise AssertionError("the server did not close the lane")

    def controls(self) -> list:
        return [decode_control(p) for t, _f, p in self.frames if t == fastpath.TYPE_CTRL]

    def data(self) -> list[bytes]:
        return [p for t, _f, p in self.frames if t == fastpath.TYPE_DATA]

    def close(self) -> None:
        self.writer.close()
