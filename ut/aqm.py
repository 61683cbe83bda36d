"""CoDel queue management for a session queue (RFC 8289), sans I/O.

Why: WireGuard's inner TCP fills whatever queue sits in front of the slowest link. Over
UDP that queue is a router's, which drops when it is full, and the inner TCP slows
down. Over TCP lanes nothing is dropped on the path: a saturated uplink's backlog piles
up in the tunnel (the lanes' buffers, then the session queue) and every packet, a ping
or an SSH keystroke too, waits behind it (issue 14: loaded ping 3.5-5.4 x a direct
WireGuard's on a 20 Mbit/s uplink). The session keeps that backlog in its own queue,
where each datagram's arrival time is known (``Session.cap_lanes``), and this
object decides, each time the queue's head is about to leave, whether to drop it.

CoDel rather than a fixed age bound because a lane's loss repair stalls it for about
a round trip: a transient queue that a fixed 20 ms bound turned into drops (and a CUBIC
transfer into a fraction of itself), CoDel lets through. It drops only once the
queueing delay has stayed above ``target`` for a whole ``interval``, then more often
(``interval / sqrt(count)``) until the delay is below target again: a standing queue
is drained, a burst is not punished.
"""

from __future__ import annotations

import math

__all__ = ["CoDel", "CODEL_TARGET_SECONDS", "CODEL_INTERVAL_SECONDS"]

CODEL_TARGET_SECONDS = 0.005  # RFC 8289's defaults: 5 ms of standing delay ...
CODEL_INTERVAL_SECONDS = 0.1  # ... over 100 ms, about a worst-case round trip
# A queue holding at most this many bytes is never dropped from: one datagram waiting
# is not a standing queue (RFC 8289's MAXPACKET; a WireGuard datagram is at most this).
CODEL_MIN_BACKLOG_BYTES = 1500


class CoDel:
    """The CoDel state of one queue. Call ``drop_head`` with the head's sojourn time
    before taking it; while it answers True, drop the head and ask again."""

    __slots__ = ("target", "interval", "dropping", "count", "drops",
                 "_first_above", "_drop_next", "_last_count")

    def __init__(self, target: float = CODEL_TARGET_SECONDS,
                 interval: float = CODEL_INTERVAL_SECONDS) -> None:
        self.target = target
        self.interval = interval
        self.dropping = False  # in the dropping state (drops due every drop interval)
        self.count = 0  # drops since the dropping state began (sets the drop rate)
        self.drops = 0  # every drop this object has asked for
        self._first_above = 0.0  # when the delay will have been above target an interval
        self._drop_next = 0.0
        self._last_count = 0

    def _above_for_interval(self, now: float, sojourn: float, backlog: int) -> bool:
        """RFC 8289 ``dodequeue``'s test: has the delay been above target for an interval?"""
        if sojourn < self.target or backlog <= CODEL_MIN_BACKLOG_BYTES:
            self._first_above = 0.0
            return False
        if not self._first_above:
            self._first_above = now + self.interval
            return False
        return now >= self._first_above

    def drop_head(self, now: float, sojourn: float, backlog: int) -> bool:
        """Whether to drop the head now. ``sojourn`` is how long it has waited, ``backlog``
        the queue's bytes with it. A True answer counts as a drop (the caller drops it)."""
        ok_to_drop = self._above_for_interval(now, sojourn, backlog)
        if self.dropping:
            if not ok_to_drop:
                self.dropping = False  # delay back below target: stop
                return False
            if now < self._drop_next:
                return False
            self.count += 1
            self._drop_next += self.interval / math.sqrt(self.count)
            self.drops += 1
            return True
        if not ok_to_drop:
            return False
        # Enter the dropping state. If it was left only recently, resume near the rate
        # that controlled the queue then, not from scratch (RFC 8289 section 5.5).
        self.dropping = True
        delta = self.count - self._last_count
        self.count = delta if delta > 1 and now - self._drop_next < 16 * self.interval else 1
        self._drop_next = now + self.interval / math.sqrt(self.count)
        self._last_count = self.count
        self.drops += 1
        return True

    def reset(self) -> None:
        """Forget the delay history (the queue emptied for lack of lanes, say)."""
        self.dropping = False
        self._first_above = 0.0
