#!/usr/bin/env python3
"""Where the queue sits while a carrier is loaded: what the loaded ping waits behind.

Brings up the benchmark's test bed and one carrier, runs iperf3 through WireGuard and a
fixed-schedule ping beside it, and every 50 ms reads the kernel's socket queues in both
namespaces with ``ss``:

* each UDP socket with data waiting (Recv-Q), named by its process and port: the
  carrier's socket facing WireGuard, wireguard-go's own;
* the carrier's outer TCP connections (between the two link addresses), summed per
  side: bytes not yet acknowledged or sent (Send-Q) and bytes not yet read (Recv-Q);
* for ut-tunnel, the session queue (``ut_queue_len``, datagrams).

Each queue is shown as bytes (median, p95) and as milliseconds of the carrier's rate
(bytes ÷ throughput), the delay it adds to whatever waits behind it. ``ss`` counts a
UDP socket's memory, overhead included (about 2.3 KB per full-size datagram), so UDP
figures overstate the payload.

    sudo python bench/queues.py                    # ut, up, 10 streams
    sudo python bench/queues.py --carrier v2ray --direction down --streams 1
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import carriers as C  # noqa: E402
from run import Bench, bring_up  # noqa: E402

from ut._testbase.netbed import NetBed  # noqa: E402

USERS = re.compile(r'users:\(\("([^"]+)"')


def sample_sockets(bed: NetBed, node, add) -> None:
    """One ``ss`` reading of ``node``: UDP queues by owner, outer TCP queues summed."""
    out = bed.run(node, ["ss", "-Htunap"]).stdout
    sendq = recvq = 0
    lanes = False
    for line in out.splitlines():
        f = line.split()
        if len(f) < 6:
            continue
        proto, state, rq, sq, local, peer = f[0], f[1], int(f[2]), int(f[3]), f[4], f[5]
        if proto == "udp":
            m = USERS.search(line)
            owner = m.group(1) if m else "?"
            add(f"{node.name} UDP {owner} {local} Recv-Q", rq)
        elif proto == "tcp" and state == "ESTAB":
            ends = (local.rsplit(":", 1)[0], peer.rsplit(":", 1)[0])
            if node.link_ip in ends and bed.cloud.link_ip in ends:  # the carrier's, not iperf3's
                lanes = True
                sendq += sq
                recvq += rq
    if lanes:
        add(f"{node.name} outer TCP Send-Q (sum)", sendq)
        add(f"{node.name} outer TCP Recv-Q (sum)", recvq)


def measure(args) -> dict:
    carrier = C.all_carriers()[args.carrier]
    why = carrier.available()
    if why:
        raise SystemExit(f"{args.carrier}: {why}")
    samples: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        samples.setdefault(key, []).append(value)

    with NetBed() as bed:
        bed.pki()
        bench = Bench(bed, args.seconds)
        bench.start_iperf_server()
        bring_up(bench, carrier)
        cmd = ["iperf3", "-c", bed.cloud.wg_ip, "-t", str(args.seconds), "-J",
               "-P", str(args.streams)] + (["-R"] if args.direction == "down" else [])
        iperf = bed.spawn(bed.home, cmd, name="iperf3-client")
        ping = bed.spawn(bed.home, [sys.executable, str(HERE / "pinger.py"), bed.cloud.wg_ip,
                                    "--duration", str(args.seconds - 1)], name="pinger")
        time.sleep(1.5)  # past slow start
        end = time.monotonic() + args.seconds - 3
        while time.monotonic() < end:
            for node in (bed.home, bed.cloud):
                sample_sockets(bed, node, add)
                if carrier.has_metrics:
                    qlen = sum(v for name, _l, v in bed.metrics(node) if name == "ut_queue_len")
                    add(f"{node.name} ut session queue, datagrams", qlen)
            time.sleep(0.05)
        iperf.wait(args.seconds + 30)
        ping.wait(args.seconds + 30)
        text = bed.log_text(iperf)
        result, _ = json.JSONDecoder().raw_decode(text[text.index("{"):])
        mbps = result["end"]["sum_received"]["bits_per_second"] / 1e6
        rtts = [x for x in json.loads(bed.log_text(ping).strip().splitlines()[-1])["rtt_ms"]
                if x is not None]
        carrier.stop(bed)
    return {"carrier": args.carrier, "direction": args.direction, "streams": args.streams,
            "mbps": round(mbps, 1), "ping_ms": rtts, "samples": samples}


def pct(values: list[float], p: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(p / 100 * len(v)))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--carrier", default="ut")
    p.add_argument("--direction", choices=("up", "down"), default="up")
    p.add_argument("--streams", type=int, default=10)
    p.add_argument("--seconds", type=float, default=10.0)
    args = p.parse_args(argv)
    res = measure(args)
    rtt = res["ping_ms"]
    print(f"{res['carrier']} {res['direction']} x{res['streams']}: {res['mbps']} Mbit/s; "
          f"ping p50 {statistics.median(rtt):.1f} ms, p95 {pct(rtt, 95):.1f} ms")
    byte_rate = res["mbps"] * 1e6 / 8
    print(f"{'queue':60s} {'median':>9s} {'p95':>9s}   as ms of the rate (median / p95)")
    for key, v in sorted(res["samples"].items()):
        if not any(v):
            continue
        if key.endswith("datagrams"):
            print(f"{key:60s} {statistics.median(v):>9.0f} {pct(v, 95):>9.0f}")
        else:
            print(f"{key:60s} {statistics.median(v):>9.0f} {pct(v, 95):>9.0f}   "
                  f"{statistics.median(v) / byte_rate * 1e3:.1f} / {pct(v, 95) / byte_rate * 1e3:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
