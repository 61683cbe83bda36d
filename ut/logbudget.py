"""A budget of log lines for events that come by the thousand in a mass event.

Theory of operation (issue 19, point 4): a server's per-lane and per-session lines
(``lane_open``, ``lane_close``, ``session_open``, ``session_close``) are one each in
normal life; when 5,000 lanes are reset at once or a server with 5,000 sessions stops,
they are 10,000 lines in one loop pass: tens of microseconds each in ``logging`` before
any output, hundreds of milliseconds of stalled event loop in all, and a log nobody
reads line by line. ``LineBudget`` lets ``burst`` such lines through per ``window``
seconds; the rest are only counted, by event and reason, and reported in one
``log_summary`` line when the window ends. Normal life never meets the budget, so every
line is written as before.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from .logs import event

__all__ = ["LineBudget"]


class LineBudget:
    """At most ``burst`` lines per ``window`` seconds go out; the others are summarised.

    ``allow(name, reason)`` says whether a line may be written; when it may not, the
    line is counted under ``"name:reason"`` and the count is logged as ``log_summary``
    (``suppressed``: counts by event and reason) once the window has ended.

    >>> budget = LineBudget(burst=2, window=1.0, role="server")
    >>> [budget.allow("lane_close", "peer_closed") for _ in range(3)]
    [True, True, False]
    >>> budget.suppressed
    {'lane_close:peer_closed': 1}
    """

    __slots__ = ("burst", "window", "role", "_start", "_used", "suppressed", "_timer", "_clock")

    def __init__(self, burst: int, window: float, role: str, clock: Any = time.monotonic) -> None:
        self.burst = burst
        self.window = window
        self.role = role
        self._clock = clock
        self._start = float("-inf")
        self._used = 0
        self.suppressed: dict[str, int] = {}
        self._timer: asyncio.TimerHandle | None = None

    def allow(self, name: str, reason: str | None = None) -> bool:
        now = self._clock()
        if now - self._start >= self.window:
            self._start, self._used = now, 0
        if self._used < self.burst:
            self._used += 1
            return True
        key = f"{name}:{reason}" if reason else name
        self.suppressed[key] = self.suppressed.get(key, 0) + 1
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (a test): summarised by the next flush()
                return False
            self._timer = loop.call_later(self.window, self.flush)
        return False

    def flush(self) -> None:
        """Log what was suppressed (if anything) as one ``log_summary`` line."""
        self._timer = None
        if self.suppressed:
            total = sum(self.suppressed.values())
            suppressed, self.suppressed = self.suppressed, {}
            event("log_summary", logging.INFO, role=self.role, lines=total,
                  window_seconds=self.window, suppressed=suppressed)

    def close(self) -> None:
        """Flush now and forget the timer (the server is stopping)."""
        if self._timer is not None:
            self._timer.cancel()
        self.flush()
