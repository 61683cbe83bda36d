"""JSON-lines logging on the standard ``logging`` module.

Every record the tunnel writes is an *event*: ``event(name, **fields)``. The
formatter puts the spec's keys (``event, role, client_cn, session_id, lane_id,
err``) and any other fields into one JSON object per line. Payload bytes and
key material are never passed here, by rule: callers pass sizes and counts.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

LOGGER_NAME = "ut"
logger = logging.getLogger(LOGGER_NAME)

_STD_ATTRS = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, event, then the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
        }
        fields = getattr(record, "ut", None)
        if fields is not None:
            out.update(fields)
        else:
            out["event"] = "message"
            out["msg"] = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None and "err" not in out:
            out["err"] = repr(record.exc_info[1])
        return json.dumps(out, default=str, separators=(",", ":"))


def event(name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log the event ``name`` with ``fields`` (no payload bytes, no key material)."""
    if logger.isEnabledFor(level):
        logger.log(level, name, extra={"ut": {"event": name, **fields}})


def setup_logging(level: str | None = None, stream: Any = None) -> None:
    """Send ``ut`` events to ``stream`` (stderr) as JSON lines.

    ``level`` comes from config ``log.level``; the environment variable
    ``UT_LOG_LEVEL`` overrides it so a person can turn on ``debug`` without
    editing the file.
    """
    name = (os.environ.get("UT_LOG_LEVEL") or level or "info").upper()
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    for h in list(logger.handlers):
        if getattr(h, "_ut_handler", False):
            logger.removeHandler(h)
    handler._ut_handler = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(getattr(logging, name, logging.INFO))
    logger.propagate = False


class Debounced:
    """Counts occurrences and lets one log line through per ``window_seconds``.

    ``hit(n)`` adds ``n``; it returns the count accumulated since the last line
    when a line is due (and resets it), else 0. ``flush()`` returns what is left.
    """

    __slots__ = ("window_seconds", "_pending", "_last", "_clock")

    def __init__(self, window_seconds: float = 5.0, clock: Any = time.monotonic) -> None:
        self.window_seconds = window_seconds
        self._pending = 0
        self._last = float("-inf")
        self._clock = clock

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
