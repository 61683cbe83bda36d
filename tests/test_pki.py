"""ut.pki: the private CA, its certificates, file modes, and the `pki` CLI."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import socket
import ssl
import stat
import subprocess
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from ut import pki
from ut._testbase.certs import make_test_pki

OPENSSL = shutil.which("openssl")


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _eku(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def _san(cert: x509.Certificate) -> list[str]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(v) for v in ext.get_values_for_type(x509.DNSName)] + [
        str(v) for v in ext.get_values_for_type(x509.IPAddress)
    ]


# ----------------------------------------------------------------- init + issue


def test_init_writes_ca_and_server_files_with_modes(tmp_path: Path) -> None:
    paths = pki.init_pki(tmp_path / "pki", "vpn.example.com", ips=["203.0.113.7"])
    assert set(paths) == {"ca", "ca_key", "server_cert", "server_key"}
    assert [p.name for p in paths.values()] == ["ca.pem", "ca.key", "server.pem", "server.key"]
    assert _mode(paths["ca_key"]) == 0o600
    assert _mode(paths["server_key"]) == 0o600
    assert _mode(paths["ca"]) == 0o644
    assert _mode(paths["server_cert"]) == 0o644
    # No temporary files left behind.
    assert sorted(p.name for p in (tmp_path / "pki").iterdir()) == sorted(
        ["ca.pem", "ca.key", "server.pem", "server.key"]
    )

    ca = pki.load_cert(paths["ca"])
    server = pki.load_cert(paths["server_cert"])
    assert pki.cert_cn(ca) == "vpn.example.com Root CA"
    assert pki.cert_cn(server) == "vpn.example.com"
    assert server.issuer == ca.subject
    assert _eku(server) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert _san(server) == ["vpn.example.com", "203.0.113.7"]
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # The key on disk matches the certificate.
    key = pki.load_key(paths["server_key"])
    assert key.public_key().public_numbers() == server.public_key().public_numbers()


def test_server_name_that_is_an_ip_goes_into_san_as_ip(tmp_path: Path) -> None:
    paths = pki.init_pki(tmp_path, "10.1.2.3")
    assert _san(pki.load_cert(paths["server_cert"])) == ["10.1.2.3"]


def test_issue_client(tmp_path: Path) -> None:
    pki.init_pki(tmp_path, "localhost")
    cert_path, key_path = pki.issue_client(tmp_path, "home-office_1", days=30)
    assert cert_path == tmp_path / "home-office_1.pem"
    assert key_path == tmp_path / "home-office_1.key"
    assert _mode(key_path) == 0o600 and _mode(cert_path) == 0o644
    cert = pki.load_cert(cert_path)
    assert pki.cert_cn(cert) == "home-office_1"
    assert _eku(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=30) <= lifetime <= dt.timedelta(days=30, minutes=10)
    # Authority key identifier points at the CA's subject key identifier.
    ca = pki.load_cert(tmp_path / "ca.pem")
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest


def test_client_cert_never_outlives_the_ca(tmp_path: Path) -> None:
    pki.init_pki(tmp_path, "localhost", ca_days=10)
    cert_path, _ = pki.issue_client(tmp_path, "home", days=825)
    ca = pki.load_cert(tmp_path / "ca.pem")
    assert pki.load_cert(cert_path).not_valid_after_utc <= ca.not_valid_after_utc


def test_init_refuses_to_overwrite_a_ca(tmp_path: Path) -> None:
    first = pki.init_pki(tmp_path, "localhost")
    before = first["ca"].read_bytes()
    with pytest.raises(pki.PkiError, match="already exist"):
        pki.init_pki(tmp_path, "localhost")
    assert first["ca"].read_bytes() == before
    pki.init_pki(tmp_path, "localhost", force=True)
    assert first["ca"].read_bytes() != before


def test_issue_refuses_to_overwrite_a_client_unless_forced(tmp_path: Path) -> None:
    pki.init_pki(tmp_path, "localhost")
    cert_path, _ = pki.issue_client(tmp_path, "home")
    before = cert_path.read_bytes()
    with pytest.raises(pki.PkiError, match="already exists"):
        pki.issue_client(tmp_path, "home")
    pki.issue_client(tmp_path, "home", force=True)
    assert cert_path.read_bytes() != before


@pytest.mark.parametrize(
    "name", ["", "../etc/passwd", "a/b", ".hidden", "-rf", "has space", "ca", "server", "é", "x" * 65,
             "semi;colon"]
)
def test_bad_client_names_are_refused(tmp_path: Path, name: str) -> None:
    pki.init_pki(tmp_path, "localhost")
    with pytest.raises(pki.PkiError, match="bad client name"):
        pki.issue_client(tmp_path, name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.key", "ca.pem", "server.key", "server.pem"]


def test_issue_without_a_ca_says_run_init(tmp_path: Path) -> None:
    with pytest.raises(pki.PkiError, match="pki init"):
        pki.issue_client(tmp_path, "home")


def test_write_key_is_0600_whatever_the_umask_and_replaces_a_readable_file(tmp_path: Path) -> None:
    key_path = tmp_path / "k.key"
    key_path.write_text("old")
    os.chmod(key_path, 0o666)
    old = os.umask(0)
    try:
        _, key = pki.make_ca()
        pki.write_key(key_path, key)
    finally:
        os.umask(old)
    assert _mode(key_path) == 0o600
    assert b"PRIVATE KEY" in key_path.read_bytes()


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(pki.PkiError, match="nope.pem: file not found"):
        pki.load_cert(tmp_path / "nope.pem")
    bad = tmp_path / "bad.pem"
    bad.write_text("hello")
    with pytest.raises(pki.PkiError, match="bad.pem: not a PEM certificate"):
        pki.load_cert(bad)
    with pytest.raises(pki.PkiError, match="bad.pem: not an unencrypted PEM private key"):
        pki.load_key(bad)


def test_cert_summary(tmp_path: Path) -> None:
    pki.init_pki(tmp_path, "localhost", ips=["127.0.0.1"])
    cert_path, _ = pki.issue_client(tmp_path, "home")
    s = pki.cert_summary(cert_path)
    assert s["cn"] == "home" and s["issuer"] == "localhost Root CA"
    assert s["expired"] is False and s["is_ca"] is False
    assert dt.datetime.fromisoformat(s["not_after"]) > dt.datetime.now(dt.timezone.utc)
    server = pki.cert_summary(tmp_path / "server.pem")
    assert server["san"] == ["localhost", "127.0.0.1"]


# ------------------------------------------------------- neutral certificates


_PRODUCT = (b"ut-tunnel", b"ut tunnel", b"ut_tunnel", b"uttunnel")


def _cert_texts(path: Path) -> list[bytes]:
    """Every form of the certificate at ``path`` a prober could read: DER, PEM, text dumps."""
    cert = pki.load_cert(path)
    texts = [
        cert.public_bytes(serialization.Encoding.DER),
        path.read_bytes(),
        cert.subject.rfc4514_string().encode(),
        cert.issuer.rfc4514_string().encode(),
        repr(list(cert.extensions)).encode(),
        format(cert.serial_number, "x").encode(),
    ]
    if OPENSSL is not None:
        dump = subprocess.run([OPENSSL, "x509", "-in", str(path), "-noout", "-text"],
                              capture_output=True, check=True)
        texts.append(dump.stdout)
    return texts


def test_no_certificate_names_the_product(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "pki"
    assert pki.run_pki(_parse(["pki", "init", str(d), "--server-name", "vpn.example.com",
                               "--ip", "203.0.113.7"])) == 0
    assert pki.run_pki(_parse(["pki", "client", str(d), "home"])) == 0
    capsys.readouterr()
    for name in ("ca.pem", "server.pem", "home.pem"):
        for text in _cert_texts(d / name):
            for word in _PRODUCT:
                assert word not in text.lower(), f"{name} says {word!r}"
    assert pki.cert_cn(pki.load_cert(d / "ca.pem")) == "vpn.example.com Root CA"


def test_default_ca_name() -> None:
    assert pki.default_ca_name("vpn.example.com") == "vpn.example.com Root CA"
    assert pki.default_ca_name("203.0.113.7") == "203.0.113.7 Root CA"
    # Too long for a CN: leading labels go first.
    long_name = "a" * 30 + "." + "b" * 30 + ".example.com"
    assert pki.default_ca_name(long_name) == "b" * 30 + ".example.com Root CA"
    assert pki.default_ca_name("c" * 60) == "Root CA"
    for name in (long_name, "c" * 60, "x.y"):
        assert len(pki.default_ca_name(name)) <= 64
    # The trimmed name is a valid CN.
    assert len(pki.cert_cn(pki.make_ca(pki.default_ca_name(long_name))[0])) <= 64


def test_cli_ca_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "pki"
    assert pki.run_pki(_parse(["pki", "init", str(d), "--server-name", "vpn.example.com",
                               "--ca-name", "Example Corp Internal CA"])) == 0
    assert "CN=Example Corp Internal CA" in capsys.readouterr().out
    assert pki.run_pki(_parse(["pki", "client", str(d), "home"])) == 0
    ca = pki.load_cert(d / "ca.pem")
    assert pki.cert_cn(ca) == "Example Corp Internal CA"
    for leaf in ("server.pem", "home.pem"):
        assert pki.load_cert(d / leaf).issuer == ca.subject
    assert pki.run_pki(_parse(["pki", "init", str(d / "x"), "--server-name", "a", "--ca-name", ""])) == 1
    assert "bad CA name" in capsys.readouterr().err
    with pytest.raises(pki.PkiError, match="bad CA name"):
        pki.init_pki(tmp_path / "y", "localhost", ca_cn="x" * 65)


def test_leaf_lifetime_is_at_most_398_days_and_the_ca_lives_10_years(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert pki.LEAF_DAYS <= 398
    d = tmp_path / "pki"
    assert pki.run_pki(_parse(["pki", "init", str(d), "--server-name", "localhost"])) == 0
    assert pki.run_pki(_parse(["pki", "client", str(d), "home"])) == 0
    capsys.readouterr()

    def lifetime(name: str) -> dt.timedelta:
        cert = pki.load_cert(d / name)
        return cert.not_valid_after_utc - cert.not_valid_before_utc

    for leaf in ("server.pem", "home.pem"):
        assert dt.timedelta(days=pki.LEAF_DAYS) <= lifetime(leaf) <= dt.timedelta(days=398), leaf
    assert lifetime("ca.pem") >= dt.timedelta(days=3650)


def test_a_pki_made_the_old_way_still_connects(tmp_path: Path) -> None:
    """CA "ut-tunnel CA", 825-day leaves: what `pki init`/`pki client` made before."""
    from ut import tls

    paths = pki.init_pki(tmp_path, "localhost", ips=["127.0.0.1"], days=825, ca_cn="ut-tunnel CA")
    cert_path, key_path = pki.issue_client(tmp_path, "home", days=825)
    assert pki.cert_cn(pki.load_cert(paths["ca"])) == "ut-tunnel CA"
    leaf = pki.load_cert(cert_path)
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc >= dt.timedelta(days=825)
    server_ctx = tls.server_context(paths["ca"], paths["server_cert"], paths["server_key"])
    client_ctx = tls.client_context(paths["ca"], cert_path, key_path)
    server, client = _memory_handshake(server_ctx, client_ctx, "localhost")
    assert tls.peer_cn(server) == "home"
    assert tls.peer_cn(client) == "localhost"


def _memory_handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, hostname: str
) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """A whole handshake between two contexts in memory (no sockets, no threads)."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=hostname)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {id(client): False, id(server): False}
    for _ in range(10):
        for obj in (client, server):
            if not done[id(obj)]:
                try:
                    obj.do_handshake()
                    done[id(obj)] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            break
    assert all(done.values()), "the handshake did not finish"
    # TLS 1.3: the server judges the client's certificate after the client is done;
    # one read each way surfaces a refusal.
    client.write(b"x")
    s_in.write(c_out.read())
    assert server.read(1) == b"x"
    return server, client


# -------------------------------------------------------------- chain checks


@pytest.mark.skipif(OPENSSL is None, reason="openssl command not installed")
def test_openssl_verifies_chains_strictly(tmp_path: Path) -> None:
    p = make_test_pki(tmp_path)
    client, _ = p.client("home")

    def verify(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [OPENSSL, "verify", "-x509_strict", "-CAfile", str(p.ca), *args],
            capture_output=True, text=True, check=False,
        )

    ok = verify("-purpose", "sslserver", "-verify_hostname", "localhost", "-verify_ip", "127.0.0.1",
                str(p.server_cert))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    ok = verify("-purpose", "sslclient", str(client))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # The purposes are enforced: a client certificate cannot serve.
    wrong = verify("-purpose", "sslserver", str(client))
    assert wrong.returncode != 0
    other, _ = p.client("evil", other_ca=True)
    assert verify(str(other)).returncode != 0


def test_blocking_handshake_with_issued_certificates(tmp_path: Path) -> None:
    """The chain verifies in a real handshake with strict X.509 checks, both ways."""
    pki.init_pki(tmp_path, "localhost", ips=["127.0.0.1"])
    cert_path, key_path = pki.issue_client(tmp_path, "home")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tmp_path / "ca.pem"))
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    server_ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    server_ctx.load_cert_chain(tmp_path / "server.pem", tmp_path / "server.key")
    client_ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    client_ctx.load_cert_chain(cert_path, key_path)

    listener = socket.create_server(("127.0.0.1", 0))
    seen: dict[str, object] = {}

    def serve() -> None:
        conn, _ = listener.accept()
        with server_ctx.wrap_socket(conn, server_side=True) as tls_conn:
            seen["peer"] = tls_conn.getpeercert()
            tls_conn.sendall(b"ok")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    with socket.create_connection(listener.getsockname(), timeout=5) as raw:
        with client_ctx.wrap_socket(raw, server_hostname="localhost") as tls_conn:
            assert tls_conn.recv(2) == b"ok"
    thread.join(5)
    listener.close()
    assert dict(x[0] for x in seen["peer"]["subject"])["commonName"] == "home"  # type: ignore[index]


def test_test_pki_helper_variants(tmp_path: Path) -> None:
    p = make_test_pki(tmp_path)
    now = dt.datetime.now(dt.timezone.utc)
    expired, _ = p.client("old", expired=True)
    assert pki.load_cert(expired).not_valid_after_utc < now
    future, _ = p.client("new", not_yet_valid=True)
    assert pki.load_cert(future).not_valid_before_utc > now
    other, _ = p.client("evil", other_ca=True)
    assert pki.load_cert(other).issuer == pki.load_cert(p.other_ca).subject
    wrong, _ = p.server_cert_for("wrong.example")
    assert _san(pki.load_cert(wrong)) == ["wrong.example"]


# ----------------------------------------------------------------------- CLI


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ut-tunnel")
    pki.add_pki_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli_init_and_client(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "pki"
    args = _parse(["pki", "init", str(d), "--server-name", "vpn.example.com", "--ip", "203.0.113.7",
                   "--ip", "10.0.0.1", "--days", "100"])
    assert args.pki_command == "init"
    assert pki.run_pki(args) == 0
    out = capsys.readouterr().out
    assert str(d / "ca.pem") in out and str(d / "server.key") in out
    assert "CN=vpn.example.com" in out and "expires" in out
    assert _san(pki.load_cert(d / "server.pem")) == ["vpn.example.com", "203.0.113.7", "10.0.0.1"]

    assert pki.run_pki(_parse(["pki", "client", str(d), "home"])) == 0
    out = capsys.readouterr().out
    assert str(d / "home.pem") in out and "CN=home" in out and str(d / "home.key") in out

    # Second init without --force: refused, exit 1, message on stderr.
    assert pki.run_pki(_parse(["pki", "init", str(d), "--server-name", "x"])) == 1
    assert "already exist" in capsys.readouterr().err
    assert pki.run_pki(_parse(["pki", "client", str(d), "../evil"])) == 1
    assert "bad client name" in capsys.readouterr().err


def test_cli_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parse(["pki", "init", "/tmp/x"])  # --server-name missing
    with pytest.raises(SystemExit):
        _parse(["pki", "client", "/tmp/x", "home", "--days", "0"])
    with pytest.raises(SystemExit):
        _parse(["pki"])


def test_init_creates_the_directory_private(tmp_path: Path) -> None:
    """A new PKI directory is 0700 whatever the umask (it holds ca.key); keys stay 0600;
    an existing directory keeps its mode."""
    old = os.umask(0o022)
    try:
        d = tmp_path / "parent" / "pki"
        pki.init_pki(d, "localhost")
        assert _mode(d) == 0o700
        assert _mode(d / "ca.key") == 0o600 and _mode(d / "server.key") == 0o600
        assert _mode(d / "ca.pem") == 0o644
        pki.issue_client(d, "home")
        assert _mode(d / "home.key") == 0o600

        shared = tmp_path / "shared"
        shared.mkdir(mode=0o755)
        pki.init_pki(shared, "localhost")
        assert _mode(shared) == 0o755 and _mode(shared / "ca.key") == 0o600
    finally:
        os.umask(old)
