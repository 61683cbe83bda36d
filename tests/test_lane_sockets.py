"""Lane socket options (issue 14): ``tcp.sock_buf`` is applied after the TCP handshake,
so the handshake still negotiates window scaling; 0 leaves the kernel's autotuning."""

from __future__ import annotations

import socket
import sys

import pytest

from tests.tunnelkit import run_on, tunnel
from ut.lane import tcp_state

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="TCP_INFO and SO_RCVBUF doubling are Linux's")


def _wscale(sock) -> tuple[int, int]:
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return raw[6] & 0x0F, raw[6] >> 4  # tcpi_snd_wscale, tcpi_rcv_wscale


@pytest.mark.parametrize("sock_buf", [0, 16384])
def test_sock_buf_keeps_window_scaling(pki, sock_buf):
    async def main():
        async with tunnel(pki, lanes=2, client_tcp={"sock_buf": sock_buf},
                          server_tcp={"sock_buf": sock_buf}) as t:
            t.peer.send(b"x" * 100)
            assert await t.peer.recv()
            lanes = [lane for lane in t.client.session.lanes if lane is not None]
            (server_session,) = t.server.sessions.values()
            lanes += [lane for lane in server_session.lanes if lane is not None]
            assert lanes
            for lane in lanes:
                snd, rcv = _wscale(lane.sock)
                assert snd > 0 and rcv > 0, "the SYN offered no window scale"
                rcvbuf = lane.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
                if sock_buf:
                    assert rcvbuf == 2 * sock_buf  # Linux doubles what it is given
                st = tcp_state(lane.sock)
                assert st is not None and st.rtt_seconds >= 0 and not st.in_loss

    run_on("uvloop", main())
