"""Sans-I/O accounting of a probe run: loss, duplicates, reordering, RTT, timeline.

:class:`ProbeStats` is fed ``on_send(seq, send_ts, size)`` and
``on_reply(seq, send_ts, recv_ts, size)`` and touches no socket, so tests drive it
with made-up timestamps. Definitions (also in ``docs/udpmon.md``):

- *received*: distinct sequence numbers that came back; *lost* = sent - received.
- *duplicates*: every further copy of a sequence number already received.
- *reordered*: a first copy whose sequence number is below the highest sequence
  number received before it; its *displacement* is that highest number minus its
  own. ``reorder_max_displacement`` is the largest such value.
- RTT percentiles use the nearest-rank method on first copies: the ``p``-th
  percentile of ``n`` sorted values is the value at rank ``ceil(p/100 * n)``.
"""

from __future__ import annotations

import math
from array import array
from bisect import bisect_left
from collections.abc import Sequence
from typing import Any


def percentile(sorted_values: Sequence[float], p: float) -> float | None:
    """Nearest-rank ``p``-th percentile of ascending ``sorted_values`` (None if empty)."""
    n = len(sorted_values)
    if n == 0:
        return None
    rank = math.ceil(p / 100.0 * n)
    return sorted_values[min(max(rank, 1), n) - 1]


def to_ms(seconds: float | None) -> float | None:
    """Seconds -> milliseconds rounded to 0.1 us, as the reports show them (None stays None)."""
    return None if seconds is None else round(seconds * 1000.0, 4)


class ProbeStats:
    """Sans-I/O accounting of one probe run.

    Feed it ``on_send(seq, send_ts, size)`` for ``seq`` = 0, 1, 2, ... in order
    and ``on_reply(seq, send_ts, recv_ts, size)`` for every reply, timestamps in
    seconds on one monotonic clock. ``start`` is the origin of the per-second
    timeline (default: the first send time).
    """

    OK, DUPLICATE, FOREIGN = "ok", "duplicate", "foreign"

    def __init__(self, start: float | None = None) -> None:
        self.start = start
        self.sent = 0
        self.bytes_sent = 0
        self.received = 0
        self.bytes_received = 0
        self.duplicates = 0
        self.reordered = 0
        self.reorder_max_displacement = 0
        self.foreign = 0
        self._highest = -1
        self._send_ts = array("d")
        self._rtt = array("d")  # NaN until the first copy arrives
        self._dup_seqs: dict[int, int] = {}
        self._reordered_seqs: list[int] = []

    def on_send(self, seq: int, send_ts: float, size: int = 0) -> None:
        if seq != self.sent:
            raise ValueError(f"on_send: expected seq {self.sent}, got {seq}")
        if self.start is None:
            self.start = send_ts
        self._send_ts.append(send_ts)
        self._rtt.append(math.nan)
        self.sent += 1
        self.bytes_sent += size

    def on_foreign(self) -> None:
        """Count a datagram that is not a reply of this run (bad magic, run id, length)."""
        self.foreign += 1

    def on_reply(self, seq: int, send_ts: float, recv_ts: float, size: int = 0) -> str:
        """Account one reply; returns :attr:`OK`, :attr:`DUPLICATE` or :attr:`FOREIGN`."""
        if not 0 <= seq < self.sent or abs(self._send_ts[seq] - send_ts) > 1e-6:
            self.foreign += 1
            return self.FOREIGN
        rtt = self._rtt
        if rtt[seq] == rtt[seq]:  # not NaN: seen before
            self.duplicates += 1
            self._dup_seqs[seq] = self._dup_seqs.get(seq, 0) + 1
            return self.DUPLICATE
        rtt[seq] = recv_ts - send_ts
        self.received += 1
        self.bytes_received += size
        if seq < self._highest:
            self.reordered += 1
            self._reordered_seqs.append(seq)
            disp = self._highest - seq
            if disp > self.reorder_max_displacement:
                self.reorder_max_displacement = disp
        else:
            self._highest = seq
        return self.OK

    @property
    def lost(self) -> int:
        return self.sent - self.received

    @property
    def loss_pct(self) -> float:
        return 100.0 * self.lost / self.sent if self.sent else 0.0

    def rtts(self) -> list[float]:
        """Round-trip times of first copies, ascending, in seconds."""
        return sorted(x for x in self._rtt if x == x)

    def rtt_summary(self) -> dict[str, float | None]:
        """``min, mean, p50, p95, p99, max`` in seconds (None when nothing came back)."""
        r = self.rtts()
        return {
            "min": r[0] if r else None,
            "mean": math.fsum(r) / len(r) if r else None,
            "p50": percentile(r, 50),
            "p95": percentile(r, 95),
            "p99": percentile(r, 99),
            "max": r[-1] if r else None,
        }

    def timeline(self) -> list[dict[str, Any]]:
        """Per-second buckets by *send* time: second ``t`` holds datagrams sent in
        ``[start + t, start + t + 1)``. RTT values in milliseconds."""
        if not self.sent:
            return []
        start = self.start if self.start is not None else self._send_ts[0]
        last_t = int(self._send_ts[-1] - start)
        dups = sorted(self._dup_seqs.items())
        dup_seqs = [s for s, _ in dups]
        dup_cum = [0]
        for _, c in dups:
            dup_cum.append(dup_cum[-1] + c)
        reord = sorted(self._reordered_seqs)
        out = []
        lo = 0
        for t in range(last_t + 1):
            hi = bisect_left(self._send_ts, start + t + 1, lo)
            r = sorted(x for x in self._rtt[lo:hi] if x == x)
            sent = hi - lo
            d_lo, d_hi = bisect_left(dup_seqs, lo), bisect_left(dup_seqs, hi)
            out.append({
                "t": t,
                "sent": sent,
                "received": len(r),
                "lost": sent - len(r),
                "loss_pct": round(100.0 * (sent - len(r)) / sent, 4) if sent else 0.0,
                "duplicates": dup_cum[d_hi] - dup_cum[d_lo],
                "reordered": bisect_left(reord, hi) - bisect_left(reord, lo),
                "rtt_p50_ms": to_ms(percentile(r, 50)),
                "rtt_max_ms": to_ms(r[-1] if r else None),
            })
            lo = hi
        return out
