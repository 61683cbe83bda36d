"""The process-wide budget of queued bytes, and whose datagrams go when it is reached.

Theory of operation (issue 19, "Memory budget"): every server session's queue counts
its payload bytes towards one ``fastpath.QueueBudget`` (``limits.queue_budget_bytes``).
Each queue keeps its own limits (``queue.max_packets`` / ``queue.max_bytes``), so one
session alone never holds more than those; the budget bounds what many sessions hold
together: 200 sessions whose clients stopped reading held 793-994 MiB before it.

When a push leaves the budget exceeded, ``shed`` brings it back under a low-water mark
(``SHED_TO`` of the budget: the scan over the queues is paid once per eighth of the
budget of new traffic, not once per datagram) by dropping the oldest datagrams of the
*longest* queues first ("longest queue drop", as shared-buffer switches do): the
sessions that hold the most give back down to a common level, and a session holding
little loses nothing. Whoever pushed, a light session never pays for a heavy one. What
is dropped is counted under the drop reason ``budget`` of the session it came from.

The budget is a soft bound by at most one batch of datagrams read from one UDP socket
(shedding runs after a batch is queued). Queues not yet full are never touched while
the total is under the budget.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["SHED_TO", "shed", "water_level"]

#: After a shed, the queues hold at most this fraction of the budget.
SHED_TO = 0.875


def water_level(sizes: list[int], excess: int) -> int:
    """The level L such that trimming every size above L down to L frees at least
    ``excess`` bytes, as high as possible (so the fewest, largest queues give).

    >>> water_level([100, 50, 10], 60)   # 100 -> 45, 50 -> 45: 60 freed
    45
    >>> water_level([100, 50, 10], 500)  # everything
    0
    """
    if excess <= 0:
        return max(sizes, default=0)
    ordered = sorted(sizes, reverse=True)
    total = 0
    for k, size in enumerate(ordered, 1):
        total += size
        below = ordered[k] if k < len(ordered) else 0
        # Trimming the k largest down to `below` frees total - k * below.
        if total - k * below >= excess:
            return max(below, (total - excess) // k)
    return 0


def shed(budget: Any, sessions: Iterable[Any], target: int | None = None) -> list[tuple[Any, int]]:
    """Drop the oldest datagrams of the longest queues until ``budget.nbytes`` is at most
    ``target`` (default ``SHED_TO`` × ``budget.max_bytes``). ``sessions`` are objects
    with a ``queue`` (a ``RingQueue`` on ``budget``). Returns ``[(session, dropped)]`` for
    the sessions that lost datagrams; the caller counts them (reason ``budget``)."""
    if target is None:
        target = int(budget.max_bytes * SHED_TO)
    excess = budget.nbytes - target
    if excess <= 0:
        return []
    held = [s for s in sessions if s.queue.nbytes]
    level = water_level([s.queue.nbytes for s in held], excess)
    out = []
    for s in held:
        if s.queue.nbytes > level:
            n = s.queue.shrink_to(level)
            if n:
                out.append((s, n))
    return out
