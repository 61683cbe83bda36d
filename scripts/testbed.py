#!/usr/bin/env python3
"""Bring up the real-WireGuard test bed (ut/_testbase/netbed.py) by hand, for debugging and benchmarks.

    sudo python scripts/testbed.py up [--homes N] [--no-tunnel] [--no-drop] [--detach]
    sudo python scripts/testbed.py down [TAG ...] [--all] [--stale]
    sudo python scripts/testbed.py list
    sudo python scripts/testbed.py demo [--mib N]

``up`` builds the namespaces, nftables UDP drop, wireguard-go on both sides and (unless
``--no-tunnel``) certificates, an ut-tunnel server in the cloud and a client in every home,
plus an HTTP server on the cloud's WireGuard address; then prints how to reach everything.
In the foreground it waits for Ctrl-C and tears the bed down; with ``--detach`` it leaves
the bed running and records it in /run/ut-testbed/<tag>.json for ``down``.

``demo`` brings a bed up, pings and downloads a file through the tunnel, prints the
numbers and the tunnel's metrics, and tears everything down.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time

from ut._testbase import netbed
from ut._testbase.netbed import STATE_DIR, NetBed, metric_sum  # noqa: E402


def _check(need_tunnel: bool) -> None:
    reasons = netbed.missing_prerequisites()
    if need_tunnel and not reasons:
        try:
            netbed.ut_tunnel_command()
        except netbed.BedError as exc:
            reasons.append(str(exc))
    if reasons:
        sys.exit("testbed: cannot start: " + "; ".join(reasons))


def _bring_up(args) -> tuple[NetBed, str | None]:
    bed = NetBed(homes=args.homes, drop_udp=not args.no_drop, mtu=args.mtu,
                 keep_workdir=getattr(args, "detach", False), verbose=args.verbose)
    bed.up()
    url = None
    try:
        if not args.no_tunnel:
            bed.pki()
            extra = {"metrics": {"per_lane_id": True}, "tcp": {"lanes": args.lanes}}
            bed.start_server(extra)
            for h in bed.home_nodes:
                bed.start_client(h, extra)
            bed.use_tunnel()
            bed.reset_wireguard()
        www = bed.wd / "www"
        www.mkdir(exist_ok=True)
        url = bed.start_http_server(www)
    except BaseException:
        bed.teardown()
        raise
    return bed, url


def _describe(bed: NetBed, url: str | None) -> None:
    c = bed.cloud
    print(f"bed {bed.tag}  (work dir {bed.wd}, logs in {bed.wd / 'logs'})")
    print(f"  WireGuard MTU {bed.mtu}; UDP on the links {'DROPPED' if bed.drop_udp else 'allowed'}")
    print(f"  cloud: ns {c.ns}\n         link {c.link_if} {c.link_ip}  wg {c.wg_if} {c.wg_ip}")
    for h in bed.home_nodes:
        print(f"  {h.name}: ns {h.ns}\n         link {h.link_if} {h.link_ip}  wg {h.wg_if} {h.wg_ip}"
              f"  (WireGuard endpoint {h.endpoint})")
    print("try:")
    print(f"  ip netns exec {bed.home.ns} bash")
    print(f"  ip netns exec {bed.home.ns} python3 {netbed.HERE} ping {c.wg_ip} --count 3")
    print(f"  ip netns exec {bed.home.ns} curl -s http://127.0.0.1:{netbed.METRICS_PORT}/metrics")
    print(f"  ip netns exec {c.ns} iperf3 -s -B {c.wg_ip}   # and in home: iperf3 -c {c.wg_ip}")
    if url:
        print(f"  HTTP server (files in {bed.wd / 'www'}): {url}/  (PUT uploads to {url}/upload/NAME)")


def cmd_up(args) -> int:
    _check(not args.no_tunnel)
    bed, url = _bring_up(args)
    _describe(bed, url)
    if args.detach:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        state = bed.state()
        state["own_workdir"] = True
        (STATE_DIR / f"{bed.tag}.json").write_text(json.dumps(state, indent=2))
        print(f"detached; tear down with: python {sys.argv[0]} down {bed.tag}")
        bed._torn_down = True  # the bed outlives this process; `down` removes it
        return 0
    print("bed is up; Ctrl-C tears it down")
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        while not stop:
            for t in bed._tracked:
                if t.proc.poll() is not None and not getattr(t.proc, "reported", False):
                    print(f"  ! {t.name} [{t.proc.pid}] exited {t.proc.returncode} (log {t.log})")
                    t.proc.reported = True
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        problems = bed.teardown()
        print("torn down" + (f" with problems: {problems}" if problems else ""))
    return 0


def cmd_down(args) -> int:
    tags = list(args.tags)
    if args.all:
        tags += [p.stem for p in STATE_DIR.glob("*.json")]
    rc = 0
    for tag in dict.fromkeys(tags):
        f = STATE_DIR / f"{tag}.json"
        if not f.exists():
            print(f"no detached bed {tag} ({f} missing)")
            rc = 1
            continue
        problems = netbed.teardown_state(json.loads(f.read_text()))
        f.unlink()
        print(f"bed {tag} down" + (f" with problems: {problems}" if problems else ""))
    if args.stale:
        for ns in netbed.remove_stale_beds():
            print(f"removed stale namespace {ns}")
    if not tags and not args.stale:
        print("nothing to do: give TAGs, --all or --stale")
    return rc


def cmd_list(_args) -> int:
    for f in sorted(STATE_DIR.glob("*.json")) if STATE_DIR.exists() else []:
        st = json.loads(f.read_text())
        print(f"detached {f.stem}: {' '.join(st['namespaces'])}  (work dir {st['workdir']})")
    for tag, namespaces in netbed.stale_beds().items():
        print(f"stale {tag}: {' '.join(namespaces)}")
    return 0


def cmd_demo(args) -> int:
    _check(True)
    args.no_tunnel = False
    bed, url = _bring_up(args)
    try:
        _describe(bed, url)
        h, c = bed.home, bed.cloud
        dropped = bed.udp_dropped()
        first = bed.wait_ping(h, c, within=15)
        res = bed.ping(h, c, count=10, interval=0.1)
        rtts = sorted(res["rtt_ms"])
        print(f"\nping: first reply after {first:.2f}s, then {res['received']}/{res['sent']}, "
              f"rtt min/median/max {rtts[0]:.2f}/{rtts[len(rtts) // 2]:.2f}/{rtts[-1]:.2f} ms"
              if rtts else f"\nping: {res}")
        src = bed.wd / "www" / "demo.bin"
        digest = netbed.make_random_file(src, args.mib << 20)
        dest = bed.wd / "demo-download.bin"
        secs = bed.download(h, f"{url}/demo.bin", dest)
        ok = netbed.sha256_file(dest) == digest
        print(f"download {args.mib} MiB: {secs:.2f}s, {args.mib * 8 * 1.048576 / secs:.0f} Mbit/s, "
              f"sha256 {'ok' if ok else 'MISMATCH'}")
        reply, usecs = bed.upload(h, dest, f"{url}/upload/demo.bin")
        print(f"upload {args.mib} MiB: {usecs:.2f}s, {args.mib * 8 * 1.048576 / usecs:.0f} Mbit/s, "
              f"sha256 {'ok' if reply.get('sha256') == digest else 'MISMATCH'}")
        print(f"UDP packets dropped on the links meanwhile: {bed.udp_dropped() - dropped}")
        for node in (h, c):
            s = bed.metrics(node)
            lanes: dict = {}
            for n, lab, v in s:
                if n == "ut_lane_frames_total" and "lane_id" in lab:
                    lanes[lab["lane_id"]] = lanes.get(lab["lane_id"], 0) + int(v)
            print(f"{node.name} metrics: sessions {metric_sum(s, 'ut_sessions_active')}, "
                  f"lanes {metric_sum(s, 'ut_lanes_active_total')}, "
                  f"udp in {metric_sum(s, 'ut_udp_in_packets_total')} pkts, "
                  f"drops {metric_sum(s, 'ut_udp_drop_total')}, frames per lane (both ways) {lanes or '-'}")
        return 0 if ok else 1
    finally:
        problems = bed.teardown()
        print("torn down" + (f" with problems: {problems}" if problems else ""))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("up", "demo"):
        sp = sub.add_parser(name)
        sp.add_argument("--homes", type=int, default=1)
        sp.add_argument("--lanes", type=int, default=5)
        sp.add_argument("--mtu", type=int, default=netbed.DEFAULT_WG_MTU)
        sp.add_argument("--no-drop", action="store_true", help="allow UDP on the links")
        sp.add_argument("-v", "--verbose", action="store_true", help="print every command")
        if name == "up":
            sp.add_argument("--no-tunnel", action="store_true", help="WireGuard only, direct")
            sp.add_argument("--detach", action="store_true", help="leave the bed running")
        else:
            sp.add_argument("--mib", type=int, default=16, help="download size (MiB)")
    sd = sub.add_parser("down")
    sd.add_argument("tags", nargs="*")
    sd.add_argument("--all", action="store_true", help="every detached bed")
    sd.add_argument("--stale", action="store_true", help="beds whose owner process is gone")
    sub.add_parser("list")
    args = p.parse_args(argv)
    return {"up": cmd_up, "down": cmd_down, "list": cmd_list, "demo": cmd_demo}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
