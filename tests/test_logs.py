"""JSON-lines logging: every line parses, carries the spec's keys, never carries
payload bytes; the level comes from config and ``UT_LOG_LEVEL``; ``Debounced``
lets one line per window through without losing a count."""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest

import ut
from ut.logs import (
    LEVEL_ENV,
    LOGGER_NAME,
    REQUIRED_KEYS,
    Debounced,
    event,
    level_number,
    setup_logging,
)

ROOT = Path(__file__).resolve().parent.parent
# Issue 4 / SPEC.md "Log events": events the tunnel must write.
REQUIRED_EVENTS = (
    "tls_handshake_fail", "lane_open", "lane_close", "queue_drop_oldest", "pdu_too_large",
    "session_open", "session_close", "start",
)


@pytest.fixture
def log(monkeypatch: pytest.MonkeyPatch) -> Any:
    """``log(level=None) -> read()``: set up JSON logging into a buffer; restore after."""
    monkeypatch.delenv(LEVEL_ENV, raising=False)
    logger = logging.getLogger(LOGGER_NAME)
    saved = (list(logger.handlers), logger.level, logger.propagate)
    buf = io.StringIO()

    def setup(level: str | None = None) -> Any:
        setup_logging(level, stream=buf)

        def read() -> list[dict[str, Any]]:
            return [json.loads(line) for line in buf.getvalue().splitlines()]

        return read

    yield setup
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


def test_lines_are_json_with_the_spec_keys(log: Any) -> None:
    read = log()
    event("lane_open", role="client", client_cn="home", session_id="00ab", lane_id=2,
          peer="10.0.0.1:5443")
    event("start", version="0.1.0", config={"lanes": 5, "addrs": ("a", "b")})
    logging.getLogger(LOGGER_NAME).info("plain %s", "message")
    lines = read()
    assert len(lines) == 3
    for line in lines:
        assert list(line)[:2] == ["ts", "level"]
        assert list(line)[2:2 + len(REQUIRED_KEYS)] == list(REQUIRED_KEYS)
        assert isinstance(line["ts"], float)
    first, second, third = lines
    assert first == {
        "ts": first["ts"], "level": "info", "event": "lane_open", "role": "client",
        "client_cn": "home", "session_id": "00ab", "lane_id": 2, "err": None,
        "peer": "10.0.0.1:5443",
    }
    assert second["role"] is None and second["config"] == {"lanes": 5, "addrs": ["a", "b"]}
    assert third["event"] == "message" and third["msg"] == "plain message"


def test_no_payload_bytes_and_no_secrets(log: Any) -> None:
    read = log()
    secret = b"\x00WIREGUARD-PAYLOAD\xff" * 3
    event("pdu_too_large", role="client", payload=secret, data=secret,
          nested={"d": bytearray(7), "m": memoryview(b"abc")}, private_key="-----BEGIN",
          psk="hunter2")
    (line,) = read()
    text = json.dumps(line)
    assert "WIREGUARD" not in text and "BEGIN" not in text and "hunter2" not in text
    assert line["payload"] == "[redacted]"
    assert line["data"] == f"<{len(secret)} bytes>"
    assert line["nested"] == {"d": "<7 bytes>", "m": "<3 bytes>"}
    assert line["private_key"] == "[redacted]" and line["psk"] == "[redacted]"


def test_errors_and_tracebacks(log: Any) -> None:
    read = log()
    event("lane_close", logging.WARNING, role="server", err=ConnectionResetError(104, "reset"))
    event("udp_error", logging.WARNING, err=TimeoutError())
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger(LOGGER_NAME).exception("crashed")
    a, b, c = read()
    assert a["level"] == "warning" and a["err"] == "ConnectionResetError: [Errno 104] reset"
    assert b["err"] == "TimeoutError"
    assert c["level"] == "error" and c["err"] == "ValueError: boom"
    assert "Traceback" in c["traceback"] and "boom" in c["traceback"]


def test_info_by_default_debug_from_config(log: Any) -> None:
    read = log()
    event("quiet", logging.DEBUG)
    event("loud")
    assert [x["event"] for x in read()] == ["loud"]
    read = log("debug")
    event("quiet", logging.DEBUG)
    assert read()[-1]["event"] == "quiet" and read()[-1]["level"] == "debug"
    read = log("WARNING")
    event("info_line")
    event("warn_line", logging.WARNING)
    assert read()[-1]["event"] == "warn_line"
    assert "info_line" not in [x["event"] for x in read()]


def test_env_overrides_config(log: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LEVEL_ENV, "debug")
    read = log("error")
    event("dbg", logging.DEBUG)
    assert [x["event"] for x in read()] == ["dbg"]
    monkeypatch.setenv(LEVEL_ENV, "error")
    read = log("debug")
    event("warn_line", logging.WARNING)
    event("err_line", logging.ERROR)
    assert [x["event"] for x in read()][-1] == "err_line"
    assert "warn_line" not in [x["event"] for x in read()]


def test_bad_levels(log: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"log\.level: 'loud' is not a log level"):
        setup_logging("loud", stream=io.StringIO())
    # A typo in the environment is reported and ignored: the config's level holds.
    monkeypatch.setenv(LEVEL_ENV, "verbose")
    read = log("warning")
    event("info_line")
    (line,) = read()
    assert line["event"] == "log_level_invalid" and line["level"] == "warning"
    assert line["using"] == "warning"
    assert "UT_LOG_LEVEL: 'verbose'" in line["err"]
    assert level_number("Warn") == logging.WARNING


def test_setup_twice_keeps_one_handler_and_foreign_handlers(log: Any) -> None:
    logger = logging.getLogger(LOGGER_NAME)
    foreign = logging.NullHandler()
    logger.addHandler(foreign)
    log()
    read = log()
    event("once")
    assert [x["event"] for x in read()] == ["once"]
    assert foreign in logger.handlers
    assert sum(getattr(h, "_ut_handler", False) for h in logger.handlers) == 1
    logger.removeHandler(foreign)


def test_debounced_one_line_per_window() -> None:
    now = [100.0]
    d = Debounced(5.0, clock=lambda: now[0])
    assert d.hit() == 1  # the first occurrence is reported at once
    assert d.hit(3) == 0 and d.hit() == 0
    assert d.pending == 4
    now[0] += 4.9
    assert d.hit() == 0
    now[0] += 0.1  # a full window since the last line
    assert d.hit(2) == 7
    assert d.pending == 0
    now[0] += 1
    assert d.hit(5) == 0
    assert d.flush() == 5 and d.flush() == 0


def test_debounced_loses_no_count() -> None:
    """A burst of 10,000 drops over 12 s: 3 lines, and lines + flush add up exactly."""
    now = [0.0]
    d = Debounced(5.0, clock=lambda: now[0])
    lines = []
    for i in range(10_000):
        now[0] = i * 0.0012
        n = d.hit()
        if n:
            lines.append(n)
    assert len(lines) == 3
    assert sum(lines) + d.flush() == 10_000


def test_required_events_are_written_somewhere() -> None:
    """Every event the spec and issue 4 require is logged by some module of the package."""
    source = "\n".join(p.read_text() for p in Path(ut.__file__).parent.glob("*.py") if p.name != "logs.py")
    missing = [e for e in REQUIRED_EVENTS if not re.search(rf"""["']{e}["']""", source)]
    assert not missing, f"events never logged: {missing}"
