"""What an active prober sees: blocking probes that report an answer's *shape*.

Each probe connects to ``(host, port)``, does one thing a censor's prober does, and
returns an ``Answer``: the first bytes back (status line, headers, body), how the
connection ended (``fin``: the peer closed; for TLS, ``close_notify`` if it closed TLS
cleanly and ``eof`` if not; ``reset``; ``open``: still open when we stopped waiting),
and after how many seconds. Tests compare these with a real nginx's
(``ut._testbase.nginx``). ``openssl s_client`` and ``curl`` are used where a reference
client is the better judge (CertificateRequest, HTTP/2).
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass

__all__ = ["Answer", "curl", "probe_plain", "probe_tls", "s_client_asks_certificate"]


@dataclass
class Answer:
    data: bytes
    end: str  # fin / close_notify / eof / reset / open
    seconds: float  # from the probe's last write to the end (or to giving up)
    alpn: str | None = None
    version: str | None = None

    @property
    def status(self) -> str:
        """The status line (``HTTP/1.1 400 Bad Request``), or ``""``."""
        line = self.data.split(b"\r\n", 1)[0]
        return line.decode("latin-1") if line.startswith(b"HTTP/") else ""

    def header(self, name: str) -> str | None:
        head = self.data.split(b"\r\n\r\n", 1)[0].decode("latin-1")
        for line in head.split("\r\n")[1:]:
            k, _, v = line.partition(":")
            if k.strip().lower() == name.lower():
                return v.strip()
        return None

    @property
    def body(self) -> bytes:
        return self.data.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in self.data else b""


def _read_all(sock: socket.socket, wait: float, tls: bool) -> tuple[bytes, str, float]:
    out = bytearray()
    t0 = time.monotonic()
    deadline = t0 + wait
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return bytes(out), "open", wait
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return bytes(out), "open", wait
        except ssl.SSLEOFError:
            return bytes(out), "eof", time.monotonic() - t0
        except (ConnectionResetError, ssl.SSLError):
            return bytes(out), "reset", time.monotonic() - t0
        if not chunk:
            return bytes(out), "close_notify" if tls else "fin", time.monotonic() - t0
        out += chunk


def probe_plain(addr: tuple[str, int], data: bytes, wait: float = 5.0) -> Answer:
    """Plain TCP: send ``data`` (maybe nothing) and read until the end or ``wait``."""
    with socket.create_connection(addr, timeout=wait) as sock:
        if data:
            sock.sendall(data)
        got, end, secs = _read_all(sock, wait, tls=False)
    return Answer(got, end, secs)


def probe_tls(addr: tuple[str, int], data: bytes, *, wait: float = 5.0,
              alpn: tuple[str, ...] = ("http/1.1",), version: str = "1.3",
              server_name: str = "localhost") -> Answer:
    """TLS without a client certificate (nothing verified), then ``data``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    v = ssl.TLSVersion.TLSv1_3 if version == "1.3" else ssl.TLSVersion.TLSv1_2
    ctx.minimum_version = ctx.maximum_version = v
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    raw = socket.create_connection(addr, timeout=wait)
    with ctx.wrap_socket(raw, server_hostname=server_name) as sock:
        if data:
            sock.sendall(data)
        got, end, secs = _read_all(sock, wait, tls=True)
        return Answer(got, end, secs, sock.selected_alpn_protocol(), sock.version())


def curl(url: str, *, http2: bool = True, timeout: float = 10.0) -> tuple[str, str]:
    """``(http_version, status code)`` as ``curl -k`` reports them."""
    args = ["curl", "-sk", "-o", os.devnull, "-w", "%{http_version} %{http_code}",
            "--max-time", str(timeout), "--http2" if http2 else "--http1.1", url]
    res = subprocess.run(args, capture_output=True, text=True, timeout=timeout + 5)
    version, _, code = res.stdout.strip().partition(" ")
    return version, code


def s_client_asks_certificate(addr: tuple[str, int], tls13: bool = True) -> bool:
    """Whether the server's handshake asks for a client certificate (a CertificateRequest),
    as ``openssl s_client`` reports it."""
    args = ["openssl", "s_client", "-connect", f"{addr[0]}:{addr[1]}", "-servername", "localhost",
            "-tls1_3" if tls13 else "-tls1_2"]
    res = subprocess.run(args, input=b"", capture_output=True, timeout=15)
    out = res.stdout.decode(errors="replace")
    if "Server certificate" not in out and "BEGIN CERTIFICATE" not in out:
        raise RuntimeError(f"s_client did not complete a handshake: {out[-500:]}")
    # s_client prints the signature algorithms of a CertificateRequest (both TLS versions)
    # and, for TLS 1.2, its certificate types; "No client certificate CA names sent"
    # shows either way.
    return "Requested Signature Algorithms" in out or "Client Certificate Types" in out
