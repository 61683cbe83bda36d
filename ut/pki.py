"""A private certificate authority for ut-tunnel's mutual TLS.

Theory of operation: one directory holds one PKI. ``init_pki`` creates the CA
(``ca.pem``/``ca.key``) and the server's certificate (``server.pem``/
``server.key``); ``issue_client`` signs one client certificate per home site
(``<name>.pem``/``<name>.key``). The client's identity on the server is its
certificate's CN (spec: "client identity = certificate CN"), so a client name is
validated to be safe both as a file name and as a CN.

Every key is ECDSA P-256 (fast to make, small, accepted by every TLS stack).
Certificates carry the extensions OpenSSL 3 checks in strict mode
(``VERIFY_X509_STRICT``): BasicConstraints and KeyUsage (critical), Subject and
Authority Key Identifiers, ExtendedKeyUsage (``serverAuth`` or ``clientAuth``)
and, on server certificates, a SubjectAlternativeName that always contains the
server name: hostname checks read the SAN, never the CN.

Certificates look like those of any private PKI: nothing in them names this
software. The CA is called ``<server name> Root CA`` unless ``--ca-name`` /
``ca_cn`` says otherwise (``default_ca_name``), and leaf certificates live 397
days by default (``LEAF_DAYS``), under the 398 days a public website's may; the
CA lives 10 years. (What a handshake *sends* is ut/tls.py's business: the leaf
and any intermediate, not the root.)

Files: a PKI directory that ``init_pki`` creates is mode 0700; private keys are
written mode 0600 and are never world-readable, not even for an instant (they are created 0600 under a temporary name, then renamed into
place); certificates are written 0644.

The ``ut-tunnel pki`` subcommand is ``add_pki_parser`` + ``run_pki``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import ipaddress
import os
import re
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ut.addr import is_ip

__all__ = [
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "SERVER_CERT_FILE",
    "SERVER_KEY_FILE",
    "PkiError",
    "default_ca_name",
    "make_ca",
    "make_cert",
    "write_cert",
    "write_key",
    "load_cert",
    "load_key",
    "init_pki",
    "issue_client",
    "validate_name",
    "cert_cn",
    "cert_summary",
    "add_pki_parser",
    "run_pki",
]

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
SERVER_CERT_FILE = "server.pem"
SERVER_KEY_FILE = "server.key"

CA_DAYS = 3650
# Leaf certificates: 397 days (+ the 5-minute backdate) stays under the 398-day
# ceiling browsers have enforced on public certificates since 2020, so a leaf's
# lifetime looks like any website's. (825 before: PKIs made then keep working.)
LEAF_DAYS = 397
# Certificates start this long in the past so a peer whose clock is a little
# behind does not see a brand-new certificate as "not yet valid".
_BACKDATE = _dt.timedelta(minutes=5)

# Letters, digits, '.', '_', '-'; starts with a letter or digit; at most 64
# characters (the X.509 upper bound for a CN). Safe in a file name, a CN, a
# metric label and a log line.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# The X.509 upper bound for a CN (RFC 5280 ub-common-name).
_MAX_CN = 64
# Names whose files init_pki owns.
_RESERVED_NAMES = frozenset({"ca", "server"})


class PkiError(ValueError):
    """A PKI operation was refused (existing CA, bad name, unreadable file...)."""


# ----------------------------------------------------------------- building


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _validity(
    not_before: _dt.datetime | None, not_after: _dt.datetime | None, days: int
) -> tuple[_dt.datetime, _dt.datetime]:
    start = not_before if not_before is not None else _now() - _BACKDATE
    end = not_after if not_after is not None else start + _BACKDATE + _dt.timedelta(days=days)
    if start.tzinfo is None:
        start = start.replace(tzinfo=_dt.timezone.utc)
    if end.tzinfo is None:
        end = end.replace(tzinfo=_dt.timezone.utc)
    if end <= start:
        raise PkiError(f"certificate would expire ({end:%Y-%m-%d}) before it starts ({start:%Y-%m-%d})")
    return start, end


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def default_ca_name(server_name: str) -> str:
    """The CA's name when none is given: ``"<server_name> Root CA"``.

    Named after the server, like a company's private CA, and different for every
    PKI: a fixed default would be one more string shared by every installation.
    Leading DNS labels are dropped if needed to fit the 64-character CN limit.

    >>> default_ca_name("vpn.example.com")
    'vpn.example.com Root CA'
    """
    suffix = " Root CA"
    name = server_name
    while len(name) + len(suffix) > _MAX_CN and "." in name:
        name = name.split(".", 1)[1]
    return name + suffix if len(name) + len(suffix) <= _MAX_CN else "Root CA"


def _check_ca_name(cn: str) -> str:
    if not isinstance(cn, str) or not cn.strip() or len(cn) > _MAX_CN or not cn.isprintable():
        raise PkiError(f"bad CA name {cn!r}: use 1-{_MAX_CN} printable characters")
    return cn


def make_ca(
    cn: str = "Root CA",
    *,
    not_before: _dt.datetime | None = None,
    not_after: _dt.datetime | None = None,
    days: int = CA_DAYS,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Make a self-signed CA certificate and its key.

    The CA may sign leaf certificates only (``path_length=0``).

    >>> ca_cert, ca_key = make_ca("home-lab CA")
    """
    key = _new_key()
    start, end = _validity(not_before, not_after, days)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def make_cert(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    cn: str,
    *,
    server: bool = False,
    dns: Iterable[str] = (),
    ips: Iterable[str | ipaddress.IPv4Address | ipaddress.IPv6Address] = (),
    not_before: _dt.datetime | None = None,
    not_after: _dt.datetime | None = None,
    days: int = LEAF_DAYS,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Make a leaf certificate signed by ``ca_cert``/``ca_key`` and its new key.

    ``server=False`` makes a client certificate (ExtendedKeyUsage clientAuth);
    ``server=True`` a server certificate (serverAuth) whose SubjectAlternativeName
    lists ``cn`` (as an IP address entry if it is one, else a DNS name), then
    ``dns`` and ``ips``. A client certificate gets a SAN only if ``dns``/``ips``
    are given.
    """
    key = _new_key()
    start, end = _validity(not_before, not_after, days)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
    )
    names: list[x509.GeneralName] = []
    seen: set[str] = set()

    def add_dns(name: str) -> None:
        if name.lower() not in seen:
            seen.add(name.lower())
            names.append(x509.DNSName(name))

    def add_ip(value: Any) -> None:
        ip = ipaddress.ip_address(value)
        if str(ip) not in seen:
            seen.add(str(ip))
            names.append(x509.IPAddress(ip))

    if server:
        if is_ip(cn):
            add_ip(cn)
        else:
            add_dns(cn)
    for name in dns:
        add_dns(name)
    for ip in ips:
        add_ip(ip)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


# -------------------------------------------------------------------- files


def _write_atomic(path: str | os.PathLike[str], data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` via a temporary file created with ``mode``.

    The temporary file is created by ``mkstemp`` (always 0600) and chmod-ed to
    ``mode`` before any data is written, so a key is never readable by others,
    even for an instant, and a reader never sees half a file.
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, mode)  # exact mode whatever the umask
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_cert(path: str | os.PathLike[str], cert: x509.Certificate) -> None:
    """Write ``cert`` as PEM to ``path``, mode 0644 (replacing any old file)."""
    _write_atomic(path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def write_key(path: str | os.PathLike[str], key: ec.EllipticCurvePrivateKey) -> None:
    """Write ``key`` as unencrypted PKCS#8 PEM to ``path``, mode 0600."""
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_atomic(path, data, 0o600)


def _read(path: str | os.PathLike[str]) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise PkiError(f"{os.fspath(path)}: file not found") from None
    except IsADirectoryError:
        raise PkiError(f"{os.fspath(path)}: is a directory, expected a PEM file") from None
    except OSError as exc:
        raise PkiError(f"{os.fspath(path)}: cannot read: {exc.strerror or exc}") from None


def load_cert(path: str | os.PathLike[str]) -> x509.Certificate:
    """Read one PEM certificate (the first one if the file holds a chain)."""
    data = _read(path)
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise PkiError(f"{os.fspath(path)}: not a PEM certificate ({exc})") from None


def load_key(path: str | os.PathLike[str]) -> ec.EllipticCurvePrivateKey:
    """Read an unencrypted PEM private key (PKCS#8 or traditional)."""
    data = _read(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise PkiError(f"{os.fspath(path)}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{os.fspath(path)}: expected an ECDSA key, got {type(key).__name__}")
    return key


# -------------------------------------------------------------- directories


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid client name, else raise PkiError.

    Valid: 1-64 characters from letters, digits, ``.``, ``_``, ``-``, starting
    with a letter or digit, and not ``ca`` or ``server`` (their files belong to
    the CA and the server).
    """
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise PkiError(
            f"bad client name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    if name.lower() in _RESERVED_NAMES:
        raise PkiError(f"bad client name {name!r}: {name}.pem is used by the PKI itself")
    return name


def _not_after(cert: x509.Certificate) -> _dt.datetime:
    value = getattr(cert, "not_valid_after_utc", None)  # cryptography >= 42
    if value is None:
        value = cert.not_valid_after.replace(tzinfo=_dt.timezone.utc)
    return value


def _not_before(cert: x509.Certificate) -> _dt.datetime:
    value = getattr(cert, "not_valid_before_utc", None)
    if value is None:
        value = cert.not_valid_before.replace(tzinfo=_dt.timezone.utc)
    return value


def _leaf_end(ca_cert: x509.Certificate, days: int) -> _dt.datetime:
    # A leaf that outlives its CA is useless; stop it with the CA.
    return min(_now() + _dt.timedelta(days=days), _not_after(ca_cert))


def _make_private_dir(root: Path) -> None:
    """Create ``root`` mode 0700 (exactly, whatever the umask) if it does not exist.

    The directory holds the CA key: nobody else needs to list it. An existing
    directory is left as it is (it may be shared on purpose); the keys in it are
    0600 either way. Missing parents are created with the usual mode.
    """
    if root.is_dir():
        return
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        root.mkdir(mode=0o700)
    except FileExistsError:
        if not root.is_dir():
            raise
        return
    os.chmod(root, 0o700)


def init_pki(
    directory: str | os.PathLike[str],
    server_name: str,
    ips: Sequence[str] = (),
    days: int = LEAF_DAYS,
    *,
    dns: Sequence[str] = (),
    ca_days: int = CA_DAYS,
    ca_cn: str | None = None,
    force: bool = False,
) -> dict[str, Path]:
    """Create a PKI in ``directory``: a CA and the server's certificate.

    Writes ``ca.pem``, ``ca.key``, ``server.pem``, ``server.key``. The server
    certificate's CN is ``server_name`` and its SAN holds ``server_name``,
    ``dns`` and ``ips``; it is valid ``days`` days, the CA ``ca_days``. The
    CA's CN is ``ca_cn``, by default ``default_ca_name(server_name)``. Refuses
    (PkiError) when ``ca.pem`` or ``ca.key`` already exists unless ``force``:
    a new CA invalidates every client certificate issued so far.

    Returns ``{"ca": ..., "ca_key": ..., "server_cert": ..., "server_key": ...}``.

    >>> paths = init_pki("/etc/ut/pki", "vpn.example.com", ips=["203.0.113.7"])
    """
    if not isinstance(server_name, str) or not server_name or len(server_name) > 253:
        raise PkiError(f"bad server name {server_name!r}")
    if not is_ip(server_name) and not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", server_name):
        raise PkiError(f"bad server name {server_name!r}: expected a DNS name or an IP address")
    for ip in ips:
        if not is_ip(str(ip)):
            raise PkiError(f"bad IP address {ip!r}")
    if days <= 0 or ca_days <= 0:
        raise PkiError("days must be a positive number")
    ca_cn = _check_ca_name(default_ca_name(server_name) if ca_cn is None else ca_cn)
    root = Path(directory)
    paths = {
        "ca": root / CA_CERT_FILE,
        "ca_key": root / CA_KEY_FILE,
        "server_cert": root / SERVER_CERT_FILE,
        "server_key": root / SERVER_KEY_FILE,
    }
    if not force:
        existing = [str(p) for p in (paths["ca"], paths["ca_key"]) if p.exists()]
        if existing:
            raise PkiError(
                f"{' and '.join(existing)} already exist(s); a new CA would invalidate every "
                "client certificate signed by the old one (use --force / force=True to replace it)"
            )
    _make_private_dir(root)
    ca_cert, ca_key = make_ca(ca_cn, days=ca_days)
    srv_cert, srv_key = make_cert(
        ca_cert, ca_key, server_name, server=True, dns=dns, ips=ips,
        not_after=_leaf_end(ca_cert, days),
    )
    # Keys first: a crash part-way never leaves a certificate without its key.
    write_key(paths["ca_key"], ca_key)
    write_cert(paths["ca"], ca_cert)
    write_key(paths["server_key"], srv_key)
    write_cert(paths["server_cert"], srv_cert)
    return paths


def issue_client(
    directory: str | os.PathLike[str],
    name: str,
    days: int = LEAF_DAYS,
    *,
    force: bool = False,
) -> tuple[Path, Path]:
    """Sign a client certificate with the CA in ``directory``.

    ``name`` becomes the certificate's CN (the client's identity on the server)
    and the file names ``<name>.pem`` and ``<name>.key``; see ``validate_name``.
    Refuses to replace an existing ``<name>.pem`` unless ``force``. Validity is
    ``days`` days, never past the CA's own expiry.

    >>> cert_path, key_path = issue_client("/etc/ut/pki", "home")
    """
    validate_name(name)
    if days <= 0:
        raise PkiError("days must be a positive number")
    root = Path(directory)
    ca_path, ca_key_path = root / CA_CERT_FILE, root / CA_KEY_FILE
    if not ca_path.exists() or not ca_key_path.exists():
        raise PkiError(f"{root}: no CA here ({CA_CERT_FILE}/{CA_KEY_FILE}); run `ut-tunnel pki init` first")
    ca_cert, ca_key = load_cert(ca_path), load_key(ca_key_path)
    if _not_after(ca_cert) <= _now():
        raise PkiError(f"{ca_path}: the CA expired on {_not_after(ca_cert):%Y-%m-%d}; make a new PKI")
    cert_path, key_path = root / f"{name}.pem", root / f"{name}.key"
    if not force and (cert_path.exists() or key_path.exists()):
        raise PkiError(f"{cert_path} already exists (use --force / force=True to re-issue it)")
    cert, key = make_cert(ca_cert, ca_key, name, not_after=_leaf_end(ca_cert, days))
    write_key(key_path, key)
    write_cert(cert_path, cert)
    return cert_path, key_path


# ------------------------------------------------------------------ reading


def cert_cn(cert: x509.Certificate) -> str:
    """The certificate's subject CN, or ``""`` if it has none."""
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not attrs:
        return ""
    value = attrs[0].value
    return value.decode() if isinstance(value, bytes) else str(value)


def cert_summary(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A human summary of the certificate at ``path``.

    Keys: ``path``, ``cn``, ``issuer`` (the issuer's CN, or its full DN if it has
    no CN), ``not_before`` and ``not_after`` (ISO 8601, UTC), ``san`` (list of
    strings), ``serial`` (hex), ``is_ca``, ``expired``.
    """
    cert = load_cert(path)
    issuer_cn = cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    try:
        san_ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        san = [str(v) for v in san_ext.get_values_for_type(x509.DNSName)]
        san += [str(v) for v in san_ext.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        san = []
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    return {
        "path": os.fspath(path),
        "cn": cert_cn(cert),
        "issuer": str(issuer_cn[0].value) if issuer_cn else cert.issuer.rfc4514_string(),
        "not_before": _not_before(cert).isoformat(),
        "not_after": _not_after(cert).isoformat(),
        "san": san,
        "serial": format(cert.serial_number, "x"),
        "is_ca": is_ca,
        "expired": _not_after(cert) <= _now(),
    }


# ---------------------------------------------------------------------- CLI


def add_pki_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``pki init`` and ``pki client`` to an argparse ``subparsers`` object.

    Returns the ``pki`` parser; ``args.pki_command`` is ``"init"`` or
    ``"client"`` after parsing. Run the parsed arguments with ``run_pki(args)``.
    """
    pki = subparsers.add_parser(
        "pki",
        help="make the private CA and certificates for mutual TLS",
        description="Make a private CA and the server's and clients' certificates.",
    )
    sub = pki.add_subparsers(dest="pki_command", metavar="{init,client}")
    sub.required = True

    init = sub.add_parser(
        "init",
        help="create a CA and the server certificate in DIR",
        description=(
            "Create ca.pem, ca.key, server.pem and server.key in DIR. Copy ca.pem and "
            "server.* to the server; keep ca.key private (it signs client certificates). "
            "No certificate names this software."
        ),
    )
    init.add_argument("dir", metavar="DIR", help="directory for the PKI (created mode 0700 if missing)")
    init.add_argument(
        "--server-name", required=True, metavar="NAME",
        help="DNS name (or IP) clients use to reach the server; goes into CN and SAN",
    )
    init.add_argument(
        "--ip", action="append", default=[], metavar="IP",
        help="an extra IP address for the server certificate's SAN (repeatable)",
    )
    init.add_argument(
        "--ca-name", metavar="NAME", default=None,
        help="the CA's name (its CN, which peers see as the issuer); default '<server-name> Root CA'",
    )
    init.add_argument(
        "--days", type=_positive_int, default=LEAF_DAYS,
        help=f"server certificate lifetime in days (default {LEAF_DAYS}; the CA gets {CA_DAYS})",
    )
    init.add_argument("--force", action="store_true", help="replace an existing CA in DIR")

    client = sub.add_parser(
        "client",
        help="sign a client certificate NAME with the CA in DIR",
        description=(
            "Write NAME.pem and NAME.key in DIR, signed by DIR's CA. NAME is the client's "
            "identity (certificate CN) on the server."
        ),
    )
    client.add_argument("dir", metavar="DIR", help="directory made by `pki init`")
    client.add_argument("name", metavar="NAME", help="client name: letters, digits, '.', '_', '-'")
    client.add_argument(
        "--days", type=_positive_int, default=LEAF_DAYS,
        help=f"lifetime in days (default {LEAF_DAYS})",
    )
    client.add_argument("--force", action="store_true", help="replace an existing NAME.pem")
    return pki


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {value}")
    return value


def _describe(path: Path, out: Any) -> None:
    s = cert_summary(path)
    extra = f", SAN {', '.join(s['san'])}" if s["san"] else ""
    print(f"  {path}  CN={s['cn']}  expires {s['not_after'][:10]}{extra}", file=out)


def run_pki(args: argparse.Namespace, *, out: Any = None, err: Any = None) -> int:
    """Run a parsed ``pki`` command; print what was written. Returns an exit code."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    try:
        if args.pki_command == "init":
            paths = init_pki(
                args.dir, args.server_name, ips=args.ip, days=args.days,
                ca_cn=args.ca_name, force=args.force,
            )
            print(f"wrote a new PKI in {args.dir}:", file=out)
            _describe(paths["ca"], out)
            print(f"  {paths['ca_key']}  (CA private key, mode 0600: keep it off the servers)", file=out)
            _describe(paths["server_cert"], out)
            print(f"  {paths['server_key']}  (server private key, mode 0600)", file=out)
            print(f"next: ut-tunnel pki client {args.dir} NAME", file=out)
        elif args.pki_command == "client":
            cert_path, key_path = issue_client(args.dir, args.name, days=args.days, force=args.force)
            print(f"wrote client certificate {args.name}:", file=out)
            _describe(cert_path, out)
            print(f"  {key_path}  (client private key, mode 0600)", file=out)
            print(f"the client also needs {Path(args.dir) / CA_CERT_FILE} (tls.ca_cert)", file=out)
        else:  # pragma: no cover - argparse enforces the choice
            print(f"unknown pki command {args.pki_command!r}", file=err)
            return 2
    except PkiError as exc:
        print(f"ut-tunnel pki: error: {exc}", file=err)
        return 1
    except OSError as exc:
        print(f"ut-tunnel pki: error: {exc}", file=err)
        return 1
    return 0
