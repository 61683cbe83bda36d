"""Bring your own CA (issue 20): certificates made with the real ``openssl`` command, the
way docs/guide.md ("Bring your own CA") shows, carry a tunnel.

The CA is made by ``openssl req -x509 -new`` with the distribution's default
``openssl.cnf``, which gives it no keyUsage extension; OpenSSL's strict X.509 mode refuses
such a CA ("CA cert does not include key usage extension"), and leaves without an Authority
Key Identifier ("Missing Authority Key Identifier"). ut-tunnel deliberately does not use
strict mode (ut/tls.py says why), so both must work, end to end.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

import ut
from ut.udpmon import UdpEcho, run_probe

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "guide.md"
OPENSSL = shutil.which("openssl")


def _need_openssl() -> str:
    if OPENSSL is None:
        msg = "the openssl command is not installed (apt-get install openssl)"
        if os.environ.get("UT_REQUIRE_E2E", "") not in ("", "0"):
            pytest.fail(msg + " (UT_REQUIRE_E2E=1 turns this skip into a failure)", pytrace=False)
        pytest.skip(msg)
    return OPENSSL


def _guide_byo_block() -> str:
    text = GUIDE.read_text()
    section = text[text.index("### Bring your own CA"):]
    m = re.search(r"```sh\n(.*?)```", section, re.S)
    assert m, "docs/guide.md lost the 'Bring your own CA' commands"
    return m.group(1)


@pytest.fixture(scope="module")
def byo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The guide's openssl commands, run verbatim in a scratch directory, plus one more
    client certificate made without an Authority Key Identifier."""
    openssl = _need_openssl()
    d = tmp_path_factory.mktemp("my-ca")
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", _guide_byo_block()], cwd=d,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    (d / "noaki.ext").write_text(
        "extendedKeyUsage=clientAuth\nauthorityKeyIdentifier=none\nsubjectKeyIdentifier=none\n")
    for argv in (
        [openssl, "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", "noaki.key", "-out", "noaki.csr", "-subj", "/CN=noaki"],
        [openssl, "x509", "-req", "-in", "noaki.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
         "-CAcreateserial", "-days", "30", "-extfile", "noaki.ext", "-out", "noaki.pem"],
    ):
        r = subprocess.run(argv, cwd=d, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
    return d


def _ext(cert: x509.Certificate, cls: type) -> object | None:
    try:
        return cert.extensions.get_extension_for_class(cls).value
    except x509.ExtensionNotFound:
        return None


def test_the_guide_makes_what_strict_mode_refuses(byo: Path) -> None:
    ca = x509.load_pem_x509_certificate((byo / "ca.pem").read_bytes())
    assert _ext(ca, x509.BasicConstraints).ca  # type: ignore[union-attr]
    assert _ext(ca, x509.KeyUsage) is None, "this test is about a CA without keyUsage"
    noaki = x509.load_pem_x509_certificate((byo / "noaki.pem").read_bytes())
    assert _ext(noaki, x509.AuthorityKeyIdentifier) is None
    for key in ("ca.key", "server.key", "home.key"):
        assert (byo / key).stat().st_mode & 0o077 == 0, key
    version = subprocess.run([OPENSSL, "version"], capture_output=True, text=True).stdout
    if version.startswith("OpenSSL 3"):
        def verify(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([OPENSSL, "verify", *args, "-CAfile", "ca.pem", "home.pem"],
                                  cwd=byo, capture_output=True, text=True)
        assert verify().returncode == 0
        strict = verify("-x509_strict")
        assert strict.returncode != 0 and "key usage" in (strict.stdout + strict.stderr)


def _configs(byo: Path, client_name: str, port: int = 0, echo_port: int = 9) -> tuple[dict, dict]:
    server = {
        "role": "server",
        "tcp": {"listen_addr": "127.0.0.1:0", "lanes": 3},
        "udp": {"wg_udp_addr": f"127.0.0.1:{echo_port}"},
        "metrics": {"enabled": False},
        "tls": {"ca_cert": str(byo / "ca.pem"), "cert": str(byo / "server.pem"),
                "key": str(byo / "server.key")},
    }
    client = {
        "role": "client",
        "tcp": {"server_addr": f"127.0.0.1:{port}", "lanes": 3},
        "udp": {"listen_addr": "127.0.0.1:0"},
        "metrics": {"enabled": False},
        "tls": {"ca_cert": str(byo / "ca.pem"), "cert": str(byo / f"{client_name}.pem"),
                "key": str(byo / f"{client_name}.key"), "server_name": "vpn.example.com"},
    }
    return server, client


@pytest.mark.parametrize("client_auth", ["handshake", "proof"])
@pytest.mark.parametrize("client_name", ["home", "noaki"])
def test_a_tunnel_runs_on_openssl_made_certificates(byo: Path, client_name: str,
                                                     client_auth: str) -> None:
    """Both ways of showing the client certificate (tls.client_auth) take these files: the
    proof's verifier (cryptography) is as lenient as the handshake's (OpenSSL)."""
    async def main() -> tuple[int, int, str]:
        echo = UdpEcho("127.0.0.1", 0)
        echo_addr = await echo.start()
        echo_task = asyncio.ensure_future(echo.run())
        try:
            server_cfg, _ = _configs(byo, client_name, echo_port=echo_addr[1])
            server_cfg["tls"]["client_auth"] = client_auth
            async with ut.Server(ut.load_config(server_cfg)) as server:
                _, client_cfg = _configs(byo, client_name, port=server.address[1])
                client_cfg["tls"]["client_auth"] = client_auth
                async with ut.Client(ut.load_config(client_cfg)) as client:
                    res = await asyncio.wait_for(
                        run_probe(client.udp_address, rate=500, count=50, wait=2.0), 30)
                    cns = sorted({cn for cn, _ in server.sessions})
                    return res.stats.sent, res.stats.received, ",".join(cns)
        finally:
            echo_task.cancel()
            echo.close()

    sent, received, cns = asyncio.run(main())
    assert (sent, received) == (50, 50)
    assert cns == client_name  # the identity is the certificate CN


def test_check_accepts_the_openssl_files(byo: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "home.yaml"
    cfg.write_text(
        "role: client\ntcp: {server_addr: 'vpn.example.com:5443'}\n"
        f"tls: {{ca_cert: '{byo / 'ca.pem'}', cert: '{byo / 'home.pem'}', "
        f"key: '{byo / 'home.key'}'}}\n")
    r = subprocess.run([sys.executable, "-m", "ut", "check", "-config", str(cfg)],
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert "CN=home" in r.stdout and "signed by tls.ca_cert" in r.stdout
    assert "WARNING" not in r.stdout
