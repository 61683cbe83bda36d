"""The client proof: how a client shows it belongs without a CertificateRequest.

With ``tls.client_auth: proof`` the server's TLS handshake asks for no certificate, so a
prober that connects sees what any HTTPS site shows. A client then proves, in its first
bytes on the connection, two things, in this order:

1. **It knows the private CA** (something a prober cannot guess): it asks for a *path*
   made of a timestamp, a random nonce and an HMAC of both under a key derived from the
   CA certificate's bytes. The server checks it with one HMAC, before parsing anything
   else: a request without it goes to the web face as it is (``ut.webface``).
2. **Who it is**: its certificate chain (from the private CA) and a signature, with the
   certificate's key, over that path, the server name and the connection's channel
   binding (RFC 5929 ``tls-unique`` of this TLS connection: a proof cannot be lifted into
   another connection). The chain is verified by ``cryptography``'s X.509 verifier against
   ``tls.ca_cert`` only, as leniently as OpenSSL's default mode (``ut.tls``: no strict
   extension rules), but with the same checks that matter: signatures, dates, CA flag,
   and a client purpose where an ExtendedKeyUsage is present.

The request looks like any HTTP/1.1 GET::

    GET /<token> HTTP/1.1
    Host: <server name>
    Accept: */*
    Authorization: Bearer <signature>.<certificate>[.<intermediate>...]

(``<token>``, the signature and the certificates are unpadded base64url.) Replays are
refused: a nonce is remembered for the timestamp window (``MAX_SKEW_SECONDS`` either
way). A wrong clock on the client shows as reason ``clock_skew``.

This module is sans-I/O: ``ClientProver.request`` makes the bytes, ``ProofVerifier.check``
judges a request head; ``ut.transport`` moves them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import struct
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import h11
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import ConfigError

__all__ = [
    "HEAD_LIMIT",
    "MAX_SKEW_SECONDS",
    "PROOF_REASONS",
    "ClientProver",
    "ProofResult",
    "ProofVerifier",
    "head_end",
]

#: Largest request head the server reads before deciding (a chain of a few certificates
#: fits; nginx's default ``large_client_header_buffers`` is 4 × 8 KiB).
HEAD_LIMIT = 16384
#: How far a proof's timestamp may be from the server's clock, either way.
MAX_SKEW_SECONDS = 120
#: The reasons ``ProofVerifier.check`` gives for a refused proof, besides ``no_proof``
#: (not a client at all: a prober, a browser). Words shared with ``ut.tls.REASONS``.
PROOF_REASONS: tuple[str, ...] = (
    "unknown_ca", "expired", "not_yet_valid", "bad_certificate", "bad_proof", "clock_skew",
)
#: How every proof request starts (a connection that starts otherwise is not a client).
PROOF_START = b"GET /"
MAX_CHAIN = 4
REPLAY_CACHE_MAX = 200_000  # nonces; ~100 bytes each

_PATH_LABEL = b"ut-tunnel path v1\x00"
_SIGN_LABEL = b"ut-tunnel client proof v1\x00"
_TS = struct.Struct(">Q")
_NONCE_LEN = 16
_MAC_LEN = 16
_TOKEN_BYTES = _TS.size + _NONCE_LEN + _MAC_LEN
_TOKEN_CHARS = (_TOKEN_BYTES * 8 + 5) // 6  # unpadded base64url


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def head_end(buf: bytes | bytearray) -> int:
    """Index just past the blank line that ends an HTTP head in ``buf``, or -1."""
    i = buf.find(b"\r\n\r\n")
    return -1 if i < 0 else i + 4


def _path_key(ca_der: bytes) -> bytes:
    return hashlib.sha256(_PATH_LABEL + ca_der).digest()


def _signed_message(token: str, host: str, binding: bytes) -> bytes:
    return b"".join((_SIGN_LABEL, token.encode(), b"\x00", host.encode("idna"), b"\x00", binding))


def _read_pem_certs(path: str, key: str) -> list[x509.Certificate]:
    try:
        with open(path, "rb") as fh:
            certs = x509.load_pem_x509_certificates(fh.read())
    except OSError as exc:
        raise ConfigError(path, key, f"cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ConfigError(path, key, f"not a PEM certificate ({exc})") from None
    return certs


@dataclass(frozen=True)
class ProofResult:
    """What ``ProofVerifier.check`` decided: ``cn`` when the client is proven, else
    ``reason`` (``no_proof`` or one of ``PROOF_REASONS``) and ``text`` for a human."""

    cn: str | None
    reason: str = ""
    text: str = ""
    rest: bytes = b""  # bytes after the request head (the client's first frames)

    @property
    def ok(self) -> bool:
        return self.cn is not None


class ClientProver:
    """The client's side: makes the proof request for each new lane.

    ``cert`` may hold intermediates after the leaf (all are sent); ``key`` is the
    certificate's private key (EC, RSA or Ed25519, unencrypted PEM); ``ca_cert`` the
    private CA, whose bytes key the path HMAC.
    """

    def __init__(self, ca_cert: Any, cert: Any, key: Any) -> None:
        ca_path, cert_path, key_path = os.fspath(ca_cert), os.fspath(cert), os.fspath(key)
        ca = _read_pem_certs(ca_path, "tls.ca_cert")
        self._path_key = _path_key(ca[0].public_bytes(serialization.Encoding.DER))
        chain = _read_pem_certs(cert_path, "tls.cert")[:MAX_CHAIN]
        self._chain = ".".join(_b64(c.public_bytes(serialization.Encoding.DER)) for c in chain)
        try:
            with open(key_path, "rb") as fh:
                self._key = serialization.load_pem_private_key(fh.read(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(key_path, "tls.key", f"cannot load the private key ({exc})") from None

    def token(self, now: float | None = None) -> str:
        """A fresh path token: timestamp, nonce, HMAC under the CA-derived key."""
        ts = _TS.pack(int(time.time() if now is None else now))
        nonce = os.urandom(_NONCE_LEN)
        mac = hmac.new(self._path_key, ts + nonce, hashlib.sha256).digest()[:_MAC_LEN]
        return _b64(ts + nonce + mac)

    def proof(self, host: str, binding: bytes, prefix: str = "",
              now: float | None = None) -> tuple[str, str]:
        """``(target, authorization)``: the request target ``prefix/<token>`` and the
        ``Authorization`` header value, for a connection to ``host`` whose channel
        binding is ``binding`` (``b""``: not bound, when a proxy terminates TLS)."""
        token = self.token(now)
        sig = _sign(self._key, _signed_message(token, host, binding))
        return f"{prefix}/{token}", f"Bearer {_b64(sig)}.{self._chain}"

    def request(self, host: str, binding: bytes, now: float | None = None) -> bytes:
        """The proof request (an HTTP/1.1 GET head) for a TLS lane to ``host``."""
        target, authorization = self.proof(host, binding, now=now)
        return (
            f"GET {target} HTTP/1.1\r\nHost: {host}\r\nAccept: */*\r\n"
            f"Authorization: {authorization}\r\n\r\n"
        ).encode("ascii")


def _sign(key: Any, message: bytes) -> bytes:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(message, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(message, padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH),
                        hashes.SHA256())
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        return key.sign(message)
    raise TypeError(f"unsupported key type for a client proof: {type(key).__name__}")


def _verify(public_key: Any, sig: bytes, message: bytes) -> None:
    """Raises ``InvalidSignature`` (or ``TypeError`` for a key type we do not sign with)."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        public_key.verify(sig, message, ec.ECDSA(hashes.SHA256()))
    elif isinstance(public_key, rsa.RSAPublicKey):
        public_key.verify(sig, message, padding.PSS(padding.MGF1(hashes.SHA256()),
                                                    padding.PSS.DIGEST_LENGTH), hashes.SHA256())
    elif isinstance(public_key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        public_key.verify(sig, message)
    else:
        raise TypeError(type(public_key).__name__)


class ProofVerifier:
    """The server's side: judges the first request head of a connection.

    ``check`` never raises on input; it returns a ``ProofResult``. Cost for a prober:
    an HTTP parse and one HMAC; the certificate work happens only for a request that
    already showed it knows the CA.
    """

    def __init__(self, ca_cert: Any, *, clock: Any = time.time) -> None:
        ca_path = os.fspath(ca_cert)
        cas = _read_pem_certs(ca_path, "tls.ca_cert")
        self._path_key = _path_key(cas[0].public_bytes(serialization.Encoding.DER))
        self._store = verification.Store(cas)
        self._clock = clock
        self._seen: OrderedDict[bytes, float] = OrderedDict()

    def _verifier(self, now: float) -> verification.ClientVerifier:
        # OpenSSL's default (non-strict) mode, as for the handshake (ut.tls): any
        # extensions may be present, the CA flag and signatures are what is checked.
        when = _utc(now)
        return (
            verification.PolicyBuilder()
            .store(self._store)
            .time(when)
            .max_chain_depth(MAX_CHAIN)
            .extension_policies(
                ca_policy=verification.ExtensionPolicy.permit_all().require_present(
                    x509.BasicConstraints, verification.Criticality.AGNOSTIC, None),
                ee_policy=verification.ExtensionPolicy.permit_all(),
            )
            .build_client_verifier()
        )

    def check(self, data: bytes, *, host: str | None, binding: bytes, prefix: str = "",
              now: float | None = None) -> ProofResult:
        """Judge ``data``: the connection's first bytes, holding one complete request
        head (``head_end(data) > 0``). ``binding`` is this connection's channel binding
        as the server sees it; ``host``, if given, must be what the client named;
        ``prefix`` is the path before the token (``tcp.ws_path`` for WebSocket lanes)."""
        now = self._clock() if now is None else now
        end = head_end(data)
        if end < 0:
            return ProofResult(None, "no_proof", "no complete request head")
        request = _parse_head(bytes(data[:end]))
        rest = bytes(data[end:])
        if request is None:
            return ProofResult(None, "no_proof", "not an HTTP/1.1 request")
        target, headers = request
        token = target[len(prefix) + 1:] if target.startswith(prefix + "/") else ""
        raw = _token_bytes(token)
        if raw is None:
            return ProofResult(None, "no_proof", "no proof path")
        ts_nonce, mac = raw[:-_MAC_LEN], raw[-_MAC_LEN:]
        want = hmac.new(self._path_key, ts_nonce, hashlib.sha256).digest()[:_MAC_LEN]
        if not hmac.compare_digest(want, mac):
            return ProofResult(None, "no_proof", "no proof path")
        # From here on the request knew the CA: refusals are a client's, logged.
        (ts,) = _TS.unpack_from(ts_nonce)
        if abs(now - ts) > MAX_SKEW_SECONDS:
            return ProofResult(None, "clock_skew", (
                f"the client's clock is {ts - now:+.0f} s off the server's (more than "
                f"{MAX_SKEW_SECONDS} s): set both clocks (NTP)"))
        claimed_host = headers.get("host", "")
        if host is not None and claimed_host.lower() != host.lower():
            return ProofResult(None, "bad_proof", "the proof names another server")
        auth = headers.get("authorization", "")
        scheme, _, value = auth.partition(" ")
        parts = value.split(".")
        if scheme != "Bearer" or len(parts) < 2 or len(parts) > MAX_CHAIN + 1:
            return ProofResult(None, "bad_proof", "no certificate and signature in the proof")
        try:
            sig = _unb64(parts[0])
            chain = [x509.load_der_x509_certificate(_unb64(p)) for p in parts[1:]]
        except (ValueError, binascii.Error) as exc:
            return ProofResult(None, "bad_certificate", f"unreadable certificate in the proof: {exc}")
        result = self._check_chain(chain, now)
        if result is not None:
            return result
        leaf = chain[0]
        try:
            _verify(leaf.public_key(), sig, _signed_message(token, claimed_host, binding))
        except (InvalidSignature, TypeError, ValueError):
            return ProofResult(None, "bad_proof",
                               "the proof's signature does not verify for this connection")
        if not self._first_use(ts_nonce, now):
            return ProofResult(None, "bad_proof", "a proof seen before (replayed)")
        cn = _common_name(leaf)
        if not cn:
            return ProofResult(None, "bad_certificate", "the client certificate has no CN")
        return ProofResult(cn, rest=rest)

    def _check_chain(self, chain: Sequence[x509.Certificate], now: float) -> ProofResult | None:
        leaf = chain[0]
        when = _utc(now)
        if leaf.not_valid_after_utc < when:
            return ProofResult(None, "expired", "the client certificate has expired")
        if leaf.not_valid_before_utc > when:
            return ProofResult(None, "not_yet_valid", "the client certificate is not valid yet")
        try:
            self._verifier(now).verify(leaf, list(chain[1:]))
        except verification.VerificationError as exc:
            text = str(exc)
            if "expired" in text or "not yet valid" in text:
                return ProofResult(None, "expired", f"a certificate in the chain: {text}")
            return ProofResult(None, "unknown_ca",
                               f"the client certificate is not from tls.ca_cert ({text[:120]})")
        if not _allows_client_auth(leaf):
            return ProofResult(None, "bad_certificate",
                               "the certificate's ExtendedKeyUsage does not allow clientAuth")
        return None

    def _first_use(self, ts_nonce: bytes, now: float) -> bool:
        seen = self._seen
        while seen:
            oldest, expiry = next(iter(seen.items()))
            if expiry > now and len(seen) < REPLAY_CACHE_MAX:
                break
            del seen[oldest]
        if ts_nonce in seen:
            return False
        seen[ts_nonce] = now + 2 * MAX_SKEW_SECONDS + 1
        return True


def _token_bytes(token: str) -> bytes | None:
    if len(token) != _TOKEN_CHARS:
        return None
    try:
        raw = _unb64(token)
    except (ValueError, binascii.Error):
        return None
    return raw if len(raw) == _TOKEN_BYTES else None


def _parse_head(head: bytes) -> tuple[str, dict[str, str]] | None:
    """(target, lower-cased headers) of a GET head, or None if it is not one."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=HEAD_LIMIT)
    try:
        conn.receive_data(head)
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return None
    if not isinstance(event, h11.Request) or event.method != b"GET":
        return None
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in event.headers}
    return event.target.decode("latin-1"), headers


def _utc(now: float) -> Any:
    import datetime

    return datetime.datetime.fromtimestamp(now, datetime.timezone.utc)


def _allows_client_auth(cert: x509.Certificate) -> bool:
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return True  # as OpenSSL: no EKU means any purpose
    return ExtendedKeyUsageOID.CLIENT_AUTH in eku or ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in eku


def _common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = names[0].value if names else ""
    return value if isinstance(value, str) else value.decode("utf-8", "replace")
