"""Cost of the staleness bound on the hot path (issue 19, point 3).

``queue.max_age_seconds`` is on by default, so its check runs for every batch a session
takes from its queue: one clock read and one look at the queue's head
(``RingQueue.drop_stale``). This times ``Session.push_datagrams`` (a batch of WireGuard-
sized datagrams queued and written to a lane at once, the healthy-link path) with the
bound off and on, alternating rounds, on a fake lane (no sockets: only the session's own
work is timed; a loopback tunnel's noise would hide a difference of this size).

    python bench/stale_cost.py [--rounds 9] [--batches 20000] [--impl compiled|pure]

Prints the median microseconds per batch of 32 x 1420-byte datagrams for each setting
and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from ut._testbase.fakes import FakePort, open_lane
from ut._testbase.tunnelkit import use_implementation
from ut.session import Session
from ut.stats import TunnelStats

BATCH = [bytes(1420)] * 32


class _BenchSession(Session):
    role = "client"

    def udp_target(self):  # type: ignore[override]
        return self.port, None


async def _per_batch_us(max_queue_age: float, batches: int) -> float:
    stats = TunnelStats(role="client", max_lanes=1)
    s = _BenchSession(asyncio.get_running_loop(), stats, client_cn="bench", session_id=1,
                      n_lanes=1, max_packets=4096, max_bytes=8 << 20, skip_slow_lanes=True,
                      max_queue_age=max_queue_age)
    s.port = FakePort()  # type: ignore[attr-defined]
    lane = open_lane(s, 0, "client")
    s.lane_up(lane)
    written = lane.transport.written
    t0 = time.perf_counter()
    for _ in range(batches):
        s.push_datagrams(BATCH)
        written.clear()
    elapsed = time.perf_counter() - t0
    assert not s.counters.drops, s.counters.drops
    lane.connection_lost(None)
    return elapsed / batches * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--batches", type=int, default=20000)
    ap.add_argument("--impl", choices=("compiled", "pure"), default="compiled")
    args = ap.parse_args()
    off: list[float] = []
    on: list[float] = []
    with use_implementation(args.impl):
        for _ in range(args.rounds):
            off.append(asyncio.run(_per_batch_us(0.0, args.batches)))
            on.append(asyncio.run(_per_batch_us(3.0, args.batches)))
    mo, mn = statistics.median(off), statistics.median(on)
    print(f"{args.impl}: per batch of 32 x 1420 B, median of {args.rounds} rounds x "
          f"{args.batches} batches")
    print(f"  max_age_seconds 0 (off): {mo:.2f} us   (min {min(off):.2f})")
    print(f"  max_age_seconds 3 (on):  {mn:.2f} us   (min {min(on):.2f})")
    print(f"  on / off: {mn / mo:.3f}")


if __name__ == "__main__":
    main()
