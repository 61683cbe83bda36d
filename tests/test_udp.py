"""UdpPort's segmentation offload: on by default on Linux, off with UT_NO_GSO=1, and off
for a port whose socket refuses it, without losing the datagrams of that send."""

from __future__ import annotations

import asyncio
import logging
import socket
import sys

import pytest

from ut import fastpath, udp
from ut._testbase.tunnelkit import use_implementation

SO_NO_CHECK = 11  # Linux: a socket without UDP checksums cannot use GSO (EINVAL)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="UDP GSO is Linux-only")


def _receiver() -> socket.socket:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(2)
    return rx


@pytest.mark.parametrize("impl", ["compiled", "pure"])
def test_port_falls_back_when_the_socket_refuses_gso(impl, caplog, monkeypatch):
    monkeypatch.setattr(udp, "_gso_off_logged", False)
    with use_implementation(impl):
        if not fastpath.HAVE_GSO:
            pytest.skip("this build has no GSO (UT_NO_MMSG=1, the macOS-like build)")

    async def main():
        with use_implementation(impl), _receiver() as rx:
            sock = udp.open_udp_socket(bind=("127.0.0.1", 0))
            sock.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)
            errors: list = []
            port = udp.UdpPort(asyncio.get_running_loop(), sock, lambda b: None, errors.append)
            assert port.gso
            grams = [b"%03d" % i * 100 for i in range(10)]
            assert port.send_many(grams, rx.getsockname()) == (10, 0)
            assert not port.gso and not errors  # a refusal is not a send error
            assert [rx.recv(2000) for _ in grams] == grams
            assert port.send_many(grams[:2], rx.getsockname()) == (2, 0)
            port.close()

    with caplog.at_level(logging.INFO):
        asyncio.run(main())
    assert [r for r in caplog.records if "udp_gso_off" in r.getMessage()]


def test_ut_no_gso_turns_it_off(monkeypatch):
    async def main():
        sock = udp.open_udp_socket(bind=("127.0.0.1", 0))
        port = udp.UdpPort(asyncio.get_running_loop(), sock, lambda b: None)
        on = port.gso
        port.close()
        return on

    assert asyncio.run(main()) == fastpath.HAVE_GSO
    monkeypatch.setenv(udp.GSO_ENV, "1")
    assert asyncio.run(main()) is False
