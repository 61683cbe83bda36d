"""What a handshake sends: our certificate and any intermediate CA, never the root (issue 15).

Without help OpenSSL's "auto chain" completes a certificate file that holds only
the leaf from the context's trust store (``tls.ca_cert``), so every lane sent the
private root CA too, in clear under TLS 1.2. ``ut.tls`` has OpenSSL build the
chain once per context without the root (``_send_chain_without_root``).

The certificates sent are read off the handshake's Certificate messages as
OpenSSL writes and reads them (``SSLContext._msg_callback``: CPython's debugging
hook, decrypted TLS 1.3 messages included), and cross-checked with
``openssl s_client -showcerts``.
"""

from __future__ import annotations

import datetime as dt
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ut import pki, tls
from ut._testbase.certs import make_test_pki

OPENSSL = shutil.which("openssl")
VERSIONS = [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3]

# Where the ctypes path must work; elsewhere it may degrade (and these tests skip).
_MUST_WORK = sys.platform.startswith("linux") and sys.implementation.name == "cpython"

pytestmark = pytest.mark.skipif(
    not hasattr(ssl.SSLContext, "_msg_callback"), reason="no SSLContext._msg_callback"
)


def _need_chain_fix() -> None:
    if tls._libssl() is None and not _MUST_WORK:
        pytest.skip("OpenSSL is not reachable through ctypes here: the root is still sent")


# ------------------------------------------------------------------ helpers


def _der(path: Path) -> list[bytes]:
    """The certificates in a PEM file, as DER."""
    return [c.public_bytes(serialization.Encoding.DER)
            for c in x509.load_pem_x509_certificates(path.read_bytes())]


def _certificates(msg: bytes, tls13: bool) -> list[bytes]:
    """The DER certificates in a Certificate handshake message (4-byte header included)."""
    assert msg[0] == 11, "not a Certificate message"
    pos = 4
    if tls13:
        pos += 1 + msg[pos]  # certificate_request_context
    end = pos + 3 + int.from_bytes(msg[pos:pos + 3], "big")
    pos += 3
    certs = []
    while pos < end:
        n = int.from_bytes(msg[pos:pos + 3], "big")
        certs.append(msg[pos + 3:pos + 3 + n])
        pos += 3 + n
        if tls13:
            pos += 2 + int.from_bytes(msg[pos:pos + 2], "big")  # per-certificate extensions
    assert pos == end
    return certs


def _chains_sent(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, version: ssl.TLSVersion,
    hostname: str = "localhost",
) -> tuple[list[bytes], list[bytes]]:
    """Handshake in memory; return (certificates the server sent, those the client sent)."""
    client_ctx.minimum_version = client_ctx.maximum_version = version
    sent: dict[bool, list[bytes]] = {}

    def on_message(conn: Any, direction: str, _v: Any, content: Any, msg_type: Any, data: bytes) -> None:
        if content == ssl._TLSContentType.HANDSHAKE and msg_type == ssl._TLSMessageType.CERTIFICATE:
            # Seen from the server: what it writes is its chain, what it reads the client's.
            sent[direction == "write"] = _certificates(data, version == ssl.TLSVersion.TLSv1_3)

    server_ctx._msg_callback = on_message  # type: ignore[attr-defined]
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=hostname)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done: set[int] = set()
    for _ in range(10):
        for obj in (client, server):
            if id(obj) not in done:
                try:
                    obj.do_handshake()
                    done.add(id(obj))
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    assert len(done) == 2, "the handshake did not finish"
    assert client.version() == {VERSIONS[0]: "TLSv1.2", VERSIONS[1]: "TLSv1.3"}[version]
    return sent[True], sent[False]


def _ca(cn: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Certificate, Any] | None,
        path_length: int | None) -> x509.Certificate:
    """A CA certificate: self-signed if ``issuer`` is None, else signed by it."""
    now = dt.datetime.now(dt.timezone.utc)
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, cn)])
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    aki_from = (issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
                if issuer_cert else ski)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_cert.subject if issuer_cert else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False),
                       critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(aki_from),
                       critical=False)
        .sign(issuer_key, hashes.SHA256())
    )


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _der_of(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


# -------------------------------------------------------------------- tests


@pytest.mark.parametrize("version", VERSIONS, ids=["tls1.2", "tls1.3"])
def test_each_end_sends_its_certificate_alone(tmp_path: Path, version: ssl.TLSVersion) -> None:
    _need_chain_fix()
    p = make_test_pki(tmp_path)
    cert, key = p.client("home")
    server_sent, client_sent = _chains_sent(
        tls.server_context(p.ca, p.server_cert, p.server_key), tls.client_context(p.ca, cert, key),
        version)
    assert server_sent == _der(p.server_cert)
    assert client_sent == _der(cert)


def test_without_the_fix_openssl_sends_the_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The measurement above can see a root: OpenSSL's auto chain adds it when left alone."""
    monkeypatch.setattr(tls, "_send_chain_without_root", lambda ctx: False)
    p = make_test_pki(tmp_path)
    cert, key = p.client("home")
    server_sent, client_sent = _chains_sent(
        tls.server_context(p.ca, p.server_cert, p.server_key), tls.client_context(p.ca, cert, key),
        ssl.TLSVersion.TLSv1_2)
    assert server_sent == _der(p.server_cert) + _der(p.ca)
    assert client_sent == _der(cert) + _der(p.ca)


@pytest.mark.parametrize("layout", ["intermediate-in-cert-file", "intermediate-in-ca-file",
                                    "root-in-cert-file-too"])
@pytest.mark.parametrize("version", VERSIONS, ids=["tls1.2", "tls1.3"])
def test_an_intermediate_ca_is_still_sent(tmp_path: Path, layout: str, version: ssl.TLSVersion) -> None:
    """Bring your own CA with an intermediate: it is sent wherever our configuration holds
    it (so a peer that trusts only the root accepts us); the root is never sent.

    In "intermediate-in-ca-file" only the server's ca_cert holds the intermediate: the
    client, trusting the root alone, needs the server to send it; the client itself has
    no intermediate to send, and the server completes the client's chain from its store.
    """
    _need_chain_fix()
    root_key, inter_key = pki._new_key(), pki._new_key()
    root = _ca("Example Root", root_key, None, path_length=1)
    inter = _ca("Example Issuing CA", inter_key, (root, root_key), path_length=0)
    server, server_key = pki.make_cert(inter, inter_key, "localhost", server=True)
    client, client_key = pki.make_cert(inter, inter_key, "home")
    (tmp_path / "root.pem").write_bytes(_pem(root))
    for name, leaf, leaf_key in (("server", server, server_key), ("home", client, client_key)):
        chain = {"intermediate-in-cert-file": (leaf, inter), "intermediate-in-ca-file": (leaf,),
                 "root-in-cert-file-too": (leaf, inter, root)}[layout]
        (tmp_path / f"{name}.pem").write_bytes(_pem(*chain))
        pki.write_key(tmp_path / f"{name}.key", leaf_key)
        ca = (root, inter) if layout == "intermediate-in-ca-file" and name == "server" else (root,)
        (tmp_path / f"{name}-ca.pem").write_bytes(_pem(*ca))

    server_ctx = tls.server_context(tmp_path / "server-ca.pem", tmp_path / "server.pem",
                                    tmp_path / "server.key")
    client_ctx = tls.client_context(tmp_path / "home-ca.pem", tmp_path / "home.pem",
                                    tmp_path / "home.key")
    server_sent, client_sent = _chains_sent(server_ctx, client_ctx, version)
    assert server_sent == [_der_of(server), _der_of(inter)]
    if layout == "intermediate-in-ca-file":
        assert client_sent == [_der_of(client)]
    else:
        assert client_sent == [_der_of(client), _der_of(inter)]


@pytest.mark.skipif(OPENSSL is None, reason="openssl command not installed")
@pytest.mark.parametrize("flag", ["-tls1_2", "-tls1_3"])
def test_openssl_s_client_sees_one_certificate(tmp_path: Path, flag: str) -> None:
    """The check from the issue, as an operator would run it against a server."""
    _need_chain_fix()
    p = make_test_pki(tmp_path)
    cert, key = p.client("home")
    ctx = tls.server_context(p.ca, p.server_cert, p.server_key)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(20)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            conn.settimeout(20)
            with ctx.wrap_socket(conn, server_side=True) as tls_conn:
                tls_conn.sendall(b"ok")
        except (OSError, ssl.SSLError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        r = subprocess.run(
            [OPENSSL, "s_client", "-connect", f"127.0.0.1:{listener.getsockname()[1]}", flag,
             "-showcerts", "-servername", "localhost", "-CAfile", str(p.ca),
             "-cert", str(cert), "-key", str(key)],
            input=b"", capture_output=True, timeout=30,
        )
    finally:
        thread.join(20)
        listener.close()
    out = r.stdout.decode(errors="replace")
    assert out.count("-----BEGIN CERTIFICATE-----") == 1, out
    assert "Verify return code: 0 (ok)" in out, out


# ------------------------------------------------------------ degrading


def _a_context(tmp_path: Path) -> ssl.SSLContext:
    p = make_test_pki(tmp_path)
    return tls.server_context(p.ca, p.server_cert, p.server_key)


def test_the_fix_applies_here() -> None:
    if not _MUST_WORK:
        pytest.skip("only required on Linux CPython")
    assert tls._libssl() is not None


def test_without_ctypes_access_contexts_work_as_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tls, "_libssl", lambda: None)
    p = make_test_pki(tmp_path)
    cert, key = p.client("home")
    server_ctx = tls.server_context(p.ca, p.server_cert, p.server_key)
    assert tls._send_chain_without_root(server_ctx) is False
    server_sent, _ = _chains_sent(server_ctx, tls.client_context(p.ca, cert, key),
                                  ssl.TLSVersion.TLSv1_3)
    assert server_sent == _der(p.server_cert) + _der(p.ca)  # the old behaviour


class _FakeLib:
    """Stands in for libssl: records calls, returns what it is told."""

    def __init__(self, options: int | None = None, ctrl: Any = 1) -> None:
        self.calls: list[str] = []
        self._options, self._ctrl = options, ctrl

    def SSL_CTX_get_options(self, ptr: int) -> int:  # OpenSSL's names
        self.calls.append("get_options")
        return self._options if self._options is not None else -1

    def SSL_CTX_ctrl(self, ptr: int, cmd: int, larg: int, parg: Any) -> int:
        self.calls.append("ctrl")
        if isinstance(self._ctrl, BaseException):
            raise self._ctrl
        return int(self._ctrl)

    def ERR_clear_error(self) -> None:
        self.calls.append("clear_error")


def test_a_pointer_that_does_not_match_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = _a_context(tmp_path)
    lib = _FakeLib(options=int(ctx.options) ^ 1)  # not this context's options
    monkeypatch.setattr(tls, "_libssl", lambda: lib)
    assert tls._send_chain_without_root(ctx) is False
    assert lib.calls == ["get_options"]  # nothing was changed


def test_failures_never_raise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = _a_context(tmp_path)
    failing = _FakeLib(options=int(ctx.options), ctrl=0)
    monkeypatch.setattr(tls, "_libssl", lambda: failing)
    assert tls._send_chain_without_root(ctx) is False
    assert failing.calls == ["get_options", "ctrl", "clear_error"]
    raising = _FakeLib(options=int(ctx.options), ctrl=OSError("boom"))
    monkeypatch.setattr(tls, "_libssl", lambda: raising)
    assert tls._send_chain_without_root(ctx) is False
