"""ut.tls: real mutual-TLS handshakes over loopback, and why they fail.

Every handshake test runs under the stock asyncio loop and under uvloop, with
the server accepting raw TCP and upgrading it itself, in one of two ways:

- ``start_tls``: ``create_server`` with a protocol that calls
  ``transport.pause_reading()`` in ``connection_made``, then
  ``loop.start_tls(..., server_side=True, ssl_handshake_timeout=...)``.
  Works on the stock loop (CPython 3.11.7 honours a pause made inside
  ``connection_made``, see gh-103607) but NOT on uvloop 0.23: uvloop starts reading
  right after ``connection_made`` returns, so the ClientHello is delivered to
  the plain protocol and lost, and the handshake times out. The tests below pin
  both facts down.
- ``accepted``: ``loop.sock_accept`` on a listening socket, then
  ``loop.connect_accepted_socket(factory, sock, ssl=ctx,
  ssl_handshake_timeout=...)``. Works the same on both loops, and handshake
  errors reach the caller, so ``failure_reason`` can classify them.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ut import pki as pki_mod
from ut import tls
from ut._testbase.certs import TestPki, make_test_pki
from ut.errors import ConfigError

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
    uvloop = None

LOOP_KINDS = ("asyncio", "uvloop")
HANDSHAKE_TIMEOUT = 5.0


def run(kind: str, make: Callable[[], Awaitable[Any]], timeout: float = 20.0) -> Any:
    """Run ``make()`` in a fresh loop of ``kind`` (``asyncio`` or ``uvloop``)."""
    if kind == "uvloop":
        if uvloop is None:
            pytest.skip("uvloop is not installed")
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(asyncio.wait_for(make(), timeout))
    finally:
        loop.close()


@pytest.fixture
def pki(tmp_path: Path) -> TestPki:
    return make_test_pki(tmp_path)


@pytest.fixture(params=LOOP_KINDS)
def loop_kind(request: pytest.FixtureRequest) -> str:
    return request.param


# (loop kind, server pattern) pairs that work; uvloop + start_tls is tested apart.
SERVER_KINDS = [("asyncio", "start_tls"), ("asyncio", "accepted"), ("uvloop", "accepted")]


@pytest.fixture(params=SERVER_KINDS, ids=["-".join(k) for k in SERVER_KINDS])
def server_kind(request: pytest.FixtureRequest) -> tuple[str, str]:
    return request.param


# ------------------------------------------------------------ test servers


@dataclass
class Outcome:
    """What the server saw for one connection."""

    cn: str | None = None
    version: str | None = None
    exc: BaseException | None = None

    @property
    def reason(self) -> str:
        assert self.exc is not None, f"handshake succeeded (cn={self.cn})"
        return tls.failure_reason(self.exc, side="server")[0]


class _Sink(asyncio.Protocol):
    def data_received(self, data: bytes) -> None:
        pass


class _Paused(asyncio.Protocol):
    """A raw TCP connection waiting for ``start_tls`` (the tunnel's pattern)."""

    def __init__(self, server: LaneServer) -> None:
        self.server = server
        self.early: bytes = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.pause_reading()  # type: ignore[attr-defined]
        self.server.tasks.add(asyncio.get_running_loop().create_task(self.upgrade(transport)))

    async def upgrade(self, raw: Any) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport = await loop.start_tls(
                raw, _Sink(), self.server.ctx, server_side=True,
                ssl_handshake_timeout=self.server.handshake_timeout,
            )
        except Exception as exc:  # noqa: BLE001 - recorded for the test
            raw.abort()
            self.server.outcomes.put_nowait(Outcome(exc=exc))
            return
        self.server.succeeded(transport)

    def data_received(self, data: bytes) -> None:
        self.early += data  # must never happen: reading is paused


class LaneServer:
    """Accepts raw TCP on loopback and upgrades each connection to TLS."""

    def __init__(self, ctx: ssl.SSLContext, pattern: str, handshake_timeout: float = HANDSHAKE_TIMEOUT):
        self.ctx, self.pattern, self.handshake_timeout = ctx, pattern, handshake_timeout
        self.outcomes: asyncio.Queue[Outcome] = asyncio.Queue()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.transports: list[asyncio.BaseTransport] = []
        self._server: asyncio.AbstractServer | None = None
        self._listener: socket.socket | None = None

    async def __aenter__(self) -> LaneServer:
        loop = asyncio.get_running_loop()
        if self.pattern == "start_tls":
            self._server = await loop.create_server(lambda: _Paused(self), "127.0.0.1", 0)
            self.port = self._server.sockets[0].getsockname()[1]
        else:
            self._listener = socket.create_server(("127.0.0.1", 0))
            self._listener.setblocking(False)
            self.port = self._listener.getsockname()[1]
            self.tasks.add(loop.create_task(self._accept_loop()))
        return self

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        while True:
            conn, _ = await loop.sock_accept(self._listener)
            self.tasks.add(loop.create_task(self._upgrade_accepted(conn)))

    async def _upgrade_accepted(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.connect_accepted_socket(
                _Sink, conn, ssl=self.ctx, ssl_handshake_timeout=self.handshake_timeout
            )
        except Exception as exc:  # noqa: BLE001 - recorded for the test
            conn.close()
            self.outcomes.put_nowait(Outcome(exc=exc))
            return
        self.succeeded(transport)

    def succeeded(self, transport: Any) -> None:
        self.transports.append(transport)
        version = transport.get_extra_info("ssl_object").version()
        self.outcomes.put_nowait(Outcome(cn=tls.peer_cn(transport), version=version))
        transport.write(b"hi")

    async def outcome(self, timeout: float = 10.0) -> Outcome:
        return await asyncio.wait_for(self.outcomes.get(), timeout)

    async def __aexit__(self, *exc: object) -> None:
        for task in self.tasks:
            task.cancel()
        for transport in self.transports:
            transport.abort()  # type: ignore[attr-defined]
        if self._server is not None:
            self._server.close()
        if self._listener is not None:
            self._listener.close()
        await asyncio.sleep(0)


@dataclass
class ClientResult:
    """What the client saw: handshake error, or first-read result."""

    exc: BaseException | None = None
    peer: str | None = None
    version: str | None = None
    first_read: bytes | None = None

    @property
    def reason(self) -> str:
        assert self.exc is not None, "the client saw no error"
        return tls.failure_reason(self.exc, side="client")[0]


async def dial(port: int, ctx: ssl.SSLContext, hostname: str = "localhost",
               handshake_timeout: float = HANDSHAKE_TIMEOUT) -> ClientResult:
    """Connect like a client lane, then read once (TLS 1.3 refusals show up there)."""
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname=hostname,
            ssl_handshake_timeout=handshake_timeout,
        )
    except Exception as exc:  # noqa: BLE001
        return ClientResult(exc=exc)
    result = ClientResult(
        peer=tls.peer_cn(writer.transport), version=writer.get_extra_info("ssl_object").version()
    )
    try:
        result.first_read = await asyncio.wait_for(reader.readexactly(2), 5)
    except Exception as exc:  # noqa: BLE001
        result.exc = exc
    writer.transport.abort()
    return result


def client_ctx(pki: TestPki, cert: Path | None = None, key: Path | None = None,
               max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    if cert is None:
        cert, key = pki.client("home")
    ctx = tls.client_context(pki.ca, cert, key)
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


def server_ctx(pki: TestPki, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    return tls.server_context(pki.ca, cert or pki.server_cert, key or pki.server_key)


# ------------------------------------------------------------------ contexts


def test_context_settings(pki: TestPki) -> None:
    s = server_ctx(pki)
    c = client_ctx(pki)
    for ctx in (s, c):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
        assert ctx.maximum_version in (ssl.TLSVersion.MAXIMUM_SUPPORTED, ssl.TLSVersion.TLSv1_3)
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        # Deliberately not strict: a CA without keyUsage, a leaf without AKI are accepted
        # (tests/test_byo_ca.py, docs/guide.md "Bring your own CA").
        assert not ctx.verify_flags & ssl.VERIFY_X509_STRICT
        # Only our CA: no system trust store.
        assert ctx.cert_store_stats()["x509_ca"] == 1
        assert [dict(x[0] for x in ca["subject"])["commonName"] for ca in ctx.get_ca_certs()] == [
            pki_mod.cert_cn(pki_mod.load_cert(pki.ca))
        ]
    assert c.check_hostname is True
    assert s.check_hostname is False


@pytest.mark.parametrize("make", [tls.server_context, tls.client_context])
def test_context_file_errors_name_file_and_key(pki: TestPki, tmp_path: Path, make: Any) -> None:
    missing = tmp_path / "missing.pem"
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a pem\n")
    other_key = pki.client("other")[1]
    cases = [
        ((missing, pki.server_cert, pki.server_key), "tls.ca_cert", missing, "file not found"),
        ((garbage, pki.server_cert, pki.server_key), "tls.ca_cert", garbage, "not a PEM"),
        ((pki.ca, missing, pki.server_key), "tls.cert", missing, "file not found"),
        ((pki.ca, garbage, pki.server_key), "tls.cert", garbage, "not a PEM certificate"),
        ((pki.ca, pki.server_cert, garbage), "tls.key", garbage, "not a PEM private key"),
        ((pki.ca, pki.server_cert, other_key), "tls.key", other_key, "does not belong"),
        ((pki.ca, tmp_path, pki.server_key), "tls.cert", tmp_path, "directory"),
    ]
    for args, key, path, words in cases:
        with pytest.raises(ConfigError) as info:
            make(*args)
        err = info.value
        assert (err.key, err.file) == (key, str(path)), str(err)
        assert words in err.problem
        assert str(err).startswith(f"{path}: {key}: ")


def test_encrypted_key_is_refused_with_a_clear_message(pki: TestPki, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    from ut.pki import load_key

    encrypted = tmp_path / "enc.key"
    encrypted.write_bytes(load_key(pki.server_key).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    ))
    with pytest.raises(ConfigError) as info:
        tls.server_context(pki.ca, pki.server_cert, encrypted)
    assert info.value.key == "tls.key" and "encrypted" in info.value.problem


def test_own_cn(pki: TestPki, tmp_path: Path) -> None:
    assert tls.own_cn(pki.server_cert) == "localhost"
    assert tls.own_cn(pki.client("home-1")[0]) == "home-1"
    with pytest.raises(ConfigError):
        tls.own_cn(tmp_path / "nope.pem")


def test_peer_cn_rejects_non_tls_and_nameless_peers() -> None:
    class FakeSSLObject:
        def __init__(self, cert: dict[str, Any]) -> None:
            self.cert = cert

        def getpeercert(self) -> dict[str, Any]:
            return self.cert

    class FakeTransport:
        def __init__(self, obj: Any) -> None:
            self.obj = obj

        def get_extra_info(self, name: str) -> Any:
            return self.obj if name == "ssl_object" else None

    named = FakeSSLObject({"subject": ((("organizationName", "x"),), (("commonName", "home"),))})
    assert tls.peer_cn(named) == "home"
    assert tls.peer_cn(FakeTransport(named)) == "home"
    with pytest.raises(ValueError, match="not a TLS connection"):
        tls.peer_cn(object())
    with pytest.raises(ValueError, match="not a TLS connection"):
        tls.peer_cn(FakeTransport(None))  # a plain TCP transport
    with pytest.raises(ValueError, match="no certificate"):
        tls.peer_cn(FakeSSLObject({}))
    with pytest.raises(ValueError, match="no CN"):
        tls.peer_cn(FakeSSLObject({"subject": ((("organizationName", "x"),),)}))


# ---------------------------------------------------------------- handshakes


@pytest.mark.parametrize("version", ["TLSv1.3", "TLSv1.2"])
def test_handshake_ok_gives_peer_cn_both_ways(pki: TestPki, server_kind: tuple[str, str], version: str) -> None:
    loop_kind, pattern = server_kind
    max_version = ssl.TLSVersion.TLSv1_2 if version == "TLSv1.2" else None

    async def main() -> None:
        async with LaneServer(server_ctx(pki), pattern) as server:
            result = await dial(server.port, client_ctx(pki, max_version=max_version))
            outcome = await server.outcome()
        assert outcome.exc is None, tls.failure_reason(outcome.exc)
        assert (outcome.cn, outcome.version) == ("home", version)
        assert result.exc is None, tls.failure_reason(result.exc)
        assert (result.peer, result.version, result.first_read) == ("localhost", version, b"hi")

    run(loop_kind, main)


def test_ip_address_dialling_verifies_ip_san(pki: TestPki, loop_kind: str) -> None:
    async def main() -> None:
        async with LaneServer(server_ctx(pki), "accepted") as server:
            result = await dial(server.port, client_ctx(pki), hostname="127.0.0.1")
            assert (await server.outcome()).cn == "home"
        assert result.first_read == b"hi"

    run(loop_kind, main)


# Client certificate problems: (how to make the client context, server-side reason).
CLIENT_CASES = {
    "other_ca": (lambda p: client_ctx(p, *p.client("evil", other_ca=True)), "unknown_ca"),
    "expired": (lambda p: client_ctx(p, *p.client("old", expired=True)), "expired"),
    "not_yet_valid": (lambda p: client_ctx(p, *p.client("new", not_yet_valid=True)), "not_yet_valid"),
    "no_certificate": (lambda p: _no_cert_ctx(p), "no_certificate"),
    "server_cert_as_client": (lambda p: client_ctx(p, p.server_cert, p.server_key), "bad_certificate"),
}


def _no_cert_ctx(p: TestPki, max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(p.ca)
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


@pytest.mark.parametrize("version", ["TLSv1.3", "TLSv1.2"])
@pytest.mark.parametrize("case", list(CLIENT_CASES))
def test_server_refuses_bad_client_certificate(
    pki: TestPki, server_kind: tuple[str, str], case: str, version: str
) -> None:
    loop_kind, pattern = server_kind
    make_ctx, expected = CLIENT_CASES[case]

    async def main() -> None:
        ctx = make_ctx(pki)
        if version == "TLSv1.2":
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        async with LaneServer(server_ctx(pki), pattern) as server:
            result = await dial(server.port, ctx)
            outcome = await server.outcome()
        reason, text = tls.failure_reason(outcome.exc, side="server")  # type: ignore[arg-type]
        assert reason == expected, text
        # asyncio and uvloop never flush the server's alert: the client sees the
        # connection drop (TLS 1.2: during the handshake; TLS 1.3: on its first read).
        assert result.first_read is None
        assert result.reason == "closed", tls.failure_reason(result.exc)  # type: ignore[arg-type]
        if version == "TLSv1.3":
            assert result.version == "TLSv1.3"  # the client believed the handshake had finished

    run(loop_kind, main)


def test_server_side_texts_say_what_to_do(pki: TestPki) -> None:
    async def main() -> None:
        async with LaneServer(server_ctx(pki), "accepted") as server:
            await dial(server.port, client_ctx(pki, *pki.client("evil", other_ca=True)))
            outcome = await server.outcome()
        reason, text = tls.failure_reason(outcome.exc, side="server")  # type: ignore[arg-type]
        assert reason == "unknown_ca"
        assert "client certificate not signed by this server's CA" in text
        assert "`ut-tunnel pki client`" in text
        assert text.endswith("(unable to get local issuer certificate)")

    run("asyncio", main)


# Server certificate problems: (server cert maker, client hostname, client-side reason).
SERVER_CASES = {
    "wrong_name": (lambda p: p.server_cert_for("wrong.example"), "localhost", "wrong_name"),
    "wrong_ip": (lambda p: p.server_cert_for("wrong.example"), "127.0.0.1", "wrong_name"),
    "unknown_ca": (lambda p: p.server(other_ca=True), "localhost", "unknown_ca"),
    "expired": (lambda p: p.server(expired=True), "localhost", "expired"),
    "not_yet_valid": (lambda p: p.server(not_yet_valid=True), "localhost", "not_yet_valid"),
    "client_cert_as_server": (lambda p: p.client("localhost"), "localhost", "bad_certificate"),
}


@pytest.mark.parametrize("version", ["TLSv1.3", "TLSv1.2"])
@pytest.mark.parametrize("case", list(SERVER_CASES))
def test_client_refuses_bad_server_certificate(
    pki: TestPki, server_kind: tuple[str, str], case: str, version: str
) -> None:
    loop_kind, pattern = server_kind
    make_cert, hostname, expected = SERVER_CASES[case]
    max_version = ssl.TLSVersion.TLSv1_2 if version == "TLSv1.2" else None

    async def main() -> None:
        cert, key = make_cert(pki)
        async with LaneServer(server_ctx(pki, cert, key), pattern) as server:
            result = await dial(server.port, client_ctx(pki, max_version=max_version), hostname=hostname)
            outcome = await server.outcome()
        assert isinstance(result.exc, ssl.SSLCertVerificationError)
        reason, text = tls.failure_reason(result.exc, side="client")
        assert reason == expected, text
        if expected == "wrong_name":
            assert "tls.server_name" in text and f"'{hostname}'" in text
        # The client aborts without an alert from asyncio/uvloop: the server sees a reset.
        assert outcome.reason == "closed"

    run(loop_kind, main)


# ----------------------------------------- TLS 1.3: refusal seen on first read


def _blocking_tls_server(ctx: ssl.SSLContext, seen: list[Any]) -> int:
    """A one-shot server on a thread, using blocking ``ssl`` sockets: unlike
    asyncio and uvloop, it sends its alert before closing (as Go's or OpenSSL's
    servers do)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError as exc:
            seen.append(exc)
            return
        finally:
            listener.close()
        conn.settimeout(10)
        try:
            with ctx.wrap_socket(conn, server_side=True) as tls_conn:
                seen.append(tls.peer_cn(tls_conn))
                tls_conn.sendall(b"hi")
        except Exception as exc:  # noqa: BLE001
            seen.append(exc)
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1]


# case -> (server-side reason, client-side reason from the alert, alert words)
ALERT_CASES = {
    "no_certificate": ("no_certificate", "no_certificate", "tlsv13 alert certificate required"),
    "other_ca": ("unknown_ca", "unknown_ca", "tlsv1 alert unknown ca"),
    "expired": ("expired", "expired", "sslv3 alert certificate expired"),
    "not_yet_valid": ("not_yet_valid", "bad_certificate", "sslv3 alert bad certificate"),
    "server_cert_as_client": ("bad_certificate", "bad_certificate", "sslv3 alert unsupported certificate"),
}


@pytest.mark.parametrize("case", list(ALERT_CASES))
def test_tls13_client_classifies_alert_on_first_read(pki: TestPki, loop_kind: str, case: str) -> None:
    server_reason, client_reason, words = ALERT_CASES[case]
    make_ctx, _ = CLIENT_CASES[case]

    async def main() -> None:
        seen: list[Any] = []
        port = _blocking_tls_server(server_ctx(pki), seen)
        result = await dial(port, make_ctx(pki))
        await asyncio.sleep(0.05)
        # The handshake "succeeded" for the client; the refusal came on the first read.
        assert result.version == "TLSv1.3"
        assert isinstance(result.exc, ssl.SSLError), result.exc
        assert words in str(result.exc)
        reason, text = tls.failure_reason(result.exc, side="client")
        assert reason == client_reason, text
        assert tls.failure_reason(seen[0], side="server")[0] == server_reason

    run(loop_kind, main)


def test_tls13_alert_text_tells_the_client_what_to_do(pki: TestPki) -> None:
    async def main() -> None:
        port = _blocking_tls_server(server_ctx(pki), [])
        result = await dial(port, _no_cert_ctx(pki))
        reason, text = tls.failure_reason(result.exc, side="client")  # type: ignore[arg-type]
        assert reason == "no_certificate"
        assert "tls.cert" in text and "tlsv13 alert certificate required" in text

    run("asyncio", main)


def test_tls12_client_sees_alerts_during_handshake(pki: TestPki, loop_kind: str) -> None:
    async def main() -> None:
        port = _blocking_tls_server(server_ctx(pki), [])
        ctx = client_ctx(pki, *pki.client("evil", other_ca=True), max_version=ssl.TLSVersion.TLSv1_2)
        result = await dial(port, ctx)
        assert result.version is None  # refused inside the handshake
        assert "tlsv1 alert unknown ca" in str(result.exc)
        assert result.reason == "unknown_ca"

    run(loop_kind, main)


# ------------------------------------------------------------ not TLS at all


@pytest.mark.parametrize(
    "payload",
    [
        b"\x00\x01\x02garbage that is not a TLS record\r\n",
        b"GET /metrics HTTP/1.1\r\nHost: example\r\n\r\n",
        b"CONNECT example.com:443 HTTP/1.1\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.6\r\n",
    ],
    ids=["garbage", "http", "http-connect", "ssh"],
)
def test_server_classifies_plain_tcp_as_not_tls(pki: TestPki, server_kind: tuple[str, str], payload: bytes) -> None:
    loop_kind, pattern = server_kind

    async def main() -> None:
        async with LaneServer(server_ctx(pki), pattern) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(payload)
            outcome = await server.outcome()
            assert await reader.read(100) == b""  # closed without a word
            writer.close()
        reason, text = tls.failure_reason(outcome.exc, side="server")  # type: ignore[arg-type]
        assert reason == "not_tls", text
        assert "tcp.server_addr" in text

    run(loop_kind, main)


def test_client_classifies_http_server_as_not_tls(pki: TestPki, loop_kind: str) -> None:
    async def main() -> None:
        async def http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(1)
            writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            writer.close()

        srv = await asyncio.start_server(http, "127.0.0.1", 0)
        try:
            result = await dial(srv.sockets[0].getsockname()[1], client_ctx(pki))
        finally:
            srv.close()
        assert result.reason == "not_tls"

    run(loop_kind, main)


# ------------------------------------------------------------------ timeouts


@pytest.mark.parametrize("payload", [b"", b"\x16\x03\x01\x02\x00\x01"], ids=["silent", "partial-hello"])
def test_server_handshake_timeout(pki: TestPki, server_kind: tuple[str, str], payload: bytes) -> None:
    loop_kind, pattern = server_kind

    async def main() -> None:
        async with LaneServer(server_ctx(pki), pattern, handshake_timeout=0.3) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(payload)
            outcome = await server.outcome(timeout=5)
            writer.close()
        reason, text = tls.failure_reason(outcome.exc, side="server")  # type: ignore[arg-type]
        assert reason == "timeout", text
        assert "tcp.connect_timeout_seconds" in text

    run(loop_kind, main)


def test_client_handshake_timeout_against_silent_server(pki: TestPki, loop_kind: str) -> None:
    async def main() -> None:
        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()  # until the client gives up
            writer.close()

        srv = await asyncio.start_server(silent, "127.0.0.1", 0)
        try:
            result = await dial(srv.sockets[0].getsockname()[1], client_ctx(pki), handshake_timeout=0.3)
        finally:
            srv.close()
        assert result.reason == "timeout"

    run(loop_kind, main)


def test_wait_for_timeout_is_timeout(loop_kind: str) -> None:
    async def main() -> None:
        try:
            await asyncio.wait_for(asyncio.sleep(5), 0.01)
        except asyncio.TimeoutError as exc:
            assert tls.failure_reason(exc)[0] == "timeout"
        else:  # pragma: no cover
            raise AssertionError("no timeout")

    run(loop_kind, main)


# ----------------------------------------------------------- TLS version floor


def test_server_refuses_tls11_client(pki: TestPki, server_kind: tuple[str, str]) -> None:
    loop_kind, pattern = server_kind

    async def main() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            old.minimum_version = ssl.TLSVersion.TLSv1
            old.maximum_version = ssl.TLSVersion.TLSv1_1
        old.set_ciphers("DEFAULT:@SECLEVEL=0")
        old.load_verify_locations(pki.ca)
        async with LaneServer(server_ctx(pki), pattern) as server:
            await dial(server.port, old)
            outcome = await server.outcome()
        assert outcome.reason == "protocol_version"

    run(loop_kind, main)


# ------------------------------------- the start_tls pattern on uvloop (known)


class _PausedRecorder(asyncio.Protocol):
    received: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.pause_reading()  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.received.append(data)


def test_pause_reading_in_connection_made(loop_kind: str) -> None:
    """The stock loop honours a pause made in ``connection_made``; uvloop 0.23 does not.

    This is why the ``start_tls`` server pattern loses the ClientHello on uvloop.
    If this test fails for uvloop, uvloop has fixed it: drop the special case.
    """

    async def main() -> list[bytes]:
        _PausedRecorder.received = []
        server = await asyncio.get_running_loop().create_server(_PausedRecorder, "127.0.0.1", 0)
        # Connect and send before the loop has even accepted: deterministic.
        with socket.create_connection(server.sockets[0].getsockname()) as sock:
            sock.sendall(b"ClientHello")
            await asyncio.sleep(0.2)
        server.close()
        return _PausedRecorder.received

    received = run(loop_kind, main)
    if loop_kind == "asyncio":
        assert received == []
    else:
        assert received == [b"ClientHello"]


@pytest.mark.xfail(
    uvloop is not None, strict=True,
    reason="uvloop 0.23 ignores pause_reading() in connection_made: the ClientHello goes to the "
    "plain protocol and start_tls times out; use sock_accept + connect_accepted_socket(ssl=...)",
)
def test_start_tls_pattern_on_uvloop(pki: TestPki) -> None:
    async def main() -> None:
        async with LaneServer(server_ctx(pki), "start_tls", handshake_timeout=0.5) as server:
            result = await dial(server.port, client_ctx(pki), handshake_timeout=1.0)
            outcome = await server.outcome()
        assert outcome.cn == "home", outcome.exc
        assert result.first_read == b"hi"

    run("uvloop", main)


# -------------------------------------------- failure_reason on its own


# Messages as OpenSSL 3.0 / CPython 3.11 produce them (observed in the tests above).
OBSERVED = [
    (ssl.SSLError(1, "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate required (_ssl.c:2580)"), "no_certificate"),
    (ssl.SSLError(1, "[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca (_ssl.c:2580)"), "unknown_ca"),
    (ssl.SSLError(1, "[SSL: SSLV3_ALERT_UNKNOWN_CA] sslv3 alert unknown ca (_ssl.c:2580)"), "unknown_ca"),
    (ssl.SSLError(1, "[SSL: SSLV3_ALERT_CERTIFICATE_EXPIRED] sslv3 alert certificate expired (_ssl.c:2580)"), "expired"),
    (ssl.SSLError(1, "[SSL: SSLV3_ALERT_BAD_CERTIFICATE] sslv3 alert bad certificate (_ssl.c:2580)"), "bad_certificate"),
    (ssl.SSLError(1, "[SSL: SSLV3_ALERT_UNSUPPORTED_CERTIFICATE] sslv3 alert unsupported certificate (_ssl.c:1006)"), "bad_certificate"),
    (ssl.SSLError(1, "[SSL: PEER_DID_NOT_RETURN_A_CERTIFICATE] peer did not return a certificate (_ssl.c:1006)"), "no_certificate"),
    (ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)"), "not_tls"),
    (ssl.SSLError(1, "[SSL: HTTP_REQUEST] http request (_ssl.c:1006)"), "not_tls"),
    (ssl.SSLError(1, "[SSL: RECORD_LAYER_FAILURE] record layer failure (_ssl.c:1006)"), "not_tls"),
    (ssl.SSLError(1, "[SSL: UNSUPPORTED_PROTOCOL] unsupported protocol (_ssl.c:1006)"), "protocol_version"),
    (ssl.SSLError(1, "[SSL: TLSV1_ALERT_PROTOCOL_VERSION] tlsv1 alert protocol version (_ssl.c:1006)"), "protocol_version"),
    (ssl.SSLEOFError(8, "[SSL: UNEXPECTED_EOF_WHILE_READING] EOF occurred in violation of protocol (_ssl.c:1006)"), "closed"),
    (ConnectionAbortedError("SSL handshake is taking longer than 10.0 seconds: aborting the connection"), "timeout"),
    (ConnectionResetError(), "closed"),
    (ConnectionResetError(104, "Connection reset by peer"), "closed"),
    (asyncio.IncompleteReadError(b"", 9), "closed"),
    (BrokenPipeError(32, "Broken pipe"), "closed"),
    (TimeoutError(), "timeout"),
    (asyncio.TimeoutError(), "timeout"),
    (ConnectionRefusedError(111, "Connection refused"), "other"),
    (ssl.SSLError(1, "[SSL: SSLV3_ALERT_HANDSHAKE_FAILURE] sslv3 alert handshake failure (_ssl.c:1006)"), "other"),
    (ValueError("something else"), "other"),
]


@pytest.mark.parametrize("exc,expected", OBSERVED, ids=[f"{i}-{e}" for i, (_, e) in enumerate(OBSERVED)])
def test_failure_reason_table(exc: BaseException, expected: str) -> None:
    reason, text = tls.failure_reason(exc)
    assert reason == expected
    assert reason in tls.REASONS
    assert "(_ssl.c:" not in text and "[SSL:" not in text
    assert text


def test_failure_reason_looks_through_wrappers() -> None:
    try:
        try:
            raise ssl.SSLError(1, "[SSL: HTTP_REQUEST] http request (_ssl.c:1006)")
        except ssl.SSLError as inner:
            raise RuntimeError("lane failed") from inner
    except RuntimeError as outer:
        assert tls.failure_reason(outer)[0] == "not_tls"


def test_failure_reason_refused_and_dns_texts() -> None:
    assert "connection refused" in tls.failure_reason(ConnectionRefusedError(111, "refused"))[1]
    assert "resolve" in tls.failure_reason(socket.gaierror(-2, "Name or service not known"))[1]
