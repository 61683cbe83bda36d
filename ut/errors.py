"""Exceptions shared by the compiled fast path and its pure-Python twin.

Both implementations raise these very classes, so callers and tests catch one
type whichever implementation is active.
"""

from __future__ import annotations


class FrameError(ValueError):
    """A PDU stream is broken; the lane that carried it must be closed.

    ``reason`` is one of ``bad_magic``, ``bad_version``, ``too_long``,
    ``bad_type``, ``truncated`` (a fixed vocabulary, safe as a metric label).
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class ControlError(ValueError):
    """A CTRL payload does not parse. ``reason`` is a fixed word (metric-safe)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class ConfigError(ValueError):
    """Bad configuration. The message names the file and the dotted key."""

    def __init__(self, file: str, key: str, problem: str) -> None:
        super().__init__(f"{file}: {key}: {problem}" if key else f"{file}: {problem}")
        self.file = file
        self.key = key
        self.problem = problem
