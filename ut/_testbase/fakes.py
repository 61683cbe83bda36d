"""Stand-ins with no network for unit tests: an asyncio transport, a UDP port, an open lane.

Enough of each for ``ut.lane.Lane`` and ``ut.session.Session`` to run on (the fuzz tests
feed them random bytes; the session tests time their queue).
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["FakeTransport", "FakePort", "open_lane"]


class FakeTransport(asyncio.Transport):
    """Enough of an asyncio transport for a Lane (no network)."""

    def __init__(self, cn: str = "fuzz") -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.closed = self.aborted = False
        self.cn = cn
        self.buffered = 0  # what get_write_buffer_size reports (a test sets a backlog)

    def write(self, data):
        self.written.append(bytes(data))

    def is_closing(self):
        return self.closed or self.aborted

    def close(self):
        self.closed = True

    def abort(self):
        self.aborted = True

    def set_write_buffer_limits(self, high=None, low=None):
        pass

    def get_write_buffer_size(self):
        return self.buffered

    def get_extra_info(self, name, default=None):
        if name == "peername":
            return ("127.0.0.1", 4242)
        if name == "ssl_object":
            cn = self.cn

            class Obj:
                def getpeercert(self):
                    return {"subject": ((("commonName", cn),),)}
            return Obj()
        return default


def open_lane(owner: Any, lane_id: int, role: str = "server") -> Any:
    """A Lane whose HELLO exchange is done, on a FakeTransport (no network)."""
    from ut.lane import Lane
    from ut.laneproto import LaneMachine, State

    machine = LaneMachine(role, lane_id=lane_id, max_lanes=max(lane_id + 1, 1))
    machine.state = State.OPEN
    lane = Lane(owner, machine)
    lane.connection_made(FakeTransport())
    return lane


class FakePort:
    def __init__(self) -> None:
        self.sent = 0
        self.sock = type("S", (), {"fileno": lambda self: 3})()

    closed = False  # as UdpPort.closed

    def send_many(self, datagrams, addr=None):
        self.sent += len(datagrams)
        return len(datagrams), 0
