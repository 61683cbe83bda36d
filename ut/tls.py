"""Mutual-TLS contexts for lanes, peer identity, and handshake failure reasons.

Theory of operation: the server requires a client certificate signed by the
private CA (spec: "server requires and verifies client certs"); the client
verifies the server's chain against the same CA *and* the server's name. Only
the configured CA is trusted — never the system store — so a certificate from a
public CA cannot open a lane. TLS 1.3 is preferred, 1.2 allowed (the spec's
"Go default"); both contexts verify chains in OpenSSL's strict X.509 mode,
which certificates made by ``ut.pki`` satisfy.

``failure_reason`` turns whatever a handshake raised into one word from a fixed
vocabulary (safe as a metric label and a log field) plus a sentence that tells
a human what to do. It must work on both ends, and it must work on the
*client* for TLS 1.3's late rejection: in 1.3 the client finishes its side of
the handshake before the server has checked the client certificate, so a
refused client learns it only from an alert on its first read (for example
``[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate required``).
A lane therefore only counts as open once the first frame has been read.
"""

from __future__ import annotations

import asyncio
import errno
import os
import ssl
from typing import Any

from ut.errors import ConfigError

__all__ = [
    "REASONS",
    "server_context",
    "client_context",
    "peer_cn",
    "own_cn",
    "failure_reason",
]

#: Every word ``failure_reason`` can return.
REASONS: tuple[str, ...] = (
    "unknown_ca",
    "expired",
    "not_yet_valid",
    "no_certificate",
    "wrong_name",
    "bad_certificate",
    "timeout",
    "not_tls",
    "closed",
    "protocol_version",
    "other",
)


# ----------------------------------------------------------------- contexts


def _check_readable(path: str, key: str) -> None:
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except FileNotFoundError:
        raise ConfigError(path, key, "file not found") from None
    except IsADirectoryError:
        raise ConfigError(path, key, "is a directory, expected a PEM file") from None
    except OSError as exc:
        raise ConfigError(path, key, f"cannot read: {exc.strerror or exc}") from None


def _load(ctx: ssl.SSLContext, ca_cert: Any, cert: Any, key: Any) -> None:
    ca_path, cert_path, key_path = os.fspath(ca_cert), os.fspath(cert), os.fspath(key)
    for path, name in ((ca_path, "tls.ca_cert"), (cert_path, "tls.cert"), (key_path, "tls.key")):
        _check_readable(path, name)
    try:
        ctx.load_verify_locations(cafile=ca_path)
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(ca_path, "tls.ca_cert", f"not a PEM CA certificate ({_short(exc)})") from None
    # load_cert_chain says only "PEM lib" for both a bad certificate and a bad
    # key; parse each first so the message names the right file.
    _check_pem(cert_path, "tls.cert")
    _check_pem(key_path, "tls.key")
    try:
        ctx.load_cert_chain(cert_path, key_path)
    except ssl.SSLError as exc:
        text = _short(exc)
        if "KEY_VALUES_MISMATCH" in text.upper() or "key values mismatch" in text:
            raise ConfigError(
                key_path, "tls.key", f"this key does not belong to the certificate {cert_path}"
            ) from None
        raise ConfigError(cert_path, "tls.cert", f"cannot use certificate and key ({text})") from None


def _check_pem(path: str, key: str) -> None:
    # Imported here: cryptography is only needed to explain a bad file.
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    with open(path, "rb") as fh:
        data = fh.read()
    try:
        if key == "tls.key":
            serialization.load_pem_private_key(data, password=None)
        else:
            x509.load_pem_x509_certificate(data)
    except TypeError:
        raise ConfigError(path, key, "the private key is encrypted; ut-tunnel needs an unencrypted key") from None
    except ValueError:
        what = "private key" if key == "tls.key" else "certificate"
        raise ConfigError(path, key, f"not a PEM {what}") from None


def _base_context(purpose: int) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.MAXIMUM_SUPPORTED
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.options |= ssl.OP_NO_COMPRESSION
    return ctx


def server_context(ca_cert: Any, cert: Any, key: Any) -> ssl.SSLContext:
    """A server context: presents ``cert``/``key``, requires a client certificate
    signed by ``ca_cert`` (and nothing else). TLS 1.2 minimum, 1.3 preferred.

    Paths may be ``str`` or path-like. A missing or bad file raises
    ``ConfigError`` naming the file and the key (``tls.ca_cert``, ``tls.cert``,
    ``tls.key``).

    >>> ctx = server_context("/etc/ut/ca.pem", "/etc/ut/server.pem", "/etc/ut/server.key")
    """
    ctx = _base_context(ssl.PROTOCOL_TLS_SERVER)
    _load(ctx, ca_cert, cert, key)
    return ctx


def client_context(ca_cert: Any, cert: Any, key: Any) -> ssl.SSLContext:
    """A client context: presents ``cert``/``key``, verifies the server's chain
    against ``ca_cert`` only and its name (``check_hostname``; pass
    ``server_hostname=`` when connecting). TLS 1.2 minimum, 1.3 preferred.

    >>> ctx = client_context("/etc/ut/ca.pem", "/etc/ut/home.pem", "/etc/ut/home.key")
    """
    ctx = _base_context(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = True
    _load(ctx, ca_cert, cert, key)
    return ctx


# ----------------------------------------------------------------- identity


def peer_cn(conn: Any) -> str:
    """The CN of the peer's verified certificate.

    ``conn`` is an ``ssl.SSLObject``, an ``ssl.SSLSocket``, or an asyncio
    transport (its ``get_extra_info("ssl_object")`` is used). Returns ``""``
    if the peer sent no certificate (impossible with these contexts) and raises
    ``ValueError`` if ``conn`` is not a TLS connection.
    """
    obj = conn
    if not hasattr(obj, "getpeercert") and hasattr(obj, "get_extra_info"):
        obj = obj.get_extra_info("ssl_object")
    if obj is None or not hasattr(obj, "getpeercert"):
        raise ValueError(f"not a TLS connection: {conn!r}")
    cert = obj.getpeercert()
    if not cert:
        return ""
    for rdn in cert.get("subject", ()):
        for name, value in rdn:
            if name == "commonName":
                return str(value)
    return ""


def own_cn(cert_path: Any) -> str:
    """The CN of the certificate in the PEM file at ``cert_path``."""
    from ut.pki import PkiError, cert_cn, load_cert

    try:
        return cert_cn(load_cert(cert_path))
    except PkiError as exc:
        raise ConfigError(os.fspath(cert_path), "tls.cert", str(exc).split(": ", 1)[-1]) from None


# ------------------------------------------------------------------ reasons

# X509_V_ERR_* codes as OpenSSL 3 reports them in SSLCertVerificationError.verify_code.
_V_UNABLE_TO_GET_ISSUER_CERT = 2
_V_CERT_SIGNATURE_FAILURE = 7
_V_CERT_NOT_YET_VALID = 9
_V_CERT_HAS_EXPIRED = 10
_V_DEPTH_ZERO_SELF_SIGNED_CERT = 18
_V_SELF_SIGNED_CERT_IN_CHAIN = 19
_V_UNABLE_TO_GET_ISSUER_CERT_LOCALLY = 20
_V_UNABLE_TO_VERIFY_LEAF_SIGNATURE = 21
_V_INVALID_PURPOSE = 26
_V_HOSTNAME_MISMATCH = 62
_V_IP_ADDRESS_MISMATCH = 64

_VERIFY_CODES: dict[int, str] = {
    _V_UNABLE_TO_GET_ISSUER_CERT: "unknown_ca",
    _V_CERT_SIGNATURE_FAILURE: "unknown_ca",
    _V_DEPTH_ZERO_SELF_SIGNED_CERT: "unknown_ca",
    _V_SELF_SIGNED_CERT_IN_CHAIN: "unknown_ca",
    _V_UNABLE_TO_GET_ISSUER_CERT_LOCALLY: "unknown_ca",
    _V_UNABLE_TO_VERIFY_LEAF_SIGNATURE: "unknown_ca",
    _V_CERT_NOT_YET_VALID: "not_yet_valid",
    _V_CERT_HAS_EXPIRED: "expired",
    _V_HOSTNAME_MISMATCH: "wrong_name",
    _V_IP_ADDRESS_MISMATCH: "wrong_name",
    _V_INVALID_PURPOSE: "bad_certificate",
}

# Lower-case fragments of OpenSSL reason strings (``SSLError.reason`` is the
# upper-case form, the message the lower-case one), first match wins. The
# "alert" forms are what the *other* side sends: a client refused by the server
# reads them after its own handshake finished (TLS 1.3) or during it (TLS 1.2).
_REASON_FRAGMENTS: tuple[tuple[str, str], ...] = (
    ("certificate required", "no_certificate"),          # tlsv13 alert certificate required
    ("peer did not return a certificate", "no_certificate"),
    ("no certificate returned", "no_certificate"),
    ("no certificates returned", "no_certificate"),
    ("unknown ca", "unknown_ca"),                        # sslv3/tlsv1 alert unknown ca
    ("certificate expired", "expired"),                  # sslv3 alert certificate expired
    ("certificate has expired", "expired"),
    ("certificate is not yet valid", "not_yet_valid"),
    ("bad certificate", "bad_certificate"),              # sslv3 alert bad certificate
    ("unsupported certificate", "bad_certificate"),
    ("certificate unknown", "bad_certificate"),
    ("certificate revoked", "bad_certificate"),
    ("decrypt error", "bad_certificate"),
    ("protocol version", "protocol_version"),            # tlsv1 alert protocol version
    ("unsupported protocol", "protocol_version"),
    ("no protocols available", "protocol_version"),
    ("version too low", "protocol_version"),
    ("wrong version number", "not_tls"),                 # plain TCP where TLS expected
    ("http request", "not_tls"),
    ("https proxy request", "not_tls"),
    ("record layer failure", "not_tls"),
    ("packet length too long", "not_tls"),
    ("record length mismatch", "not_tls"),
    ("unexpected eof", "closed"),                        # peer closed mid-handshake
    ("eof occurred in violation of protocol", "closed"),
    ("handshake is taking longer", "timeout"),           # asyncio / uvloop handshake timeout
    ("timed out", "timeout"),
)

_HUMAN: dict[str, str] = {
    "unknown_ca": (
        "the peer's certificate is not signed by the CA in tls.ca_cert: issue client "
        "certificates with `ut-tunnel pki client` from the same PKI directory as the server's, "
        "and give both sides that directory's ca.pem"
    ),
    "expired": (
        "a certificate has expired: issue a new one with `ut-tunnel pki client` "
        "(or `pki init` for the server) and restart"
    ),
    "not_yet_valid": (
        "a certificate is not valid yet: check the clocks on both hosts (NTP), "
        "or wait until its start date"
    ),
    "no_certificate": (
        "the client sent no certificate: set tls.cert and tls.key on the client to a "
        "certificate issued with `ut-tunnel pki client`"
    ),
    "wrong_name": (
        "the server's certificate does not match the name the client dialled: set tls.server_name "
        "on the client to a name in the certificate, or re-run `ut-tunnel pki init` with the right "
        "--server-name/--ip"
    ),
    "bad_certificate": (
        "a certificate was refused (wrong purpose, bad signature or unusable): issue it again "
        "with `ut-tunnel pki` (server: `pki init`, clients: `pki client`)"
    ),
    "timeout": (
        "the TCP+TLS handshake did not finish in time (tcp.connect_timeout_seconds): check the "
        "network path and that the peer is a ut-tunnel endpoint"
    ),
    "not_tls": (
        "the peer does not speak TLS (plain TCP, HTTP or a port scanner): check that the client's "
        "tcp.server_addr points at the ut-tunnel server's tcp.listen_addr"
    ),
    "closed": (
        "the peer closed or reset the connection during the handshake: the other side's log says "
        "why (often it refused our certificate), or a firewall/proxy is in the way"
    ),
    "protocol_version": (
        "no common TLS version: ut-tunnel needs TLS 1.2 or 1.3 on both sides"
    ),
    "other": "the TLS handshake failed",
}


def _short(exc: BaseException) -> str:
    """One-line text of an exception (``SSLError`` strings can carry file/line noise)."""
    text = getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or ""
    full = str(exc)
    if isinstance(exc, ssl.SSLError) and exc.args and isinstance(exc.args[-1], str):
        full = exc.args[-1]
    return full or str(text) or type(exc).__name__


def failure_reason(exc: BaseException) -> tuple[str, str]:
    """Classify a TLS handshake failure: ``(reason, human_text)``.

    ``reason`` is one of ``REASONS``. Works on the server's exception (client
    sent no certificate, one from another CA, an expired one; plain TCP or
    HTTP instead of TLS) and on the client's (server certificate for the wrong
    name, from an unknown CA, expired; and, in TLS 1.3, the alert the client
    reads on its first read after the server refused its certificate).
    Timeouts (``TimeoutError``, ``asyncio.TimeoutError`` and asyncio's
    "handshake is taking longer than" abort) give ``timeout``; a peer that
    closes or resets mid-handshake gives ``closed``.

    >>> failure_reason(TimeoutError())[0]
    'timeout'
    """
    reason = _classify(exc)
    human = _HUMAN[reason]
    detail = _short(exc)
    if reason == "wrong_name" and getattr(exc, "verify_message", None):
        detail = exc.verify_message  # type: ignore[attr-defined]
    return reason, f"{human} ({detail})" if detail else human


def _classify(exc: BaseException) -> str:
    # Unwrap exceptions raised "from" a handshake error.
    seen = 0
    while exc.__cause__ is not None and not isinstance(exc, ssl.SSLError) and seen < 5:
        exc = exc.__cause__
        seen += 1
    if isinstance(exc, ssl.SSLCertVerificationError):
        by_code = _VERIFY_CODES.get(getattr(exc, "verify_code", 0) or 0)
        if by_code:
            return by_code
        return _by_text((exc.verify_message or "") + " " + str(exc)) or "bad_certificate"
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return "timeout"
    if isinstance(exc, ssl.SSLError):
        # Order: the library reason code (e.g. WRONG_VERSION_NUMBER), then the text.
        code = (getattr(exc, "reason", None) or "").replace("_", " ")
        found = _by_text(code) or _by_text(str(exc))
        if found:
            return found
        if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
            return "closed"
        return "other"
    if isinstance(exc, ConnectionAbortedError):
        return _by_text(str(exc)) or "closed"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, EOFError, asyncio.IncompleteReadError)):
        return "closed"
    if isinstance(exc, ConnectionError):
        return "closed"
    if isinstance(exc, OSError):
        if exc.errno in (errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED):
            return "closed"
        if exc.errno == errno.ETIMEDOUT:
            return "timeout"
        return _by_text(str(exc)) or "other"
    return _by_text(str(exc)) or "other"


def _by_text(text: str) -> str | None:
    low = text.lower()
    for fragment, reason in _REASON_FRAGMENTS:
        if fragment in low:
            return reason
    return None
