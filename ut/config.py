"""Load and validate ut-tunnel's YAML configuration.

Theory of operation: ``load_config`` reads YAML (or takes a mapping), checks
every key against the schema (``SCHEMA``, read off the section dataclasses of
``ut.configschema``, where each key's default and rules are declared once), and
returns a frozen ``Config``. Anything wrong stops start-up with a
``ConfigError`` whose message names the file and the dotted key (spec,
Configuration: "A missing, wrong-typed, conflicting or unknown key stops
start-up with a message that names the key and the file")::

    /etc/ut/ut.yaml: tcp.lanes: must be between 1 and 64, got 0

Rules:

- Unknown keys are errors, with the closest known key suggested.
- Types are strict: ``true`` is not a number, ``"5"`` is not a number; whole
  numbers are accepted where seconds (floats) are expected.
- Keys that belong to the other role are allowed and ignored (one file may
  serve both roles, as the spec's example does); keys *required* for a role
  are required only for that role.
- Relative ``tls.*`` paths resolve against the config file's directory (the
  current directory for a mapping, unless ``base_dir`` is given). The files
  must exist and be readable unless ``check_files=False``.
- Conflicts between keys (backoff bounds, two listeners on one port) are
  checked here, after every key on its own.
- Hostile files are refused, never followed: at most ``MAX_CONFIG_BYTES`` are
  read, YAML anchors and aliases are refused before anything expands them,
  nesting deeper than ``MAX_DEPTH`` is refused, and any failure of the YAML
  library becomes a ``ConfigError``. Messages quote at most ``SHOW_MAX``
  characters of a value.

This module is the public face: the section classes, ``SCHEMA`` and the limits
are re-exported from ``ut.configschema``, so ``from ut.config import ...``
reaches all of it.

Example::

    from ut.config import load_config

    cfg = load_config("/etc/ut/ut.yaml")
    host, port = cfg.tcp.server_host_port
    test_cfg = cfg.with_overrides({"tcp.lanes": 2, "metrics.enabled": False})
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ut.addr import parse_addr
from ut.configschema import (
    ALPN_MAX,
    COALESCE_MS_MAX,
    DROP_POLICIES,
    DURATION_MAX,
    LANE_PICKS,
    LOG_LEVELS,
    MAX_LANES,
    QUEUE_MAX_BYTES,
    QUEUE_MAX_PACKETS,
    QUEUE_MIN_BYTES,
    RESEQUENCE_MAX_WAIT_MS_MAX,
    ROLES,
    SCHEMA,
    SECTIONS,
    SHOW_MAX,
    SOCK_BUF_MAX,
    SOCK_BUF_MIN,
    TCP_BUF_MAX,
    TCP_BUF_MIN,
    FallbackConfig,
    KeySpec,
    LimitsConfig,
    LogConfig,
    MetricsConfig,
    QueueConfig,
    ShapingConfig,
    TcpConfig,
    TlsConfig,
    TunConfig,
    UdpConfig,
    clip_text,
    show_value,
)
from ut.errors import ConfigError

__all__ = [
    "Config",
    "ConfigError",
    "FallbackConfig",
    "LimitsConfig",
    "LogConfig",
    "MetricsConfig",
    "QueueConfig",
    "SCHEMA",
    "ShapingConfig",
    "TcpConfig",
    "TlsConfig",
    "TunConfig",
    "UdpConfig",
    "load_config",
    "parse_addr",
    # Re-exported from ut.configschema for code that reads the schema or its limits.
    "ALPN_MAX",
    "COALESCE_MS_MAX",
    "DROP_POLICIES",
    "DURATION_MAX",
    "KeySpec",
    "LANE_PICKS",
    "LOG_LEVELS",
    "MAX_CONFIG_BYTES",
    "MAX_DEPTH",
    "MAX_LANES",
    "QUEUE_MAX_BYTES",
    "QUEUE_MAX_PACKETS",
    "QUEUE_MIN_BYTES",
    "RESEQUENCE_MAX_WAIT_MS_MAX",
    "ROLES",
    "SECTIONS",
    "SHOW_MAX",
    "SOCK_BUF_MAX",
    "SOCK_BUF_MIN",
    "TCP_BUF_MAX",
    "TCP_BUF_MIN",
]

#: The most a config file may hold; more (or an endless device) is refused. A
#: commented example is about 3 KiB; 64 KiB of the worst YAML still parses in well
#: under a second with PyYAML's pure-Python parser (which names lines in errors).
MAX_CONFIG_BYTES = 64 * 1024
#: The deepest nesting of mappings and lists a config file may have (it needs 2).
MAX_DEPTH = 32

# ------------------------------------------------------------------- config


@dataclass(frozen=True)
class Config:
    """A validated configuration. Build it with ``load_config``.

    ``source`` is the file it came from (as given), or ``"<dict>"``.
    """

    role: str
    tcp: TcpConfig
    udp: UdpConfig
    queue: QueueConfig
    metrics: MetricsConfig
    tls: TlsConfig
    log: LogConfig
    source: str
    shaping: ShapingConfig = ShapingConfig()
    fallback: FallbackConfig = FallbackConfig()
    tun: TunConfig = TunConfig()
    limits: LimitsConfig = LimitsConfig()

    @property
    def is_client(self) -> bool:
        return self.role == "client"

    @property
    def is_server(self) -> bool:
        return self.role == "server"

    @property
    def tls_server_name(self) -> str | None:
        """The name a client verifies the server certificate against.

        ``tls.server_name`` if set, else the host of ``tcp.server_addr``;
        ``None`` when neither is set (a server config).
        """
        if self.tls.server_name:
            return self.tls.server_name
        if self.tcp.server_addr is None:
            return None
        return self.tcp.server_host_port[0]

    def to_dict(self) -> dict[str, Any]:
        """The configuration as plain nested dicts, YAML-shaped (``source`` left out)."""
        out: dict[str, Any] = {"role": self.role}
        for section, keys in SCHEMA.items():
            values = {name: getattr(getattr(self, section), name) for name in keys}
            out[section] = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
        return out

    def summary(self) -> dict[str, Any]:
        """What this node will do, for the start-up log line.

        Only the keys that apply to ``role`` are included; no secrets (the
        ``tls`` entries are file paths). Example (client)::

            {"role": "client", "source": "/etc/ut/ut.yaml",
             "tcp": {"server_addr": "vpn.example.com:5443", "lanes": 5, ...},
             "udp": {"listen_addr": "127.0.0.1:15000"}, ...}
        """
        out: dict[str, Any] = {"role": self.role, "source": self.source}
        for section, values in self.to_dict().items():
            if section == "role":
                continue
            kept = {
                name: value
                for name, value in values.items()
                if self.role in SCHEMA[section][name].roles
                and not (section == "metrics" and not self.metrics.enabled and name != "enabled")
            }
            if kept:  # a section with no key for this role (fallback: on a client) is left out
                out[section] = kept
        if self.is_client:
            out["tls"]["server_name"] = self.tls_server_name
        return out

    def with_overrides(
        self, overrides: Mapping[str, Any], *, check_files: bool = True
    ) -> Config:
        """A new, re-validated Config with dotted keys replaced.

        >>> cfg.with_overrides({"tcp.lanes": 2, "udp.listen_addr": "127.0.0.1:0"})

        Unknown keys and bad values raise ``ConfigError`` as ``load_config``
        does (the file named is this config's ``source``). Relative ``tls.*``
        paths resolve against the current directory.
        """
        raw = self.to_dict()
        for dotted, value in overrides.items():
            section, _, name = dotted.partition(".")
            if dotted == "role":
                raw["role"] = value
                continue
            if section not in SCHEMA or name not in SCHEMA[section]:
                raise ConfigError(self.source, clip_text(str(dotted)), f"unknown key{_suggest(str(dotted))}")
            raw[section][name] = value
        return _build(raw, self.source, Path.cwd(), check_files)


# ----------------------------------------------------------------- messages


def _choices(choices: tuple[str, ...]) -> str:
    quoted = [repr(c) for c in choices]
    if len(quoted) == 1:
        return f"{quoted[0]} (the only value)"
    if len(quoted) == 2:
        return f"{quoted[0]} or {quoted[1]}"
    return "one of " + ", ".join(quoted)


def _choice_hint(value: str, choices: tuple[str, ...]) -> str:
    if len(value) > SHOW_MAX:
        return ""
    lowered = {c.lower(): c for c in choices}
    if value.lower() in lowered:
        return f"; did you mean {lowered[value.lower()]!r}?"
    close = difflib.get_close_matches(value, choices, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_wildcard(host: str) -> bool:
    return host in ("0.0.0.0", "::", "")


# ------------------------------------------------------------------ loading


def load_config(
    source: str | os.PathLike[str] | Mapping[str, Any],
    *,
    check_files: bool = True,
    base_dir: str | os.PathLike[str] | None = None,
) -> Config:
    """Read, validate and return a configuration.

    ``source`` is a path to a YAML file, or a mapping shaped like the file
    (reported as ``"<dict>"`` in errors). ``check_files=False`` skips the
    existence/readability check of the ``tls`` files (for validating a file on
    a host without the certificates). ``base_dir`` overrides the directory
    relative ``tls`` paths resolve against (default: the file's directory, or
    the current directory for a mapping).

    Raises ``ConfigError`` (a ``ValueError``) naming the file and dotted key.

    >>> cfg = load_config("/etc/ut/ut.yaml")
    >>> cfg.role, cfg.tcp.lanes
    ('client', 5)
    """
    if isinstance(source, Mapping):
        name = "<dict>"
        raw: Any = source
        directory = Path(base_dir) if base_dir is not None else Path.cwd()
    elif isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        raw = _read_yaml(name)
        directory = Path(base_dir) if base_dir is not None else Path(os.path.abspath(name)).parent
    else:
        raise TypeError(f"load_config() needs a path or a mapping, got {_type_name(source)}")
    return _build(raw, name, directory, check_files)


def _find_duplicate(node: yaml.Node, path: str = "") -> tuple[str, int, int] | None:
    """The first key given twice in one mapping: ``(dotted key, first line, line)``.

    PyYAML silently keeps the last of duplicate keys; a config that sets a key
    twice is almost always a mistake, so it is an error here.
    """
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                key = str(key_node.value)
                dotted = f"{path}.{key}" if path else key
                line = key_node.start_mark.line + 1
                if key in seen and key != "<<":
                    return dotted, seen[key], line
                seen[key] = line
                found = _find_duplicate(value_node, dotted)
            else:
                found = _find_duplicate(value_node, path)
            if found:
                return found
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            found = _find_duplicate(item, path)
            if found:
                return found
    return None


class _RefusedYAML(Exception):
    """A construct a config file may not use; the message says which and where."""


class _GuardedLoader(yaml.SafeLoader):
    """``SafeLoader`` that refuses anchors, aliases and deep nesting while composing.

    Checked on the event stream, before any node is built, so an alias bomb
    ("billion laughs") or a self-referencing alias (``a: &a [*a]``) is refused
    without being expanded or followed.
    """

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise _RefusedYAML(
                f"YAML alias *{clip_text(str(event.anchor))}{_where(event.start_mark)}: anchors "
                "and aliases are not allowed in a configuration; write the value out")
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            raise _RefusedYAML(
                f"YAML anchor &{clip_text(str(anchor))}{_where(event.start_mark)}: anchors "
                "and aliases are not allowed in a configuration; write the value out")
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            if self._depth >= MAX_DEPTH:
                raise _RefusedYAML(f"nested more than {MAX_DEPTH} levels deep{_where(event.start_mark)}")
            self._depth += 1
            try:
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1
        return super().compose_node(parent, index)


def _where(mark: Any) -> str:
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def _read_yaml(name: str) -> Any:
    try:
        with open(name, "rb") as fh:
            data = fh.read(MAX_CONFIG_BYTES + 1)  # capped: a device like /dev/zero never ends
    except FileNotFoundError:
        raise ConfigError(name, "", "file not found") from None
    except IsADirectoryError:
        raise ConfigError(name, "", "is a directory, expected a YAML file") from None
    except OSError as exc:
        raise ConfigError(name, "", f"cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:  # a NUL byte or an unencodable character in the path
        raise ConfigError(name, "", f"cannot read: {clip_text(str(exc))}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(name, "", f"larger than {MAX_CONFIG_BYTES // 1024} KiB; "
                          "a configuration file is a few kilobytes")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(name, "", f"not UTF-8 text (byte {exc.start})") from None
    loader: _GuardedLoader | None = None
    try:
        loader = _GuardedLoader(text)
        node = loader.get_single_node()
        duplicate = _find_duplicate(node) if node is not None else None
        if duplicate:
            key, first, line = duplicate
            raise ConfigError(name, clip_text(key), f"duplicate key at line {line} (first set at line {first})")
        raw = loader.construct_document(node) if node is not None else None
    except ConfigError:
        raise
    except _RefusedYAML as exc:
        raise ConfigError(name, "", str(exc)) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(name, "", f"YAML syntax error{_where(mark)}: {clip_text(str(problem), 200)}") from None
    except Exception as exc:  # noqa: BLE001 - whatever PyYAML trips over is the file's fault
        # A scalar PyYAML recognises but cannot convert: an integer of more than
        # 4300 digits, a timestamp like 2024-13-45, an empty "!!int", ...
        what = clip_text(str(exc), 200) or type(exc).__name__
        raise ConfigError(name, "", f"a value cannot be read: {what}") from None
    finally:
        if loader is not None:
            loader.dispose()
    if raw is None:
        raise ConfigError(name, "", "file is empty (it needs at least role, tcp and tls)")
    return raw


#: The longest "host:port" (a 253-character DNS name, brackets, a port), with room.
_ADDR_MAX = 270

_ALL_KEYS: tuple[str, ...] = ("role",) + SECTIONS + tuple(
    f"{section}.{name}" for section, keys in SCHEMA.items() for name in keys
)


def _suggest(dotted: str) -> str:
    if len(dotted) > 2 * SHOW_MAX:
        return ""
    section, _, name = dotted.rpartition(".")
    # The same name in another section first ("tcp.wg_udp_addr" -> "udp.wg_udp_addr").
    if section:
        moved = [k for k in _ALL_KEYS if k.endswith("." + name) and k != dotted]
        if moved:
            return f"; did you mean {moved[0]}?"
        pool = [k for k in _ALL_KEYS if k.startswith(section + ".")] or list(_ALL_KEYS)
    else:
        pool = ["role", *SECTIONS]
    close = difflib.get_close_matches(dotted, pool, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]}?"
    if section in SCHEMA:
        return f"; known keys in {section}: {', '.join(SCHEMA[section])}"
    return f"; known top-level keys: role, {', '.join(SECTIONS)}"


def _type_name(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int):
        try:
            return f"a whole number ({clip_text(str(value))})"
        except ValueError:  # more digits than Python will convert
            return f"a whole number of {value.bit_length()} bits"
    if isinstance(value, float):
        return f"a number ({value:g})"
    if isinstance(value, str):
        return f"a string ({show_value(value)})"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, Mapping):
        return "a mapping"
    return clip_text(type(value).__name__)


def _looks_numeric(value: str) -> bool:
    if len(value) > SHOW_MAX:
        return False
    try:
        float(value)
    except ValueError:
        return False
    return True


def _convert(file: str, dotted: str, spec: KeySpec, value: Any, directory: Path) -> Any:
    """Type-check and normalise one value; raise ConfigError naming ``dotted``."""

    def fail(problem: str) -> ConfigError:
        return ConfigError(file, dotted, problem)

    kind = spec.kind
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            hint = " (write it without quotes)" if isinstance(value, str) and _looks_numeric(value) else ""
            raise fail(f"must be a whole number, got {_type_name(value)}{hint}")
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            hint = " (write it without quotes)" if isinstance(value, str) and _looks_numeric(value) else ""
            raise fail(f"must be a number of seconds, got {_type_name(value)}{hint}")
        try:
            finite = math.isfinite(value)
        except OverflowError:  # an int too large for a float
            finite = False
        if not finite:
            raise fail(f"must be a finite number, got {_type_name(value)}")
        value = float(value)
    elif kind == "bool":
        if not isinstance(value, bool):
            raise fail(f"must be true or false, got {_type_name(value)}")
    elif kind in ("str", "enum", "name"):
        if not isinstance(value, str):
            raise fail(f"must be a string, got {_type_name(value)}")
        if kind == "enum" and value not in spec.choices:
            raise fail(f"must be {_choices(spec.choices)}, got {show_value(value)}"
                       f"{_choice_hint(value, spec.choices)}")
        if kind == "name" and not value:
            raise fail("must not be empty (leave the key out to use the server_addr host)")
    elif kind == "strlist":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise fail(f"must be a list of strings, got {_type_name(value)}")
        value = tuple(value)
    elif kind == "addr":
        if not isinstance(value, str):
            hint = ' (quote it: "host:port")' if isinstance(value, (int, float)) else ""
            raise fail(f'must be a "host:port" string, got {_type_name(value)}{hint}')
        if len(value) > _ADDR_MAX:
            raise fail(f'must be a "host:port" string of at most {_ADDR_MAX} characters, '
                       f"got {show_value(value)}")
        try:
            parse_addr(value, allow_port_zero=spec.port_zero)
        except ValueError as exc:
            raise fail(clip_text(str(exc), 200)) from None
        value = value.strip()
    elif kind == "path":
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str) or not value.strip():
            raise fail(f"must be a file path, got {_type_name(value)}")
        value = os.path.normpath(str(directory / os.path.expanduser(value)))
    if spec.check is not None:
        problem = spec.check(value)
        if problem:
            raise fail(problem)
    return value


def _check_file(file: str, dotted: str, path: str) -> None:
    shown = clip_text(path, 200)
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except FileNotFoundError:
        raise ConfigError(file, dotted, f"file not found: {shown}") from None
    except IsADirectoryError:
        raise ConfigError(file, dotted, f"is a directory, expected a PEM file: {shown}") from None
    except OSError as exc:
        raise ConfigError(file, dotted, f"cannot read {shown}: {exc.strerror or 'error'}") from None
    except ValueError:  # a NUL byte or an unencodable character
        raise ConfigError(file, dotted, f"not a usable file path: {show_value(path)}") from None


def _key_text(key: Any) -> str:
    """A key as an error message names it: short, whatever the key is."""
    if isinstance(key, int) and not isinstance(key, bool):
        return _num_text(key)
    try:
        return clip_text(str(key))
    except Exception:  # noqa: BLE001 - a mapping given by a caller may hold anything
        return clip_text(type(key).__name__)


def _num_text(value: int) -> str:
    try:
        return clip_text(str(value))
    except ValueError:
        return f"<a whole number of {value.bit_length()} bits>"


def _build(raw: Any, file: str, directory: Path, check_files: bool) -> Config:
    if not isinstance(raw, Mapping):
        raise ConfigError(
            file, "", f"the top level must be a mapping of sections (role, tcp, tls, ...), got {_type_name(raw)}"
        )
    for key in raw:
        if not isinstance(key, str):
            raise ConfigError(file, _key_text(key), f"keys must be strings, got {_type_name(key)}")
        if key != "role" and key not in SCHEMA:
            raise ConfigError(file, _key_text(key), f"unknown key{_suggest(key)}")

    if "role" not in raw:
        raise ConfigError(file, "role", "missing required key: set role: client or role: server")
    role = raw["role"]
    if not isinstance(role, str) or role not in ROLES:
        hint = _choice_hint(role, ROLES) if isinstance(role, str) else ""
        raise ConfigError(file, "role", f"must be 'client' or 'server', got {_type_name(role)}{hint}")

    sections: dict[str, dict[str, Any]] = {}
    for section, keys in SCHEMA.items():
        given = raw.get(section)
        if given is None:
            given = {}  # an absent or empty section ("tcp:") means all defaults
        if not isinstance(given, Mapping):
            raise ConfigError(file, section, f"must be a mapping of keys, got {_type_name(given)}")
        for key in given:
            if not isinstance(key, str):
                raise ConfigError(file, f"{section}.{_key_text(key)}",
                                  f"keys must be strings, got {_type_name(key)}")
            if key not in keys:
                dotted = f"{section}.{key}"
                raise ConfigError(file, f"{section}.{_key_text(key)}", f"unknown key{_suggest(dotted)}")
        values: dict[str, Any] = {}
        for name, spec in keys.items():
            dotted = f"{section}.{name}"
            value = given.get(name)
            if value is None:
                if role in spec.required:
                    raise ConfigError(file, dotted, f"missing required key for role {role}")
                values[name] = spec.default
                continue
            values[name] = _convert(file, dotted, spec, value, directory)
        sections[section] = values

    tcp, metrics = sections["tcp"], sections["metrics"]
    if tcp["dial_backoff_min_seconds"] > tcp["dial_backoff_max_seconds"]:
        raise ConfigError(
            file,
            "tcp.dial_backoff_min_seconds",
            f"must not exceed tcp.dial_backoff_max_seconds "
            f"({tcp['dial_backoff_min_seconds']:g} > {tcp['dial_backoff_max_seconds']:g})",
        )
    queue = sections["queue"]
    if queue["aqm_target_ms"] >= queue["aqm_interval_ms"]:
        raise ConfigError(
            file, "queue.aqm_target_ms",
            f"must be below queue.aqm_interval_ms ({queue['aqm_target_ms']:g} >= "
            f"{queue['aqm_interval_ms']:g}): the delay allowed to stand, against the time "
            "it may stand before drops begin")
    if role == "server" and metrics["enabled"]:
        m_host, m_port = parse_addr(metrics["listen_addr"])
        t_host, t_port = parse_addr(tcp["listen_addr"])
        overlap = m_host == t_host or _is_wildcard(m_host) or _is_wildcard(t_host)
        if m_port == t_port and m_port != 0 and overlap:
            raise ConfigError(
                file,
                "metrics.listen_addr",
                f"conflicts with tcp.listen_addr ({metrics['listen_addr']} vs {tcp['listen_addr']}): "
                "both are TCP listeners; use another port",
            )
    kind = tcp["transport"]
    if kind == "ws" and role == "client":
        raise ConfigError(file, "tcp.transport", "ws is for a server behind a reverse proxy that "
                          "terminates TLS; a client always speaks TLS: use wss")
    if kind == "ws" and not _is_loopback(parse_addr(tcp["listen_addr"])[0]):
        raise ConfigError(file, "tcp.transport", "ws is plain HTTP (lanes, proofs and client "
                          "certificates readable on the wire): listen on loopback "
                          f"(tcp.listen_addr is {tcp['listen_addr']}) behind the reverse proxy "
                          "that terminates TLS, or use wss")
    if kind != "tls" and sections["tls"]["client_auth"] != "proof":
        raise ConfigError(file, "tcp.transport", f"{kind} needs tls.client_auth: proof (a client "
                          "certificate does not cross a TLS-terminating proxy)")
    tun = sections["tun"]
    if tun["enabled"]:
        if not tun["address"]:
            raise ConfigError(file, "tun.address", "TUN mode needs this end's address(es), "
                              "e.g. [10.77.0.1/24]")
        if role == "server" and not tun["clients"]:
            raise ConfigError(file, "tun.clients", 'TUN mode needs each client\'s addresses: '
                              '["CN=10.77.0.2/32", ...]')
    fallback = sections["fallback"]
    if role == "server" and sections["tls"]["client_auth"] != "proof":
        for name in ("addr", "h2_addr"):
            if fallback[name] is not None:
                raise ConfigError(
                    file, f"fallback.{name}",
                    "is only used with tls.client_auth: proof (with handshake, a connection "
                    "without a client certificate is refused in the TLS handshake)")
    if check_files:
        for name in ("ca_cert", "cert", "key"):
            _check_file(file, f"tls.{name}", sections["tls"][name])

    return Config(
        role=role,
        tcp=TcpConfig(**sections["tcp"]),
        udp=UdpConfig(**sections["udp"]),
        queue=QueueConfig(**sections["queue"]),
        metrics=MetricsConfig(**sections["metrics"]),
        tls=TlsConfig(**sections["tls"]),
        log=LogConfig(**sections["log"]),
        shaping=ShapingConfig(**sections["shaping"]),
        fallback=FallbackConfig(**sections["fallback"]),
        tun=TunConfig(**sections["tun"]),
        limits=LimitsConfig(**sections["limits"]),
        source=file,
    )
