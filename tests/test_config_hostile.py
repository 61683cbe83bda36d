"""Hostile configuration files: whatever the file holds, ``load_config`` answers
with one short ``ConfigError`` naming the file (and the key where there is one),
quickly, never with a traceback, a hang or a memory blow-up (issue 19, point 6)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ut.config import MAX_CONFIG_BYTES, MAX_DEPTH, load_config
from ut.errors import ConfigError

#: The longest message any of these inputs may produce.
MESSAGE_MAX = 600

BASE = {
    "role": "client",
    "tcp": {"server_addr": "vpn.example.com:5443"},
    "tls": {"ca_cert": "ca.pem", "cert": "home.pem", "key": "home.key"},
}


def write(tmp_path: Path, data: str | bytes, name: str = "ut.yaml") -> Path:
    path = tmp_path / name
    if isinstance(data, str):
        data = data.encode()
    path.write_bytes(data)
    return path


def refused(path: str | os.PathLike[str], key: str | None = None, match: str = "",
            *, check_files: bool = False) -> ConfigError:
    """Load ``path``; it must fail with a short ConfigError, within two seconds."""
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as info:
        load_config(path, check_files=check_files)
    elapsed = time.monotonic() - t0
    err = info.value
    assert elapsed < 2.0, (elapsed, str(err)[:200])
    assert err.file == os.fspath(path)
    assert str(err).startswith(os.fspath(path) + ": ")
    assert len(str(err)) < MESSAGE_MAX, str(err)[:MESSAGE_MAX]
    if key is not None:
        assert err.key == key, str(err)
    assert match in err.problem, str(err)
    return err


def config_with(**tcp: Any) -> str:
    raw = {**BASE, "tcp": {**BASE["tcp"], **tcp}}
    return yaml.safe_dump(raw)


# ----------------------------------------------------------------- file size


def test_dev_zero_is_refused_quickly() -> None:
    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero")
    refused("/dev/zero", "", f"larger than {MAX_CONFIG_BYTES // 1024} KiB")


def test_huge_file_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "role: client\n" + "# padding\n" * (MAX_CONFIG_BYTES // 10 + 10))
    refused(path, "", "larger than")


def test_file_just_under_the_cap_is_read(tmp_path: Path) -> None:
    text = config_with()
    text += "#" * (MAX_CONFIG_BYTES - len(text) - 1) + "\n"
    cfg = load_config(write(tmp_path, text), check_files=False)
    assert cfg.role == "client"


@pytest.mark.parametrize("text", [
    "a: [" + "1," * (MAX_CONFIG_BYTES // 2 - 10) + "]\n",
    "".join(f"k{i}: 1\n" for i in range(MAX_CONFIG_BYTES // 10)),
    "a: {" + "".join(f"k{i}: 1," for i in range(MAX_CONFIG_BYTES // 8)) + "}\n",
])
def test_worst_file_under_the_cap_is_quick(tmp_path: Path, text: str) -> None:
    text = text[:MAX_CONFIG_BYTES - 3] + "]\n" if len(text) > MAX_CONFIG_BYTES else text
    refused(write(tmp_path, text), None)


def test_nul_in_the_config_path(tmp_path: Path) -> None:
    refused(str(tmp_path / "a\0b.yaml"), "", "cannot read")


# ------------------------------------------------------- anchors and aliases


BILLION_LAUGHS = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


def test_billion_laughs_is_refused(tmp_path: Path) -> None:
    refused(write(tmp_path, BILLION_LAUGHS), "", "not allowed in a configuration")


def test_billion_laughs_of_mappings_is_refused(tmp_path: Path) -> None:
    # The duplicate-key check used to walk every alias: refuse before it runs.
    lines = ["role: client", "l0: &l0 {x: 1, y: 2}"]
    for n in range(1, 40):
        lines.append(f"l{n}: &l{n} {{a: *l{n - 1}, b: *l{n - 1}}}")
    refused(write(tmp_path, "\n".join(lines) + "\n"), "", "not allowed")


def test_self_referencing_alias_is_refused(tmp_path: Path) -> None:
    refused(write(tmp_path, "a: &a [*a]\n"), "", "not allowed in a configuration")


def test_alias_without_anchor_is_refused(tmp_path: Path) -> None:
    refused(write(tmp_path, "role: *r\n"), "", "YAML alias *r at line 1, column 7: ")


def test_merge_key_alias_is_refused(tmp_path: Path) -> None:
    text = "base: &base {lanes: 2}\nrole: client\ntcp:\n  <<: *base\n"
    refused(write(tmp_path, text), "", "not allowed in a configuration")


def test_anchor_on_a_scalar_is_refused(tmp_path: Path) -> None:
    refused(write(tmp_path, "role: &r client\n"), "", "YAML anchor &r at line 1, column 7: anchors and aliases are not allowed")


# -------------------------------------------------------------------- nesting


@pytest.mark.parametrize("text", [
    "[" * 100_000 + "]" * 100_000,
    "{a: " * 50_000 + "1" + "}" * 50_000,
    "".join(f"{'  ' * n}a:\n" for n in range(200)),
    "- " * 5000 + "x\n",
])
def test_deep_nesting_is_refused(tmp_path: Path, text: str) -> None:
    refused(write(tmp_path, text), "")


def test_nesting_limit(tmp_path: Path) -> None:
    ok = "[" * MAX_DEPTH + "]" * MAX_DEPTH
    refused(write(tmp_path, ok), "", "top level must be a mapping")
    deep = "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1)
    refused(write(tmp_path, deep), "", f"nested more than {MAX_DEPTH} levels deep")


# ------------------------------------------------------ values YAML can't convert


def test_integer_over_the_digit_limit(tmp_path: Path) -> None:
    refused(write(tmp_path, config_with() + "queue:\n  max_packets: " + "9" * 5000 + "\n"), "",
            "cannot be read")


def test_impossible_timestamp(tmp_path: Path) -> None:
    refused(write(tmp_path, "role: 2024-13-45\n"), "", "cannot be read")


@pytest.mark.parametrize("text", [
    "role: !!python/object:os.system x\n",
    "role: !!binary 'a'\n",
    "? [a, b]\n: 1\n",
    "role: client\n---\nrole: server\n",
    "role: !" + "t" * 100_000 + " x\n",
    "role: \"\\x\"\n",
    "\0",
    "role: client\t\ttcp",
    "!!int",
    "role: !!float ''\n",
])
def test_yaml_library_errors(tmp_path: Path, text: str) -> None:
    refused(write(tmp_path, text), "")


def test_huge_integers_in_range_checks(tmp_path: Path) -> None:
    big = "9" * 400
    refused(write(tmp_path, config_with(lanes=int(big))), "tcp.lanes", "between 1 and 64")
    refused(write(tmp_path, config_with(idle_seconds=int(big))), "tcp.idle_seconds", "finite")
    refused(write(tmp_path, config_with(tcp_buf=int(big))), "tcp.tcp_buf", "between")
    refused(write(tmp_path, config_with(sock_buf=int(big))), "tcp.sock_buf", "between")
    err = refused(write(tmp_path, config_with(idle_seconds=1e300)), "tcp.idle_seconds", "between")
    assert "characters)" in err.problem


def test_huge_integers_in_a_mapping() -> None:
    raw = {**BASE, "tcp": {**BASE["tcp"], "lanes": 10 ** 10_000}}
    with pytest.raises(ConfigError, match=r"tcp\.lanes: must be between 1 and 64, got a whole number of"):
        load_config(raw, check_files=False)
    raw = {**BASE, "tcp": {**BASE["tcp"], "idle_seconds": 10 ** 10_000}}
    with pytest.raises(ConfigError, match=r"tcp\.idle_seconds: must be a finite number"):
        load_config(raw, check_files=False)


# ------------------------------------------------------------ short messages


LONG = "x" * 50_000  # a file holds at most MAX_CONFIG_BYTES
_LONG_CASES: list[tuple[str, str]] = []


def long_cases() -> list[tuple[str, str]]:
    if _LONG_CASES:
        return _LONG_CASES
    _LONG_CASES[:] = [
        (yaml.safe_dump({**BASE, "role": LONG}), "role"),
        (config_with(lane_pick=LONG), "tcp.lane_pick"),
        (config_with(server_addr=LONG), "tcp.server_addr"),
        (config_with(server_addr=LONG[:200] + ":5443"), "tcp.server_addr"),
        (config_with(lanes=LONG), "tcp.lanes"),
        (config_with(idle_seconds="1" * 50_000), "tcp.idle_seconds"),
        (config_with(**{LONG: 1}), "tcp." + LONG[:60] + "… (50000 characters)"),
        (yaml.safe_dump({**BASE, LONG: 1}), LONG[:60] + "… (50000 characters)"),
        (yaml.safe_dump({**BASE, "metrics": {"path": LONG}}), "metrics.path"),
        (yaml.safe_dump({**BASE, "metrics": {"path": "/" + LONG + " "}}), "metrics.path"),
        (yaml.safe_dump({**BASE, "tls": {**BASE["tls"], "server_name": LONG + "!"}}), "tls.server_name"),
        (yaml.safe_dump({**BASE, "tls": {**BASE["tls"], "alpn": [LONG]}}), "tls.alpn"),
        (yaml.safe_dump({**BASE, "tls": {**BASE["tls"], "alpn": ["a" * 200] * 2}}), "tls.alpn"),
        (yaml.safe_dump({**BASE, "log": {"level": LONG}}), "log.level"),
        (yaml.safe_dump({**BASE, "log": LONG}), "log"),
    ]
    return _LONG_CASES


@pytest.mark.parametrize("case", range(15))
def test_long_values_are_quoted_short(tmp_path: Path, case: int) -> None:
    text, key = long_cases()[case]
    err = refused(write(tmp_path, text), key)
    assert LONG[:200] not in str(err)
    # The same, given as a mapping (no size cap there): the message is as short.
    with pytest.raises(ConfigError) as info:
        load_config(yaml.safe_load(text), check_files=False)
    assert info.value.key == key and len(str(info.value)) < MESSAGE_MAX


def test_long_tls_path_is_quoted_short(tmp_path: Path) -> None:
    write(tmp_path, "", "ca.pem")
    text = yaml.safe_dump({**BASE, "tls": {**BASE["tls"], "cert": "/" + "d" * 50_000}})
    err = refused(write(tmp_path, text), "tls.cert", check_files=True)
    assert "characters)" in err.problem


def test_nul_in_a_tls_path(tmp_path: Path) -> None:
    write(tmp_path, "", "ca.pem")
    text = config_with().replace("home.pem", '"home\\0.pem"')
    refused(write(tmp_path, text), "tls.cert", "not a usable file path", check_files=True)


# --------------------------------------------------------------- timer ranges


@pytest.mark.parametrize("key, value, match", [
    ("idle_seconds", 1e-300, "between 1 and 86400"),
    ("idle_seconds", 0.5, "between 1 and 86400, got 0.5"),
    ("idle_seconds", 86401, "between 1 and 86400, got 86401"),
    ("dial_backoff_min_seconds", 1e-6, "between 0.01 and 86400, got 1e-06"),
    ("dial_backoff_max_seconds", 0.001, "between 0.01 and 86400"),
    ("dial_backoff_max_seconds", 1e9, "between 0.01 and 86400"),
    ("connect_timeout_seconds", 0.01, "between 0.1 and 86400"),
    ("hello_timeout_seconds", 0.05, "between 0.1 and 86400"),
    ("hello_timeout_seconds", 1e6, "between 0.1 and 86400"),
])
def test_timers_that_only_spin_are_refused(tmp_path: Path, key: str, value: float, match: str) -> None:
    refused(write(tmp_path, config_with(**{key: value})), f"tcp.{key}", match)


def test_linger_zero_and_timer_floors_are_allowed(tmp_path: Path) -> None:
    text = config_with(idle_seconds=1, dial_backoff_min_seconds=0.01, dial_backoff_max_seconds=0.01,
                       connect_timeout_seconds=0.1, hello_timeout_seconds=0.1,
                       session_linger_seconds=0)
    cfg = load_config(write(tmp_path, text), check_files=False)
    assert (cfg.tcp.idle_seconds, cfg.tcp.dial_backoff_min_seconds, cfg.tcp.session_linger_seconds) == (1, 0.01, 0)
    cfg = load_config(write(tmp_path, config_with(idle_seconds=86400, session_linger_seconds=86400)),
                      check_files=False)
    assert cfg.tcp.idle_seconds == 86400


# ------------------------------------------------------------------- fuzzing


FUZZ = settings(max_examples=200, deadline=2000,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

scalars = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40)
           | st.sampled_from(["client", "server", "h:1", "127.0.0.1:0", "/metrics", "rr", "info"]))
structures = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=12) | st.sampled_from(["role", "tcp", "udp", "tls", "lanes"]),
                      children, max_size=5),
    max_leaves=30,
)


def only_config_errors(path: Path) -> None:
    t0 = time.monotonic()
    try:
        load_config(path, check_files=False)
    except ConfigError as err:
        assert err.file == str(path)
        assert len(str(err)) < MESSAGE_MAX
    assert time.monotonic() - t0 < 2.0


@FUZZ
@given(data=st.binary(max_size=300))
def test_fuzz_bytes(tmp_path: Path, data: bytes) -> None:
    only_config_errors(write(tmp_path, data))


@FUZZ
@given(text=st.text(max_size=300)
       | st.lists(st.sampled_from(["role:", " client", "\n", "  ", "tcp:", "- ", "[", "]", "{", "}",
                                   "&a ", "*a ", "!!int ", "!!binary ", "? ", ": ", ",", "'", '"',
                                   "<<: ", "9" * 5000, "lanes: ", "#", "---\n", "%YAML 1.1\n"]),
                  max_size=60).map("".join))
def test_fuzz_text(tmp_path: Path, text: str) -> None:
    only_config_errors(write(tmp_path, text))


@FUZZ
@given(doc=structures)
def test_fuzz_yaml_structures(tmp_path: Path, doc: Any) -> None:
    only_config_errors(write(tmp_path, yaml.safe_dump(doc)))


@FUZZ
@given(section=st.sampled_from(["role", "tcp", "udp", "queue", "metrics", "tls", "shaping", "log"]),
       key=st.sampled_from(["lanes", "idle_seconds", "server_addr", "listen_addr", "path", "alpn",
                            "server_name", "level", "cert", "max_bytes", "coalesce_ms", "enabled",
                            "lane_pick", "dial_backoff_min_seconds", "x"]),
       value=structures)
def test_fuzz_near_valid_configs(tmp_path: Path, section: str, key: str, value: Any) -> None:
    raw: dict[str, Any] = {k: dict(v) if isinstance(v, dict) else v for k, v in BASE.items()}
    if section == "role":
        raw["role"] = value
    else:
        raw.setdefault(section, {})[key] = value
    only_config_errors(write(tmp_path, yaml.safe_dump(raw)))
