"""Which congestion control a session's lanes use (``tcp.congestion``), sans I/O.

Why: the lanes are several TCP connections through one bottleneck, and no single
congestion control suits both kinds of home link (issue 14, bench/README.md):

* On a long path with random loss (Wi-Fi, a lossy peering) BBR keeps a lane at speed
  where a loss-based control (CUBIC, Reno) halves its window at every loss: five CUBIC
  lanes would carry a fraction of what five BBR lanes carry.
* On a saturated slow uplink with a router queue, several BBR flows overestimate the
  bottleneck together (BBR v1's known trouble with shallow buffers) and keep its queue
  overflowing: 40 % of the lanes' packets lost, every lane stalled in loss repair in
  turn, loaded ping 3-5 x a direct WireGuard's. Loss-based lanes back off at the
  first overflow: loaded ping within 2 x.

So with ``auto`` the lanes start with the host's control (BBR where it is the default)
and move to a loss-based one when the path shows a queue that our own data keeps
overflowing: over ``QUEUED_SECONDS`` while the lanes have data waiting, a round trip
above its minimum by ``QUEUED_DELAY`` on average, and at least ``OVERFLOW_LOSS`` of the
lanes' segments retransmitted. (A lossy path has the loss but no queue; a fast
link whose forwarding lags has the queue but little loss: BBR suits both.) They move back after a long quiet spell (``CLEAR_DELAY``
on average over ``CLEAR_SECONDS``), which a loss-based control on a lossy path gives (it cannot
fill a queue). The hold times keep it from flapping.
"""

from __future__ import annotations

__all__ = ["CongestionChooser"]

# Seconds of standing queue that mean "a bottleneck queue fills". Five BBR lanes keeping
# a 50-packet queue at 20 Mbit/s overflowing (a quarter to half of their segments lost)
# average 7-10 ms above the minimum round trip (BBR drains its queue every few round
# trips): a 10 ms bar let them run so for two seconds (issue 14, bench/README.md).
QUEUED_DELAY = 0.005
QUEUED_SECONDS = 0.5  # ... sustained this long
OVERFLOW_LOSS = 0.20  # ... with this share of the lanes' segments retransmitted
CLEAR_DELAY = 0.002  # back to the host's control once the queue stays below this ...
CLEAR_SECONDS = 10.0  # ... for this long
# The loss-based controls to try, best first: CUBIC where the host lets us (root, or
# net.ipv4.tcp_allowed_congestion_control), else Reno, which every Linux has and allows.
LOSS_BASED = ("cubic", "reno")


class CongestionChooser:
    """Feed it the path's queueing delay while the lanes are busy; it says when to switch.

    The evidence is taken over windows (``QUEUED_SECONDS`` while the host's control is
    in use, ``CLEAR_SECONDS`` while a loss-based one is): BBR's probing makes the delay
    dip now and then, so a switch does not wait for it to stay up without a break.
    ``update`` returns ``"queued"`` (use a loss-based control), ``"clear"`` (back to the
    host's own) or None (no change). ``state`` is the current one.
    """

    __slots__ = ("state", "mean_delay", "loss", "_start", "_n", "_delay", "_retrans", "_segs")

    def __init__(self) -> None:
        self.state = "clear"
        self.mean_delay = self.loss = 0.0  # the last window's evidence (for the log)
        self._start = -1.0  # when the current window began
        self._n = 0  # readings in it
        self._delay = 0.0  # their delays added
        self._retrans = self._segs = 0  # the lanes' segments in it

    def update(self, now: float, path_delay: float, retrans: int = 0, segs: int = 0) -> str | None:
        """``path_delay``: the lanes' round trip above its minimum; ``retrans``, ``segs``:
        segments the lanes retransmitted and sent since the last call."""
        if self._start < 0:
            self._start = now
            self._n, self._delay, self._retrans, self._segs = 0, 0.0, 0, 0
        self._n += 1
        self._delay += path_delay
        self._retrans += retrans
        self._segs += segs
        hold = QUEUED_SECONDS if self.state == "clear" else CLEAR_SECONDS
        if now - self._start < hold:
            return None
        mean = self.mean_delay = self._delay / self._n
        self.loss = self._retrans / max(1, self._segs)
        overflowing = self.loss >= OVERFLOW_LOSS
        self._start = -1.0
        if self.state == "clear" and mean >= QUEUED_DELAY and overflowing:
            self.state = "queued"
        elif self.state == "queued" and mean < CLEAR_DELAY:
            self.state = "clear"
        else:
            return None
        return self.state
