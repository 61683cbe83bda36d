"""Mutual-TLS contexts for lanes, peer identity, and handshake failure reasons.

Theory of operation: the server requires a client certificate signed by the
private CA (spec: "server requires and verifies client certs"); the client
verifies the server's chain against the same CA *and* the server's name. Only
the configured CA is trusted — never the system store — so a certificate from a
public CA cannot open a lane. TLS 1.3 is preferred, 1.2 allowed (the spec's
"Go default").

Chains are verified in OpenSSL's default mode, not its strict X.509 mode
(``VERIFY_X509_STRICT``): strict mode refuses a CA without a keyUsage extension
and a leaf without an Authority Key Identifier, which is what the most common
way of making a CA gives (``openssl req -x509 -new`` with Debian's default
``openssl.cnf``, or OpenSSL 1.1 / LibreSSL ``x509 -req``). WireGuard-carrying
tools users compare us with (v2ray, sing-box: Go's crypto/x509; OpenVPN) accept
those too. What keeps strangers out is unchanged: the only trust anchor is
``tls.ca_cert`` (never the system store), signatures, validity dates, the
issuer's CA flag, the TLS purpose (an ExtendedKeyUsage that is present must
allow it) and, on the client, the server's name are all still checked.
Certificates made by ``ut.pki`` also pass the strict mode (tests/test_pki.py).

``failure_reason`` turns whatever a handshake raised into one word from a fixed
vocabulary (safe as a metric label and a log field) plus a sentence that tells
a human what to do. It must work on both ends, and it must work on the
*client* for TLS 1.3's late rejection: in 1.3 the client finishes its side of
the handshake before the server has checked the client certificate, so a
refused client learns it only from an alert on its first read (for example
``[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate required``),
so a client should count a lane as open only once it has read the server's
first frame. Servers built on asyncio or uvloop never send that alert (their
SSL protocol drops the connection without flushing it): their refused clients
see EOF on the first read, which ``failure_reason`` calls ``closed``.

Server-side upgrade pattern: to classify handshake failures the server must
run the handshake itself rather than pass ``ssl=`` to ``create_server`` (whose
failures only reach the loop's debug log). ``loop.sock_accept`` followed by
``loop.connect_accepted_socket(factory, sock, ssl=ctx,
ssl_handshake_timeout=...)`` works on both the stock loop and uvloop. The
alternative, ``create_server`` with a protocol that calls
``transport.pause_reading()`` in ``connection_made`` and then
``loop.start_tls(..., server_side=True)``, works on the stock loop only:
uvloop (0.23) starts reading right after ``connection_made`` regardless, the
ClientHello reaches the plain protocol and is lost, and the handshake times
out (pinned down in ``tests/test_tls.py``).
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import functools
import os
import ssl
import sys
from collections.abc import Sequence
from typing import Any

from ut.addr import is_ip
from ut.errors import ConfigError

__all__ = [
    "REASONS",
    "DEFAULT_ALPN",
    "ClientContext",
    "server_context",
    "client_context",
    "sends_sni",
    "peer_cn",
    "own_cn",
    "failure_reason",
]

#: What a browser or ``curl`` offers, and the default of ``tls.alpn``.
DEFAULT_ALPN: tuple[str, ...] = ("h2", "http/1.1")

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
    "refused_by_server",
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
    _send_chain_without_root(ctx)


# ------------------------------------------------------------- chain we send
#
# A handshake must not send our root CA. OpenSSL's "auto chain" completes the
# chain we send from the context's trust store when the certificate file holds
# only the leaf, and that store holds ca_cert (we need it to verify the peer):
# so without help every lane sends the private CA, whose name and self-signature
# a TLS 1.2 observer reads in clear, and which no ordinary HTTPS server sends
# (a peer must already have the root to trust it). Python's ssl module exposes
# neither SSL_CTX_set_mode nor SSL_CTX_build_cert_chain, so this calls the
# latter through ctypes, once per context, after the certificate and ca_cert are
# loaded: OpenSSL builds the chain the way auto chain would (certificates in the
# certificate file first, then ca_cert), drops a self-signed root at the end, and
# stores the result as the context's explicit chain, which turns auto chain off.
# So a leaf signed by the root is sent alone, and an intermediate CA (in the
# certificate file or in ca_cert) is still sent. Where this cannot be done safely
# (another Python, a statically linked OpenSSL without exported symbols, an
# unexpected object layout) it does nothing: the lanes work as before and send
# the root too.

# From openssl/ssl.h (unchanged since OpenSSL 1.0.2).
_SSL_CTRL_BUILD_CERT_CHAIN = 105
_SSL_BUILD_CHAIN_FLAG_UNTRUSTED = 0x1    # use the certificate file's extra certificates
_SSL_BUILD_CHAIN_FLAG_NO_ROOT = 0x2      # leave out a self-signed root
_SSL_BUILD_CHAIN_FLAG_IGNORE_ERROR = 0x8  # an incomplete chain is fine: send what there is
_SSL_BUILD_CHAIN_FLAG_CLEAR_ERROR = 0x10  # ... and leave no errors on OpenSSL's queue
_BUILD_FLAGS = (
    _SSL_BUILD_CHAIN_FLAG_UNTRUSTED
    | _SSL_BUILD_CHAIN_FLAG_NO_ROOT
    | _SSL_BUILD_CHAIN_FLAG_IGNORE_ERROR
    | _SSL_BUILD_CHAIN_FLAG_CLEAR_ERROR
)


@functools.lru_cache(maxsize=1)
def _libssl() -> Any | None:
    """The OpenSSL that Python's ``_ssl`` module runs on, via ctypes; None if unavailable.

    Opening ``_ssl``'s own file (already loaded) and looking symbols up through
    it finds the libssl that ``_ssl`` is linked to (or the copy built into it),
    never another OpenSSL that happens to be on the system.
    """
    if sys.implementation.name != "cpython":
        return None  # the SSL_CTX pointer is read from CPython's object layout
    try:
        import _ssl

        lib = ctypes.CDLL(_ssl.__file__)
        ctrl, get_options, clear_error = lib.SSL_CTX_ctrl, lib.SSL_CTX_get_options, lib.ERR_clear_error
    except (ImportError, OSError, AttributeError, TypeError):
        return None
    ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    ctrl.restype = ctypes.c_long
    get_options.argtypes = [ctypes.c_void_p]
    get_options.restype = ctypes.c_uint64
    clear_error.argtypes = []
    clear_error.restype = None
    return lib


def _ssl_ctx_pointer(ctx: ssl.SSLContext, lib: Any) -> int | None:
    """The ``SSL_CTX *`` behind ``ctx``, or None if it cannot be found with confidence.

    CPython's context object is ``{PyObject_HEAD; SSL_CTX *ctx; ...}``
    (Modules/_ssl.c, the same since Python 3.0); ``object.__basicsize__`` is
    the size of PyObject_HEAD on this build (bigger on free-threaded builds).
    The pointer is trusted only if OpenSSL reports for it the same options as
    Python does for ``ctx``.
    """
    offset = object.__basicsize__
    if type(ctx).__basicsize__ < offset + ctypes.sizeof(ctypes.c_void_p):
        return None
    ptr = ctypes.c_void_p.from_address(id(ctx) + offset).value
    if not ptr or lib.SSL_CTX_get_options(ptr) != int(ctx.options):
        return None
    return int(ptr)


def _send_chain_without_root(ctx: ssl.SSLContext) -> bool:
    """Make ``ctx`` send its certificate chain without the root CA (see above).

    Call it once the certificate, its key and the CAs are loaded. Returns True
    if the chain was set, False if nothing was changed. Never raises.
    """
    try:
        lib = _libssl()
        if lib is None:
            return False
        ptr = _ssl_ctx_pointer(ctx, lib)
        if ptr is None:
            return False
        if lib.SSL_CTX_ctrl(ptr, _SSL_CTRL_BUILD_CERT_CHAIN, _BUILD_FLAGS, None) == 0:
            lib.ERR_clear_error()  # a failure leaves the chain as it was (auto chain)
            return False
        return True
    except Exception:  # an improvement to what is sent, never a reason to fail
        return False


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


def _base_context(purpose: int, cls: type[ssl.SSLContext] = ssl.SSLContext) -> ssl.SSLContext:
    ctx = cls(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.MAXIMUM_SUPPORTED
    ctx.verify_mode = ssl.CERT_REQUIRED
    # Not VERIFY_X509_STRICT, deliberately: see the module docstring ("bring your own
    # CA" in docs/guide.md). Python 3.13's create_default_context() turns it on; a plain
    # SSLContext does not, so clear it explicitly in case a later Python changes that.
    ctx.verify_flags &= ~ssl.VERIFY_X509_STRICT
    ctx.options |= ssl.OP_NO_COMPRESSION
    return ctx


def server_context(
    ca_cert: Any, cert: Any, key: Any, *, alpn: Sequence[str] = DEFAULT_ALPN,
    client_auth: str = "handshake",
) -> ssl.SSLContext:
    """A server context: presents ``cert``/``key``, requires a client certificate
    signed by ``ca_cert`` (and nothing else). TLS 1.2 minimum, 1.3 preferred.

    ``client_auth="proof"`` (``tls.client_auth``) asks for no certificate in the
    handshake (no CertificateRequest: a prober sees an ordinary HTTPS server); the
    client proves itself after it (``ut.proof``, ``ut.gate``).

    ``alpn`` (``tls.alpn``) is what the server is willing to select. Python's
    ALPN callback (``SSL_select_next_proto``) picks the first protocol of *the
    server's* list that the client also offers; with no overlap it selects none
    and the handshake goes on, and a client that offers no ALPN (an older
    ut-tunnel, a scanner) is not asked about it at all. Lanes speak ut-tunnel
    frames whatever was selected. An empty ``alpn`` selects nothing.

    Paths may be ``str`` or path-like. A missing or bad file raises
    ``ConfigError`` naming the file and the key (``tls.ca_cert``, ``tls.cert``,
    ``tls.key``).

    >>> ctx = server_context("/etc/ut/ca.pem", "/etc/ut/server.pem", "/etc/ut/server.key")
    """
    ctx = _base_context(ssl.PROTOCOL_TLS_SERVER)
    _load(ctx, ca_cert, cert, key)
    if client_auth == "proof":
        ctx.verify_mode = ssl.CERT_NONE
    elif client_auth != "handshake":
        raise ValueError(f"client_auth must be 'handshake' or 'proof', not {client_auth!r}")
    # TLS 1.3 tickets from the server's session cache (a 32-byte id) instead of
    # stateless ones (~640 bytes: the whole session, client certificate included). A
    # resuming lane's ClientHello then has the size of a browser's.
    ctx.options |= ssl.OP_NO_TICKET
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


class ClientContext(ssl.SSLContext):
    """A client ``SSLContext`` whose connections offer ``resume_session``.

    asyncio's and uvloop's ``create_connection`` take no ``session=``, but both
    build the connection with ``sslcontext.wrap_bio(...)``: this override passes
    ``resume_session`` there. One session serves every lane (they all dial the
    same server with the same context); a session the server no longer accepts
    (restarted, ticket expired) just costs a full handshake. ``None`` (the
    start) offers nothing to resume.
    """

    resume_session: ssl.SSLSession | None = None

    def wrap_bio(  # type: ignore[override]
        self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, server_side: bool = False,
        server_hostname: str | None = None, session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        if session is None and not server_side:
            session = self.resume_session
        return super().wrap_bio(incoming, outgoing, server_side=server_side,
                                server_hostname=server_hostname, session=session)


def client_context(
    ca_cert: Any, cert: Any, key: Any, *, alpn: Sequence[str] = DEFAULT_ALPN,
    server_trust: str = "private",
) -> ClientContext:
    """A client context: presents ``cert``/``key``, verifies the server's chain
    against ``ca_cert`` only and its name (``check_hostname``; pass
    ``server_hostname=`` when connecting). TLS 1.2 minimum, 1.3 preferred.

    Its ClientHello is ``curl``'s on the same OpenSSL (same JA4, see
    ``_like_curl``), offering ``alpn`` (``tls.alpn``) in that order. Set
    ``resume_session`` (``ClientContext``) to resume a session on later
    connections. ``server_trust="system"`` (``tls.server_trust``) also trusts the
    system's CAs for the server (a CDN in front of it).

    >>> ctx = client_context("/etc/ut/ca.pem", "/etc/ut/home.pem", "/etc/ut/home.key")
    """
    ctx = _base_context(ssl.PROTOCOL_TLS_CLIENT, ClientContext)
    ctx.check_hostname = True
    _load(ctx, ca_cert, cert, key)
    if server_trust == "system":  # tls.server_trust: a CDN in front shows a public certificate
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    _like_curl(ctx)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx  # type: ignore[return-value]


def _like_curl(ctx: ssl.SSLContext) -> None:
    """Make the ClientHello the one ``curl`` sends through the same OpenSSL.

    A DPI engine files a hello under its JA4 (tests/test_tls_hello.py compares
    ours with curl's). Python's own client hello differs from curl's in three
    ways, each undone here:

    - cipher suites: Python narrows the TLS 1.2 list (no CBC, no RSA key
      exchange); curl keeps OpenSSL's ``DEFAULT``. We offer ``DEFAULT`` too. It
      costs nothing: our server keeps Python's strict list and its own order, and
      TLS 1.3 (what two ut-tunnel ends speak) ignores the 1.2 list. The
      security level Python set (``@SECLEVEL=2``) stays.
    - session_ticket (0x0023): curl sets ``SSL_OP_NO_TICKET``, which drops that
      TLS 1.2 extension. TLS 1.3 resumption (what lanes use) does not need it.
    - post_handshake_auth (0x0031): curl offers it, Python only when asked.

    What still differs, outside JA4: curl's supported_versions also lists TLS
    1.1 and 1.0; ours starts at 1.2 (the spec's minimum), and the padding
    extension absorbs the 4 bytes, so the record is the same length. The
    key_share, groups, signature algorithms and extension order are OpenSSL's
    and so already curl's.
    """
    ctx.set_ciphers("DEFAULT")
    ctx.options |= ssl.OP_NO_TICKET
    ctx.post_handshake_auth = True


def sends_sni(server_hostname: str | None) -> bool:
    """Whether a client connecting with ``server_hostname`` sends SNI.

    Python (like OpenSSL's callers generally) never puts an IP address into
    SNI, so a client dialling ``203.0.113.7`` with no ``tls.server_name`` sends
    a ClientHello without one, which browsers never do and an observer notices.
    """
    return bool(server_hostname) and not is_ip(server_hostname.strip("[]"))  # type: ignore[union-attr]


# ----------------------------------------------------------------- identity


def peer_cn(conn: Any) -> str:
    """The CN of the peer's verified certificate.

    ``conn`` is an ``ssl.SSLObject``, an ``ssl.SSLSocket``, or an asyncio
    transport (its ``get_extra_info("ssl_object")`` is used). Raises
    ``ValueError`` if ``conn`` is not a TLS connection, or if the peer's
    certificate is missing (impossible with these contexts) or has no CN: an
    identity that cannot be named must not be used.
    """
    obj = conn
    if not hasattr(obj, "getpeercert") and hasattr(obj, "get_extra_info"):
        obj = obj.get_extra_info("ssl_object")
    if obj is None or not hasattr(obj, "getpeercert"):
        raise ValueError(f"not a TLS connection: {conn!r}")
    cert = obj.getpeercert()
    if not cert:
        raise ValueError("the peer presented no certificate")
    for rdn in cert.get("subject", ()):
        for name, value in rdn:
            if name == "commonName" and value:
                return str(value)
    raise ValueError("the peer certificate has no CN")


def own_cn(cert_path: Any) -> str:
    """The CN of the certificate in the PEM file at ``cert_path``."""
    from ut.pki import PkiError, cert_cn, load_cert

    try:
        return cert_cn(load_cert(cert_path))
    except PkiError as exc:
        raise ConfigError(os.fspath(cert_path), "tls.cert", str(exc).split(": ", 1)[-1]) from None


# ------------------------------------------------------------------ reasons

# X509_V_ERR_* codes, as OpenSSL 3 reports them in
# ``SSLCertVerificationError.verify_code`` (see openssl/x509_vfy.h).
_VERIFY_CODES: dict[int, str] = {
    2: "unknown_ca",       # UNABLE_TO_GET_ISSUER_CERT
    7: "unknown_ca",       # CERT_SIGNATURE_FAILURE
    9: "not_yet_valid",    # CERT_NOT_YET_VALID
    10: "expired",         # CERT_HAS_EXPIRED
    18: "unknown_ca",      # DEPTH_ZERO_SELF_SIGNED_CERT
    19: "unknown_ca",      # SELF_SIGNED_CERT_IN_CHAIN
    20: "unknown_ca",      # UNABLE_TO_GET_ISSUER_CERT_LOCALLY (the usual "other CA")
    21: "unknown_ca",      # UNABLE_TO_VERIFY_LEAF_SIGNATURE
    26: "bad_certificate",  # INVALID_PURPOSE (client cert used as server cert or vice versa)
    62: "wrong_name",      # HOSTNAME_MISMATCH
    64: "wrong_name",      # IP_ADDRESS_MISMATCH
}

# Lower-case fragments of OpenSSL 3 reason texts, first match wins. Fragments
# with "alert" are alerts the *peer* sent about *our* certificate: a client
# refused by a server that flushes its alert reads them during the handshake
# (TLS 1.2) or on its first read after it (TLS 1.3).
_ALERTS: tuple[tuple[str, str], ...] = (
    ("alert certificate required", "no_certificate"),  # tlsv13 alert certificate required
    ("alert unknown ca", "unknown_ca"),                # tlsv1 / sslv3 alert unknown ca
    ("alert certificate expired", "expired"),          # sslv3 alert certificate expired
    ("alert bad certificate", "bad_certificate"),      # sslv3 alert bad certificate (also: not yet valid)
    ("alert unsupported certificate", "bad_certificate"),  # wrong purpose
    ("alert certificate unknown", "bad_certificate"),
    ("alert certificate revoked", "bad_certificate"),
    ("alert decrypt error", "bad_certificate"),
    ("alert protocol version", "protocol_version"),
)
_LOCAL: tuple[tuple[str, str], ...] = (
    ("peer did not return a certificate", "no_certificate"),  # server: client sent none
    ("no certificate returned", "no_certificate"),
    ("unable to get local issuer certificate", "unknown_ca"),
    ("self-signed certificate", "unknown_ca"),
    ("self signed certificate", "unknown_ca"),
    ("certificate has expired", "expired"),
    ("certificate is not yet valid", "not_yet_valid"),
    ("hostname mismatch", "wrong_name"),
    ("ip address mismatch", "wrong_name"),
    ("unsuitable certificate purpose", "bad_certificate"),
    ("unsupported protocol", "protocol_version"),        # peer offered TLS <= 1.1
    ("no protocols available", "protocol_version"),
    ("wrong version number", "not_tls"),                 # plain TCP bytes where TLS expected
    ("http request", "not_tls"),                         # "GET / HTTP/1.1" to the TLS port
    ("https proxy request", "not_tls"),                  # "CONNECT ..." to the TLS port
    ("record layer failure", "not_tls"),
    ("packet length too long", "not_tls"),
    ("record length mismatch", "not_tls"),
    ("unexpected eof", "closed"),                        # peer closed mid-handshake
    ("eof occurred in violation of protocol", "closed"),
    ("handshake is taking longer than", "timeout"),      # asyncio's and uvloop's handshake timeout
    ("timed out", "timeout"),
)


def failure_reason(exc: BaseException, *, side: str | None = None) -> tuple[str, str]:
    """Classify a TLS handshake failure: ``(reason, human_text)``.

    ``reason`` is one of ``REASONS`` (safe as a metric label and log field).
    ``human_text`` says what went wrong and what to do, and ends with the
    library's own words in parentheses. ``side`` (``"server"``, ``"client"``
    or ``None``) only sharpens the wording ("client certificate ..." rather
    than "peer certificate ...").

    Handles, on the server: a client with no certificate, one from another CA,
    an expired or not-yet-valid one, one with the wrong purpose, plain TCP or
    HTTP instead of TLS, TLS <= 1.1. On the client: a server certificate for
    another name, from an unknown CA, expired; the alerts a server sends about
    the client's certificate (in TLS 1.3 they arrive on the first read after
    the handshake, e.g. ``tlsv13 alert certificate required``). asyncio's and
    uvloop's "SSL handshake is taking longer than N seconds" abort,
    ``TimeoutError`` and ``asyncio.TimeoutError`` give ``timeout``; a reset or
    EOF mid-handshake gives ``closed``.

    >>> failure_reason(TimeoutError())[0]
    'timeout'
    """
    reason, ours = _classify(exc)
    return reason, f"{_human(reason, ours, side, exc)} ({_short(exc)})"


def _short(exc: BaseException) -> str:
    """The library's words, without OpenSSL's ``[SSL: CODE]`` and ``(_ssl.c:N)`` noise."""
    if isinstance(exc, ssl.SSLCertVerificationError) and getattr(exc, "verify_message", None):
        return str(exc.verify_message)
    text = str(exc)
    if isinstance(exc, ssl.SSLError) and len(exc.args) > 1 and isinstance(exc.args[1], str):
        text = exc.args[1]
        if text.startswith("[") and "] " in text:
            text = text.split("] ", 1)[1]
        if text.endswith(")") and " (_ssl.c:" in text:
            text = text[: text.rindex(" (_ssl.c:")]
    return text or type(exc).__name__


def _classify(exc: BaseException) -> tuple[str, bool]:
    """``(reason, ours)``: ``ours`` is True when the peer judged *our* certificate."""
    reason, ours = _classify_one(exc)
    if reason == "other":
        # Look through "raise X from handshake_error" wrappers.
        inner = exc.__cause__ or exc.__context__
        depth = 0
        while inner is not None and depth < 4 and not isinstance(inner, asyncio.CancelledError):
            inner_reason, inner_ours = _classify_one(inner)
            if inner_reason != "other":
                return inner_reason, inner_ours
            inner = inner.__cause__ or inner.__context__
            depth += 1
    return reason, ours


def _classify_one(exc: BaseException) -> tuple[str, bool]:
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = getattr(exc, "verify_code", None)
        if code in _VERIFY_CODES:
            return _VERIFY_CODES[code], False
        return _match(_LOCAL, f"{getattr(exc, 'verify_message', '')} {exc}") or "bad_certificate", False
    if isinstance(exc, ssl.SSLError):
        # exc.reason is OpenSSL's code (WRONG_VERSION_NUMBER, TLSV1_ALERT_UNKNOWN_CA...);
        # the text carries the same words in lower case.
        text = f"{(getattr(exc, 'reason', None) or '').replace('_', ' ')} {exc}"
        alert = _match(_ALERTS, text)
        if alert:
            return alert, True
        local = _match(_LOCAL, text)
        if local:
            return local, False
        if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
            return "closed", False
        return "other", False
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return "timeout", False
    if isinstance(exc, ConnectionRefusedError):
        return "other", False
    own = getattr(exc, "reason", None)
    if isinstance(exc, ConnectionError) and own in REASONS:  # e.g. ut.lane.RefusedByWebFace
        return own, False
    if isinstance(exc, ConnectionAbortedError):
        return _match(_LOCAL, str(exc)) or "closed", False
    if isinstance(exc, (ConnectionError, EOFError)):  # reset, broken pipe, IncompleteReadError
        return "closed", False
    if isinstance(exc, OSError):
        if exc.errno in (errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED):
            return "closed", False
        if exc.errno == errno.ETIMEDOUT:
            return "timeout", False
    return _match(_LOCAL, str(exc)) or "other", False


def _match(table: tuple[tuple[str, str], ...], text: str) -> str | None:
    low = text.lower()
    for fragment, reason in table:
        if fragment in low:
            return reason
    return None


def _human(reason: str, ours: bool, side: str | None, exc: BaseException) -> str:
    # Whose certificate failed, in words: the peer's (we checked it) or ours (the
    # peer sent an alert about it).
    peer = {"server": "client", "client": "server"}.get(side or "", "peer")
    mine = {"server": "server", "client": "client"}.get(side or "", "our")
    if ours:
        return {
            "no_certificate": (
                "the server requires a client certificate and got none: set tls.cert and tls.key "
                "to a certificate made with `ut-tunnel pki client`"
            ),
            "unknown_ca": (
                f"the {peer} does not trust the {mine} certificate (not signed by its CA): issue "
                "it with `ut-tunnel pki` from the same PKI directory as the peer's, and give both "
                "sides that directory's ca.pem"
            ),
            "expired": (
                f"the {peer} says the {mine} certificate has expired: issue a new one with "
                "`ut-tunnel pki client` (clients) or `ut-tunnel pki init` (server) and restart"
            ),
            "bad_certificate": (
                f"the {peer} refused the {mine} certificate (wrong purpose, not yet valid or "
                "otherwise unusable; its log names the reason): check the clocks and re-issue it "
                "with `ut-tunnel pki`"
            ),
            "protocol_version": "the peer refused our TLS version: both sides need TLS 1.2 or 1.3",
        }.get(reason, "the peer refused the handshake")
    if reason == "unknown_ca":
        if side == "server":
            return (
                "client certificate not signed by this server's CA (tls.ca_cert): issue it with "
                "`ut-tunnel pki client` from the same PKI directory as the server's certificate"
            )
        if side == "client":
            return (
                "server certificate not signed by the CA in tls.ca_cert: give the client the "
                "ca.pem of the PKI directory that issued the server's certificate"
            )
        return (
            "peer certificate not signed by the CA in tls.ca_cert: both sides need certificates "
            "and ca.pem from the same `ut-tunnel pki` directory"
        )
    if reason == "expired":
        fix = "`ut-tunnel pki client`" if peer == "client" else "`ut-tunnel pki` (server: `pki init`)"
        return f"{peer} certificate has expired: issue a new one with {fix} and restart the {peer}"
    if reason == "not_yet_valid":
        return (
            f"{peer} certificate is not valid yet: the clocks of the two hosts disagree (check NTP), "
            "or the certificate was issued with a future start date"
        )
    if reason == "no_certificate":
        return (
            "the client sent no certificate: set tls.cert and tls.key on the client to a "
            "certificate made with `ut-tunnel pki client`"
        )
    if reason == "wrong_name":
        return (
            "server certificate does not match the name the client dialled: set tls.server_name "
            "to a name the certificate holds, or re-issue it with `ut-tunnel pki init "
            "--server-name NAME [--ip IP]`"
        )
    if reason == "bad_certificate":
        return (
            f"{peer} certificate refused (wrong purpose, e.g. a client certificate on the server, "
            "or otherwise unusable): re-issue it with `ut-tunnel pki` (server: `pki init`, "
            "clients: `pki client`)"
        )
    if reason == "timeout":
        return (
            "the TCP+TLS handshake did not finish in time (tcp.connect_timeout_seconds): check the "
            "network path, and that the address is a ut-tunnel endpoint"
        )
    if reason == "not_tls":
        return (
            "the peer does not speak TLS (plain TCP, HTTP or a scanner): check that the client's "
            "tcp.server_addr points at the ut-tunnel server's tcp.listen_addr"
        )
    if reason == "closed":
        if side == "client":
            return (
                "the server closed the connection during or right after the handshake: it most "
                "likely refused this client's certificate; the server's log (tls_handshake_fail) "
                "says why"
            )
        return (
            "the peer closed or reset the connection during the handshake: it most likely refused "
            "our certificate (its log says why), or something in the path cut the connection"
        )
    if reason == "protocol_version":
        return "no common TLS version: ut-tunnel needs TLS 1.2 or 1.3 on both sides"
    if reason == "refused_by_server" and isinstance(exc, ConnectionError):
        return str(exc)
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused: nothing listens there; check tcp.server_addr and that the server runs"
    if isinstance(exc, OSError) and exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return "no route to the server: check tcp.server_addr and the network"
    if type(exc).__name__ == "gaierror":
        return "cannot resolve the server's host name: check tcp.server_addr and DNS"
    return "the TLS handshake failed"
