#!/usr/bin/env python3
"""Python cost of ut.session per batch, without sockets or TLS.

Times the session's own work for one batch of datagrams in each direction, with lanes
and the UDP port replaced by objects that accept everything and do nothing:

* UDP -> lanes: ``push_datagrams`` (queue, counters, flush: pop, pick, encode, write);
* lanes -> UDP: ``lane_frames`` (sort DATA from control, counters, ``send_udp``);
* the deframer turning one read of encoded frames back into frames.

It answers "how much of the interpreter's share in ``bench/cpuprofile.py`` is ours":
compare the microseconds per batch here with the CPU per batch on the bed.

    python bench/session_cost.py [--batch 12] [--size 1412] [--rounds 20000]

``UT_NO_EXTENSIONS=1`` measures the pure-Python twin.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ut import fastpath  # noqa: E402
from ut.session import Session  # noqa: E402
from ut.stats import TunnelStats  # noqa: E402


class NullLane:
    """Takes every write; always ready."""

    def __init__(self, lane_id: int) -> None:
        self.lane_id = lane_id
        self.ready = self.writable = True
        self.closing = False

    def write(self, data: bytes, frames: int) -> bool:
        return True


class NullPort:
    """A UDP port whose sends all succeed."""

    class sock:  # noqa: N801 - stands in for a socket object
        @staticmethod
        def fileno() -> int:
            return 3

    def send_many(self, datagrams: list, addr) -> tuple[int, int]:
        return len(datagrams), 0


async def measure(batch: int, size: int, rounds: int) -> dict[str, float]:
    session = Session(
        asyncio.get_running_loop(), TunnelStats(role="client", max_lanes=5), client_cn="bench", session_id=1,
        n_lanes=5, max_packets=4096, max_bytes=8 << 20,
    )
    for i in range(5):
        session.lanes[i] = NullLane(i)  # type: ignore[assignment]
        session.picker.set_ready(i, True)
    session.udp_target = lambda: (NullPort(), None)  # type: ignore[method-assign]
    datagrams = [os.urandom(size) for _ in range(batch)]
    frames = [(fastpath.TYPE_DATA, 0, d) for d in datagrams]
    encoded = fastpath.encode_data(datagrams)
    deframer = fastpath.Deframer()
    lane = session.lanes[0]

    t0 = time.perf_counter()
    for _ in range(rounds):
        session.push_datagrams(list(datagrams))
    t1 = time.perf_counter()
    for _ in range(rounds):
        session.lane_frames(lane, frames)  # type: ignore[arg-type]
    t2 = time.perf_counter()
    for _ in range(rounds):
        buf = deframer.get_buffer(len(encoded))
        buf[: len(encoded)] = encoded
        deframer.buffer_updated(len(encoded))
    t3 = time.perf_counter()
    return {
        "udp_to_lanes_us": (t1 - t0) / rounds * 1e6,
        "lanes_to_udp_us": (t2 - t1) / rounds * 1e6,
        "deframe_us": (t3 - t2) / rounds * 1e6,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=12, help="datagrams per batch (the bed shows 9-15)")
    p.add_argument("--size", type=int, default=1412, help="datagram bytes (WireGuard at MTU 1380)")
    p.add_argument("--rounds", type=int, default=20000)
    args = p.parse_args(argv)
    res = asyncio.run(measure(args.batch, args.size, args.rounds))
    total = sum(res.values())
    print(f"{fastpath.IMPLEMENTATION} fast path, {args.batch} x {args.size} B per batch:")
    for k, v in res.items():
        print(f"  {k:16s} {v:7.2f} us per batch")
    print(f"  {'total':16s} {total:7.2f} us per batch = {total / args.batch:.2f} us per datagram")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
