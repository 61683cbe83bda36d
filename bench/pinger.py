#!/usr/bin/env python3
"""Fixed-schedule ICMP echo, for latency under load (run inside a namespace, as root).

    python bench/pinger.py DST [--interval 0.1] [--duration 5] [--timeout 1]

Unlike ut/_testbase/netbed.py's helper (which waits for each reply before sending the next),
this sends one echo every ``interval`` seconds whatever the replies do, so a slow path
is sampled as often as a fast one (no coordinated omission), and the run always ends
at ``duration + timeout``. Prints one JSON line: ``{"sent", "received", "rtt_ms": [...]}``
(replies in send order; a reply later than ``timeout`` counts as lost).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import socket
import struct
import sys
import time

from ut._testbase.netbed import _icmp_checksum  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("dst")
    p.add_argument("--interval", type=float, default=0.1)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--timeout", type=float, default=1.0)
    a = p.parse_args(argv)
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ident = (os.getpid() ^ random.getrandbits(16)) & 0xFFFF
    payload = b"utbench-ping".ljust(56, b".")
    sent_at: dict[int, float] = {}
    rtt: dict[int, float] = {}
    start = time.monotonic()
    n_slots = max(1, int(a.duration / a.interval))
    seq = 0
    end = start + n_slots * a.interval + a.timeout
    while True:
        now = time.monotonic()
        if seq < n_slots and now >= start + seq * a.interval:
            hdr = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
            pkt = hdr[:2] + struct.pack("!H", _icmp_checksum(hdr + payload)) + hdr[4:] + payload
            sent_at[seq] = time.monotonic()
            sock.sendto(pkt, (a.dst, 0))
            seq += 1
            continue
        if now >= end or (seq >= n_slots and len(rtt) == seq):
            break
        nxt = start + seq * a.interval if seq < n_slots else end
        r, _, _ = select.select([sock], [], [], max(0.0, min(nxt, end) - now))
        if not r:
            continue
        data, addr = sock.recvfrom(65535)
        t = time.monotonic()
        ihl = (data[0] & 0x0F) * 4
        if len(data) < ihl + 8 or addr[0] != a.dst:
            continue
        typ, _, _, rid, rseq = struct.unpack("!BBHHH", data[ihl : ihl + 8])
        if typ == 0 and rid == ident and rseq in sent_at and rseq not in rtt:
            if t - sent_at[rseq] <= a.timeout:
                rtt[rseq] = round((t - sent_at[rseq]) * 1000, 3)
    print(json.dumps({"sent": seq, "received": len(rtt), "rtt_ms": [rtt[k] for k in sorted(rtt)]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
