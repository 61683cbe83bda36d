"""What a ut-tunnel configuration may say: every key, its default and its rules.

Theory of operation: each section of the YAML file (``tcp:``, ``udp:``, ...) is a
frozen dataclass, and each key of it is one field declared with ``setting()``. That
one declaration is the only place a key's default and rules are written: the
dataclass uses the default when the key is left out, and ``SCHEMA`` (what the
loader ``ut.config`` checks a file against, what ``Config.summary`` and so
``ut-tunnel check`` show per role, what the tests compare docs/config.md with)
is derived from the fields' metadata. Reading YAML, type conversion, conflicts
between keys and naming the file and key in an error are the loader's job.

Example (a key of ``tcp:``, used by both roles, 1 to 64)::

    lanes: int = setting(5, check=_range(1, MAX_LANES))

    SCHEMA["tcp"]["lanes"]  # KeySpec(kind='int', default=5, roles=('client', 'server'), ...)
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any, TypeVar, overload

from ut.addr import HOSTNAME_RE, is_ip, parse_addr

__all__ = [
    "ALPN_MAX",
    "COALESCE_MS_MAX",
    "DROP_POLICIES",
    "LANE_PICKS",
    "LOG_LEVELS",
    "MAX_LANES",
    "QUEUE_MAX_AGE_SECONDS",
    "QUEUE_MAX_BYTES",
    "QUEUE_MAX_PACKETS",
    "QUEUE_MIN_BYTES",
    "RESEQUENCE_MAX_WAIT_MS_MAX",
    "ROLES",
    "SCHEMA",
    "SECTIONS",
    "SECTION_CLASSES",
    "SOCK_BUF_MAX",
    "SOCK_BUF_MIN",
    "TCP_BUF_MAX",
    "TCP_BUF_MIN",
    "KeySpec",
    "LimitsConfig",
    "LogConfig",
    "MetricsConfig",
    "QueueConfig",
    "ShapingConfig",
    "TcpConfig",
    "TlsConfig",
    "UdpConfig",
    "DURATION_MAX",
    "SHOW_MAX",
    "clip_text",
    "setting",
    "show_value",
]

ROLES = ("client", "server")
LOG_LEVELS = ("debug", "info", "warning", "error")
LANE_PICKS = ("rr", "hash")
DROP_POLICIES = ("oldest",)
AQMS = ("codel", "off")

MAX_LANES = 64
TCP_BUF_MIN = 4096  # lane I/O chunk: one TLS record is at most 16 KiB, a burst more
TCP_BUF_MAX = 1024 * 1024
SOCK_BUF_MIN = 4096
SOCK_BUF_MAX = 64 * 1024 * 1024
RESEQUENCE_MAX_WAIT_MS_MAX = 5000.0
COALESCE_MS_MAX = 20.0  # longer holds would show in every interactive round trip
ALPN_MAX = 8
QUEUE_MAX_PACKETS = 1 << 20  # a ring this long already holds far more than any link buffers
QUEUE_MIN_BYTES = 65535  # one maximal datagram must always fit
QUEUE_MAX_BYTES = 1 << 30
DURATION_MAX = 86400.0  # one day: a longer timer is a typo, not a setting
# queue.max_age_seconds: WireGuard resends a handshake after 5 s and the inner TCP
# retransmits within seconds, so a datagram older than this is only a late duplicate;
# yet a slow first dial (connect + TLS + HELLO over a long path) stays well inside it.
QUEUE_MAX_AGE_SECONDS = 3.0
QUEUE_MAX_AGE_MIN = 0.1
QUEUE_MAX_AGE_MAX = 3600.0
SHOW_MAX = 60  # error messages quote at most this many characters of a value
# limits: (issue 19): counts of sessions, lanes and pending connections.
LIMIT_COUNT_MAX = 1_000_000
# limits.queue_budget_bytes: 128 MiB of queued payload keeps a server with every
# queue full well inside the design's 512 MiB (a bytes object costs ~33 bytes more
# than its payload), yet is 16 sessions' worth of full 8 MiB queues at once.
QUEUE_BUDGET_BYTES = 128 * 1024 * 1024

_C, _S = ("client",), ("server",)
CLIENT_AUTHS = ("handshake", "proof")
TRANSPORTS = ("tls", "wss", "ws")
SERVER_TRUSTS = ("private", "system")


# -------------------------------------------------------------------- keys


@dataclass(frozen=True)
class KeySpec:
    """One configuration key: its type, default, checks, and which roles use it.

    ``kind`` is ``int``, ``float``, ``bool``, ``str``, ``enum``, ``addr``,
    ``path``, ``name`` or ``strlist`` (a list of strings, kept as a tuple).
    ``roles`` lists the roles that use the key (the other role ignores it).
    ``required`` lists the roles for which the key must be present. ``check``
    returns a problem text or ``None``. ``port_zero`` lets an ``addr`` say port 0
    (a listener on any free port). Declared with ``setting()``; read from ``SCHEMA``.
    """

    kind: str
    default: Any
    roles: tuple[str, ...] = ROLES
    required: tuple[str, ...] = ()
    choices: tuple[str, ...] = ()
    check: Callable[[Any], str | None] | None = None
    port_zero: bool = False


_T = TypeVar("_T")

# The kinds a default's own type says; the others (enum aside) must be named.
_KIND_OF_TYPE: dict[type, str] = {bool: "bool", int: "int", float: "float", str: "str"}
# What a field of each kind must be annotated as: the loader hands the dataclass
# values of this type, so the two must agree.
_ANNOTATION_OF_KIND = {
    "int": "int", "float": "float", "bool": "bool", "str": "str", "enum": "str",
    "addr": "str", "path": "str", "name": "str", "strlist": "tuple[str, ...]",
}


@overload
def setting(
    default: _T,
    *,
    kind: str | None = None,
    roles: tuple[str, ...] = ROLES,
    required: tuple[str, ...] = (),
    choices: tuple[str, ...] = (),
    check: Callable[[Any], str | None] | None = None,
    port_zero: bool = False,
) -> _T: ...


@overload
def setting(
    *,
    kind: str,
    roles: tuple[str, ...] = ROLES,
    required: tuple[str, ...] = (),
    choices: tuple[str, ...] = (),
    check: Callable[[Any], str | None] | None = None,
    port_zero: bool = False,
) -> Any: ...


def setting(
    default: Any = MISSING,
    *,
    kind: str | None = None,
    roles: tuple[str, ...] = ROLES,
    required: tuple[str, ...] = (),
    choices: tuple[str, ...] = (),
    check: Callable[[Any], str | None] | None = None,
    port_zero: bool = False,
) -> Any:
    """A configuration key as a dataclass field: its default and its rules, once.

    (Not called ``key``: ``tls.key`` is a field, and a class body would find it first.)

    Returns ``dataclasses.field(default=default, metadata={"spec": KeySpec(...)})``.
    ``kind`` may be left out when the default says it (``bool``, ``int``,
    ``float``, ``str``) or ``choices`` are given (``enum``). A key without a
    default must be required for every role (the dataclass cannot be built
    without it); its ``KeySpec.default`` is ``None``.

    >>> @dataclass(frozen=True)
    ... class Example:
    ...     lanes: int = setting(5, check=_range(1, MAX_LANES))
    ...     server_addr: str | None = setting(None, kind="addr", roles=("client",))
    """
    if default is MISSING and set(required) != set(ROLES):
        raise TypeError("setting(): a key without a default must be required for every role")
    if kind is None:
        kind = "enum" if choices else _KIND_OF_TYPE.get(type(default))
        if kind is None:
            raise TypeError(f"setting({'' if default is MISSING else repr(default)}): "
                            "the default does not tell the kind; name it (kind=...)")
    if kind not in _ANNOTATION_OF_KIND:
        raise TypeError(f"setting(): unknown kind {kind!r}")
    spec = KeySpec(
        kind, None if default is MISSING else default, roles, required, choices, check, port_zero
    )
    if default is MISSING:
        return field(metadata={"spec": spec})
    return field(default=default, metadata={"spec": spec})


def _keys_of(section: type[Any]) -> dict[str, KeySpec]:
    """``{name: KeySpec}`` of a section's fields, in declaration order."""
    specs: dict[str, KeySpec] = {}
    for f in fields(section):
        spec = _spec_of(f)
        want = _ANNOTATION_OF_KIND[spec.kind]
        # Annotations are strings here (``from __future__ import annotations``).
        if f.type not in (want, f"{want} | None"):
            raise TypeError(f"{section.__name__}.{f.name}: annotated {f.type}, but kind {spec.kind!r} "
                            f"holds {want} (unless named, the kind is the default's type: 120 is int)")
        specs[f.name] = spec
    return specs


def _spec_of(f: Field[Any]) -> KeySpec:
    spec = f.metadata.get("spec")
    if not isinstance(spec, KeySpec):
        raise TypeError(f"field {f.name} is not declared with setting()")
    return spec


# ------------------------------------------------------------------ checks


def clip_text(text: str, limit: int = SHOW_MAX) -> str:
    """``text``, or for a long one its first ``limit`` characters, "…" and its length."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text)} characters)"


def show_value(value: str) -> str:
    """``repr(value)`` for an error message; a long string is cut (``clip_text``)."""
    if len(value) <= SHOW_MAX:
        return repr(value)
    return f"{value[:SHOW_MAX]!r}… ({len(value)} characters)"


def _num(value: float) -> str:
    if isinstance(value, int):
        try:
            return clip_text(str(value))
        except ValueError:  # more digits than Python will convert
            return f"a whole number of {value.bit_length()} bits"
    return clip_text(str(int(value)) if float(value).is_integer() else f"{value:g}")


def _range(
    low: float | None = None, high: float | None = None, *, above: float | None = None
) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if above is not None and not value > above:
            return f"must be greater than {_num(above)}, got {_num(value)}"
        if low is not None and high is not None and not low <= value <= high:
            return f"must be between {_num(low)} and {_num(high)}, got {_num(value)}"
        if low is not None and high is None and value < low:
            return f"must be at least {_num(low)}, got {_num(value)}"
        return None

    return check


def _tcp_buf(value: int) -> str | None:
    if TCP_BUF_MIN <= value <= TCP_BUF_MAX:
        return None
    hint = (
        "; it is no longer the socket buffer size: for kernel autotuning leave tcp.sock_buf "
        "at 0" if value == 0 else ""
    )
    return (f"must be between {TCP_BUF_MIN} and {TCP_BUF_MAX} (the lane's I/O chunk in "
            f"bytes), got {_num(value)}{hint}")


def _congestion(value: str) -> str | None:
    if value in ("auto", "system") or re.fullmatch(r"[a-z][a-z0-9_]{0,14}", value):
        return None
    return (f"must be auto, system or a congestion control's name (e.g. cubic, bbr, reno), "
            f"got {show_value(value)}")


def _sock_buf(value: int) -> str | None:
    if value == 0 or SOCK_BUF_MIN <= value <= SOCK_BUF_MAX:
        return None
    return (f"must be 0 (kernel autotuning) or between {SOCK_BUF_MIN} and {SOCK_BUF_MAX}, "
            f"got {_num(value)}")


def _max_age(value: float) -> str | None:
    if value == 0 or QUEUE_MAX_AGE_MIN <= value <= QUEUE_MAX_AGE_MAX:
        return None
    return (f"must be 0 (off) or between {_num(QUEUE_MAX_AGE_MIN)} and "
            f"{_num(QUEUE_MAX_AGE_MAX)} seconds, got {_num(value)}")


def _metrics_path(value: str) -> str | None:
    if not value.startswith("/"):
        return f'must start with "/", got {show_value(value)}'
    if any(ch.isspace() for ch in value) or "?" in value or "#" in value:
        return f"must be a plain URL path (no spaces, '?' or '#'), got {show_value(value)}"
    return None


def _ws_path(value: str) -> str | None:
    if not value.startswith("/") or value.endswith("/") or len(value) > 200:
        return f'must start with "/" and not end with one (e.g. /ws), got {show_value(value)}'
    if any(not (ch.isascii() and ch.isprintable()) or ch.isspace() or ch in "?#%" for ch in value):
        return f"must be a plain URL path (ASCII, no spaces, '?', '#' or '%'), got {show_value(value)}"
    return None


def _proxy(value: str) -> str | None:
    from .httpproxy import parse_proxy

    try:
        parse_proxy(value, environ={})
    except ValueError:
        return f'must be "env" or http://[user:password@]host:port, got {show_value(value)}'
    return None


def _alpn(value: tuple[str, ...]) -> str | None:
    if not 1 <= len(value) <= ALPN_MAX:
        return f"must list 1 to {ALPN_MAX} protocol names (e.g. [h2, http/1.1]), got {len(value)}"
    for name in value:
        if not 1 <= len(name.encode()) <= 255 or not name.isprintable() or not name.isascii():
            return f"protocol names must be 1 to 255 printable ASCII characters, got {show_value(name)}"
    if len(set(value)) != len(value):
        return f"lists a protocol twice: {clip_text(str(list(value)))}"
    return None


def _server_name(value: str) -> str | None:
    if is_ip(value) or HOSTNAME_RE.fullmatch(value):
        return None
    return f"must be a DNS name or an IP address, got {show_value(value)}"


# ---------------------------------------------------------------- sections


@dataclass(frozen=True)
class TcpConfig:
    """``tcp:`` — lanes, their sockets and their timers."""

    server_addr: str | None = setting(None, kind="addr", roles=_C, required=_C)
    listen_addr: str = setting("0.0.0.0:5443", kind="addr", roles=_S, port_zero=True)
    lanes: int = setting(5, check=_range(1, MAX_LANES))
    tcp_nodelay: bool = setting(True)
    tcp_buf: int = setting(16384, check=_tcp_buf)
    sock_buf: int = setting(0, check=_sock_buf)
    # Issue 14: the lanes' congestion control; auto = the host's, loss-based while the
    # path shows a standing queue (ut/lanecc.py).
    congestion: str = setting("auto", check=_congestion)
    # Timers have a floor (a tiny one only makes the process spin or flood the log)
    # and a ceiling of one day.
    idle_seconds: float = setting(120.0, check=_range(1, DURATION_MAX))
    lane_pick: str = setting("rr", choices=LANE_PICKS)
    skip_slow_lanes: bool = setting(True)
    resequence: bool = setting(True)
    resequence_max_wait_ms: float = setting(500.0, check=_range(1, RESEQUENCE_MAX_WAIT_MS_MAX))
    dial_backoff_min_seconds: float = setting(5.0, roles=_C, check=_range(0.01, DURATION_MAX))
    dial_backoff_max_seconds: float = setting(60.0, roles=_C, check=_range(0.01, DURATION_MAX))
    connect_timeout_seconds: float = setting(10.0, check=_range(0.1, DURATION_MAX))
    hello_timeout_seconds: float = setting(5.0, check=_range(0.1, DURATION_MAX))
    session_linger_seconds: float = setting(180.0, roles=_S, check=_range(0, DURATION_MAX))
    # What carries a lane (docs/config.md): TLS, WebSocket over TLS, or (server behind a
    # TLS-terminating reverse proxy) WebSocket over plain HTTP on loopback.
    transport: str = setting("tls", choices=TRANSPORTS)
    ws_path: str = setting("/ws", check=_ws_path)
    proxy: str | None = setting(None, kind="str", roles=_C, check=_proxy)

    @property
    def server_host_port(self) -> tuple[str, int]:
        """``server_addr`` as ``(host, port)``; ``ValueError`` if it is not set."""
        if self.server_addr is None:
            raise ValueError("tcp.server_addr is not set")
        return parse_addr(self.server_addr, allow_port_zero=False)

    @property
    def listen_host_port(self) -> tuple[str, int]:
        """``listen_addr`` as ``(host, port)``."""
        return parse_addr(self.listen_addr)


@dataclass(frozen=True)
class UdpConfig:
    """``udp:`` — the WireGuard side."""

    listen_addr: str = setting("127.0.0.1:15000", kind="addr", roles=_C, port_zero=True)
    wg_udp_addr: str = setting("127.0.0.1:51820", kind="addr", roles=_S)

    @property
    def listen_host_port(self) -> tuple[str, int]:
        """``listen_addr`` as ``(host, port)`` (client)."""
        return parse_addr(self.listen_addr)

    @property
    def wg_host_port(self) -> tuple[str, int]:
        """``wg_udp_addr`` as ``(host, port)`` (server)."""
        return parse_addr(self.wg_udp_addr, allow_port_zero=False)


@dataclass(frozen=True)
class QueueConfig:
    """``queue:`` — the per-session drop-oldest ring; either limit triggers a drop."""

    max_packets: int = setting(4096, check=_range(1, QUEUE_MAX_PACKETS))
    max_bytes: int = setting(8388608, check=_range(QUEUE_MIN_BYTES, QUEUE_MAX_BYTES))
    drop_policy: str = setting("oldest", choices=DROP_POLICIES)
    max_delay_ms: float = setting(0.0, check=_range(0, 10000))
    # Issue 14: queue management of the session queue (ut/aqm.py); with it, a lane takes
    # no more while a few KiB wait in it, so a backlog waits where its delay is known.
    aqm: str = setting("codel", choices=AQMS)
    aqm_target_ms: float = setting(5.0, check=_range(1, 1000))
    aqm_interval_ms: float = setting(100.0, check=_range(10, 10000))
    # Issue 19: drop, as ``stale``, what waited this long (an outage's backlog); 0 = off.
    # Below 0.1 s it would be the AQM's job (max_delay_ms), which also caps the lanes.
    max_age_seconds: float = setting(QUEUE_MAX_AGE_SECONDS, check=_max_age)


@dataclass(frozen=True)
class MetricsConfig:
    """``metrics:`` — the Prometheus endpoint."""

    enabled: bool = setting(True)
    listen_addr: str = setting("127.0.0.1:5080", kind="addr", port_zero=True)
    path: str = setting("/metrics", check=_metrics_path)
    per_client_cn: bool = setting(True)
    per_lane_id: bool = setting(False)

    @property
    def listen_host_port(self) -> tuple[str, int]:
        """``listen_addr`` as ``(host, port)``."""
        return parse_addr(self.listen_addr)


@dataclass(frozen=True)
class TlsConfig:
    """``tls:`` — absolute paths to PEM files, and the name to verify (client)."""

    ca_cert: str = setting(kind="path", required=ROLES)
    cert: str = setting(kind="path", required=ROLES)
    key: str = setting(kind="path", required=ROLES)
    server_name: str | None = setting(None, kind="name", roles=_C, check=_server_name)
    alpn: tuple[str, ...] = setting(("h2", "http/1.1"), kind="strlist", check=_alpn)
    # How the client shows its certificate: in the TLS handshake (the spec's mTLS), or in
    # a proof after it (ut.proof), so that a prober sees an ordinary HTTPS server.
    client_auth: str = setting("proof", choices=CLIENT_AUTHS)
    # Which CAs vouch for the server: only ca_cert, or also the system's (a CDN in front).
    server_trust: str = setting("private", choices=SERVER_TRUSTS, roles=_C)


@dataclass(frozen=True)
class FallbackConfig:
    """``fallback:`` — where connections that are not clients go (``tls.client_auth: proof``):
    a plain-HTTP web server for HTTP/1.1, and one for HTTP/2 with prior knowledge; neither
    set: a built-in static site (``ut.webface``)."""

    addr: str | None = setting(None, kind="addr", roles=_S)
    h2_addr: str | None = setting(None, kind="addr", roles=_S)


@dataclass(frozen=True)
class ShapingConfig:
    """``shaping:`` — what a passive observer sees of each lane write (docs/protocol.md, "Padding")."""

    padding: bool = setting(True)
    coalesce_ms: float = setting(0.0, check=_range(0, COALESCE_MS_MAX))


@dataclass(frozen=True)
class LimitsConfig:
    """``limits:`` — the server's robustness bounds (issue 19), far above what a normal
    site meets: at one, a new session or lane is refused (ERR ``limit``), counted in
    ``ut_limit_refusals_total`` and logged (debounced); what is established goes on."""

    max_sessions: int = setting(10000, roles=_S, check=_range(1, LIMIT_COUNT_MAX))
    # A client runs one session at a time; a restarted one leaves its old session
    # lingering (tcp.session_linger_seconds). Lingering sessions give way first.
    max_sessions_per_cn: int = setting(64, roles=_S, check=_range(1, LIMIT_COUNT_MAX))
    max_lanes: int = setting(20000, roles=_S, check=_range(1, LIMIT_COUNT_MAX))
    # Connections not yet through TLS + HELLO; at the cap the oldest is dropped.
    max_pending: int = setting(512, roles=_S, check=_range(1, LIMIT_COUNT_MAX))
    # New connections accepted per second (a token bucket of accept_burst): the rest wait
    # in the listen backlog, so a flood of handshakes takes a bounded share of the loop.
    accept_rate: int = setting(500, roles=_S, check=_range(1, LIMIT_COUNT_MAX))
    accept_burst: int = setting(64, roles=_S, check=_range(1, LIMIT_COUNT_MAX))
    queue_budget_bytes: int = setting(QUEUE_BUDGET_BYTES, roles=_S,
                                      check=_range(QUEUE_MIN_BYTES, QUEUE_MAX_BYTES))


def _tun_name(value: str) -> str | None:
    if not 1 <= len(value) <= 15 or not all(ch.isalnum() or ch in "-_." for ch in value):
        return f"must be an interface name of 1 to 15 letters, digits, '-', '_' or '.', got {show_value(value)}"
    return None


def _networks(value: tuple[str, ...]) -> str | None:
    import ipaddress

    for item in value:
        try:
            ipaddress.ip_interface(item)
        except ValueError:
            return f"must list addresses with a prefix (10.77.0.2/24, fd77::2/64), got {show_value(item)}"
    return None


def _tun_clients(value: tuple[str, ...]) -> str | None:
    from .tunroute import AddressBook

    try:
        AddressBook.from_entries(value)
    except ValueError as exc:
        return f'must list "CN=address/prefix,...": {clip_text(str(exc))}'
    return None


@dataclass(frozen=True)
class TunConfig:
    """``tun:`` — TUN mode (ut.tun, ut.tunroute): lanes carry IP packets between TUN
    devices instead of WireGuard's datagrams."""

    enabled: bool = setting(False)
    name: str = setting("ut0", check=_tun_name)
    address: tuple[str, ...] = setting((), kind="strlist", check=_networks)
    # A packet is one DATA frame: 65535 bytes of payload less the 4-byte sequence number.
    mtu: int = setting(1500, check=_range(576, 65000))
    routes: tuple[str, ...] = setting((), kind="strlist", roles=_C, check=_networks)
    clients: tuple[str, ...] = setting((), kind="strlist", roles=_S, check=_tun_clients)
    # Linux: super-packets of up to 64 KiB between two ends that both have it (ut.tun).
    offload: bool = setting(True)


@dataclass(frozen=True)
class LogConfig:
    """``log:``."""

    level: str = setting("info", choices=LOG_LEVELS)


# ------------------------------------------------------------------ schema

#: The sections in the order the loader checks them and ``to_dict`` shows them.
SECTION_CLASSES: dict[str, type[Any]] = {
    "tcp": TcpConfig,
    "udp": UdpConfig,
    "queue": QueueConfig,
    "metrics": MetricsConfig,
    "tls": TlsConfig,
    "shaping": ShapingConfig,
    "fallback": FallbackConfig,
    "limits": LimitsConfig,
    "tun": TunConfig,
    "log": LogConfig,
}
#: Every key: ``SCHEMA[section][name] -> KeySpec``, read off the section dataclasses
#: above. ``role`` is top level (the loader's first check).
SCHEMA: dict[str, dict[str, KeySpec]] = {
    section: _keys_of(cls) for section, cls in SECTION_CLASSES.items()
}
SECTIONS: tuple[str, ...] = tuple(SCHEMA)
