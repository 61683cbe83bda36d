"""JA4 TLS client fingerprints from the raw bytes of a ClientHello (FoxIO's JA4 spec).

JA4 = ``a_b_c``:

- a: ``t`` (TLS over TCP), the version (highest of supported_versions, else the hello's
  legacy version: ``13``, ``12``...), ``d`` with SNI or ``i`` without, the cipher count
  and the extension count (two digits each, at most 99, SNI and ALPN included), and the
  first and last character of the first ALPN value (``00`` without ALPN).
- b: sha256 of the cipher suites as 4-digit hex, sorted, comma-joined; 12 hex digits.
- c: sha256 of the extensions as 4-digit hex, sorted, SNI (0000) and ALPN (0010) left
  out, then ``_`` and the signature algorithms in their order; 12 hex digits.

GREASE values (``0x?a?a``) are ignored everywhere. ``ja4_r`` gives the same with the
lists written out instead of hashed (JA4_r), which is what to compare when b or c differ.

Usage::

    hello = parse_client_hello(first_bytes_of_the_connection)
    ja4(hello)     # 't13d1516h2_8daaf6152771_e5627efa2ab1'
    ja4_r(hello)   # 't13d1516h2_002f,0035,..._0005,000a,..._0403,0804,...'
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field

__all__ = ["ClientHello", "parse_client_hello", "ja4", "ja4_r", "is_grease"]

EXT_SNI = 0x0000
EXT_GROUPS = 0x000A
EXT_SIG_ALGS = 0x000D
EXT_ALPN = 0x0010
EXT_PSK = 0x0029
EXT_SUPPORTED_VERSIONS = 0x002B

_VERSIONS = {0x0304: "13", 0x0303: "12", 0x0302: "11", 0x0301: "10", 0x0300: "s3",
             0x0002: "s2", 0xFEFF: "d1", 0xFEFD: "d2", 0xFEFC: "d3"}


def is_grease(value: int) -> bool:
    """RFC 8701 GREASE: 0x0a0a, 0x1a1a, ... 0xfafa."""
    return (value & 0x0F0F) == 0x0A0A and (value >> 8) == (value & 0xFF)


@dataclass
class ClientHello:
    """What JA4 (and a curious test) needs from a ClientHello, GREASE already dropped."""

    legacy_version: int
    ciphers: list[int]
    extensions: list[int]  # in the order sent
    sni: str | None = None
    alpn: list[bytes] = field(default_factory=list)
    sig_algs: list[int] = field(default_factory=list)
    groups: list[int] = field(default_factory=list)
    supported_versions: list[int] = field(default_factory=list)
    session_id: bytes = b""
    raw_extensions: dict[int, bytes] = field(default_factory=dict)


def _handshake_bytes(data: bytes) -> bytes:
    """The handshake message carried by the TLS records at the start of ``data``."""
    out = b""
    pos = 0
    while pos + 5 <= len(data):
        ctype, _ver, length = struct.unpack_from("!BHH", data, pos)
        if ctype != 22:
            raise ValueError(f"not a TLS handshake record (content type {ctype})")
        out += data[pos + 5:pos + 5 + length]
        pos += 5 + length
        if len(out) >= 4 and len(out) >= 4 + int.from_bytes(out[1:4], "big"):
            break
    if len(out) < 4 or out[0] != 1:
        raise ValueError("not a ClientHello")
    length = int.from_bytes(out[1:4], "big")
    if len(out) < 4 + length:
        raise ValueError(f"truncated ClientHello ({len(out) - 4} of {length} bytes)")
    return out[4:4 + length]


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError("truncated ClientHello")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def vec(self, size_bytes: int) -> bytes:
        return self.take(int.from_bytes(self.take(size_bytes), "big"))

    @property
    def left(self) -> int:
        return len(self.data) - self.pos


def _u16_list(data: bytes) -> list[int]:
    return [v for (v,) in struct.iter_unpack("!H", data) if not is_grease(v)]


def parse_client_hello(data: bytes) -> ClientHello:
    """Parse the ClientHello at the start of ``data`` (TLS records, as read from TCP)."""
    r = _Reader(_handshake_bytes(data))
    legacy_version = r.u16()
    r.take(32)  # random
    session_id = r.vec(1)
    ciphers = _u16_list(r.vec(2))
    r.vec(1)  # compression methods
    hello = ClientHello(legacy_version, ciphers, [], session_id=session_id)
    exts = _Reader(r.vec(2) if r.left else b"")
    while exts.left:
        ext_type = exts.u16()
        body = exts.vec(2)
        if is_grease(ext_type):
            continue
        hello.extensions.append(ext_type)
        hello.raw_extensions[ext_type] = body
        _read_extension(hello, ext_type, body)
    return hello


def _read_extension(hello: ClientHello, ext_type: int, body: bytes) -> None:
    if ext_type == EXT_SNI and body:
        names = _Reader(_Reader(body).vec(2))
        while names.left:
            kind, name = names.u8(), names.vec(2)
            if kind == 0:
                hello.sni = name.decode("ascii", "replace")
    elif ext_type == EXT_ALPN and body:
        protos = _Reader(_Reader(body).vec(2))
        while protos.left:
            hello.alpn.append(protos.vec(1))
    elif ext_type == EXT_SIG_ALGS and body:
        hello.sig_algs = _u16_list(_Reader(body).vec(2))
    elif ext_type == EXT_GROUPS and body:
        hello.groups = _u16_list(_Reader(body).vec(2))
    elif ext_type == EXT_SUPPORTED_VERSIONS and body:
        hello.supported_versions = _u16_list(_Reader(body).vec(1))


def _alnum(byte: int) -> bool:
    return 0x30 <= byte <= 0x39 or 0x41 <= byte <= 0x5A or 0x61 <= byte <= 0x7A


def _alpn_chars(hello: ClientHello) -> str:
    if not hello.alpn or not hello.alpn[0]:
        return "00"
    first = hello.alpn[0]
    if _alnum(first[0]) and _alnum(first[-1]):
        return chr(first[0]) + chr(first[-1])
    hexed = first.hex()
    return hexed[0] + hexed[-1]


def _part_a(hello: ClientHello) -> str:
    version = max(hello.supported_versions) if hello.supported_versions else hello.legacy_version
    sni = "d" if EXT_SNI in hello.extensions else "i"
    return (f"t{_VERSIONS.get(version, '00')}{sni}{min(len(hello.ciphers), 99):02d}"
            f"{min(len(hello.extensions), 99):02d}{_alpn_chars(hello)}")


def _hex_list(values: list[int]) -> str:
    return ",".join(f"{v:04x}" for v in values)


def _raw_b(hello: ClientHello) -> str:
    return _hex_list(sorted(hello.ciphers))


def _raw_c(hello: ClientHello) -> str:
    exts = _hex_list(sorted(e for e in hello.extensions if e not in (EXT_SNI, EXT_ALPN)))
    if hello.sig_algs:
        return f"{exts}_{_hex_list(hello.sig_algs)}"
    return exts


def _hash12(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12] if text else "000000000000"


def ja4(hello: ClientHello | bytes) -> str:
    """The JA4 fingerprint of ``hello`` (a ``ClientHello`` or the raw bytes of one)."""
    if isinstance(hello, (bytes, bytearray)):
        hello = parse_client_hello(bytes(hello))
    b = _hash12(_raw_b(hello))
    # An empty extension list hashes to zeros even when signature algorithms follow.
    c = _hash12(_raw_c(hello)) if any(
        e not in (EXT_SNI, EXT_ALPN) for e in hello.extensions) else "000000000000"
    return f"{_part_a(hello)}_{b}_{c}"


def ja4_r(hello: ClientHello | bytes) -> str:
    """JA4_r: JA4 with the sorted cipher and extension lists written out, not hashed."""
    if isinstance(hello, (bytes, bytearray)):
        hello = parse_client_hello(bytes(hello))
    return f"{_part_a(hello)}_{_raw_b(hello)}_{_raw_c(hello)}"
