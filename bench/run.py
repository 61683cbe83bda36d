#!/usr/bin/env python3
"""ut-tunnel benchmark (issue 6): real WireGuard through each carrier, same run, interleaved.

    sudo python bench/run.py                      # everything, writes bench/RESULTS.md
    sudo python bench/run.py --quick              # ~2-minute sanity run (bench/results/quick.md)
    sudo python bench/run.py --rounds 5 --profiles default,seed
    sudo python bench/run.py --carriers direct,ut,v2ray --tests up1,down1 --profiles default

Profiles (see bench/README.md for what each measures and how):

    default  iperf3 TCP through WireGuard home->cloud and cloud->home, 1 and 10 streams;
             ping idle and during iperf3; CPU s/GB and peak RSS of the tunnel processes
    seed     each tunnel process on 1 core (taskset) with 512 MiB; iperf3 -P 10 -b 10M up
             (100 Mbit/s total); forwarding latency p95 from the tunnel's histogram; ping
    seed-apart  the same, with each wireguard-go kept off its own tunnel process's CPU
    small    udpmon probe/echo without WireGuard: 64-byte datagrams and IMIX at fixed rates
    micro    bench/micro.py: fast path vs pure twin (frames, queue, picker)
    lossy    20 ms one-way + 1 % loss through ut/_testbase/linkemu.py: ut (1, 2, 5, 8 lanes) vs
             OpenVPN over TCP, v2ray, sing-box and direct WireGuard; up/down, 1 and 10 streams
    slow     a slow home uplink through ut/_testbase/linkemu.py: 20 Mbit/s each way, 20 ms RTT,
             a 50-packet queue; the same carriers and tests

Every round runs every carrier once, in a rotated order, so slow drifts of a shared
machine hit all carriers alike; tables show medians over rounds, and ratios are medians
of the per-round ratios (paired within a round). Raw numbers go to bench/results/*.json.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))  # bench's own modules, also when imported from elsewhere

import carriers as C  # noqa: E402

from ut._testbase import netbed  # noqa: E402
from ut._testbase.netbed import BedError, NetBed  # noqa: E402

TESTS = {  # name -> (reverse, streams)
    "up1": (False, 1),
    "down1": (True, 1),
    "up10": (False, 10),
    "down10": (True, 10),
}
TEST_LABEL = {"up1": "up 1", "down1": "down 1", "up10": "up 10", "down10": "down 10"}
ALL_PROFILES = ("default", "seed", "seed-apart", "small", "micro", "lossy", "slow")
# issue 14: the carriers of the lossy and slow profiles
LINK_CARRIERS = "direct,ut,ut-1lane,ut-2lane,ut-8lane,openvpn,v2ray,sing-box"
LINK_CARRIERS_QUICK = "direct,ut,openvpn,v2ray"
ECHO_PORT = 51900
PING_INTERVAL = 0.1
SMALL_PROBES = {  # name -> udpmon probe args
    "64B@20kpps": ["--size", "64", "--rate", "20000"],
    "imix@50M": ["--sizes", "imix", "--bitrate", "50M"],
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- small helpers
def pct(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (as udpmon): the value at rank ceil(p/100 * n)."""
    if not values:
        return None
    s = sorted(values)
    k = max(1, math.ceil(p / 100 * len(s)))
    return s[k - 1]


def med(values) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def rnd(x, nd=3):
    return None if x is None else round(x, nd)


def hist_snapshot(samples, name="ut_forward_latency_seconds") -> dict[str, dict[float, float]]:
    """{dir: {le: cumulative count}} summed over client CNs."""
    out: dict[str, dict[float, float]] = {}
    for n, lab, v in samples:
        if n == name + "_bucket":
            le = float("inf") if lab["le"] in ("+Inf", "inf") else float(lab["le"])
            d = out.setdefault(lab.get("dir", ""), {})
            d[le] = d.get(le, 0.0) + v
    return out


def drop_snapshot(samples) -> dict[str, float]:
    """ut_udp_drop_total by reason, summed over client CNs and directions."""
    out: dict[str, float] = {}
    for n, lab, v in samples:
        if n == "ut_udp_drop_total":
            out[lab["reason"]] = out.get(lab["reason"], 0.0) + v
    return out


# What a current wireguard-go asks for (conn: socketBufferSize = 7 << 20): the bench's
# wireguard-go is Debian's 2022 build, whose socket keeps net.core.rmem_default (208 KiB)
# and drops the bursts any TCP carrier delivers (issue 14: thousands of datagrams per
# lossy test, every one an inner TCP loss). Kernel WireGuard has no such socket.
WG_RMEM_DEFAULT = 7 << 20
RMEM_DEFAULT_SYSCTL = Path("/proc/sys/net/core/rmem_default")


@contextlib.contextmanager
def wg_receive_buffer(nbytes: int):
    """Set net.core.rmem_default to ``nbytes`` for the run, then restore it."""
    if not nbytes or not RMEM_DEFAULT_SYSCTL.exists():
        yield None
        return
    old = RMEM_DEFAULT_SYSCTL.read_text().strip()
    RMEM_DEFAULT_SYSCTL.write_text(str(nbytes))
    try:
        yield int(old)
    finally:
        RMEM_DEFAULT_SYSCTL.write_text(old)


# Kernel TCP counters (nstat names) that say how TCP repaired losses in a namespace: a
# repair by fast retransmit costs about a round trip; a tail loss waits for a loss probe
# (two round trips) and a timeout for the RTO (200 ms or more). Summed over both nodes,
# outer lanes and inner TCP alike (through a TCP carrier the inner TCP sees few losses).
TCP_EVENTS = ("RetransSegs", "TCPLossProbes", "TCPLossProbeRecovery", "TCPTimeouts",
              "TCPSackRecovery", "TCPLostRetransmit")


def tcp_events(bed) -> dict[str, int]:
    """The TCP_EVENTS counters of both nodes' namespaces, added together."""
    out = dict.fromkeys(TCP_EVENTS, 0)
    for n in bed.nodes:
        res = bed.run(n, "cat /proc/net/netstat /proc/net/snmp", check=False)
        lines = res.stdout.splitlines()
        for head, vals in zip(lines[::2], lines[1::2], strict=False):
            names, values = head.split()[1:], vals.split()[1:]
            for k, v in zip(names, values, strict=False):
                if k in out and v.lstrip("-").isdigit():
                    out[k] += int(v)
    return out


def wg_socket_drops(bed) -> dict[str, int]:
    """Datagrams the kernel dropped at each wireguard-go's full UDP socket (``/proc/net/udp``
    drops of the WireGuard port), by node: losses of inner packets no carrier can see."""
    port = f":{netbed.WG_PORT:04X}"
    out = {}
    for n in bed.nodes:
        res = bed.run(n, "cat /proc/net/udp /proc/net/udp6", check=False)
        out[n.name] = sum(
            int(f[-1]) for f in (line.split() for line in res.stdout.splitlines()[1:])
            if len(f) > 12 and f[1].endswith(port) and f[-1].isdigit()
        )
    return out


def reorder_snapshot(samples) -> dict[str, float]:
    """ut_reorder_{skipped,late}_total summed over client CNs (resequencing, issue 14)."""
    out = {"skipped": 0.0, "late": 0.0}
    for n, _lab, v in samples:
        if n == "ut_reorder_skipped_total":
            out["skipped"] += v
        elif n == "ut_reorder_late_total":
            out["late"] += v
    return out


def hist_quantile(
    before: dict[float, float], after: dict[float, float], q: float
) -> tuple[float | None, int]:
    """Prometheus-style quantile of the histogram delta (linear within a bucket); (s, count).
    In the +Inf bucket it returns the largest finite bound."""
    les = sorted(after)
    cum = [after[le] - before.get(le, 0.0) for le in les]
    total = cum[-1] if cum else 0
    if total <= 0:
        return None, 0
    rank = q * total
    prev_le, prev_c = 0.0, 0.0
    for le, c in zip(les, cum, strict=True):
        if c >= rank:
            if math.isinf(le):
                return prev_le, int(total)
            if c == prev_c:
                return le, int(total)
            return prev_le + (le - prev_le) * (rank - prev_c) / (c - prev_c), int(total)
        prev_le, prev_c = le, c
    return les[-1], int(total)


class Deadline(Exception):
    pass


# ---------------------------------------------------------------------- measurement primitives
class Bench:
    def __init__(self, bed: NetBed, duration: float, verbose: bool = False) -> None:
        self.bed = bed
        self.duration = duration
        self.verbose = verbose
        self.iperf_srv = None
        self.cc: str | None = None  # iperf3 -C
        # where iperf3 and the pings go: the cloud's WireGuard address, or the carrier's own
        # tunnel address for a carrier that carries IP itself (OpenVPN); set by bring_up
        self.target = bed.cloud.wg_ip
        # the two ends of what joins home and cloud (the veth pair; the lossy and slow
        # profiles add the emulated link's two devices): their byte counters are what the
        # carrier put on the link, headers and ACKs included (link_bytes)
        self.link_devs = {"home": [bed.home.link_if], "cloud": [f"uv{bed.tag}c1"]}

    def _dev_bytes(self, node, devs) -> tuple[int, int] | None:
        """(rx, tx) bytes of ``devs`` in ``node`` so far, from its /proc/net/dev."""
        res = self.bed.run(node, ["cat", "/proc/net/dev"], check=False)
        rx = tx = seen = 0
        for line in res.stdout.splitlines()[2:]:
            name, _, rest = line.partition(":")
            if name.strip() in devs:
                f = rest.split()
                rx += int(f[0])
                tx += int(f[8])
                seen += 1
        return (rx, tx) if seen else None

    def link_bytes(self) -> dict[str, int] | None:
        """Bytes on the link so far: home's end sent (``tx``, home -> cloud) and received
        (``rx``: delivered cloud -> home), the cloud's end received (``cloud_rx``: delivered
        home -> cloud) and sent (``cloud_tx``). On a lossy or rate-limited link what was
        sent and what was delivered differ by what the link dropped (and the outer TCP
        sent again). The veth counts Ethernet frames (14-byte header), the emulated link's
        TUN devices IP packets."""
        h = self._dev_bytes(self.bed.home, self.link_devs["home"])
        c = self._dev_bytes(self.bed.cloud, self.link_devs["cloud"])
        if h is None or c is None:
            return None
        return {"tx": h[1], "rx": h[0], "cloud_rx": c[0], "cloud_tx": c[1]}

    @staticmethod
    def link_delta(a: dict | None, b: dict | None) -> dict | None:
        if not a or not b:
            return None
        return {k: b[k] - a[k] for k in a if k in b}

    def start_iperf_server(self) -> None:
        bed = self.bed
        if self.iperf_srv is not None:
            bed.stop(self.iperf_srv)
        self.iperf_srv = bed.spawn(
            bed.cloud,
            # every address of the cloud namespace: the WireGuard address and a carrier's
            # own tunnel address (which exists only while that carrier runs)
            ["iperf3", "-s", "--idle-timeout", "30"],
            name="iperf3-server",
        )
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if bed.run(bed.cloud, ["ss", "-Hltn", "sport = :5201"], check=False).stdout.strip():
                return
            time.sleep(0.05)
        raise BedError(f"iperf3 server did not listen: {bed.log_text(self.iperf_srv)}")

    def ping(self, count: int, interval: float = PING_INTERVAL) -> dict:
        """``count`` ICMP echoes home -> cloud over WireGuard (or the carrier's own tunnel:
        ``self.target``), one every ``interval`` s (fixed schedule, bench/pinger.py),
        replies later than 1 s count as lost."""
        bed = self.bed
        dur = count * interval
        res = bed.run(
            bed.home,
            [
                sys.executable,
                str(HERE / "pinger.py"),
                self.target,
                "--interval",
                str(interval),
                "--duration",
                str(dur),
                "--timeout",
                "1",
            ],
            timeout=dur + 20,
        )
        return json.loads(res.stdout.strip().splitlines()[-1])

    def idle_ping(self, count: int, procs: dict | None = None) -> dict:
        """``count`` pings 50 ms apart with no load: sent, received, RTTs (ms, 2 decimals),
        the bytes home's link carried meanwhile (``link_bytes``: what the pings cost on the
        wire, with the carrier's framing, padding and TCP ACKs) and the CPU of ``procs``."""
        l0, c0 = self.link_bytes(), self.cpu(procs or {})
        p = self.ping(count, interval=0.05)
        l1, c1 = self.link_bytes(), self.cpu(procs or {})
        out = {
            "sent": p["sent"],
            "received": p["received"],
            "rtt_ms": [round(x, 2) for x in p["rtt_ms"]],
            "link_bytes": self.link_delta(l0, l1),
        }
        if procs:
            out["cpu_s"] = {r: round(c1[r] - c0[r], 3) for r in c1 if r in c0}
        return out

    def cpu(self, procs: dict) -> dict[str, float]:
        out = {}
        for role, p in procs.items():
            with contextlib.suppress(OSError, ValueError, IndexError):
                out[role] = C.proc_cpu_seconds(p.pid)
        return out

    def hist(self, carrier) -> dict | None:
        if not carrier.has_metrics:
            return None
        bed = self.bed
        try:
            home, cloud = bed.metrics(bed.home), bed.metrics(bed.cloud)
            return {
                "client": hist_snapshot(home),
                "server": hist_snapshot(cloud),
                "drops": {"client": drop_snapshot(home), "server": drop_snapshot(cloud)},
                "reorder": {"client": reorder_snapshot(home), "server": reorder_snapshot(cloud)},
            }
        except BedError:
            return None

    def iperf(
        self,
        reverse: bool,
        streams: int,
        secs: float,
        bitrate: str | None = None,
        carrier=None,
        procs=None,
        ping: bool = True,
    ) -> dict:
        """One iperf3 test (JSON), with a concurrent ping, CPU and histogram deltas. Any
        failure restarts the iperf3 server (a broken test can leave it busy); a test refused
        because the server was busy is retried once."""
        res = self._iperf(reverse, streams, secs, bitrate, carrier, procs, ping)
        if res.get("error"):
            self.start_iperf_server()
            if "busy" in res["error"]:
                res = self._iperf(reverse, streams, secs, bitrate, carrier, procs, ping)
                res["retried"] = True
                if res.get("error"):
                    self.start_iperf_server()
        return res

    def _iperf(self, reverse, streams, secs, bitrate, carrier, procs, ping) -> dict:
        bed = self.bed
        procs = procs or {}
        args = [
            "iperf3",
            "-c",
            self.target,
            "-t",
            str(secs),
            "-J",
            "-P",
            str(streams),
            "--connect-timeout",
            "3000",
        ]
        if reverse:
            args.append("-R")
        if bitrate:
            args += ["-b", bitrate]
        if self.cc:
            args += ["-C", self.cc]
        h0 = self.hist(carrier) if carrier else None
        c0 = self.cpu(procs)
        l0 = self.link_bytes()
        t0 = time.monotonic()
        ip = bed.spawn(bed.home, args, name="iperf3-client")
        res: dict = {}
        ping_res = None
        try:
            if ping and secs >= 2:
                time.sleep(0.8)
                n = max(5, int((secs - 1.6) / PING_INTERVAL))
                ping_res = self.ping(n)
            try:
                ip.wait(timeout=secs + 8)
            except subprocess.TimeoutExpired:
                bed.stop(ip)
                res["error"] = "iperf3 client timed out"
        finally:
            if ip.poll() is None:
                bed.stop(ip)
        wall = time.monotonic() - t0
        l1 = self.link_bytes()
        c1 = self.cpu(procs)
        h1 = self.hist(carrier) if carrier else None
        text = bed.log_text(ip)
        j = None
        with contextlib.suppress(ValueError):
            j, _ = json.JSONDecoder().raw_decode(text[text.index("{") :])
        if j is not None and j.get("error") and not res.get("error"):
            res["error"] = j["error"]
        if j is None or "end" not in j or "sum_received" not in j.get("end", {}):
            res["error"] = res.get("error") or f"no iperf3 result: {text[-300:]}"
        else:
            end = j["end"]
            res["mbps"] = end["sum_received"]["bits_per_second"] / 1e6
            res["bytes"] = end["sum_received"]["bytes"]
            # inner TCP retransmissions of the *sender*: with -R the sender is the server and
            # the client's JSON carries its count (end.sum_sent, "sender": false)
            res["retransmits"] = end.get("sum_sent", {}).get("retransmits")
            res["retransmits_of"] = "server" if reverse else "client"
            res["sent_bytes"] = end.get("sum_sent", {}).get("bytes")
        res["wall_s"] = round(wall, 2)
        res["link_bytes"] = self.link_delta(l0, l1)
        res["cpu_s"] = {r: round(c1[r] - c0[r], 3) for r in c1 if r in c0}
        if res.get("bytes") and res["cpu_s"]:
            res["cpu_s_per_gb"] = sum(res["cpu_s"].values()) / (res["bytes"] / 1e9)
        if ping_res is not None:
            res["ping"] = {
                "sent": ping_res["sent"],
                "received": ping_res["received"],
                "rtt_ms": [round(x, 2) for x in ping_res["rtt_ms"]],
            }
            rtt = res["ping"]["rtt_ms"]
            res["ping_p50_ms"], res["ping_p95_ms"] = rnd(pct(rtt, 50), 2), rnd(pct(rtt, 95), 2)
        if h0 and h1:
            fwd = {}
            for role in ("client", "server"):
                for d, after in h1[role].items():
                    q, n = hist_quantile(h0[role].get(d, {}), after, 0.95)
                    if n:
                        fwd[f"{role}.{d}"] = {
                            "p95_ms": rnd(q * 1000 if q is not None else None),
                            "n": n,
                        }
            res["fwd_p95"] = fwd
            # ut-tunnel's own drop counters over the test, by role and reason (non-zero only)
            res["ut_drops"] = {
                role: {k: int(v - h0["drops"][role].get(k, 0))
                       for k, v in h1["drops"][role].items() if v > h0["drops"][role].get(k, 0)}
                for role in ("client", "server")
            }
            # resequencing: numbers given up after the wait, and datagrams that came later
            res["ut_reorder"] = {
                role: {k: int(v - h0.get("reorder", {}).get(role, {}).get(k, 0))
                       for k, v in h1.get("reorder", {}).get(role, {}).items()}
                for role in ("client", "server")
            }
        return res


def rss_peaks(procs: dict) -> dict[str, int | None]:
    return {role: C.proc_status_kib(p.pid, "VmHWM") for role, p in procs.items()}


def bring_up(
    bench: Bench, carrier, limits=C.NO_LIMITS, echo_port=None, wg=True
) -> tuple[dict, dict]:
    """Start ``carrier``; with ``wg`` re-handshake WireGuard through it and check (a carrier
    that carries IP itself, OpenVPN, is checked by a ping to its own tunnel address)."""
    bed = bench.bed
    bench.target = carrier.inner_target(bed)
    procs = carrier.start(bed, limits, echo_port=echo_port)
    info: dict = {}
    if wg:
        # forget handshakes and learnt endpoints (also for OpenVPN, so that nothing is left
        # pointing at the previous carrier's, e.g. direct's, address)
        bed.reset_wireguard()
    if wg and carrier.carries_wireguard:
        info["first_reply_s"] = bed.wait_ping(bed.home, bench.target, within=15, interval=0.1)
        info["handshake"] = bed.latest_handshake(bed.home) > 0
        if not info["handshake"]:
            raise BedError("no WireGuard handshake recorded")
    elif wg:
        info["target"] = bench.target
        info["first_reply_s"] = bed.wait_ping(bed.home, bench.target, within=15, interval=0.1)
        if hasattr(carrier, "data_channel"):
            info["data_channel"] = carrier.data_channel(bed)
    if carrier.has_metrics:
        with contextlib.suppress(Exception):  # metrics unreadable: not checked
            info["implementation"] = carrier.implementation(bed)
        # the lanes after the first open 10-250 ms later (staggered): wait for them, so
        # that no TLS handshake falls into a measurement (link bytes of the idle pings)
        info["lanes_active"], info["lanes_wait_s"] = _wait_lanes(bed, carrier)
        want = "pure" if getattr(carrier, "pure", False) else "compiled"
        impl = info.get("implementation")
        if impl is not None and impl != want:  # (raised inside the suppress before: never seen)
            raise BedError(f"{carrier.name}: runs {impl!r}, expected {want!r}")
    return procs, info


def _wait_lanes(bed: NetBed, carrier, within: float = 5.0) -> tuple[int | None, float]:
    """Until home's ``ut_lanes_active`` reaches the carrier's lane count (or ``within`` s
    passed): (lanes active, seconds waited)."""
    want = getattr(carrier, "lanes", None)
    t0 = time.monotonic()
    active = None
    while True:
        with contextlib.suppress(BedError):
            active = int(
                sum(v for n, _lab, v in bed.metrics(bed.home) if n == "ut_lanes_active")
            )
        if want is None or (active is not None and active >= want):
            break
        if time.monotonic() - t0 > within:
            break
        time.sleep(0.05)
    return active, round(time.monotonic() - t0, 2)


@contextlib.contextmanager
def carrier_round(bed: NetBed, carrier, rec: dict, label: str, keep_logs: bool = False):
    """One carrier's turn in a round. Sets ``rec["ok"]`` (and ``rec["error"]``); a failure
    is recorded and the run goes on (``Deadline`` is not caught); the carrier is stopped,
    then the callables the body appended to the yielded list are called, whatever happens."""
    cleanups: list = []
    try:
        yield cleanups
        rec["ok"] = True
    except Deadline:
        raise
    except Exception as exc:  # noqa: BLE001 - one carrier failing must not stop the run
        rec["ok"] = False
        text = str(exc)
        if len(text) > 1200:  # the head says what failed, the tail (a traceback's) why
            text = text[:300] + " [...] " + text[-900:]
        rec["error"] = f"{type(exc).__name__}: {text}"
        log(f"  {label}: FAILED {rec['error'][:200]}")
        if keep_logs:
            for p in carrier.procs.values():
                rec.setdefault("logs", {})[p.bed_name] = bed.log_text(p, 15)[-1500:]
    finally:
        with contextlib.suppress(Exception):
            carrier.stop(bed)
        for fn in cleanups:
            fn()


# ---------------------------------------------------------------------- profiles
def rotated(seq: list, r: int) -> list:
    k = r % len(seq) if seq else 0
    return seq[k:] + seq[:k]


def profile_default(args, carriers: dict) -> dict:
    rounds_out = []
    with NetBed(verbose=args.verbose) as bed:
        bed.pki()
        bench = Bench(bed, args.duration)
        bench.start_iperf_server()
        for r in range(args.rounds):
            for name in rotated(list(carriers), r):
                carrier = carriers[name]
                rec = {"carrier": name, "round": r, "tests": {}}
                t0 = time.monotonic()
                with carrier_round(bed, carrier, rec, f"{name} round {r}", keep_logs=True):
                    procs, info = bring_up(bench, carrier)
                    rec.update(info)
                    rec["idle_ping"] = bench.idle_ping(args.idle_pings, procs)
                    for t in args.tests:
                        rev, streams = TESTS[t]
                        rec["tests"][t] = bench.iperf(
                            rev, streams, args.duration, carrier=carrier, procs=procs
                        )
                        if rec["tests"][t].get("error"):  # fail fast: the carrier is stuck
                            for rest in args.tests[args.tests.index(t) + 1 :]:
                                rec["tests"][rest] = {"error": f"skipped after {t} failed"}
                            break
                    rec["rss_kib"] = rss_peaks(procs)
                rec["elapsed_s"] = round(time.monotonic() - t0, 1)
                tp = " ".join(f"{t}={v.get('mbps', 0):.0f}" for t, v in rec["tests"].items())
                log(f"default r{r} {name:10s} {tp} Mbit/s  ({rec['elapsed_s']} s)")
                rounds_out.append(rec)
    return {"rounds": rounds_out, "tests": list(args.tests), "duration_s": args.duration}


def profile_seed(args, carriers: dict, wg_apart: bool = False) -> dict:
    """The seed's budget. ``wg_apart``: each side's wireguard-go may run on every CPU but the
    one its own tunnel process is pinned to (``seed-apart``); otherwise it floats (``seed``)."""
    cpus = args.seed_cpus.split(",")
    limits_desc = {"cpu_server": cpus[0], "cpu_client": cpus[-1], "memory_bytes": 512 << 20}
    rounds_out = []
    with NetBed(verbose=args.verbose) as bed:
        bed.pki()
        if wg_apart:
            limits_desc["wireguard_go_cpus"] = _pin_wireguard_apart(bed, int(cpus[0]), int(cpus[-1]))
        bench = Bench(bed, args.seed_duration)
        bench.start_iperf_server()
        for r in range(args.rounds):
            for name in rotated(list(carriers), r):
                carrier = carriers[name]
                limits = C.Limits(
                    cpus={"server": cpus[0], "client": cpus[-1]}, memory_bytes=512 << 20
                )
                rec = {"carrier": name, "round": r}
                t0 = time.monotonic()
                with carrier_round(bed, carrier, rec, f"{name} round {r}") as cleanups:
                    cleanups.append(limits.cleanup)
                    procs, info = bring_up(bench, carrier, limits)
                    rec.update(info)
                    rec["idle_ping"] = bench.idle_ping(args.idle_pings)
                    rec["test"] = bench.iperf(
                        False, 10, args.seed_duration, bitrate="10M", carrier=carrier, procs=procs
                    )
                    rec["rss_kib"] = rss_peaks(procs)
                    rec["memory_mode"] = limits.memory_mode
                    rec["memory_limit_hits"] = limits.oom_events()
                    rec["affinity"] = {role: _affinity(p.pid) for role, p in procs.items()}
                rec["elapsed_s"] = round(time.monotonic() - t0, 1)
                log(
                    f"seed r{r} {name:10s} {rec.get('test', {}).get('mbps', 0):.0f} Mbit/s "
                    f"fwd={rec.get('test', {}).get('fwd_p95')}"
                )
                rounds_out.append(rec)
    return {
        "rounds": rounds_out,
        "limits": limits_desc,
        "duration_s": args.seed_duration,
        "load": "iperf3 -P 10 -b 10M (100 Mbit/s total), home->cloud",
    }


def _pin_wireguard_apart(bed: NetBed, server_cpu: int, client_cpu: int) -> dict:
    """Keep each wireguard-go off the CPU of the tunnel process on its own side.

    On a shared core the tunnel's ``sendmmsg`` wakes wireguard-go, which preempts it
    mid-batch: the rest of the batch waits for the whole WireGuard/iperf3 chain to run
    (bench/README.md, "Seed profile"). On two real hosts, or with kernel WireGuard,
    the two do not compete for one core like this.
    """
    allowed = os.sched_getaffinity(0)
    out = {}
    for node in bed.nodes:
        own = server_cpu if node is bed.cloud else client_cpu
        cpus = allowed - {own}
        if not cpus:
            raise BedError(f"no CPU left for wireguard-go besides {own}: seed-apart needs 2 CPUs")
        proc = node.wg_proc
        if proc is None:
            raise BedError(f"no wireguard-go process for {node.name}")
        # Every thread: the Go runtime's later threads inherit the affinity of their creator.
        for tid in os.listdir(f"/proc/{proc.pid}/task"):
            os.sched_setaffinity(int(tid), cpus)
        out[node.name] = ",".join(map(str, sorted(cpus)))
    return out


def _affinity(pid: int) -> str | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                return line.split()[1]
    return None


def profile_small(args, carriers: dict) -> dict:
    """udpmon: echo in cloud where WireGuard would be, probe in home at the carrier's UDP port."""
    rounds_out = []
    ut = netbed.ut_tunnel_command()
    with NetBed(verbose=args.verbose) as bed:
        bed.pki()
        bench = Bench(bed, args.small_duration)
        for r in range(args.rounds):
            for name in rotated(list(carriers), r):
                carrier = carriers[name]
                rec = {"carrier": name, "round": r, "probes": {}}
                with carrier_round(bed, carrier, rec, f"{name} round {r}") as cleanups:
                    echo_addr = (
                        f"{bed.cloud.link_ip}:{ECHO_PORT}"
                        if name == "direct"
                        else f"127.0.0.1:{ECHO_PORT}"
                    )
                    echo = bed.spawn(
                        bed.cloud,
                        [*ut, "udpmon", "echo", "--listen", echo_addr, "--quiet"],
                        name="udpmon-echo",
                    )
                    cleanups.append(lambda echo=echo: bed.stop(echo))
                    procs, info = bring_up(bench, carrier, echo_port=ECHO_PORT, wg=False)
                    target = carrier.udpmon_target(bed, ECHO_PORT)
                    bind = ["--bind", carrier.udpmon_bind()] if carrier.udpmon_bind() else []
                    # warm-up: open lanes / UDP sessions, then the measured probes
                    bed.run(
                        bed.home,
                        [
                            *ut,
                            "udpmon",
                            "probe",
                            "--target",
                            target,
                            "--rate",
                            "50",
                            "--duration",
                            "0.5",
                            "--wait",
                            "2",
                            "--json",
                            *bind,
                        ],
                        check=False,
                        timeout=20,
                    )
                    for pname, pargs in SMALL_PROBES.items():
                        c0 = bench.cpu(procs)
                        res = bed.run(
                            bed.home,
                            [
                                *ut,
                                "udpmon",
                                "probe",
                                "--target",
                                target,
                                *pargs,
                                "--duration",
                                str(args.small_duration),
                                "--wait",
                                "1",
                                "--json",
                                *bind,
                            ],
                            check=False,
                            timeout=args.small_duration + 30,
                        )
                        c1 = bench.cpu(procs)
                        try:
                            j = json.loads(res.stdout)
                        except ValueError:
                            rec["probes"][pname] = {"error": (res.stderr or res.stdout)[-300:]}
                            continue
                        cpu = sum(c1[k] - c0[k] for k in c1 if k in c0)
                        dgrams = j["sent"] + j["received"]  # each crosses the tunnel once
                        rec["probes"][pname] = {
                            "sent": j["sent"],
                            "received": j["received"],
                            "loss_pct": j["loss_pct"],
                            "achieved_pps": j["rate"]["achieved_pps"],
                            "kept_up": j["rate"]["kept_up"],
                            "reordered": j["reordered"],
                            "rtt_ms": j["rtt_ms"],
                            "cpu_s": round(cpu, 3) if procs else None,
                            "cpu_us_per_dgram": (cpu / dgrams * 1e6) if procs and dgrams else None,
                        }
                    rec["rss_kib"] = rss_peaks(procs)
                log(
                    f"small r{r} {name:10s} "
                    + " ".join(
                        f"{k}: loss {v.get('loss_pct')}% p50 {(v.get('rtt_ms') or {}).get('p50')} ms"
                        for k, v in rec["probes"].items()
                    )
                )
                rounds_out.append(rec)
    return {
        "rounds": rounds_out,
        "probes": {k: " ".join(v) for k, v in SMALL_PROBES.items()},
        "duration_s": args.small_duration,
    }


def profile_micro(args) -> dict:
    import micro

    return micro.run(quick=args.quick)


def link_settings(args, kind: str) -> dict:
    """The emulated link and the tests of the ``lossy`` or ``slow`` profile, from the options."""
    a = vars(args)
    return {
        "params": {
            "delay_ms": a[f"{kind}_delay_ms"],
            "loss_pct": a[f"{kind}_loss_pct"],
            "rate_mbit": a[f"{kind}_rate_mbit"],
            "limit": a[f"{kind}_limit"],
        },
        "tests": a[f"{kind}_tests"],
        "duration": a[f"{kind}_duration"],
        "inner_cc": a[f"{kind}_inner_cc"] or None,
    }


def profile_lossy(args, carriers: dict, kind: str = "lossy") -> dict:
    """Home and cloud joined by ut/_testbase/linkemu.py; every carrier (and direct WireGuard) goes
    over that link instead of the veth. ``lossy``: 20 ms one-way, 1 % loss, both
    directions; ``slow``: a slow home uplink, 20 Mbit/s each way, 10 ms one-way, a
    50-packet queue (the ``--lossy-*`` and ``--slow-*`` options)."""
    from ut._testbase import linkemu

    cfg = link_settings(args, kind)
    params, tests, duration = cfg["params"], cfg["tests"], cfg["duration"]
    rounds_out = []
    with NetBed(verbose=args.verbose) as bed:
        bed.pki()
        # The carriers' outer TCP uses the namespace default (inherited from the host; the
        # sysctl is read-only in namespaces here). The inner iperf3 TCP may be set per socket.
        cc = bed.run(bed.home, ["sysctl", "-n", "net.ipv4.tcp_congestion_control"]).stdout.strip()
        bench_cc = cfg["inner_cc"]
        with linkemu.LinkEmu(bed.home.ns, bed.cloud.ns, **params) as link:
            # UDP is dropped on the emulated link too (direct lifts it like on the veth), so
            # WireGuard's UDP can only cross it through a carrier's TCP
            bed.add_drop_link(bed.home, link.dev_a)
            bed.add_drop_link(bed.cloud, link.dev_b)
            # the server certificate names the veth address; ut, v2ray, sing-box and
            # OpenVPN check the name, so the emulated link's address works as well
            for c in carriers.values():
                c.server_ip = link.addr_b
            bench = Bench(bed, duration)
            bench.link_devs["home"].append(link.dev_a)
            bench.link_devs["cloud"].append(link.dev_b)
            bench.cc = bench_cc
            bench.start_iperf_server()
            base = bed.run(
                bed.home,
                [
                    sys.executable,
                    str(HERE / "pinger.py"),
                    link.addr_b,
                    "--interval",
                    "0.05",
                    "--duration",
                    "1.5",
                ],
                timeout=30,
            )
            link_rtt = json.loads(base.stdout.strip().splitlines()[-1])
            try:
                for r in range(args.rounds):
                    for name in rotated(list(carriers), r):
                        carrier = carriers[name]
                        rec = {"carrier": name, "round": r, "tests": {}}
                        t0 = time.monotonic()
                        with carrier_round(bed, carrier, rec, f"{name} round {r}", keep_logs=True):
                            procs, info = bring_up(bench, carrier)
                            rec.update(info)
                            if args.link_idle_pings:
                                rec["idle_ping"] = bench.idle_ping(args.link_idle_pings, procs)
                            u0 = bed.udp_dropped()
                            for t in tests:
                                rev, streams = TESTS[t]
                                s0 = link.stats()
                                w0 = wg_socket_drops(bed)
                                e0 = tcp_events(bed)
                                rec["tests"][t] = bench.iperf(
                                    rev, streams, duration, carrier=carrier, procs=procs
                                )
                                s1 = link.stats()
                                w1 = wg_socket_drops(bed)
                                e1 = tcp_events(bed)
                                rec["tests"][t]["wg_socket_drops"] = sum(w1.values()) - sum(w0.values())
                                rec["tests"][t]["tcp_events"] = {k: e1[k] - e0[k] for k in e1}
                                rec["tests"][t]["link"] = {
                                    d: {
                                        k: s1[d][k] - s0[d][k] for k in ("seen", "lost", "overflow")
                                    }
                                    for d in ("ab", "ba")
                                }
                                if rec["tests"][t].get("error"):  # fail fast: carrier stuck
                                    for rest in tests[tests.index(t) + 1 :]:
                                        rec["tests"][rest] = {"error": f"skipped after {t} failed"}
                                    break
                            # UDP the drop rules caught while the carrier ran (0 for a
                            # carrier that keeps WireGuard's UDP inside its TCP)
                            if name != "direct":
                                rec["udp_dropped"] = bed.udp_dropped() - u0
                            rec["rss_kib"] = rss_peaks(procs)
                        rec["elapsed_s"] = round(time.monotonic() - t0, 1)
                        tp = " ".join(
                            f"{t}={v.get('mbps', 0):.1f}" for t, v in rec["tests"].items()
                        )
                        pg = " ".join(
                            f"{t}:{v.get('ping_p50_ms')}/{v.get('ping_p95_ms')}"
                            for t, v in rec["tests"].items()
                        )
                        rt = " ".join(
                            f"{t}:{v.get('retransmits')}" for t, v in rec["tests"].items()
                        ) + "  wg sock drops " + " ".join(
                            f"{t}:{v.get('wg_socket_drops')}" for t, v in rec["tests"].items()
                        )
                        ro = " ".join(
                            f"{t}:{sum(x['skipped'] for x in v['ut_reorder'].values())}"
                            f"/{sum(x['late'] for x in v['ut_reorder'].values())}"
                            for t, v in rec["tests"].items() if v.get("ut_reorder")
                        )
                        log(
                            f"{kind} r{r} {name:10s} {tp} Mbit/s  ping p50/p95 {pg}  "
                            f"retr {rt}  ({rec['elapsed_s']} s)"
                            + (f"  reorder skipped/late {ro}" if ro else "")
                        )
                        rounds_out.append(rec)
            finally:
                for c in carriers.values():
                    c.server_ip = None
    return {
        "rounds": rounds_out,
        "tests": list(tests),
        "duration_s": duration,
        "tcp_cc": cc,
        "inner_cc": bench_cc or cc,
        "link": {
            **params,
            "both_directions": True,
            "emulator": "ut/_testbase/linkemu.py (userspace TUN forwarder)",
            "link_rtt_ms": link_rtt.get("rtt_ms", []),
        },
    }


# ---------------------------------------------------------------------- facts
def _cmd(argv, env=None) -> str:
    try:
        res = subprocess.run(
            argv, capture_output=True, text=True, timeout=10, env={**os.environ, **(env or {})}
        )
        return (
            (res.stdout or res.stderr).strip().splitlines()[0]
            if (res.stdout or res.stderr).strip()
            else ""
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""


def proc_stat() -> list[int]:
    """The aggregate 'cpu' line of /proc/stat: user nice system idle iowait irq softirq steal."""
    with open("/proc/stat") as fh:
        return [int(x) for x in fh.readline().split()[1:9]]


def cpu_usage(a: list[int], b: list[int]) -> dict:
    d = [y - x for x, y in zip(a, b, strict=True)]
    total = sum(d) or 1
    return {
        "busy_pct": round(100 * (total - d[3] - d[4]) / total, 1),
        "steal_pct": round(100 * d[7] / total, 1),
    }


def _read(path: str) -> str | None:
    try:
        return " ".join(Path(path).read_text().split())
    except OSError:
        return None


def machine_facts() -> dict:
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    git = _cmd(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    if not git or git.startswith("fatal"):  # e.g. a `git archive` export run side by side
        git = f"{ROOT} is not a git checkout; set BENCH_GIT to say what it is"
    git = os.environ.get("BENCH_GIT") or git
    dirty = (
        subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "ut"],
            capture_output=True,
            text=True,
        )
        .stdout.strip()
        .splitlines()
    )
    so = sorted(ROOT.glob("ut/_fastpath*.so"))
    ut = " ".join(netbed.ut_tunnel_command())
    return {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
        "cpu": cpu_model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "git": git + (f" + {len(dirty)} uncommitted change(s) in ut/" if dirty else ""),
        "fastpath_so_mtime": (
            _dt.datetime.fromtimestamp(so[0].stat().st_mtime).isoformat(timespec="seconds")
            if so
            else None
        ),
        "ut_tunnel": _cmd([*ut.split(), "--version"]),
        # the ut package the ut-tunnel processes import (PYTHONPATH may point at another copy)
        "ut_package": _cmd(
            [sys.executable, "-c", "import ut, os; print(os.path.dirname(ut.__file__))"]
        ),
        "pythonpath": os.environ.get("PYTHONPATH"),
        "ut_tunnel_pure": _cmd([*ut.split(), "--version"], env={"UT_NO_EXTENSIONS": "1"}),
        "v2ray": _cmd(["v2ray", "-version"]),
        "openvpn": C.OpenVpn().version(),
        "sing_box": C.SingBox().version(),
        "udptunnel": _cmd(["dpkg-query", "-W", "-f", "${Version}", "udptunnel"]),
        "wireguard_go": _cmd(["dpkg-query", "-W", "-f", "${Version}", "wireguard-go"]),
        "iperf3": _cmd(["iperf3", "--version"]),
        "wg_mtu": netbed.DEFAULT_WG_MTU,
        "tcp_cc": _read("/proc/sys/net/ipv4/tcp_congestion_control"),
        "tcp_wmem": _read("/proc/sys/net/ipv4/tcp_wmem"),
        "tcp_rmem": _read("/proc/sys/net/ipv4/tcp_rmem"),
    }


# ---------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick", action="store_true", help="~2-minute sanity run (1 round, short tests)"
    )
    p.add_argument(
        "--rounds", type=int, default=None, help="rounds per profile (default 3; quick 1)"
    )
    p.add_argument("--profiles", default=",".join(ALL_PROFILES))
    p.add_argument(
        "--carriers",
        default="direct,ut,ut-pure,v2ray,udptunnel",
        help="default/seed/small carriers, in order",
    )
    p.add_argument(
        "--seed-carriers",
        default="direct,ut,ut-pure,v2ray",
        help="seed profile carriers (udptunnel cannot carry the TCP load; add it to see)",
    )
    p.add_argument(
        "--lossy-carriers",
        default=None,
        help=f"lossy profile carriers (default {LINK_CARRIERS}; quick {LINK_CARRIERS_QUICK})",
    )
    p.add_argument(
        "--slow-carriers",
        default=None,
        help=f"slow profile carriers (default {LINK_CARRIERS}; quick {LINK_CARRIERS_QUICK})",
    )
    p.add_argument(
        "--tests",
        default=None,
        help="default profile's iperf3 tests (default up1,down1,up10,down10; quick up1,down1)",
    )
    p.add_argument(
        "--lossy-tests",
        default=None,
        help="lossy profile's iperf3 tests (default up1,up10,down1,down10; quick up1,down1)",
    )
    p.add_argument(
        "--lossy-duration", type=float, default=None, help="seconds per lossy test (default 5)"
    )
    p.add_argument(
        "--lossy-delay-ms", type=float, default=20.0, help="one-way delay of the lossy link"
    )
    p.add_argument(
        "--lossy-loss-pct", type=float, default=1.0, help="loss of the lossy link, each way"
    )
    p.add_argument(
        "--lossy-rate-mbit",
        type=float,
        default=0.0,
        help="rate of the lossy link, each way (0 = unlimited); with it the link queues "
        "up to --lossy-limit packets, like a home router's buffer",
    )
    p.add_argument(
        "--lossy-limit", type=int, default=10000, help="packets the lossy link queues, each way"
    )
    p.add_argument(
        "--lossy-inner-cc",
        default="",
        help="congestion control of the inner iperf3 TCP in the lossy profile (iperf3 -C, "
        "e.g. cubic); default: the namespace's (host's). The carriers' outer TCP "
        "always uses the namespace default",
    )
    # the slow profile: a slow home uplink (issue 14), the same machinery as lossy
    p.add_argument(
        "--slow-tests",
        default=None,
        help="slow profile's iperf3 tests (default up1,up10,down1,down10; quick up1,down1)",
    )
    p.add_argument(
        "--slow-duration", type=float, default=None, help="seconds per slow test (default 8)"
    )
    p.add_argument(
        "--slow-delay-ms", type=float, default=10.0,
        help="one-way delay of the slow link, each way (default 10: 20 ms RTT)",
    )
    p.add_argument(
        "--slow-loss-pct", type=float, default=0.0, help="random loss of the slow link, each way"
    )
    p.add_argument(
        "--slow-rate-mbit", type=float, default=20.0, help="rate of the slow link, each way"
    )
    p.add_argument(
        "--slow-limit", type=int, default=50,
        help="packets the slow link queues, each way (a home router's buffer; tail drop)",
    )
    p.add_argument(
        "--slow-inner-cc",
        default="cubic",
        help="congestion control of the inner iperf3 TCP in the slow profile (default cubic, "
        "the loss-based default of most clients; '' = the namespace's)",
    )
    p.add_argument(
        "--duration", type=float, default=None, help="seconds per iperf3 test (default 5)"
    )
    p.add_argument(
        "--seed-duration", type=float, default=None, help="seconds of the seed test (default 6)"
    )
    p.add_argument(
        "--small-duration", type=float, default=None, help="seconds per udpmon probe (default 2)"
    )
    p.add_argument(
        "--idle-pings", type=int, default=None, help="idle pings per carrier and round (30)"
    )
    p.add_argument(
        "--link-idle-pings", type=int, default=0,
        help="idle pings (50 ms apart) per carrier and round before the tests of the lossy "
        "and slow profiles (default 0: none)",
    )
    p.add_argument(
        "--seed-cpus",
        default="0,1",
        help="CPU for the server,client in the seed profile (taskset); '0,0' puts both on CPU 0",
    )
    p.add_argument(
        "--out",
        default=None,
        help="markdown report (default bench/RESULTS.md; quick: bench/results/quick.md)",
    )
    p.add_argument("--results-dir", default=str(HERE / "results"))
    p.add_argument(
        "--wg-rmem",
        type=int,
        default=WG_RMEM_DEFAULT,
        help="net.core.rmem_default (bytes) while the run builds its beds, so wireguard-go's "
        "UDP socket gets this receive buffer (Debian's 2022 wireguard-go keeps the kernel "
        "default, 208 KiB; wireguard-go since 0.0.20230223 asks for 7 MiB itself); the old "
        "value is restored at the end. 0 leaves the sysctl alone",
    )
    p.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="hard bound on the whole run (default: 90, quick 10)",
    )
    p.add_argument("--verbose", action="store_true")
    a = p.parse_args(argv)
    q = a.quick
    a.rounds = a.rounds or (1 if q else 3)
    a.duration = a.duration or (3.0 if q else 5.0)
    a.seed_duration = a.seed_duration or (4.0 if q else 6.0)
    a.small_duration = a.small_duration or (1.5 if q else 2.0)
    a.idle_pings = a.idle_pings or (20 if q else 30)
    a.max_minutes = a.max_minutes or (10 if q else 90)
    a.profiles = [x for x in a.profiles.split(",") if x]
    a.lossy_duration = a.lossy_duration or (4.0 if q else 5.0)
    a.slow_duration = a.slow_duration or (4.0 if q else 8.0)
    a.tests = a.tests or ("up1,down1" if q else "up1,down1,up10,down10")
    a.lossy_tests = a.lossy_tests or ("up1,down1" if q else "up1,up10,down1,down10")
    a.slow_tests = a.slow_tests or ("up1,down1" if q else "up1,up10,down1,down10")
    a.lossy_carriers = a.lossy_carriers or (LINK_CARRIERS_QUICK if q else LINK_CARRIERS)
    a.slow_carriers = a.slow_carriers or (LINK_CARRIERS_QUICK if q else LINK_CARRIERS)
    a.carriers = [x for x in a.carriers.split(",") if x]
    a.seed_carriers = [x for x in a.seed_carriers.split(",") if x]
    a.lossy_carriers = [x for x in a.lossy_carriers.split(",") if x]
    a.slow_carriers = [x for x in a.slow_carriers.split(",") if x]
    a.tests = [x for x in a.tests.split(",") if x]
    a.lossy_tests = [x for x in a.lossy_tests.split(",") if x]
    a.slow_tests = [x for x in a.slow_tests.split(",") if x]
    for t in a.tests + a.lossy_tests + a.slow_tests:
        if t not in TESTS:
            p.error(f"unknown test {t!r} (have {', '.join(TESTS)})")
    for x in a.profiles:
        if x not in ALL_PROFILES:
            p.error(f"unknown profile {x!r} (have {', '.join(ALL_PROFILES)})")
    known = C.all_carriers()
    for x in a.carriers + a.seed_carriers + a.lossy_carriers + a.slow_carriers:
        if x not in known:
            p.error(f"unknown carrier {x!r} (have {', '.join(known)})")
    if a.out is None:
        a.out = str(HERE / "results" / "quick.md") if q else str(HERE / "RESULTS.md")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    needs_bed = any(
        x in args.profiles for x in ("default", "seed", "seed-apart", "small", "lossy", "slow")
    )
    if needs_bed:
        reasons = netbed.missing_prerequisites(netbed.REQUIRED_TOOLS + ("iperf3", "ss", "taskset"))
        if reasons:
            sys.exit("bench: cannot run: " + "; ".join(reasons))
    with contextlib.suppress(Exception):
        for ns in netbed.remove_stale_beds():
            log(f"removed stale namespace {ns}")

    def on_signal(signum, _frame):
        raise SystemExit(f"bench: signal {signum}")

    def on_alarm(_signum, _frame):
        raise Deadline(f"run exceeded --max-minutes {args.max_minutes}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(int(args.max_minutes * 60))

    known = C.all_carriers()
    carriers, skipped = {}, {}
    for name in dict.fromkeys(
        args.carriers + args.seed_carriers + args.lossy_carriers + args.slow_carriers
    ):
        why = known[name].available()
        if why:
            skipped[name] = why
            log(f"carrier {name} skipped: {why}")
        else:
            carriers[name] = known[name]

    def pick(names):
        return {n: carriers[n] for n in names if n in carriers}

    facts = machine_facts()
    log(f"nproc {facts['nproc']}, load {facts['loadavg_start']}, {facts['ut_tunnel']}")
    cmdline = "python bench/run.py" + "".join(
        " " + a for a in (argv if argv is not None else sys.argv[1:])
    )
    results = {
        "schema": "ut-bench/1",
        "command": cmdline,
        "facts": facts,
        "args": {k: v for k, v in vars(args).items() if k not in ("out", "results_dir")},
        "carriers": {n: {"label": c.label, "version": c.version()} for n, c in carriers.items()},
        "carriers_skipped": skipped,
        "profiles": {},
    }
    t_start = time.monotonic()
    stat0 = proc_stat()
    rmem = contextlib.ExitStack()
    try:
        old_rmem = rmem.enter_context(wg_receive_buffer(args.wg_rmem))
        results["facts"]["wg_rmem"] = {"set": args.wg_rmem, "was": old_rmem}
        if old_rmem is not None:
            log(f"net.core.rmem_default {old_rmem} -> {args.wg_rmem} for this run")
        for prof in args.profiles:
            t0 = time.monotonic()
            log(f"profile {prof} ...")
            try:
                if prof == "default":
                    out = profile_default(args, pick(args.carriers))
                elif prof in ("seed", "seed-apart"):
                    out = profile_seed(args, pick(args.seed_carriers), prof == "seed-apart")
                elif prof == "small":
                    out = profile_small(args, pick(args.carriers))
                elif prof == "micro":
                    out = profile_micro(args)
                elif prof == "slow":
                    out = profile_lossy(args, pick(args.slow_carriers), kind="slow")
                else:
                    out = profile_lossy(args, pick(args.lossy_carriers))
            except Deadline:
                raise
            except Exception as exc:  # noqa: BLE001
                out = {
                    "error": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc()[-3000:],
                }
                log(f"profile {prof} FAILED: {exc}")
            out["elapsed_s"] = round(time.monotonic() - t0, 1)
            if prof in ("default", "seed", "seed-apart", "small", "lossy", "slow"):
                out.setdefault(
                    "carriers",
                    list(
                        pick(
                            {
                                "default": args.carriers,
                                "seed": args.seed_carriers,
                                "seed-apart": args.seed_carriers,
                                "small": args.carriers,
                                "lossy": args.lossy_carriers,
                                "slow": args.slow_carriers,
                            }[prof]
                        )
                    ),
                )
            results["profiles"][prof] = out
    except Deadline as exc:
        results["aborted"] = str(exc)
        log(str(exc))
    finally:
        rmem.close()
        signal.alarm(0)
        results["facts"]["loadavg_end"] = os.getloadavg()
        results["facts"]["cpu_during_run"] = cpu_usage(stat0, proc_stat())
        results["elapsed_s"] = round(time.monotonic() - t_start, 1)
        import report

        rd = Path(args.results_dir)
        rd.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        jpath = rd / ("quick.json" if args.quick else f"run-{stamp}.json")
        jpath.write_text(json.dumps(results, separators=(",", ":")) + "\n")
        md = report.render(
            results, jpath.relative_to(ROOT) if jpath.is_relative_to(ROOT) else jpath
        )
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(md)
        log(f"wrote {args.out} and {jpath} in {results['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
