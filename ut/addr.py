"""Addresses as users write them (``"host:port"``, ``"[::1]:5443"``) and as logs show them."""

from __future__ import annotations

import ipaddress
import re
from typing import Any

HOSTNAME_RE = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
    r"(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?"
)


def parse_addr(
    text: str,
    *,
    allow_port_zero: bool = True,
    default_host: str | None = None,
    default_port: int | None = None,
) -> tuple[str, int]:
    """Split ``"host:port"`` into ``(host, port)``.

    Accepts ``"example.com:5443"``, ``"1.2.3.4:5"`` and ``"[::1]:5443"``
    (IPv6 in brackets; the returned host has no brackets). The port must be
    0..65535 (0 asks the kernel for a free port when listening, useful in
    tests), or 1..65535 with ``allow_port_zero=False`` (addresses to send or
    dial to; ``load_config`` checks ``tcp.server_addr`` and ``udp.wg_udp_addr``
    that way). Raises ``ValueError`` with a short explanation.

    A command line may leave a part out (``ut-tunnel udpmon`` does). With
    ``default_host``, a port alone (``"5443"``, ``":5443"``) means that host;
    with ``default_port``, a host alone (``"example.com"``, ``"[::1]"``, an IPv6
    address without brackets, ``"::1"``) or with an empty port (``"example.com:"``)
    means that port. Without them, as in a config file, both parts are required.

    >>> parse_addr("[::1]:5443")
    ('::1', 5443)
    >>> parse_addr("5443", default_host="0.0.0.0")
    ('0.0.0.0', 5443)
    >>> parse_addr("::1", default_port=0)
    ('::1', 0)
    """
    if not isinstance(text, str):
        raise ValueError(f'expected a "host:port" string, got {type(text).__name__}')
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        host_only = default_port is not None and end == len(text) - 1  # "[::1]"
        if end < 0 or not (text[end + 1 :].startswith(":") or host_only):
            raise ValueError(f'bad address {text!r}: expected "[IPv6]:port", e.g. "[::1]:5443"')
        host, port_text = text[1:end], text[end + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"bad address {text!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            if text.isdigit() and (default_host is not None or default_port is not None):
                # "5443": a port alone, never a host name (the host is then default_host)
                host, port_text = "", text
            elif default_port is not None:  # "example.com": a host alone
                host, port_text = text, ""
            else:
                raise ValueError(f'bad address {text!r}: expected "host:port", e.g. "127.0.0.1:5443"')
        elif ":" in host:
            if default_port is None or not is_ip(text):
                raise ValueError(f'bad address {text!r}: write IPv6 addresses in brackets, e.g. "[::1]:5443"')
            host, port_text = text, ""  # "::1": a host alone
        if not host:
            if default_host is None:
                raise ValueError(f'bad address {text!r}: the host is missing (use "0.0.0.0:{port_text}" for all interfaces)')
            host = default_host
        if not is_ip(host) and not HOSTNAME_RE.fullmatch(host):
            raise ValueError(f"bad address {text!r}: {host!r} is not a host name or IP address")
    if not port_text and default_port is not None:  # no port, or "example.com:"
        port_text = str(default_port)
    if not port_text.isdigit() or not port_text.isascii():
        raise ValueError(f"bad address {text!r}: port {port_text!r} is not a number")
    port = int(port_text)
    low = 0 if allow_port_zero else 1
    if not low <= port <= 65535:
        raise ValueError(f"bad address {text!r}: port must be between {low} and 65535, got {port}")
    return host, port


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def format_addr(addr: Any) -> str | None:
    """``("::1", 5443)`` -> ``"[::1]:5443"``; None for no address."""
    if not addr:
        return None
    try:
        host, port = addr[0], addr[1]
    except (TypeError, IndexError):
        return str(addr)
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
