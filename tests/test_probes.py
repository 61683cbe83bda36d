"""Active probers see an ordinary web server (issue: active probers).

A real nginx (Debian ``nginx-light``, ``ut._testbase.nginx``) started here is both the
*reference* (its own HTTPS port) and the *fallback* (its plain-HTTP and h2c ports) of a
ut-tunnel server with ``tls.client_auth: proof``. Every probe of the table in
docs/security.md ("Active probers") goes to both, and the answers must have the same
shape: status line, error page bytes, ALPN, TLS version, how the connection ends, and the
time to that end within ``TIME_FACTOR``. ``openssl s_client`` judges whether a handshake
asks for a client certificate; ``curl`` makes the HTTP/2 request.

Without nginx, openssl or curl these tests skip; with ``UT_REQUIRE_E2E=1`` (CI) they fail.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import ut
from ut._testbase import probes
from ut._testbase.certs import TestPki
from ut._testbase.nginx import Nginx
from ut._testbase.require import require_tools
from ut._testbase.tunnelkit import UdpEcho, run_on, server_config

# nginx's timeouts, shortened for the test on both sides (the web face's defaults are
# nginx's: 60 s and 75 s).
HEADER_TIMEOUT = 1.5
HELLO_TIMEOUT = 0.5  # how long the gate waits for a proof after the handshake
# Time to close, ours / nginx's: the gate's wait for a proof comes before the fallback's
# own timer (with the defaults, (3 + 60) / 60 = 1.05).
TIME_FACTOR = (HELLO_TIMEOUT + HEADER_TIMEOUT) / HEADER_TIMEOUT + 0.25
GET = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"


@pytest.fixture(scope="module")
def nginx(pki: TestPki, tmp_path_factory: pytest.TempPathFactory) -> Any:
    require_tools("nginx", "openssl", "curl")
    ng = Nginx(tmp_path_factory.mktemp("nginx"), pki.server_cert, pki.server_key,
               header_timeout=HEADER_TIMEOUT).start()
    try:
        yield ng
    finally:
        ng.stop()


def _with_server(pki: TestPki, nginx: Nginx, fallback: bool, client_auth: str = "proof") -> Callable:
    """Run ``probe(ours, reference) -> None`` (blocking) against a live server."""
    def run(check: Callable[[tuple, tuple, Any], None]) -> None:
        async def main() -> None:
            echo = UdpEcho().start()
            extra: dict = {"tls": {"client_auth": client_auth}}
            if fallback and client_auth == "proof":
                extra["fallback"] = {"addr": f"127.0.0.1:{nginx.http_port}",
                                     "h2_addr": f"127.0.0.1:{nginx.h2c_port}"}
            server = ut.Server(server_config(pki, echo.address, _extra=extra,
                                             hello_timeout_seconds=HELLO_TIMEOUT))
            await server.start()
            if server.transport.gate is not None:  # type: ignore[union-attr]
                server.transport.gate.face.header_timeout = HEADER_TIMEOUT  # type: ignore[union-attr]
            try:
                await asyncio.to_thread(check, server.address[:2], ("127.0.0.1", nginx.tls_port),
                                        server)
            finally:
                await server.close()
                echo.close()

        run_on("uvloop", main(), timeout=120)
    return run


def _same_shape(ours: probes.Answer, ref: probes.Answer, *, body: bool = True) -> None:
    assert ours.status == ref.status, (ours.data[:200], ref.data[:200])
    assert ours.end == ref.end, (ours.end, ref.end)
    assert ours.alpn == ref.alpn and ours.version == ref.version
    for name in ("Server", "Content-Type", "Connection"):
        assert ours.header(name) == ref.header(name), name
    if body:
        assert ours.body == ref.body
    if ref.end != "open":
        assert ours.seconds <= max(ref.seconds * TIME_FACTOR, ref.seconds + 0.05), (ours, ref)
        assert ours.seconds >= ref.seconds / TIME_FACTOR - 0.05, (ours, ref)
    assert b"ut-tunnel" not in ours.data.lower() and b"ut_tunnel" not in ours.data.lower()


# Each probe: (name, function(addr) -> Answer, compare bodies). Bodies differ only where
# the page comes from the built-in site rather than nginx's own files.
PROBES: list[tuple[str, Callable[[tuple], probes.Answer], bool]] = [
    ("connect, send nothing", lambda a: probes.probe_plain(a, b"", wait=HEADER_TIMEOUT * 3), True),
    ("plain GET on the TLS port", lambda a: probes.probe_plain(a, GET), True),
    ("512 random bytes", lambda a: probes.probe_plain(a, b"\x01" + os.urandom(511)), True),
    ("TLS 1.3, no certificate, GET /", lambda a: probes.probe_tls(a, GET, wait=1.0), True),
    ("TLS 1.3, no certificate, GET /nope, close",
     lambda a: probes.probe_tls(a, b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
     True),
    ("TLS 1.3, garbage", lambda a: probes.probe_tls(a, b"\x01\x02garbage\r\n\r\n"), True),
    ("TLS 1.3, ALPN h2 + http/1.1, nothing sent",
     lambda a: probes.probe_tls(a, b"", alpn=("h2", "http/1.1"), wait=0.5), True),
    ("TLS 1.3, silent after the handshake",
     lambda a: probes.probe_tls(a, b"", wait=HEADER_TIMEOUT * 3), True),
    ("TLS 1.2, no certificate, GET /",
     lambda a: probes.probe_tls(a, GET.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"),
                                version="1.2"), True),
]


@pytest.mark.parametrize("name, probe, body", PROBES, ids=[p[0] for p in PROBES])
def test_probe_answers_like_nginx_with_nginx_as_fallback(pki: TestPki, nginx: Nginx, name: str,
                                                         probe: Callable, body: bool) -> None:
    def check(ours: tuple, ref: tuple, server: Any) -> None:
        _same_shape(probe(ours), probe(ref), body=body)
        assert server.stats()["sessions"] == []

    _with_server(pki, nginx, fallback=True)(check)


SITE_PROBES = [p for p in PROBES if "ALPN h2" not in p[0]]


@pytest.mark.parametrize("name, probe, body", SITE_PROBES, ids=[p[0] for p in SITE_PROBES])
def test_probe_answers_like_nginx_with_the_built_in_site(pki: TestPki, nginx: Nginx, name: str,
                                                         probe: Callable, body: bool) -> None:
    """No fallback configured: the built-in site. nginx's own page for ``/`` is another
    file, so only its status line and headers are compared there."""
    def check(ours: tuple, ref: tuple, server: Any) -> None:
        same_body = body and "GET /" not in name or "nope" in name
        _same_shape(probe(ours), probe(ref), body=same_body)

    _with_server(pki, nginx, fallback=False)(check)


def test_http2_request_and_alpn(pki: TestPki, nginx: Nginx) -> None:
    """curl over HTTP/2 gets the same answer; the built-in site, like an nginx without
    http2, selects http/1.1."""
    def check(ours: tuple, ref: tuple, server: Any) -> None:
        assert probes.curl(f"https://127.0.0.1:{ours[1]}/") == probes.curl(
            f"https://127.0.0.1:{ref[1]}/") == ("2", "200")
        assert probes.curl(f"https://127.0.0.1:{ours[1]}/", http2=False) == ("1.1", "200")
        assert server.stats()["web_face"]["fallback"] == 2

    _with_server(pki, nginx, fallback=True)(check)

    def check_site(ours: tuple, ref: tuple, server: Any) -> None:
        assert probes.curl(f"https://127.0.0.1:{ours[1]}/") == ("1.1", "200")
        assert server.stats()["web_face"]["site"] == 1

    _with_server(pki, nginx, fallback=False)(check_site)


@pytest.mark.parametrize("client_auth, asks", [("proof", False), ("handshake", True)])
def test_certificate_request_only_in_handshake_mode(pki: TestPki, nginx: Nginx, client_auth: str,
                                                    asks: bool) -> None:
    def check(ours: tuple, ref: tuple, server: Any) -> None:
        assert probes.s_client_asks_certificate(ref) is False
        for tls13 in (True, False):
            assert probes.s_client_asks_certificate(ours, tls13=tls13) is asks

    _with_server(pki, nginx, fallback=True, client_auth=client_auth)(check)


def test_nginx_helper_serves_its_files(nginx: Nginx, tmp_path: Path) -> None:
    ans = probes.probe_plain(("127.0.0.1", nginx.http_port), GET.replace(
        b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
    assert ans.status == "HTTP/1.1 200 OK" and b"Hello." in ans.body
