#!/usr/bin/env python3
"""Where a carrier's CPU goes while it carries iperf3 through real WireGuard.

Issue 6 asks, for a target out of reach, for "the profile that says where the time
goes". This brings up the benchmark's test bed (two namespaces, wireguard-go, UDP
dropped between them), starts one carrier, runs one iperf3 test through it, and
while it runs samples the two tunnel processes with ``perf``:

* ``perf record`` (999 Hz, both processes): share of samples by code object, grouped
  into kernel / Python interpreter / uvloop / OpenSSL / libc / ut fast path, and the
  kernel entry points (system calls) that hold the kernel's share;
* ``perf stat`` on the syscall tracepoints: how many calls of each kind per second and
  how many datagrams each ``recvmmsg``/``sendmmsg``/TLS read/write carried (datagram
  counts from the carrier's own metrics);
* ``/proc``: CPU seconds per GB and context switches per MB.

    sudo python bench/cpuprofile.py                       # ut, up, 1 stream, 12 s
    sudo python bench/cpuprofile.py --carrier ut-sockbuf16k --direction down
    sudo python bench/cpuprofile.py --carrier v2ray       # no datagram counts (no metrics)

Needs what ``bench/run.py`` needs, plus ``perf`` (linux-perf). Results: one JSON
object on stdout (``--json FILE`` to keep it) and a markdown summary on stderr.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import carriers as C  # noqa: E402
from run import Bench, bring_up, log  # noqa: E402

from ut._testbase.netbed import NetBed  # noqa: E402

SYSCALLS = ("recvmmsg", "sendmmsg", "read", "write", "epoll_pwait", "epoll_wait", "epoll_ctl")
# code object (perf "dso") -> group; first match on a substring wins
GROUPS = (
    ("[kernel", "kernel"),
    ("libpython", "Python interpreter"),
    ("python3", "Python interpreter"),
    ("loop.cpython", "uvloop"),
    ("libssl", "OpenSSL"),
    ("libcrypto", "OpenSSL"),
    ("_ssl.cpython", "OpenSSL"),
    ("_fastpath", "ut fast path"),
    ("libc.so", "libc (malloc, memcpy, syscall stubs)"),
)
# kernel functions worth naming (time under each, as a share of all samples; they
# overlap: a send's softirq delivery also counts under net_rx_action)
ENTRIES = {
    "udp_sendmsg": "UDP send (datagrams out, incl. their local delivery)",
    "udp_recvmsg": "UDP receive",
    "tcp_sendmsg": "TCP send (TLS records out, incl. veth delivery)",
    "tcp_recvmsg": "TCP receive",
    "do_epoll_wait": "epoll wait",
    "__schedule": "scheduler",
    "net_rx_action": "softirq packet processing",
}


def group_of(dso: str) -> str:
    for key, name in GROUPS:
        if key in dso:
            return name
    return "other"


def ctx_switches(pid: int) -> tuple[int, int]:
    vol = invol = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches"):
                vol = int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches"):
                invol = int(line.split()[1])
    return vol, invol


def datagram_counts(bed: NetBed, carrier) -> dict[str, float]:
    """ut metrics: datagrams in from UDP and out to UDP, per role."""
    if not carrier.has_metrics:
        return {}
    out = {}
    for role, node in (("client", bed.home), ("server", bed.cloud)):
        for name, _lab, v in bed.metrics(node):
            if name in ("ut_udp_in_packets_total", "ut_udp_out_packets_total"):
                key = f"{role}.{name[7:-14]}"  # client.in / client.out
                out[key] = out.get(key, 0.0) + v
    return out


def perf_report(data: Path, pids: dict[str, int]) -> dict:
    """Shares of all samples: by role x group, and kernel entry points per role."""
    res = subprocess.run(
        ["perf", "report", "-i", str(data), "--no-children", "--sort", "pid,dso",
         "-g", "none", "--stdio", "-q"],
        capture_output=True, text=True, check=False,
    )
    by_pid = {str(p): role for role, p in pids.items()}
    groups: dict[str, dict[str, float]] = collections.defaultdict(lambda: collections.defaultdict(float))
    for line in res.stdout.splitlines():
        parts = line.split()
        if len(parts) < 3 or not parts[0].endswith("%"):
            continue
        share = float(parts[0].rstrip("%"))
        pid = parts[1].split(":")[0]
        role = by_pid.get(pid, "other")
        groups[role][group_of(" ".join(parts[2:]))] += share
    # One report sorted by pid and symbol (``--pid`` filtering mixed processes up here).
    res = subprocess.run(
        ["perf", "report", "-i", str(data), "--children", "--sort", "pid,sym",
         "-g", "none", "--stdio", "-q"],
        capture_output=True, text=True, check=False,
    )
    entries: dict[str, dict[str, float]] = {role: {} for role in pids}
    for line in res.stdout.splitlines():
        parts = line.split()
        if len(parts) < 5 or not parts[0].endswith("%") or parts[-1] not in ENTRIES:
            continue
        role = by_pid.get(parts[2].split(":")[0])
        if role is not None:
            what = ENTRIES[parts[-1]]
            entries[role][what] = round(entries[role].get(what, 0.0) + float(parts[0][:-1]), 2)
    entries = {r: dict(sorted(e.items(), key=lambda kv: -kv[1])) for r, e in entries.items()}
    return {"groups": {r: {k: round(v, 2) for k, v in sorted(g.items(), key=lambda kv: -kv[1])}
                       for r, g in groups.items()},
            "kernel_entries": entries}


def perf_stat(path: Path) -> dict[str, int]:
    counts = {}
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            parts = line.split(",")
            if len(parts) >= 3 and parts[2].startswith("syscalls:sys_enter_"):
                with contextlib.suppress(ValueError):
                    counts[parts[2][len("syscalls:sys_enter_"):]] = int(parts[0])
    return counts


def profile(args) -> dict:
    carrier = C.all_carriers()[args.carrier]
    why = carrier.available()
    if why:
        raise SystemExit(f"{args.carrier}: {why}")
    work = Path(tempfile.mkdtemp(prefix="utprof-"))
    with NetBed() as bed:
        bed.pki()
        bench = Bench(bed, args.seconds)
        bench.start_iperf_server()
        procs, _info = bring_up(bench, carrier)
        pids = {role: p.pid for role, p in procs.items()}
        cpu0 = {r: C.proc_cpu_seconds(p) for r, p in pids.items()}
        ctx0 = {r: ctx_switches(p) for r, p in pids.items()}
        cmd = ["iperf3", "-c", bench.target, "-t", str(args.seconds), "-J",
               "-P", str(args.streams)] + (["-R"] if args.direction == "down" else [])
        ip = bed.spawn(bed.home, cmd, name="iperf3-client")
        time.sleep(1.5)  # past slow start
        window = max(2.0, args.seconds - 3.0)
        d0, t0 = datagram_counts(bed, carrier), time.monotonic()
        pid_list = ",".join(str(p) for p in pids.values())
        events = ",".join(f"syscalls:sys_enter_{s}" for s in SYSCALLS)
        stats = {
            role: subprocess.Popen(
                ["perf", "stat", "-x,", "-e", events, "-o", str(work / f"stat-{role}.txt"),
                 "-p", str(pid), "--", "sleep", str(window)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            for role, pid in pids.items()
        }
        rec = subprocess.Popen(
            ["perf", "record", "-F", "999", "-g", "-o", str(work / "perf.data"), "-p", pid_list,
             "--", "sleep", str(window)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        for p in (*stats.values(), rec):
            p.wait(window + 30)
        d1, t1 = datagram_counts(bed, carrier), time.monotonic()
        ip.wait(args.seconds + 30)
        cpu1 = {r: C.proc_cpu_seconds(p) for r, p in pids.items()}
        ctx1 = {r: ctx_switches(p) for r, p in pids.items()}
        text = bed.log_text(ip)
        j, _ = json.JSONDecoder().raw_decode(text[text.index("{"):])
        nbytes = j["end"]["sum_received"]["bytes"]
        mbps = j["end"]["sum_received"]["bits_per_second"] / 1e6
        carrier.stop(bed)
    span = t1 - t0
    out: dict = {"command": "python bench/cpuprofile.py " + " ".join(sys.argv[1:]),
                 "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
                 "carrier": args.carrier, "label": carrier.label, "direction": args.direction,
                 "streams": args.streams, "seconds": args.seconds, "mbps": round(mbps, 1),
                 "window_s": round(span, 2), "roles": {}}
    for role in pids:
        gb = nbytes / 1e9
        vol = ctx1[role][0] - ctx0[role][0]
        invol = ctx1[role][1] - ctx0[role][1]
        calls = perf_stat(work / f"stat-{role}.txt")
        r = out["roles"][role] = {
            "cpu_s_per_gb": round((cpu1[role] - cpu0[role]) / gb, 2),
            "voluntary_ctx_per_mb": round(vol / (nbytes / 1e6), 1),
            "involuntary_ctx_per_mb": round(invol / (nbytes / 1e6), 1),
            "syscalls_per_s": {k: round(v / window) for k, v in calls.items() if v},
        }
        if d0 and d1:
            din = d1.get(f"{role}.in", 0) - d0.get(f"{role}.in", 0)
            dout = d1.get(f"{role}.out", 0) - d0.get(f"{role}.out", 0)
            r["datagrams_per_s"] = {"udp_in": round(din / span), "udp_out": round(dout / span)}
            if calls.get("recvmmsg"):
                r["datagrams_per_recvmmsg"] = round(din / calls["recvmmsg"], 1)
            if calls.get("sendmmsg"):
                r["datagrams_per_sendmmsg"] = round(dout / calls["sendmmsg"], 1)
            if calls.get("write"):
                r["datagrams_per_tls_write"] = round(din / calls["write"], 1)
    if (work / "perf.data").exists():
        out["perf"] = perf_report(work / "perf.data", pids)
    if os.environ.get("UTPROF_KEEP"):
        log(f"kept {work}, pids {pids}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return out


def markdown(res: dict) -> str:
    lines = [f"### `{res['carrier']}` ({res['label']}), {res['direction']} x{res['streams']}: "
             f"{res['mbps']} Mbit/s", ""]
    roles = list(res["roles"])
    lines += ["| | " + " | ".join(roles) + " |", "|---|" + "---|" * len(roles)]

    def row(name, f):
        lines.append(f"| {name} | " + " | ".join(str(f(res["roles"][r])) for r in roles) + " |")

    row("CPU s/GB", lambda r: r["cpu_s_per_gb"])
    row("context switches per MB (voluntary / involuntary)",
        lambda r: f"{r['voluntary_ctx_per_mb']} / {r['involuntary_ctx_per_mb']}")
    for k in ("datagrams_per_recvmmsg", "datagrams_per_sendmmsg", "datagrams_per_tls_write"):
        if any(k in res["roles"][r] for r in roles):
            row(k.replace("_", " "), lambda r, k=k: r.get(k, "–"))
    row("system calls per s", lambda r: ", ".join(f"{k} {v}" for k, v in r["syscalls_per_s"].items()))
    perf = res.get("perf")
    if perf:
        lines += ["", "Share of all samples of both processes (perf, 999 Hz):", ""]
        names = sorted({g for r in roles for g in perf["groups"].get(r, {})},
                       key=lambda g: -sum(perf["groups"].get(r, {}).get(g, 0) for r in roles))
        lines += ["| code | " + " | ".join(roles) + " |", "|---|" + "---|" * len(roles)]
        for g in names:
            lines.append(f"| {g} | " + " | ".join(
                f"{perf['groups'].get(r, {}).get(g, 0):.1f} %" for r in roles) + " |")
        lines += ["", "Kernel functions (time under each, as a share of all samples; they overlap):", ""]
        for r in roles:
            ent = ", ".join(f"{k} {v:.1f} %" for k, v in perf["kernel_entries"].get(r, {}).items())
            lines.append(f"- {r}: {ent}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--carrier", default="ut", help="a bench/run.py carrier name (default ut)")
    p.add_argument("--direction", choices=("up", "down"), default="up")
    p.add_argument("--streams", type=int, default=1)
    p.add_argument("--seconds", type=float, default=12.0)
    p.add_argument("--json", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces, perf on other processes)")
    if not shutil.which("perf"):
        raise SystemExit("perf not found (apt-get install linux-perf)")
    res = profile(args)
    text = json.dumps(res, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    log("\n" + markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
