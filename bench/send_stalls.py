#!/usr/bin/env python3
"""Why the seed profile's output-side forwarding latency is high: time every UDP send.

Runs ``bench/run.py``'s seed profile (and ``seed-apart``) with one extra carrier,
``ut-stalls``: ut-tunnel with ``bench/stalls/sitecustomize.py`` loaded, which times each
``UdpPort.send_many`` call. Then it prints, per tunnel process, how many sends took over
0.5 ms of wall time, their wall and CPU time, and how many of them were preempted
(an involuntary context switch during the call).

    sudo python bench/send_stalls.py [--rounds 1] [--profiles seed,seed-apart]

Found with it (2026-11-25): on a core shared with wireguard-go, every slow send had an
involuntary context switch, with about 1 ms of wall time against 0.2-0.3 ms of CPU:
the send wakes wireguard-go, which preempts the tunnel in mid-batch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def summarise(files: list[Path]) -> list[str]:
    lines = []
    for path in sorted(files):
        d = json.loads(path.read_text())
        slow = d["slow"]
        if not d["calls"]:
            continue  # a process that never sent (the bench's version probe)
        share = sum(r[4] for r in slow) / max(d["datagrams"], 1)
        config = next((Path(a).stem for a in d.get("argv", []) if a.endswith(".yaml")), "?")
        line = (f"{config} (pid {path.stem.split('-')[1]}): {d['calls']} sends, {len(slow)} over 0.5 ms "
                f"carrying {share:.0%} of {d['datagrams']} datagrams")
        if slow:
            wall = statistics.median(r[0] for r in slow) * 1e3
            cpu = statistics.median(r[1] for r in slow) * 1e3
            pre = sum(1 for r in slow if r[2]) / len(slow)
            line += f"; slow ones: wall {wall:.2f} ms, CPU {cpu:.2f} ms (medians), preempted {pre:.0%}"
        lines.append(line)
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--profiles", default="seed,seed-apart")
    args = p.parse_args()
    for prof in args.profiles.split(","):
        with tempfile.TemporaryDirectory(prefix="ut-stalls-") as tmp:
            os.chmod(tmp, 0o777)
            variant = {"ut-stalls": {"env": {"PYTHONPATH": str(HERE / "stalls"),
                                             "UT_STALLS_DIR": tmp}}}
            cmd = [sys.executable, str(HERE / "run.py"), "--profiles", prof,
                   "--seed-carriers", "ut-stalls", "--rounds", str(args.rounds),
                   "--out", str(Path(tmp) / "report.md"), "--results-dir", tmp]
            res = subprocess.run(cmd, env={**os.environ, "BENCH_UT_VARIANTS": json.dumps(variant)},
                                 capture_output=True, text=True)
            print(f"== {prof}")
            for line in res.stdout.splitlines() + res.stderr.splitlines():
                if " seed r" in line or "FAIL" in line:
                    print(line)
            for line in summarise(list(Path(tmp).glob("sends-*.json"))):
                print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
