"""Lane socket options (issue 14): ``tcp.sock_buf`` is applied after the TCP handshake,
so the handshake still negotiates window scaling; 0 leaves the kernel's autotuning.

Issue 15 ("a normal TCP handshake"): the SYN and SYN-ACK of a lane must look like any
other socket's on the host. What the handshake negotiated is in TCP_INFO (each side's
window scale); both ends of every lane, client and server, must show exactly what a
plain socket pair with no options shows on the same host.
"""

from __future__ import annotations

import socket
import sys

import pytest

from ut._testbase.tunnelkit import run_on, tunnel
from ut.tcpsock import tcp_state

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="TCP_INFO and SO_RCVBUF doubling are Linux's")


def _wscale(sock) -> tuple[int, int]:
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return raw[6] & 0x0F, raw[6] >> 4  # tcpi_snd_wscale, tcpi_rcv_wscale


def _plain_pair_wscale() -> tuple[tuple[int, int], tuple[int, int]]:
    """(client side, server side) window scales of a plain loopback connection."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        with socket.create_connection(listener.getsockname()) as client:
            server, _ = listener.accept()
            with server:
                return _wscale(client), _wscale(server)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("sock_buf", [0, 16384])
def test_sock_buf_keeps_window_scaling(pki, sock_buf, loop):
    plain_client, plain_server = _plain_pair_wscale()
    assert plain_client[1] > 0, "this host's plain sockets negotiate no window scale"

    async def main():
        async with tunnel(pki, lanes=2, client_tcp={"sock_buf": sock_buf},
                          server_tcp={"sock_buf": sock_buf}) as t:
            t.peer.send(b"x" * 100)
            assert await t.peer.recv()
            client_lanes = [lane for lane in t.client.session.lanes if lane is not None]
            (server_session,) = t.server.sessions.values()
            server_lanes = [lane for lane in server_session.lanes if lane is not None]
            assert client_lanes and server_lanes
            for lane, plain in [(lane, plain_client) for lane in client_lanes] + [
                    (lane, plain_server) for lane in server_lanes]:
                snd, rcv = _wscale(lane.sock)
                assert snd > 0 and rcv > 0, "the SYN offered no window scale"
                # The handshake a lane made is the one any socket on this host makes.
                assert (snd, rcv) == plain, (lane.owner.role, (snd, rcv), plain)
                rcvbuf = lane.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
                if sock_buf:
                    assert rcvbuf == 2 * sock_buf  # Linux doubles what it is given
                st = tcp_state(lane.sock)
                assert st is not None and st.rtt_seconds >= 0 and not st.in_loss

    run_on(loop, main())
