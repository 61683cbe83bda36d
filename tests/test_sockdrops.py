"""Datagrams the kernel drops at our own full UDP socket are counted (ut/sockdrops.py).

Real sockets on loopback: a receiver with a tiny buffer that is not read, a burst sent at
it, and the kernel's own per-socket counter compared with what ut-tunnel reports. The
end-to-end check through a real tunnel is in tests/test_metrics_traffic.py.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys

import pytest

from ut._testbase.tunnelkit import run_on, wait_for
from ut.sockdrops import read_drop_table, watcher_for
from ut.udp import UdpPort, open_udp_socket

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="per-socket drop counters are Linux's /proc/net/udp"
)

HEADER = ("  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  "
          "timeout inode ref pointer drops\n")
V4 = ("  123: 0100007F:3A98 00000000:0000 07 00000000:00000000 00:00000000 00000000     0"
      "        0 45678 2 0000000000000000 17\n")
V6 = ("  200: 00000000000000000000000001000000:3A99 00000000000000000000000000000000:0000 07 "
      "00000000:00000000 00:00000000 00000000     0        0 45679 2 0000000000000000 0\n")


def test_table_is_read_from_both_files_and_missing_ones_are_skipped(tmp_path):
    v4, v6 = tmp_path / "udp", tmp_path / "udp6"
    v4.write_text(HEADER + V4)
    v6.write_text(HEADER + V6)
    assert read_drop_table((str(v4), str(v6), str(tmp_path / "absent"))) == {45678: 17, 45679: 0}
    assert read_drop_table((str(tmp_path / "absent"),)) == {}


def small_receiver() -> socket.socket:
    """A bound, non-blocking UDP socket whose buffer holds only a few datagrams."""
    sock = open_udp_socket(bind=("127.0.0.1", 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return sock


def burst(addr: tuple, n: int = 200, size: int = 1000) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        for _ in range(n):
            tx.sendto(bytes(size), addr)


def drain(sock: socket.socket) -> int:
    got = 0
    while True:
        try:
            sock.recv(65535)
        except BlockingIOError:
            return got
        got += 1


@linux_only
def test_kernel_counter_is_what_was_not_read():
    rx = small_receiver()
    try:
        burst(rx.getsockname())
        got = drain(rx)
        drops = read_drop_table()[os.fstat(rx.fileno()).st_ino]
        assert drops > 0 and got + drops == 200, (got, drops)
    finally:
        rx.close()


@linux_only
@pytest.mark.parametrize("kind", ["asyncio", "uvloop"])
def test_udp_port_reports_each_drop_once(kind):
    async def main():
        loop = asyncio.get_running_loop()
        got: list = []
        reported: list[int] = []
        port = UdpPort(loop, small_receiver(), got.extend, None, reported.append)
        port.start()
        port.pause()  # watched, not read: the burst overflows the socket
        burst(port.address)
        port.start()
        assert await wait_for(lambda: len(got) + sum(reported) == 200, timeout=5)
        first = sum(reported)
        burst(port.address, n=100)  # read this time: nothing more to report
        assert await wait_for(lambda: len(got) + sum(reported) == 300, timeout=5)
        port.close()
        return first, sum(reported), watcher_for(loop)

    first, total, watcher = run_on(kind, main())
    assert first > 0
    assert total >= first  # a second overflow is possible on a busy machine, counted too
    assert not watcher.watched and watcher._timer is None  # closing the last port stops it


@linux_only
def test_drops_before_close_are_counted_at_close():
    async def main():
        loop = asyncio.get_running_loop()
        reported: list[int] = []
        port = UdpPort(loop, small_receiver(), lambda b: None, None, reported.append)
        port.start()
        port.pause()
        burst(port.address)
        port.close()  # before the watcher's next tick
        return reported

    reported = run_on("asyncio", main())
    assert len(reported) == 1 and reported[0] > 0


def test_without_a_callback_nothing_is_watched():
    async def main():
        loop = asyncio.get_running_loop()
        port = UdpPort(loop, open_udp_socket(bind=("127.0.0.1", 0)), lambda b: None)
        port.start()
        watched = watcher_for(loop)
        port.close()
        return watched

    watcher = run_on("asyncio", main())
    assert watcher is None or not watcher.watched
