"""ut.config: defaults, every error naming file and key, examples, paths."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest

from ut._testbase.certs import TestPki, make_test_pki
from ut.config import SCHEMA, Config, load_config, parse_addr
from ut.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


@pytest.fixture
def pki(tmp_path: Path) -> TestPki:
    return make_test_pki(tmp_path)


def tls_section(pki: TestPki) -> dict[str, str]:
    cert, key = pki.client("home")
    return {"ca_cert": str(pki.ca), "cert": str(cert), "key": str(key)}


def client_dict(pki: TestPki, **sections: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {"role": "client", "tcp": {"server_addr": "vpn.example.com:5443"},
                           "tls": tls_section(pki)}
    raw.update(sections)
    return raw


def write(tmp_path: Path, text: str, name: str = "ut.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def yaml_for(pki: TestPki, role: str = "client", extra: str = "") -> str:
    tls = tls_section(pki)
    base = f"role: {role}\n"
    if role == "client" and "server_addr" not in extra:
        base += 'tcp:\n  server_addr: "vpn.example.com:5443"\n'
    base += f"tls:\n  ca_cert: {tls['ca_cert']}\n  cert: {tls['cert']}\n  key: {tls['key']}\n"
    return base + textwrap.dedent(extra)


# ------------------------------------------------------------------ defaults


def test_defaults_for_a_minimal_client(pki: TestPki) -> None:
    cfg = load_config(client_dict(pki))
    assert cfg.role == "client" and cfg.is_client and not cfg.is_server
    assert cfg.source == "<dict>"
    t = cfg.tcp
    assert t.server_addr == "vpn.example.com:5443"
    assert t.listen_addr == "0.0.0.0:5443"
    assert (t.lanes, t.tcp_nodelay, t.tcp_buf, t.idle_seconds, t.lane_pick) == (5, True, 16384, 120, "rr")
    assert (t.sock_buf, t.skip_slow_lanes, t.resequence, t.resequence_max_wait_ms) == (0, True, True, 500)
    assert (t.dial_backoff_min_seconds, t.dial_backoff_max_seconds) == (5, 60)
    assert (t.connect_timeout_seconds, t.hello_timeout_seconds, t.session_linger_seconds) == (10, 5, 180)
    assert isinstance(t.idle_seconds, float)
    assert cfg.udp.listen_addr == "127.0.0.1:15000" and cfg.udp.wg_udp_addr == "127.0.0.1:51820"
    assert (cfg.queue.max_packets, cfg.queue.max_bytes, cfg.queue.drop_policy) == (4096, 8388608, "oldest")
    m = cfg.metrics
    assert (m.enabled, m.listen_addr, m.path, m.per_client_cn, m.per_lane_id) == (
        True, "127.0.0.1:5080", "/metrics", True, False)
    assert cfg.tls.server_name is None
    assert cfg.log.level == "info"


def test_minimal_server_needs_no_server_addr(pki: TestPki) -> None:
    cfg = load_config({"role": "server", "tls": tls_section(pki)})
    assert cfg.is_server and cfg.tcp.server_addr is None
    assert cfg.tls_server_name is None
    with pytest.raises(ValueError):
        _ = cfg.tcp.server_host_port


def test_addresses_parsed_by_properties(pki: TestPki) -> None:
    cfg = load_config(client_dict(
        pki, tcp={"server_addr": "[2001:db8::1]:443", "listen_addr": "[::]:0"},
        udp={"listen_addr": "127.0.0.1:0", "wg_udp_addr": "10.0.0.1:51821"},
        metrics={"listen_addr": "0.0.0.0:9100"},
    ))
    assert cfg.tcp.server_host_port == ("2001:db8::1", 443)
    assert cfg.tcp.listen_host_port == ("::", 0)
    assert cfg.udp.listen_host_port == ("127.0.0.1", 0)
    assert cfg.udp.wg_host_port == ("10.0.0.1", 51821)
    assert cfg.metrics.listen_host_port == ("0.0.0.0", 9100)
    assert cfg.tls_server_name == "2001:db8::1"


def test_tls_server_name_overrides_host(pki: TestPki) -> None:
    raw = client_dict(pki)
    raw["tcp"] = {"server_addr": "203.0.113.7:5443"}
    raw["tls"]["server_name"] = "vpn.example.com"
    assert load_config(raw).tls_server_name == "vpn.example.com"


def test_config_is_frozen(pki: TestPki) -> None:
    cfg = load_config(client_dict(pki))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.tcp.lanes = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.role = "server"  # type: ignore[misc]


def test_null_or_empty_section_means_defaults(pki: TestPki, tmp_path: Path) -> None:
    path = write(tmp_path, yaml_for(pki, extra="queue:\nmetrics: ~\nlog:\n  level:\n"))
    cfg = load_config(path)
    assert cfg.queue.max_packets == 4096 and cfg.metrics.enabled and cfg.log.level == "info"


def test_ints_accepted_for_seconds_and_floats_kept(pki: TestPki) -> None:
    cfg = load_config(client_dict(pki, tcp={"server_addr": "h:1", "idle_seconds": 2.5,
                                              "connect_timeout_seconds": 3}))
    assert cfg.tcp.idle_seconds == 2.5
    assert cfg.tcp.connect_timeout_seconds == 3.0 and isinstance(cfg.tcp.connect_timeout_seconds, float)


def test_other_roles_keys_are_allowed(pki: TestPki) -> None:
    raw = client_dict(pki)
    raw["tcp"].update(listen_addr="0.0.0.0:6000", session_linger_seconds=10)
    raw["udp"] = {"wg_udp_addr": "127.0.0.1:51820"}
    assert load_config(raw).tcp.listen_addr == "0.0.0.0:6000"


# --------------------------------------------------------------------- paths


def test_relative_tls_paths_resolve_against_the_config_file(pki: TestPki, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    cert, key = pki.client("home")
    conf_dir = pki.root  # the certificates live beside the config
    path = write(conf_dir, f"""\
        role: client
        tcp:
          server_addr: "vpn.example.com:5443"
        tls:
          ca_cert: ca.pem
          cert: ./{cert.name}
          key: sub/../{key.name}
        """)
    (conf_dir / "sub").mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(os.path.relpath(path, elsewhere))
    assert cfg.tls.ca_cert == str(pki.ca.resolve())
    assert cfg.tls.cert == str(cert.resolve())
    assert cfg.tls.key == str(key.resolve())
    assert cfg.source == os.path.relpath(path, elsewhere)


def test_relative_paths_in_a_mapping_use_cwd_or_base_dir(pki: TestPki, monkeypatch: pytest.MonkeyPatch) -> None:
    cert, key = pki.client("home")
    raw = {"role": "server", "tls": {"ca_cert": "ca.pem", "cert": cert.name, "key": key.name}}
    monkeypatch.chdir(pki.root)
    assert load_config(raw).tls.ca_cert == str(pki.root.resolve() / "ca.pem")
    monkeypatch.chdir("/")
    assert load_config(raw, base_dir=pki.root).tls.cert == str(cert.resolve())
    with pytest.raises(ConfigError, match="tls.ca_cert: file not found"):
        load_config(raw)


def test_pathlike_values_in_a_mapping(pki: TestPki) -> None:
    cert, key = pki.client("home")
    cfg = load_config({"role": "server", "tls": {"ca_cert": pki.ca, "cert": cert, "key": key}})
    assert cfg.tls.key == str(key)


def test_check_files_false_skips_existence(tmp_path: Path) -> None:
    raw = {"role": "server", "tls": {"ca_cert": "/nope/ca.pem", "cert": "/nope/c.pem", "key": "/nope/k"}}
    assert load_config(raw, check_files=False).tls.ca_cert == "/nope/ca.pem"
    with pytest.raises(ConfigError) as info:
        load_config(raw)
    assert info.value.key == "tls.ca_cert" and "/nope/ca.pem" in info.value.problem


# ------------------------------------------------------------------ examples


@pytest.mark.parametrize("name,role", [("client.yaml", "client"), ("server.yaml", "server")])
def test_examples_load(pki: TestPki, name: str, role: str) -> None:
    cfg = load_config(EXAMPLES / name, check_files=False)
    assert cfg.role == role
    # Relative TLS paths resolve against the file's folder (/etc/ut when installed).
    assert cfg.tls.ca_cert == str(EXAMPLES / "ca.pem")
    # Pointed at real certificates, the examples pass the full check too.
    real = cfg.with_overrides({f"tls.{k}": v for k, v in tls_section(pki).items()})
    assert real.tcp == cfg.tcp and real.queue == cfg.queue and real.metrics == cfg.metrics
    assert real.source == str(EXAMPLES / name)


def test_examples_show_the_defaults(pki: TestPki) -> None:
    client = load_config(EXAMPLES / "client.yaml", check_files=False)
    server = load_config(EXAMPLES / "server.yaml", check_files=False)
    defaults = load_config({"role": "server", "tls": tls_section(pki)})
    for cfg in (client, server):
        for section in ("queue", "metrics", "log", "shaping"):
            assert getattr(cfg, section) == getattr(defaults, section)
        assert cfg.tls.alpn == defaults.tls.alpn
    # The examples listen on / dial HTTPS's port (issue 15); the spec default stays 5443.
    assert dataclasses.replace(client.tcp, server_addr=None) == defaults.tcp
    assert dataclasses.replace(server.tcp, listen_addr="0.0.0.0:5443") == defaults.tcp
    assert client.tcp.server_addr == "vpn.example.com:443"
    assert server.tcp.listen_addr == "0.0.0.0:443"


# --------------------------------------------------------------- overrides


def test_with_overrides_revalidates(pki: TestPki) -> None:
    cfg = load_config(client_dict(pki))
    two = cfg.with_overrides({"tcp.lanes": 2, "metrics.enabled": False, "log.level": "debug"})
    assert (two.tcp.lanes, two.metrics.enabled, two.log.level) == (2, False, "debug")
    assert cfg.tcp.lanes == 5  # the original is untouched
    assert cfg.with_overrides({"role": "server"}).is_server
    with pytest.raises(ConfigError, match=r"<dict>: tcp\.lanes: must be between 1 and 64, got 0"):
        cfg.with_overrides({"tcp.lanes": 0})
    with pytest.raises(ConfigError, match=r"tcp\.lane: unknown key; did you mean tcp\.lanes\?"):
        cfg.with_overrides({"tcp.lane": 2})
    with pytest.raises(ConfigError, match="unknown key"):
        cfg.with_overrides({"nosection.x": 2})


# ------------------------------------------------------------------ summary


def test_summary_is_json_and_role_specific(pki: TestPki) -> None:
    cfg = load_config(client_dict(pki))
    s = cfg.summary()
    json.dumps(s)  # log-able as is
    assert s["role"] == "client" and s["source"] == "<dict>"
    assert s["tcp"]["server_addr"] == "vpn.example.com:5443"
    assert "listen_addr" not in s["tcp"] and "session_linger_seconds" not in s["tcp"]
    assert s["udp"] == {"listen_addr": "127.0.0.1:15000"}
    assert s["tls"]["server_name"] == "vpn.example.com"
    assert set(s) == {"role", "source", "tcp", "udp", "queue", "metrics", "tls", "log", "shaping",
                      "tun"}

    server = load_config({"role": "server", "tls": tls_section(pki), "metrics": {"enabled": False}}).summary()
    assert "server_addr" not in server["tcp"] and "dial_backoff_min_seconds" not in server["tcp"]
    assert server["udp"] == {"wg_udp_addr": "127.0.0.1:51820"}
    assert server["metrics"] == {"enabled": False}
    assert "server_name" not in server["tls"]


def test_summary_has_no_key_material(pki: TestPki) -> None:
    cfg = load_config(client_dict(pki))
    text = json.dumps(cfg.summary())
    assert "PRIVATE KEY" not in text and "BEGIN" not in text
    assert Path(cfg.tls.key).read_text() not in text


# -------------------------------------------------------------------- errors


def expect_error(source: Any, key: str, pattern: str, file: str | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(source)
    err = info.value
    expected_file = file if file is not None else (
        "<dict>" if isinstance(source, dict) else os.fspath(source))
    assert err.file == expected_file, str(err)
    assert err.key == key, str(err)
    assert re.search(pattern, err.problem), str(err)
    assert str(err) == (f"{expected_file}: {key}: {err.problem}" if key else f"{expected_file}: {err.problem}")
    return err


# (YAML to add to a valid client file, dotted key, problem regex)
YAML_ERRORS = [
    # unknown keys, with suggestions
    ("tcpp:\n  lanes: 2\n", "tcpp", r"unknown key; did you mean tcp\?"),
    ("metric:\n  enabled: false\n", "metric", r"did you mean metrics\?"),
    ("zzz: 1\n", "zzz", r"unknown key; known top-level keys: role, tcp"),
    ("queue:\n  max_packet: 1\n", "queue.max_packet", r"did you mean queue\.max_packets\?"),
    ("queue:\n  wg_udp_addr: 'h:1'\n", "queue.wg_udp_addr", r"did you mean udp\.wg_udp_addr\?"),
    ("log:\n  format: json\n", "log.format", r"unknown key; known keys in log: level"),
    # wrong types
    ("queue:\n  max_packets: true\n", "queue.max_packets", r"whole number, got a boolean \(true\)"),
    ("queue:\n  max_packets: '4096'\n", "queue.max_packets", r"got a string \('4096'\) \(write it without quotes\)"),
    ("queue:\n  max_packets: 10.5\n", "queue.max_packets", r"must be a whole number, got a number \(10\.5\)"),
    ("tls:\n  server_name: 5\n", "tls.server_name", r"must be a string"),
    ("metrics:\n  enabled: 'yes'\n", "metrics.enabled", r"must be true or false, got a string"),
    ("metrics:\n  enabled: 1\n", "metrics.enabled", r"must be true or false, got a whole number"),
    ("log:\n  level: [info]\n", "log.level", r"must be a string, got a list"),
    ("udp:\n  listen_addr: 15000\n", "udp.listen_addr", r'"host:port" string, got a whole number \(15000\) \(quote it'),
    ("queue: [1, 2]\n", "queue", r"must be a mapping of keys, got a list"),
    ("metrics: true\n", "metrics", r"must be a mapping of keys, got a boolean"),
    ("queue:\n  max_bytes: .nan\n", "queue.max_bytes", r"whole number"),
    # out of range
    ("queue:\n  max_packets: 0\n", "queue.max_packets", r"must be between 1 and 1048576, got 0"),
    ("queue:\n  max_bytes: 65534\n", "queue.max_bytes", r"must be between 65535 and 1073741824, got 65534"),
    ("metrics:\n  path: metrics\n", "metrics.path", r'must start with "/"'),
    ("metrics:\n  path: /a b\n", "metrics.path", r"plain URL path"),
    # enums
    ("queue:\n  drop_policy: newest\n", "queue.drop_policy", r"must be 'oldest' \(the only value\), got 'newest'"),
    ("log:\n  level: INFO\n", "log.level", r"one of 'debug', 'info', 'warning', 'error', got 'INFO'; did you mean 'info'\?"),
    ("log:\n  level: verbose\n", "log.level", r"got 'verbose'"),
    # bad names and addresses
    ("tls:\n  server_name: 'not a name'\n", "tls.server_name", r"DNS name or an IP"),
    ("udp:\n  listen_addr: localhost\n", "udp.listen_addr", r'expected "host:port"'),
    ("udp:\n  listen_addr: 'h:abc'\n", "udp.listen_addr", r"port 'abc' is not a number"),
    ("udp:\n  listen_addr: ':15000'\n", "udp.listen_addr", r"host is missing"),
    ("udp:\n  listen_addr: '::1:15000'\n", "udp.listen_addr", r"IPv6 addresses in brackets"),
    ("udp:\n  listen_addr: '[zz]:1'\n", "udp.listen_addr", r"not an IPv6 address"),
    ("udp:\n  listen_addr: 'a b:1'\n", "udp.listen_addr", r"not a host name or IP"),
    ("udp:\n  listen_addr: 'h:65536'\n", "udp.listen_addr", r"port must be between 0 and 65535"),
    ("udp:\n  wg_udp_addr: '127.0.0.1:0'\n", "udp.wg_udp_addr", r"port must be between 1 and 65535, got 0"),
]


@pytest.mark.parametrize("extra,key,pattern", YAML_ERRORS, ids=[k for _, k, _ in YAML_ERRORS])
def test_errors_name_file_and_key(pki: TestPki, tmp_path: Path, extra: str, key: str, pattern: str) -> None:
    # Sections given twice would be a duplicate-key error: merge into the client's tls/tcp.
    text = yaml_for(pki)
    for section in ("tls", "tcp"):
        if extra.startswith(f"{section}:\n"):
            text = text.replace(f"{section}:\n", extra, 1)
            extra = ""
    path = write(tmp_path, text + extra)
    expect_error(path, key, pattern)


# (tcp section overrides on a valid client mapping, dotted key, problem regex)
TCP_ERRORS = [
    ({"lanes": 0}, "tcp.lanes", r"between 1 and 64, got 0"),
    ({"lanes": 65}, "tcp.lanes", r"between 1 and 64, got 65"),
    ({"lanes": True}, "tcp.lanes", r"whole number, got a boolean"),
    ({"tcp_buf": 100}, "tcp.tcp_buf", r"between 4096 and 1048576 \(the lane's I/O chunk in bytes\), got 100$"),
    ({"tcp_buf": 0}, "tcp.tcp_buf", r"got 0; it is no longer the socket buffer size: for kernel autotuning leave tcp\.sock_buf at 0"),
    ({"tcp_buf": 1048577}, "tcp.tcp_buf", r"got 1048577"),
    ({"sock_buf": 100}, "tcp.sock_buf", r"0 \(kernel autotuning\) or between 4096 and 67108864, got 100"),
    ({"sock_buf": 67108865}, "tcp.sock_buf", r"got 67108865"),
    ({"resequence_max_wait_ms": 0}, "tcp.resequence_max_wait_ms", r"between 1 and 5000, got 0"),
    ({"resequence": "yes"}, "tcp.resequence", r"true or false"),
    ({"skip_slow_lanes": 1}, "tcp.skip_slow_lanes", r"true or false"),
    ({"idle_seconds": 0}, "tcp.idle_seconds", r"between 1 and 86400, got 0"),
    ({"idle_seconds": "120"}, "tcp.idle_seconds", r"number of seconds, got a string \('120'\) \(write it without quotes\)"),
    ({"idle_seconds": float("inf")}, "tcp.idle_seconds", r"finite"),
    ({"idle_seconds": False}, "tcp.idle_seconds", r"got a boolean"),
    ({"dial_backoff_min_seconds": 0}, "tcp.dial_backoff_min_seconds", r"between 0\.01 and 86400, got 0"),
    ({"dial_backoff_max_seconds": -1}, "tcp.dial_backoff_max_seconds", r"between 0\.01 and 86400, got -1"),
    ({"dial_backoff_min_seconds": 61}, "tcp.dial_backoff_min_seconds",
     r"must not exceed tcp\.dial_backoff_max_seconds \(61 > 60\)"),
    ({"connect_timeout_seconds": 0}, "tcp.connect_timeout_seconds", r"between 0\.1 and 86400, got 0"),
    ({"hello_timeout_seconds": -0.5}, "tcp.hello_timeout_seconds", r"between 0\.1 and 86400, got -0\.5"),
    ({"session_linger_seconds": -1}, "tcp.session_linger_seconds", r"between 0 and 86400, got -1"),
    ({"lane_pick": "random"}, "tcp.lane_pick", r"'rr' or 'hash', got 'random'"),
    ({"lane_pick": "RR"}, "tcp.lane_pick", r"did you mean 'rr'\?"),
    ({"tcp_nodelay": "true"}, "tcp.tcp_nodelay", r"true or false, got a string"),
    ({"server_addr": "vpn.example.com:0"}, "tcp.server_addr", r"between 1 and 65535, got 0"),
    ({"server_addr": "vpn.example.com"}, "tcp.server_addr", r'expected "host:port"'),
    ({"server_addr": None}, "tcp.server_addr", r"missing required key for role client"),
    ({"server_addr": 5443}, "tcp.server_addr", r"quote it"),
    ({"listen_addr": "0.0.0.0:99999"}, "tcp.listen_addr", r"between 0 and 65535"),
    ({"lanes_count": 3}, "tcp.lanes_count", r"did you mean tcp\.lanes\?"),
    ({"wg_udp_addr": "h:1"}, "tcp.wg_udp_addr", r"did you mean udp\.wg_udp_addr\?"),
    ({5: 1}, "tcp.5", r"keys must be strings"),
]


@pytest.mark.parametrize("tcp,key,pattern", TCP_ERRORS, ids=[k + "-" + str(i) for i, (_, k, _) in enumerate(TCP_ERRORS)])
def test_tcp_errors_in_a_mapping(pki: TestPki, tcp: dict[Any, Any], key: str, pattern: str) -> None:
    raw = client_dict(pki)
    raw["tcp"] = {"server_addr": "vpn.example.com:5443", **tcp}
    if raw["tcp"]["server_addr"] is None:
        del raw["tcp"]["server_addr"]
    expect_error(raw, key, pattern)


def test_zero_values_that_are_allowed(pki: TestPki) -> None:
    raw = client_dict(pki)
    raw["tcp"].update(sock_buf=0, session_linger_seconds=0, listen_addr="127.0.0.1:0")
    raw["metrics"] = {"listen_addr": "127.0.0.1:0"}
    raw["udp"] = {"listen_addr": "127.0.0.1:0"}
    cfg = load_config(raw)
    assert (cfg.tcp.sock_buf, cfg.tcp.session_linger_seconds) == (0, 0)


def test_missing_role_and_bad_role(pki: TestPki) -> None:
    expect_error({"tls": tls_section(pki)}, "role", r"missing required key: set role: client or role: server")
    expect_error({"role": "clinet", "tls": tls_section(pki)}, "role", r"got a string \('clinet'\); did you mean 'client'\?")
    expect_error({"role": True, "tls": tls_section(pki)}, "role", r"got a boolean")


@pytest.mark.parametrize("name", ["ca_cert", "cert", "key"])
def test_missing_tls_keys(pki: TestPki, name: str) -> None:
    raw = client_dict(pki)
    del raw["tls"][name]
    expect_error(raw, f"tls.{name}", r"missing required key for role client")
    raw = {"role": "server", "tls": tls_section(pki)}
    del raw["tls"][name]
    expect_error(raw, f"tls.{name}", r"missing required key for role server")


def test_tls_files_must_exist_and_be_files(pki: TestPki, tmp_path: Path) -> None:
    raw = client_dict(pki)
    raw["tls"]["cert"] = str(tmp_path / "gone.pem")
    expect_error(raw, "tls.cert", r"file not found: .*gone\.pem")
    raw["tls"]["cert"] = str(tmp_path)
    expect_error(raw, "tls.cert", r"is a directory")
    raw["tls"]["cert"] = ""
    expect_error(raw, "tls.cert", r"must be a file path")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_tls_file(pki: TestPki) -> None:
    raw = client_dict(pki)
    os.chmod(raw["tls"]["key"], 0)
    expect_error(raw, "tls.key", r"cannot read")


def test_metrics_port_conflicts_with_server_listen(pki: TestPki) -> None:
    raw: dict[str, Any] = {"role": "server", "tls": tls_section(pki),
                           "tcp": {"listen_addr": "0.0.0.0:5443"},
                           "metrics": {"listen_addr": "127.0.0.1:5443"}}
    expect_error(raw, "metrics.listen_addr", r"conflicts with tcp\.listen_addr \(127\.0\.0\.1:5443 vs 0\.0\.0\.0:5443\)")
    # Different hosts, neither a wildcard: fine. Disabled metrics: fine. A client: fine.
    raw["tcp"]["listen_addr"] = "10.0.0.1:5443"
    load_config(raw)
    raw["tcp"]["listen_addr"] = "127.0.0.1:5443"
    raw["metrics"]["enabled"] = False
    load_config(raw)
    raw["metrics"]["enabled"] = True
    raw["role"] = "client"
    raw["tcp"]["server_addr"] = "h:1"
    load_config(raw)
    # Port 0 twice is two different ephemeral ports.
    load_config({"role": "server", "tls": tls_section(pki), "tcp": {"listen_addr": "127.0.0.1:0"},
                 "metrics": {"listen_addr": "127.0.0.1:0"}})


# ------------------------------------------------------------ file problems


def test_file_missing(tmp_path: Path) -> None:
    expect_error(tmp_path / "nope.yaml", "", r"^file not found$")
    expect_error(str(tmp_path / "nope.yaml"), "", r"^file not found$")


def test_file_is_a_directory(tmp_path: Path) -> None:
    expect_error(tmp_path, "", r"is a directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_file_unreadable(tmp_path: Path) -> None:
    path = write(tmp_path, "role: client\n")
    os.chmod(path, 0)
    expect_error(path, "", r"cannot read")


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    expect_error(write(tmp_path, text), "", r"file is empty")


@pytest.mark.parametrize("text,what", [("- role: client\n", "a list"), ("just words\n", "a string"),
                                       ("42\n", "a whole number")])
def test_top_level_not_a_mapping(tmp_path: Path, text: str, what: str) -> None:
    expect_error(write(tmp_path, text), "", rf"top level must be a mapping .* got {what}")


def test_top_level_non_string_key(tmp_path: Path) -> None:
    expect_error(write(tmp_path, "role: client\n1: x\n"), "1", r"keys must be strings")


def test_yaml_syntax_error_has_line(tmp_path: Path) -> None:
    path = write(tmp_path, "role: client\ntcp:\n  lanes: 5\n   idle_seconds: 3\n")
    expect_error(path, "", r"YAML syntax error at line 4, column \d+: ")
    path = write(tmp_path, 'role: client\ntcp:\n  server_addr: "unterminated\n', "b.yaml")
    expect_error(path, "", r"YAML syntax error at line \d+")


def test_duplicate_keys_are_errors(pki: TestPki, tmp_path: Path) -> None:
    path = write(tmp_path, yaml_for(pki, extra="log:\n  level: info\nlog:\n  level: debug\n"))
    err = expect_error(path, "log", r"duplicate key at line \d+ \(first set at line \d+\)")
    assert "line" in err.problem
    path = write(tmp_path, "role: client\ntcp:\n  lanes: 1\n  lanes: 2\n", "b.yaml")
    expect_error(path, "tcp.lanes", r"duplicate key at line 4 \(first set at line 3\)")


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("role: client # caf\xe9\n".encode("latin-1"))
    expect_error(path, "", r"not UTF-8")


def test_load_config_rejects_other_types() -> None:
    with pytest.raises(TypeError):
        load_config(42)  # type: ignore[arg-type]


def test_config_error_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        load_config(tmp_path / "nope.yaml")


# ---------------------------------------------------------------- parse_addr


@pytest.mark.parametrize("text,expected", [
    ("example.com:5443", ("example.com", 5443)),
    ("1.2.3.4:5", ("1.2.3.4", 5)),
    ("[::1]:5443", ("::1", 5443)),
    ("[::]:0", ("::", 0)),
    ("localhost:0", ("localhost", 0)),
    (" 127.0.0.1:15000 ", ("127.0.0.1", 15000)),
])
def test_parse_addr_ok(text: str, expected: tuple[str, int]) -> None:
    assert parse_addr(text) == expected


@pytest.mark.parametrize("text", ["", "host", "host:", ":80", "::1:80", "[::1]80", "[::1", "[x]:1",
                                  "h:-1", "h:65536", "h:1.5", "h h:1", "h:٣"])
def test_parse_addr_bad(text: str) -> None:
    with pytest.raises(ValueError):
        parse_addr(text)


def test_parse_addr_port_zero_policy() -> None:
    assert parse_addr("h:0") == ("h", 0)
    with pytest.raises(ValueError, match="between 1 and 65535"):
        parse_addr("h:0", allow_port_zero=False)


# ---------------------------------------------------------------------- docs


def test_docs_cover_every_key() -> None:
    text = (ROOT / "docs" / "config.md").read_text()
    for section, keys in SCHEMA.items():
        for name in keys:
            assert f"`{section}.{name}`" in text, f"docs/config.md does not document {section}.{name}"
    assert "`role`" in text


def test_config_type_is_exported() -> None:
    import ut.config as mod

    assert mod.Config is Config
    assert set(mod.__all__) >= {"load_config", "Config", "ConfigError", "parse_addr"}


def test_unreadable_files_even_as_root(pki: TestPki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Permission errors name the file and key (simulated: root can read mode-0 files)."""
    import builtins

    real_open = builtins.open
    path = write(tmp_path, yaml_for(pki))
    denied = {str(path), tls_section(pki)["key"]}

    def fake_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if str(file) in denied:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    expect_error(path, "", r"cannot read: Permission denied")
    denied.discard(str(path))
    raw = client_dict(pki)
    expect_error(raw, "tls.key", r"cannot read .*: Permission denied")
