"""JSON-lines logging on the standard ``logging`` module.

Every record the tunnel writes is an *event*: ``event(name, **fields)``. The
formatter writes one JSON object per line: ``ts`` and ``level``, then the
spec's keys ``event, role, client_cn, session_id, lane_id, err`` (always
present, ``null`` where they do not apply, so every line has the same shape),
then the event's other fields.

Payload bytes and key material are never logged, by rule: callers pass sizes
and counts. The formatter enforces the rule where it can: a ``bytes``-like
value becomes ``"<N bytes>"`` and fields named like secrets are redacted.

Levels: ``info`` by default, from config ``log.level``; the environment
variable ``UT_LOG_LEVEL`` overrides the config so a person can turn on
``debug`` without editing the file (``setup_logging``). Events that can repeat per datagram go
through ``Debounced`` so the log carries one line per window with a count.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from typing import Any

LOGGER_NAME = "ut"
logger = logging.getLogger(LOGGER_NAME)

# The spec's keys (SPEC.md "Log events"): on every line, null when not applicable.
REQUIRED_KEYS: tuple[str, ...] = ("event", "role", "client_cn", "session_id", "lane_id", "err")
LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
LEVEL_ENV = "UT_LOG_LEVEL"
# Field names whose values are never written, whatever they hold.
SECRET_FIELDS = frozenset({"payload", "private_key", "key_material", "secret", "password", "psk"})


def _plain(value: Any) -> Any:
    """JSON ``default=``: sizes for bytes, ``Type: message`` for exceptions."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    if isinstance(value, BaseException):
        return _err_text(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


def _err_text(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, the spec's keys, then the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
        }
        fields = getattr(record, "ut", None)
        if fields is None:
            fields = {"event": "message", "msg": record.getMessage()}
        for key in REQUIRED_KEYS:
            out[key] = fields.get(key)
        for key, value in fields.items():
            if key in SECRET_FIELDS:
                out[key] = "[redacted]"
            elif isinstance(value, (bytes, bytearray, memoryview)):
                out[key] = f"<{len(value)} bytes>"
            elif key not in out or key in REQUIRED_KEYS:
                out[key] = value
        if isinstance(out["err"], BaseException):
            out["err"] = _err_text(out["err"])
        if record.exc_info and record.exc_info[1] is not None:
            if out["err"] is None:
                out["err"] = _err_text(record.exc_info[1])
            out["traceback"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        return json.dumps(out, default=_plain, separators=(",", ":"))


def event(name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log the event ``name`` with ``fields`` (no payload bytes, no key material).

    Example::

        event("lane_open", role="client", client_cn="home", session_id="00ab", lane_id=2)
    """
    if logger.isEnabledFor(level):
        logger.log(level, name, extra={"ut": {"event": name, **fields}})


def level_number(word: str, source: str = "log.level") -> int:
    """``"debug"`` -> ``logging.DEBUG``; ``ValueError`` naming ``source`` otherwise."""
    try:
        return LEVELS[word.strip().lower()]
    except KeyError:
        names = ", ".join(k for k in LEVELS if k != "warn")
        raise ValueError(f"{source}: {word!r} is not a log level ({names})") from None


def setup_logging(level: str | None = None, stream: Any = None) -> int:
    """Send ``ut`` events to ``stream`` (stderr) as JSON lines; return the level.

    ``level`` comes from config ``log.level`` (a wrong word raises ``ValueError``).
    The environment variable ``UT_LOG_LEVEL`` overrides it; a wrong word there
    is reported in a ``log_level_invalid`` warning line and ignored, so a typo in
    the environment never stops a tunnel. Calling this again replaces the handler
    it installed before (never anyone else's).
    """
    resolved = level_number(level or "info")
    env = os.environ.get(LEVEL_ENV, "").strip()
    bad_env = None
    if env:
        try:
            resolved = level_number(env, LEVEL_ENV)
        except ValueError as exc:
            bad_env = str(exc)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    for h in list(logger.handlers):
        if getattr(h, "_ut_handler", False):
            logger.removeHandler(h)
    handler._ut_handler = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(resolved)
    logger.propagate = False
    if bad_env:
        event("log_level_invalid", logging.WARNING, err=bad_env,
              using=logging.getLevelName(resolved).lower())
    return resolved


class Debounced:
    """Counts occurrences and lets one log line through per ``window_seconds``.

    ``hit(n)`` adds ``n``; it returns the count accumulated since the last line
    when a line is due (and resets it), else 0. The first hit is always due, so
    the first occurrence is logged at once. ``flush()`` returns what is left
    (call it when the thing that counts goes away, so no count is lost).

    Example::

        drops = Debounced(5.0)
        due = drops.hit(n)
        if due:
            event("queue_drop_oldest", logging.WARNING, dropped=due)
    """

    __slots__ = ("window_seconds", "_pending", "_last", "_clock")

    def __init__(self, window_seconds: float = 5.0, clock: Any = time.monotonic) -> None:
        self.window_seconds = window_seconds
        self._pending = 0
        self._last = float("-inf")
        self._clock = clock

    @property
    def pending(self) -> int:
        """Occurrences counted but not yet reported."""
        return self._pending

    def hit(self, n: int = 1) -> int:
        self._pending += n
        now = self._clock()
        if now - self._last >= self.window_seconds:
            self._last = now
            n, self._pending = self._pending, 0
            return n
        return 0

    def flush(self) -> int:
        n, self._pending = self._pending, 0
        return n
