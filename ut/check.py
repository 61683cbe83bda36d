"""``ut-tunnel check -config FILE``: validate a configuration without running it.

It does what start-up does before it opens a socket: load and validate the YAML
(every key, type, range and conflict, ``ut.config``), read the three TLS files and
build the TLS context the role would use (PEM parsing, the key belongs to the
certificate, ``ut.tls``). Then it prints the effective configuration (the file
with every default filled in, only the keys the role uses) as YAML on stdout, and
a few facts about the certificates as YAML comments, so the output is still YAML.

Exit status: 0 valid, 2 invalid (the same status, and the same message naming the
file and the key, as ``ut-tunnel -config FILE`` gives at start-up).
"""

from __future__ import annotations

import sys
from typing import IO, Any

import yaml

from .config import Config, load_config
from .errors import ConfigError

EXIT_OK, EXIT_INVALID = 0, 2


def effective_config(cfg: Config) -> dict[str, Any]:
    """The configuration as it will run: every key the role uses, defaults filled in.

    Built from the dataclasses (``Config.summary``), so keys added to the schema
    show up without a change here.
    """
    out = cfg.summary()
    out.pop("source", None)
    return out


def render_effective(cfg: Config) -> str:
    """``effective_config`` as YAML text, keys in schema order."""
    return yaml.safe_dump(effective_config(cfg), sort_keys=False, default_flow_style=False)


def _tls_facts(cfg: Config) -> list[str]:
    """One line per certificate: its CN, expiry and whether ``tls.ca_cert`` signed it."""
    from .pki import cert_summary, load_cert

    lines = []
    ca = load_cert(cfg.tls.ca_cert)
    for key, path in (("tls.ca_cert", cfg.tls.ca_cert), ("tls.cert", cfg.tls.cert)):
        s = cert_summary(path)
        line = f"{key}: {path}: CN={s['cn']}, expires {s['not_after'][:10]}"
        if s["san"]:
            line += f", SAN {', '.join(s['san'])}"
        if s["expired"]:
            line += " (EXPIRED)"
        if key == "tls.cert":
            try:
                load_cert(path).verify_directly_issued_by(ca)
                line += ", signed by tls.ca_cert"
            except Exception:  # noqa: BLE001 - any failure means "not by this CA"
                line += (", WARNING: not signed directly by tls.ca_cert: the peer refuses it "
                         "unless it trusts another CA, or an intermediate is involved")
        lines.append(line)
    return lines


def check_config(path: str, *, out: IO[str] | None = None, err: IO[str] | None = None) -> int:
    """Validate ``path`` as start-up would, print the effective config; return the exit status."""
    from . import tls

    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    try:
        cfg = load_config(path)
        make = tls.client_context if cfg.is_client else tls.server_context
        make(cfg.tls.ca_cert, cfg.tls.cert, cfg.tls.key, alpn=cfg.tls.alpn)
    except ConfigError as exc:
        print(f"ut-tunnel check: configuration error: {exc}", file=err)
        return EXIT_INVALID
    print(f"# effective configuration of {path} (role {cfg.role}, defaults filled in)", file=out)
    print(render_effective(cfg), end="", file=out)
    try:
        facts = _tls_facts(cfg)
    except Exception as exc:  # noqa: BLE001 - informative only; the context loaded above
        facts = [f"(could not describe the certificates: {exc})"]
    if cfg.is_client and not tls.sends_sni(cfg.tls_server_name):
        facts.append(f"WARNING: tls.server_name {cfg.tls_server_name} is an IP address, so the "
                     "ClientHello carries no SNI (an observer flags that): set tls.server_name "
                     "to the DNS name in the server certificate")
    for line in facts:
        print(f"# {line}", file=out)
    print(f"# OK: {path} is a valid {cfg.role} configuration", file=out)
    return EXIT_OK
