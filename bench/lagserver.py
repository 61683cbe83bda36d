"""``ut-tunnel`` with a loop-stall recorder: ``python bench/lagserver.py LAGFILE -config X``.

The same process as ``python -m ut -config X`` (``ut.cli.main``), except that the event
loop it runs also carries a timer that fires every ``TICK_SECONDS``; each time the gap
since the previous tick is over ``RECORD_MS``, a line ``<time.monotonic()> <gap in ms>``
is appended to LAGFILE. ``time.monotonic()`` is the system's ``CLOCK_MONOTONIC``, so the
bench (``abuse.py``) reads the server's worst stall in any window of its own clock.
A gap is the time the loop spent on other work between two ticks, plus the tick itself
(~1 ms). Collections of Python's garbage collector over ``RECORD_MS`` are recorded too
(``gc <time> <ms> <generation> <objects collected>``). Cost: ~1,000 callbacks a second
(well under 1 % of a core).
"""

from __future__ import annotations

import asyncio
import gc
import sys
import time
from typing import Any

TICK_SECONDS = 0.001
RECORD_MS = 3.0


class LagRecorder:
    def __init__(self, loop: asyncio.AbstractEventLoop, path: str) -> None:
        self.loop = loop
        self.out = open(path, "a", buffering=1)  # noqa: SIM115 - lives with the process
        self.last = time.monotonic()
        self.gc_t0 = self.last

    def start(self) -> None:
        self.loop.call_soon(self.tick)
        gc.callbacks.append(self.on_gc)

    def on_gc(self, phase: str, info: dict[str, Any]) -> None:
        # Collections of Python's cyclic garbage collector over RECORD_MS: a stall of
        # their own, and a sign of objects freed only by it.
        if phase == "start":
            self.gc_t0 = time.monotonic()
            return
        ms = 1000.0 * (time.monotonic() - self.gc_t0)
        if ms > RECORD_MS:
            self.out.write(f"gc {time.monotonic():.6f} {ms:.3f} {info['generation']} "
                           f"{info['collected']}\n")

    def tick(self) -> None:
        now = time.monotonic()
        gap_ms = 1000.0 * (now - self.last)
        self.last = now
        if gap_ms > RECORD_MS:
            self.out.write(f"{now:.6f} {gap_ms:.3f}\n")
        self.loop.call_later(TICK_SECONDS, self.tick)


def read_stalls(path: str, t0: float, t1: float) -> dict[str, Any]:
    """The recorded gaps that ended in [t0, t1): the worst, and how many passed 20/50 ms."""
    gaps: list[tuple[float, float]] = []  # (gap in ms, seconds after t0 it ended)
    gcs: list[list[float]] = []  # [ms, seconds after t0, generation, objects collected]
    try:
        with open(path) as f:
            for line in f:
                fields = line.split()
                if fields[0] == "gc":
                    t, ms, gen, collected = (float(x) for x in fields[1:])
                    if t0 <= t < t1:
                        gcs.append([round(ms, 1), round(t - t0, 3), int(gen), int(collected)])
                    continue
                t, gap = float(fields[0]), float(fields[1])
                if t0 <= t < t1:
                    gaps.append((gap, t - t0))
    except (OSError, ValueError, IndexError):
        pass
    return {"max_ms": max((g for g, _ in gaps), default=0.0),
            "over_20ms": sum(g > 20 for g, _ in gaps), "over_50ms": sum(g > 50 for g, _ in gaps),
            "worst": [[round(g, 1), round(t, 3)] for g, t in sorted(gaps)[-5:]],
            "gc_over_3ms": sorted(gcs)[-5:]}


def main() -> int:
    path = sys.argv.pop(1)
    import ut.runtime

    make_loop = ut.runtime.new_event_loop

    def new_event_loop(kind: str | None = None) -> asyncio.AbstractEventLoop:
        loop = make_loop(kind)
        LagRecorder(loop, path).start()
        return loop

    ut.runtime.new_event_loop = new_event_loop  # type: ignore[assignment]
    from ut.cli import main as cli_main

    return int(cli_main() or 0)


if __name__ == "__main__":
    sys.exit(main())
