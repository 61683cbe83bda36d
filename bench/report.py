#!/usr/bin/env python3
"""Render a bench/run.py JSON result as markdown (bench/RESULTS.md).

    python bench/report.py bench/results/run-YYYYmmdd-HHMMSS.json > bench/RESULTS.md
    python bench/report.py run-A.json run-B.json > bench/RESULTS.md    # runs pooled

Several runs are pooled as one run with more rounds: round r of run k becomes round
r + (rounds of runs before k), so per-round pairing still compares carriers measured
side by side; the report lists the runs and their commits.

Conventions: throughput, CPU and RSS are medians over rounds (``[min-max]`` where shown);
ratios are medians of per-round ratios (carrier and reference measured in the same round);
ping percentiles pool every sample of every round (nearest rank), "added" subtracts the
direct-WireGuard percentile measured in the same run under the same condition.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

TEST_LABEL = {"up1": "up ×1", "down1": "down ×1", "up10": "up ×10", "down10": "down ×10"}
REF = "v2ray"
DIRECT = "direct"


def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def pct(values, p):
    if not values:
        return None
    s = sorted(values)
    return s[max(1, math.ceil(p / 100 * len(s))) - 1]


def f(x, nd=0, suffix=""):
    if x is None:
        return "–"
    if isinstance(x, float) and nd == 0:
        return f"{x:.0f}{suffix}"
    return f"{x:.{nd}f}{suffix}"


def fr(x):
    return "–" if x is None else f"{x:.2f}×"


def signed(x, nd=2):
    return "–" if x is None else f"{x:+.{nd}f}"


class Rounds:
    """Per carrier, the successful rounds of a profile."""

    def __init__(self, prof: dict, order: list[str]):
        self.recs = prof.get("rounds", [])
        order = prof.get("carriers") or order
        names = []
        for n in order:
            if any(r["carrier"] == n for r in self.recs):
                names.append(n)
        for r in self.recs:
            if r["carrier"] not in names:
                names.append(r["carrier"])
        self.names = names
        self.n_rounds = 1 + max((r["round"] for r in self.recs), default=-1)

    def ok(self, name):
        return [r for r in self.recs if r["carrier"] == name and r.get("ok")]

    def failed(self):
        return [r for r in self.recs if not r.get("ok")]

    def by_round(self, name, getter):
        out = {}
        for r in self.ok(name):
            v = getter(r)
            if v is not None:
                out[r["round"]] = v
        return out

    def values(self, name, getter):
        return list(self.by_round(name, getter).values())

    def paired_ratio(self, name, ref, getter):
        a, b = self.by_round(name, getter), self.by_round(ref, getter)
        return med([a[k] / b[k] for k in a if k in b and b[k]])


def _get(*path):
    def g(r):
        x = r
        for p in path:
            if not isinstance(x, dict) or p not in x:
                return None
            x = x[p]
        return x

    return g


PING_NOTE = ["on a fixed schedule, bench/pinger.py"]


def pool(runs: list[dict], paths: list[str]) -> dict:
    """One result with the rounds of every run (see the module docstring)."""
    out = json.loads(json.dumps(runs[0]))  # a deep copy
    out["pooled"] = [
        {"json": p, "git": r.get("facts", {}).get("git"), "date": r.get("facts", {}).get("date"),
         "command": r.get("command")}
        for r, p in zip(runs, paths, strict=True)
    ]
    names = list(dict.fromkeys(n for r in runs for n in r.get("profiles", {})))
    out["profiles"] = {}
    for name in names:
        having = [r["profiles"][name] for r in runs if name in r.get("profiles", {})]
        prof = out["profiles"][name] = json.loads(json.dumps(having[0]))
        if "rounds" not in prof:
            continue  # micro: not in rounds, the first run's
        offset = 1 + max((r["round"] for r in prof["rounds"]), default=-1)
        for other in having[1:]:
            more = other.get("rounds") or []
            for rec in more:
                prof["rounds"].append({**rec, "round": rec["round"] + offset})
            offset += 1 + max((r["round"] for r in more), default=-1)
    out["elapsed_s"] = round(sum(r.get("elapsed_s") or 0 for r in runs), 1)
    return out


def render(res: dict, json_path=None) -> str:
    out: list[str] = []
    w = out.append
    PING_NOTE[0] = (
        "on a fixed schedule, bench/pinger.py"
        if res.get("ping") or "command" in res
        else "netbed's ping helper, an older run: next echo only after the previous reply"
    )
    facts = res.get("facts", {})
    args = res.get("args", {})
    carriers = res.get("carriers", {})
    quick = args.get("quick")
    w(
        "# ut-tunnel benchmark results"
        + (" (QUICK sanity run: 1 round, short tests; not for decisions)" if quick else "")
    )
    w("")
    cmd = res.get("command") or "python bench/run.py"
    w(
        f"Produced by `{cmd}` (as root) on {facts.get('date')}, in {res.get('elapsed_s')} s."
        + (f" Raw data: `{json_path}`." if json_path and not res.get("pooled") else "")
    )
    w("Re-render with `python bench/report.py <json>`. How it is measured: `bench/README.md`.")
    if res.get("pooled"):
        gits = {p["git"] for p in res["pooled"]}
        w("")
        w(
            f"**{len(res['pooled'])} runs pooled** (rounds added up; pairs stay within a round; "
            f"{'same commit' if len(gits) == 1 else 'commits differ, see below'}): "
            + "; ".join(f"`{p['json']}` ({p['date']}, git {p['git']})" for p in res["pooled"])
            + ". The machine facts below are the first run's."
        )
    if res.get("aborted"):
        w(f"\n**Run aborted:** {res['aborted']}")
    w("")
    w(
        "Reading the tables: values are medians over rounds; every round runs every carrier once "
        "(rotated order) on the same test bed, so ratios are medians of per-round ratios "
        "(carrier ÷ reference in the same round). The machine is shared with other work: "
        "absolute numbers move between runs, the same-run ratios much less."
    )
    w("")
    w("## Machine")
    w("")
    w("| fact | value |\n|---|---|")
    la0 = facts.get("loadavg_start")
    la1 = facts.get("loadavg_end")
    rows = [
        ("CPUs (nproc)", facts.get("nproc")),
        ("CPU", facts.get("cpu")),
        (
            "load average at start (1/5/15 min)",
            " / ".join(f"{x:.2f}" for x in la0) if la0 else None,
        ),
        ("load average at end", " / ".join(f"{x:.2f}" for x in la1) if la1 else None),
        (
            "whole-machine CPU during the run (busy / steal)",
            (
                f"{facts['cpu_during_run']['busy_pct']} % / {facts['cpu_during_run']['steal_pct']} %"
                " (includes the benchmark itself)"
            )
            if facts.get("cpu_during_run")
            else None,
        ),
        ("kernel", facts.get("kernel")),
        ("Python", facts.get("python")),
        (
            "ut-tunnel",
            f"{facts.get('ut_tunnel')} / with UT_NO_EXTENSIONS=1: {facts.get('ut_tunnel_pure')}",
        ),
        ("git", f"{facts.get('git')} (ut/_fastpath*.so built {facts.get('fastpath_so_mtime')})"),
        ("ut package imported (PYTHONPATH)",
         f"{facts.get('ut_package')} ({facts.get('pythonpath') or 'not set'})"
         if "ut_package" in facts else None),
        ("v2ray", facts.get("v2ray")),
        ("OpenVPN", facts.get("openvpn")),
        ("sing-box", facts.get("sing_box")),
        ("udptunnel", facts.get("udptunnel")),
        ("wireguard-go", f"{facts.get('wireguard_go')}, WireGuard MTU {facts.get('wg_mtu')}"),
        ("iperf3", facts.get("iperf3")),
        ("TCP congestion control (host default, new namespaces inherit it)", facts.get("tcp_cc")),
        ("tcp_wmem / tcp_rmem", f"{facts.get('tcp_wmem')} / {facts.get('tcp_rmem')}"),
        ("net.core.rmem_default during the run (wireguard-go's UDP receive buffer)",
         (f"{facts['wg_rmem']['set']} (was {facts['wg_rmem']['was']}; `--wg-rmem`)"
          if (facts.get("wg_rmem") or {}).get("was") is not None else "unchanged (`--wg-rmem 0`)")
         if "wg_rmem" in facts else None),
    ]
    for k, v in rows:
        w(f"| {k} | {v if v not in (None, '') else '–'} |")
    w("")
    w("## Carriers")
    w("")
    w("| name | what | version |\n|---|---|---|")
    for n, c in carriers.items():
        w(f"| `{n}` | {c['label']} | {c.get('version', '')} |")
    for n, why in (res.get("carriers_skipped") or {}).items():
        w(f"| `{n}` | **skipped**: {why} | |")
    w("")
    P = res.get("profiles", {})
    order = list(carriers) + list(res.get("carriers_skipped") or {})
    shaping_section(w, P, order, bool(res.get("pooled")))
    if "default" in P:
        targets(w, P.get("default"), P.get("seed"), order, P.get("seed-apart"),
                bool(res.get("pooled")))
        default_section(w, P["default"], order)
    for key in ("seed", "seed-apart"):
        if key in P:
            seed_section(w, P[key], order, apart=key == "seed-apart")
    if "small" in P:
        small_section(w, P["small"], order)
    if "micro" in P:
        micro_section(w, P["micro"])
    if "lossy" in P or "slow" in P:
        issue14_targets(w, P.get("lossy"), P.get("slow"), order, bool(res.get("pooled")))
    if "lossy" in P:
        lossy_section(w, P["lossy"], order)
    if "slow" in P:
        lossy_section(w, P["slow"], order, kind="slow")
    if json_path:
        cpu_profiles_section(w, Path(json_path).parent)
        tls_paths_section(w, Path(json_path).parent / "tls-paths.json")
    return "\n".join(out) + "\n"


def tls_paths_section(w, path: Path) -> None:
    """``bench/tls_paths.py --json results/tls-paths.json``: which TLS driver to use."""
    if not path.exists():
        return
    res = json.loads(path.read_text())
    w("## TLS drivers (bench/tls_paths.py, a separate run)")
    w("")
    w(
        f"One process runs both ends of a loopback TLS 1.3 mTLS stream (the product's contexts), "
        f"{res['config']['rounds']} rounds, medians; Python {res['python']}, uvloop {res['uvloop']}, "
        f"{res['openssl']}. `sslsocket` = non-blocking `ssl.SSLSocket` driven by add_reader/add_writer. "
        "Raw data: `tls-paths.json`."
    )
    w("")
    w("| write size | path | MB/s | CPU s/GB | CPU ÷ uvloop (median of per-round ratios) |")
    w("|---:|---|---:|---:|---:|")
    for r in res["summary"]:
        w(
            f"| {r['size']} | {r['path']} | {r['mb_per_s']:.0f} | {r['cpu_s_per_gb']:.2f} | "
            f"{r['cpu_vs_uvloop']:.2f}× |"
        )
    w("")


def cpu_profiles_section(w, results_dir: Path) -> None:
    """``bench/cpuprofile.py --json results/profile-*.json`` runs kept next to the run."""
    files = sorted(results_dir.glob("profile-*.json"))
    if not files:
        return
    from cpuprofile import markdown  # noqa: PLC0415 - only when there is something to show

    w("## Where the time goes (bench/cpuprofile.py, separate runs)")
    w("")
    w(
        "`perf` samples of the two tunnel processes while one iperf3 test runs through "
        "them on the same bed. Raw data: " + ", ".join(f"`{f.name}`" for f in files) + "."
    )
    w("")
    for f in files:
        res = json.loads(f.read_text())
        w(f"Command: `{res.get('command', 'python bench/cpuprofile.py')}` ({res.get('date', '?')})")
        w("")
        w(markdown(res))


# ---------------------------------------------------------------------- default profile
def _loaded_samples(r, tests=None):
    s = []
    for t, v in (r.get("tests") or {}).items():
        if tests and t not in tests:
            continue
        s += (v.get("ping") or {}).get("rtt_ms", [])
    return s


def _pool(R, name, fn):
    s = []
    for r in R.ok(name):
        s += fn(r)
    return s


def targets(w, prof, seed, order, seed_apart=None, pooled=False):
    if not prof or "rounds" not in prof:
        return
    R = Rounds(prof, order)
    if "ut" not in R.names or REF not in R.names:
        return
    tests = prof.get("tests", [])
    w("## Issue 6 targets for the compiled fast path (`ut`), "
      + ("these runs pooled" if pooled else "this run"))
    w("")
    w("| target | measured | met? |\n|---|---|---|")

    def row(what, measured, ok):
        w(f"| {what} | {measured} | {'yes' if ok else ('**no**' if ok is not None else '–')} |")

    for t in tests:
        rv = R.paired_ratio("ut", REF, _get("tests", t, "mbps"))
        rd = R.paired_ratio("ut", DIRECT, _get("tests", t, "mbps")) if DIRECT in R.names else None
        row(
            f"throughput {TEST_LABEL[t]} ≥ 1.5× v2ray and ≥ 0.6× direct",
            f"{fr(rv)} v2ray, {fr(rd)} direct",
            None if rv is None else (rv >= 1.5 and (rd is None or rd >= 0.6)),
        )
    cpu = R.paired_ratio("ut", REF, _cpu_all)
    row(
        "CPU s/GB (both processes, all tests) ≤ 0.6× v2ray",
        fr(cpu),
        None if cpu is None else cpu <= 0.6,
    )
    added = _added_loaded(R, "ut", 95)
    added_v = _added_loaded(R, REF, 95)
    row(
        "loaded ping p95 added ≤ v2ray's",
        f"{signed(added)} ms vs {signed(added_v)} ms",
        None if added is None or added_v is None else added <= added_v,
    )
    rss = max([v for r in R.ok("ut") for v in (r.get("rss_kib") or {}).values() if v] or [0]) / 1024
    row("peak RSS ≤ 64 MiB per process", f"{rss:.1f} MiB", rss <= 64 if rss else None)
    for sp, where in ((seed, "wireguard-go free to share the tunnel's core"),
                      (seed_apart, "wireguard-go off the tunnel's core")):
        if sp and sp.get("rounds"):
            S = Rounds(sp, order)
            fwd = med(S.values("ut", lambda r: _fwd_max(r.get("test"))))
            row(
                f"seed profile ({where}): forwarding latency p95 ≤ 1 ms (seed asks ≤ 10 ms)",
                f"{f(fwd, 3)} ms",
                None if fwd is None else fwd <= 1.0,
            )
    w("")


def _cpu_all(r):
    cpu = sum(sum((v.get("cpu_s") or {}).values()) for v in (r.get("tests") or {}).values())
    by = sum(v.get("bytes") or 0 for v in (r.get("tests") or {}).values())
    return cpu / (by / 1e9) if by and cpu else None


def _added_loaded(R, name, p):
    if DIRECT not in R.names:
        return None
    a = pct(_pool(R, name, _loaded_samples), p)
    b = pct(_pool(R, DIRECT, lambda r: (r.get("idle_ping") or {}).get("rtt_ms", [])), p)
    return None if a is None or b is None else a - b


def _fwd_max(test):
    if not test or not test.get("fwd_p95"):
        return None
    vals = [
        v["p95_ms"]
        for v in test["fwd_p95"].values()
        if v.get("p95_ms") is not None and v.get("n", 0) >= 20
    ]
    return max(vals) if vals else None


def _drop_totals(recs, get_test) -> str:
    """ut-tunnel's own drop counters of one test in every round, added up:
    ``"role reason count, ..."``, or ``"0"``."""
    tot: dict[tuple[str, str], int] = {}
    for r in recs:
        for role, by in ((get_test(r) or {}).get("ut_drops") or {}).items():
            for reason, k in by.items():
                tot[(role, reason)] = tot.get((role, reason), 0) + k
    return ", ".join(f"{ro} {re_} {k}" for (ro, re_), k in sorted(tot.items())) or "0"


def ut_drops(w, R, tests, single=False):
    """ut-tunnel's own drop counters over each test, all rounds added (runs that have them).
    ``single``: the profile's rounds hold one ``test``, not a ``tests`` dict."""

    def getter(t):
        if single:
            return lambda r: r.get("test")
        return lambda r: (r.get("tests") or {}).get(t)

    names = [n for n in R.names
             if any("ut_drops" in (getter(t)(r) or {}) for r in R.ok(n) for t in tests)]
    if not names:
        return
    w("### Datagrams ut-tunnel itself dropped during the tests (its counters, all rounds added)")
    w("")
    w("`role reason count`, from `ut_udp_drop_total` before and after each test; `0` = none. "
      "wireguard-go's own socket drops are not in these (see bench/README.md).")
    w("")
    w("| carrier | " + " | ".join(TEST_LABEL.get(t, t) for t in tests) + " |")
    w("|---|" + "---|" * len(tests))
    for n in names:
        w(f"| `{n}` | " + " | ".join(_drop_totals(R.ok(n), getter(t)) for t in tests) + " |")
    w("")


def default_section(w, prof, order):
    w("## Default profile: iperf3 TCP through WireGuard")
    w("")
    if prof.get("error"):
        w(f"**Profile failed:** {prof['error']}\n")
        return
    R = Rounds(prof, order)
    tests = prof.get("tests", [])
    w(
        f"{R.n_rounds} round(s); iperf3 {prof.get('duration_s')} s per test; up = home→cloud, "
        "down = cloud→home (`-R`); ×10 = `-P 10`. Ping: ICMP over WireGuard every 100 ms during "
        f"each test ({PING_NOTE[0]}; >1 s = lost), and "
        f"{args_idle(prof)} idle pings 50 ms apart before the tests."
    )
    w("")
    w("### Throughput, Mbit/s (median [min–max])")
    w("")
    def throughput(n, t):
        v = R.values(n, _get("tests", t, "mbps"))
        errs = sum(
            1
            for r in R.recs
            if r["carrier"] == n and (r.get("tests") or {}).get(t, {}).get("error")
        )
        cell = f"{f(med(v))} [{f(min(v))}–{f(max(v))}]" if v else "–"
        if errs:
            cell += f" ({errs} failed)" if v else f" **failed {errs}×**"
        return cell

    _test_table(w, R, tests, throughput)
    w("")
    w("### Throughput ratios (median of per-round ratios)")
    w("")
    refs = [x for x in (DIRECT, REF) if x in R.names]
    w("| carrier | " + " | ".join(f"{TEST_LABEL[t]} ÷ {ref}" for ref in refs for t in tests) + " |")
    w("|---|" + "---|" * (len(tests) * len(refs)))
    for n in R.names:
        if n == DIRECT:
            continue
        cells = [
            fr(R.paired_ratio(n, ref, _get("tests", t, "mbps"))) for ref in refs for t in tests
        ]
        w(f"| `{n}` | " + " | ".join(cells) + " |")
    w("")
    w("### CPU seconds per GB carried (client + server process, user+system, from /proc)")
    w("")
    w(
        "| carrier | "
        + " | ".join(TEST_LABEL[t] for t in tests)
        + " | all tests | all ÷ v2ray | client share |"
    )
    w("|---|" + "---|" * (len(tests) + 3))
    for n in R.names:
        if n == DIRECT:
            continue
        cells = [f(med(R.values(n, _get("tests", t, "cpu_s_per_gb"))), 2) for t in tests]
        allv = med(R.values(n, _cpu_all))

        def client_share(r):
            c = sum((v.get("cpu_s") or {}).get("client", 0) for v in r.get("tests", {}).values())
            s = sum(sum((v.get("cpu_s") or {}).values()) for v in r.get("tests", {}).values())
            return c / s if s else None

        share = med(R.values(n, client_share))
        w(
            f"| `{n}` | "
            + " | ".join(cells)
            + f" | {f(allv, 2)} | {fr(R.paired_ratio(n, REF, _cpu_all))} | "
            f"{f(share * 100 if share is not None else None, 0, ' %')} |"
        )
    w("")
    link_bytes_table(w, R, tests)
    w("### Inner TCP retransmissions (iperf3 sender), % of segments (≈ bytes ÷ 1340-byte MSS)")
    w("")
    w("Reordering across lanes and drops inside the carrier both show up here.")
    w("")
    w("| carrier | " + " | ".join(TEST_LABEL[t] for t in tests) + " |")
    w("|---|" + "---|" * len(tests))

    def retr(t):
        def g(r):
            v = (r.get("tests") or {}).get(t) or {}
            by = v.get("sent_bytes") or v.get("bytes")
            return (
                100 * v["retransmits"] / (by / 1340)
                if v.get("retransmits") is not None and by
                else None
            )

        return g

    for n in R.names:
        w(f"| `{n}` | " + " | ".join(f(med(R.values(n, retr(t))), 2) for t in tests) + " |")
    w("")
    ut_drops(w, R, tests)
    w("### Ping over WireGuard, ms (all samples of all rounds pooled)")
    w("")
    w(
        "\"Added\" = the carrier's percentile minus direct WireGuard's **idle** percentile (the "
        "bare path) from the same run; direct's own loaded row shows what the load adds with no "
        "tunnel at all (queues in iperf3's TCP, WireGuard and the kernel)."
    )
    w("")
    w(
        "| carrier | idle p50 / p95 / p99 | loaded p50 / p95 / p99 | added idle p50 / p95 / p99 | "
        "added loaded p50 / p95 / p99 | lost |"
    )
    w("|---|---|---|---|---|---|")
    idle = {n: _pool(R, n, lambda r: (r.get("idle_ping") or {}).get("rtt_ms", [])) for n in R.names}
    loaded = {n: _pool(R, n, _loaded_samples) for n in R.names}
    for n in R.names:
        ip = [pct(idle[n], p) for p in (50, 95, 99)]
        lp = [pct(loaded[n], p) for p in (50, 95, 99)]
        di = [pct(idle.get(DIRECT, []), p) for p in (50, 95, 99)]
        ai = [None if a is None or b is None else a - b for a, b in zip(ip, di, strict=True)]
        al = [None if a is None or b is None else a - b for a, b in zip(lp, di, strict=True)]
        sent = sum(
            (r.get("idle_ping") or {}).get("sent", 0)
            + sum((v.get("ping") or {}).get("sent", 0) for v in r.get("tests", {}).values())
            for r in R.ok(n)
        )
        recv = len(idle[n]) + len(loaded[n])
        w(
            f"| `{n}` | {' / '.join(f(x, 2) for x in ip)} | {' / '.join(f(x, 2) for x in lp)} | "
            f"{' / '.join(signed(x) for x in ai) if n != DIRECT else '(reference)'} | "
            f"{' / '.join(signed(x) for x in al)} | {sent - recv}/{sent} |"
        )
    w("")
    w("Loaded ping p95 by test, ms:")
    w("")
    w("| carrier | " + " | ".join(TEST_LABEL[t] for t in tests) + " |")
    w("|---|" + "---|" * len(tests))
    for n in R.names:
        w(
            f"| `{n}` | "
            + " | ".join(
                f(pct(_pool(R, n, lambda r, t=t: _loaded_samples(r, [t])), 95), 2) for t in tests
            )
            + " |"
        )
    w("")
    w("### Peak RSS (VmHWM), MiB, worst round")
    w("")
    w("| carrier | server (cloud) | client (home) |\n|---|---|---|")
    for n in R.names:
        if n == DIRECT:
            continue
        sv = [r.get("rss_kib", {}).get("server") for r in R.ok(n)]
        cv = [r.get("rss_kib", {}).get("client") for r in R.ok(n)]
        sv, cv = [x for x in sv if x], [x for x in cv if x]
        w(
            f"| `{n}` | {f(max(sv) / 1024, 1) if sv else '–'} | {f(max(cv) / 1024, 1) if cv else '–'} |"
        )
    w("")
    fw = [
        n
        for n in R.names
        if any((r.get("tests") or {}).get(t, {}).get("fwd_p95") for r in R.ok(n) for t in tests)
    ]
    if fw:
        w("### ut-tunnel forwarding latency p95 (its own histogram), ms")
        w("")
        w(
            "Worst of the four series (client up-in, server up-out, server down-in, client down-out) "
            "with ≥ 20 samples, from the histogram delta over each test; median over rounds. Bucket "
            "bounds limit resolution (linear interpolation inside a bucket)."
        )
        w("")
        w("| carrier | " + " | ".join(TEST_LABEL[t] for t in tests) + " |")
        w("|---|" + "---|" * len(tests))
        for n in fw:
            w(
                f"| `{n}` | "
                + " | ".join(
                    f(med(R.values(n, lambda r, t=t: _fwd_max(r["tests"].get(t)))), 3)
                    for t in tests
                )
                + " |"
            )
        w("")
    failures(w, R)


# ---------------------------------------------------------------------- link bytes, shaping
def _link_total(v):
    """Bytes the link delivered both ways (received by the cloud's end and by home's end);
    older results without the cloud's counters: what home's end sent and received."""
    lb = (v or {}).get("link_bytes")
    if not lb:
        return None
    return lb.get("cloud_rx", lb["tx"]) + lb["rx"]


def _link_per_byte(t):
    """Bytes on home's link (both ways) per iperf3 payload byte received, test ``t``."""

    def g(r):
        v = (r.get("tests") or {}).get(t) or {}
        tot = _link_total(v)
        return tot / v["bytes"] if tot is not None and v.get("bytes") else None

    return g


def _link_per_ping(r):
    """Bytes on home's link (both ways) per idle ping sent (echo and reply together)."""
    v = r.get("idle_ping") or {}
    tot = _link_total(v)
    return tot / v["sent"] if tot is not None and v.get("sent") else None


def _cpu_per_ping(r):
    """CPU µs of both tunnel processes per idle ping sent."""
    v = r.get("idle_ping") or {}
    if not v.get("cpu_s") or not v.get("sent"):
        return None
    return 1e6 * sum(v["cpu_s"].values()) / v["sent"]


def _idle_samples(r):
    return (r.get("idle_ping") or {}).get("rtt_ms", [])


def _has_link_bytes(R, tests):
    return any((v or {}).get("link_bytes") for n in R.names for r in R.ok(n)
               for v in [r.get("idle_ping"), *((r.get("tests") or {}).get(t) for t in tests)])


def link_bytes_table(w, R, tests, idle_title="idle pings"):
    """Bytes the carrier put on home's link per payload byte (iperf3) and per idle ping."""
    if not _has_link_bytes(R, tests):
        return
    idle = any(_link_per_ping(r) for n in R.names for r in R.ok(n))
    w("### Bytes on the link (what it delivered, both directions)")
    w("")
    w(
        "Per test: link bytes (what the link delivered both ways: bytes received by the "
        "cloud's end plus by home's end of the veth pair, or of the emulated link; every "
        "header, TLS record, padding and TCP ACK of the carrier, Ethernet headers on the veth) "
        "÷ iperf3 payload bytes received; median [min–max] over rounds. "
        + (f"Per idle ping ({idle_title}, echo and reply together): link bytes ÷ pings sent."
           if idle else "")
    )
    w("")
    hdr = [TEST_LABEL[t] for t in tests] + (
        ["bytes per idle ping", "idle ping p50 / p95, ms"] if idle else [])
    w("| carrier | " + " | ".join(hdr) + " |")
    w("|---|" + "---|" * len(hdr))

    def cell(vals, nd):
        return f"{f(med(vals), nd)} [{f(min(vals), nd)}–{f(max(vals), nd)}]" if vals else "–"

    for n in R.names:
        cells = [cell(R.values(n, _link_per_byte(t)), 3) for t in tests]
        if idle:
            cells.append(cell(R.values(n, _link_per_ping), 0))
            s_ = _pool(R, n, _idle_samples)
            cells.append(f"{f(pct(s_, 50), 2)} / {f(pct(s_, 95), 2)}" if s_ else "–")
        w(f"| `{n}` | " + " | ".join(cells) + " |")
    w("")


SHAPING_PAIRS = (("ut", "ut-nopad", "padding"), ("ut-coalesce2", "ut", "coalescing 2 ms"))


def _spread(vals, fmt):
    if not vals:
        return "–"
    return f"{fmt(med(vals))} [{fmt(min(vals))} – {fmt(max(vals))}]"


def shaping_section(w, P, order, pooled=False):
    """Issue 15: what record shaping costs. For each pair (``ut`` vs ``ut-nopad``: padding;
    ``ut-coalesce2`` vs ``ut``: coalescing), per profile and test: throughput, CPU s/GB,
    ping p50/p95 and link bytes, as paired per-round ratios (median [min – max])."""
    rows = []
    for key in ("default", "lossy", "slow"):
        prof = P.get(key)
        if not prof or not prof.get("rounds"):
            continue
        R = Rounds(prof, order)
        tests = prof.get("tests", [])
        for a, b, what in SHAPING_PAIRS:
            if a not in R.names or b not in R.names:
                continue
            rows.append((key, R, tests, a, b, what))
    if not rows:
        return
    w("## Record shaping (issue 15): what padding and coalescing cost, "
      + ("these runs pooled" if pooled else "this run"))
    w("")
    w(
        "Each cell: median over rounds of the per-round figure [min – max], the two carriers "
        "measured in the same round. Throughput and CPU s/GB (both tunnel processes, per GB of "
        "iperf3 payload): ratio A ÷ B. Ping: A's percentile minus B's, ms (the loaded ping "
        "of that test; for the idle row the idle pings, 50 ms apart, nothing else running: "
        "the interactive case); the first figure pools all rounds' samples, the bracket is "
        "the range of the per-round differences. Link bytes: bytes the link delivered per payload "
        "byte (per ping for the idle row), A ÷ B − 1. CPU of the idle row: µs per ping, A ÷ B "
        "(/proc counts CPU in 10 ms ticks: with few pings this ratio is coarse)."
    )
    w("")
    w("| profile | traffic | A vs B | throughput A ÷ B | CPU A ÷ B | ping p50 A − B, ms "
      "| ping p95 A − B, ms | link bytes A ÷ B − 1 |")
    w("|---|---|---|---|---|---|---|---|")

    def ratios(R, a, b, getter):
        x, y = R.by_round(a, getter), R.by_round(b, getter)
        return [x[k] / y[k] for k in x if k in y and y[k]]

    def ping_cells(R, a, b, samples):
        cells = []
        for p in (50, 95):
            pooled_d = None
            pa, pb = pct(_pool(R, a, samples), p), pct(_pool(R, b, samples), p)
            if pa is not None and pb is not None:
                pooled_d = pa - pb
            xa = {r["round"]: pct(samples(r), p) for r in R.ok(a)}
            xb = {r["round"]: pct(samples(r), p) for r in R.ok(b)}
            d = [xa[k] - xb[k] for k in xa if k in xb and xa[k] is not None and xb[k] is not None]
            cells.append(
                f"{signed(pooled_d)} [{signed(min(d))} – {signed(max(d))}]" if d else "–"
            )
        return cells

    pctfmt = lambda x: f"{100 * (x - 1):+.1f} %"  # noqa: E731
    for key, R, tests, a, b, what in rows:
        if any(_idle_samples(r) for r in R.ok(a)):
            cells = ["–", _spread(ratios(R, a, b, _cpu_per_ping), fr)]
            cells += ping_cells(R, a, b, _idle_samples)
            cells.append(_spread(ratios(R, a, b, _link_per_ping), pctfmt))
            w(f"| {key} | idle ping (interactive) | `{a}` vs `{b}` ({what}) | "
              + " | ".join(cells) + " |")
        for t in tests:
            cells = [
                _spread(ratios(R, a, b, _get("tests", t, "mbps")), fr),
                _spread(ratios(R, a, b, _get("tests", t, "cpu_s_per_gb")), fr),
            ]
            cells += ping_cells(R, a, b, lambda r, t=t: _loaded_samples(r, [t]))
            cells.append(_spread(ratios(R, a, b, _link_per_byte(t)), pctfmt))
            w(f"| {key} | {TEST_LABEL[t]} (bulk) | `{a}` vs `{b}` ({what}) | "
              + " | ".join(cells) + " |")
        if len(tests) > 1:
            cells = [
                "–",
                _spread(ratios(R, a, b, _cpu_all), fr),
            ]
            cells += ping_cells(R, a, b, _loaded_samples)
            cells.append(_spread(ratios(R, a, b, _link_all), pctfmt))
            w(f"| {key} | all bulk tests | `{a}` vs `{b}` ({what}) | " + " | ".join(cells) + " |")
    w("")


def _link_all(r):
    tests = (r.get("tests") or {}).values()
    tot = [_link_total(v) for v in tests]
    by = sum(v.get("bytes") or 0 for v in tests)
    if not by or any(x is None for x in tot):
        return None
    return sum(tot) / by


def args_idle(prof):
    for r in prof.get("rounds", []):
        if r.get("idle_ping"):
            return r["idle_ping"]["sent"]
    return "–"


def failures(w, R):
    bad = R.failed()
    iperr = [
        (r["carrier"], r["round"], t, v["error"])
        for r in R.recs
        for t, v in (r.get("tests") or {}).items()
        if v.get("error")
    ]
    if not bad and not iperr:
        return
    w("### Failures in this profile")
    w("")
    for r in bad:
        w(f"- `{r['carrier']}` round {r['round']}: {r.get('error', '')[:400]}")
    for n, rr, t, e in iperr:
        w(f"- `{n}` round {rr} test {t}: {e[:300]}")
    w("")


# ---------------------------------------------------------------------- seed
def seed_section(w, prof, order, apart=False):
    if apart:
        w("## Seed profile, wireguard-go kept off the tunnel's core (`seed-apart`)")
        w("")
        wg = prof.get("limits", {}).get("wireguard_go_cpus") or {}
        w(
            "The `seed` profile again, on a new bed, with one change: each side's wireguard-go "
            "may use every CPU except the one its own tunnel process is pinned to "
            f"({', '.join(f'{k}: CPU {v}' for k, v in wg.items()) or '–'}). On a shared core, "
            "the tunnel's `sendmmsg` wakes wireguard-go, which preempts it in mid-batch; "
            "`bench/README.md` shows how that was found. Two real hosts, or kernel WireGuard, "
            "do not put the two on one core like this."
        )
    else:
        w("## Seed profile: 1 core and 512 MiB per tunnel process, 10 flows at 100 Mbit/s total up")
    w("")
    if prof.get("error"):
        w(f"**Profile failed:** {prof['error']}\n")
        return
    R = Rounds(prof, order)
    lim = prof.get("limits", {})
    modes = {r.get("memory_mode") for r in R.recs if r.get("memory_mode") not in (None, "none")}
    aff = {}
    for r in R.recs:
        for role, a in (r.get("affinity") or {}).items():
            aff.setdefault(role, set()).add(a)
    w(
        f"{R.n_rounds} round(s) of {prof.get('duration_s')} s: {prof.get('load')}. Limits: server "
        f"`taskset -c {lim.get('cpu_server')}`, client `taskset -c {lim.get('cpu_client')}` "
        f"(seen: {', '.join(f'{k} {sorted(v)}' for k, v in aff.items()) or '–'}); memory "
        f"{(lim.get('memory_bytes') or 0) >> 20} MiB via {', '.join(sorted(modes)) or '–'}. "
        f"WireGuard{' (but for the above)' if apart else ''}, iperf3 and ping are not limited. "
        "`direct` has no tunnel process (reference)."
    )
    w("")
    w(
        "| carrier | Mbit/s | fwd latency p95, ms | loaded ping p50 / p95 / p99, ms | added p50 / p95 / p99 "
        "vs idle direct | CPU s/GB | peak RSS srv / cli, MiB | memory limit hits |"
    )
    w("|---|---|---|---|---|---|---|---|")
    pings = {
        n: _pool(R, n, lambda r: ((r.get("test") or {}).get("ping") or {}).get("rtt_ms", []))
        for n in R.names
    }
    idle_d = (
        _pool(R, DIRECT, lambda r: (r.get("idle_ping") or {}).get("rtt_ms", []))
        if DIRECT in R.names
        else []
    )
    for n in R.names:
        mb = med(R.values(n, _get("test", "mbps")))
        fwd = med(R.values(n, lambda r: _fwd_max(r.get("test"))))
        pp = [pct(pings[n], p) for p in (50, 95, 99)]
        dp = [pct(idle_d, p) for p in (50, 95, 99)]
        add = [None if a is None or b is None else a - b for a, b in zip(pp, dp, strict=True)]
        cpu = med(R.values(n, _get("test", "cpu_s_per_gb")))
        sv = [r.get("rss_kib", {}).get("server") or 0 for r in R.ok(n)]
        cv = [r.get("rss_kib", {}).get("client") or 0 for r in R.ok(n)]
        hits = sum(sum((r.get("memory_limit_hits") or {}).values()) for r in R.ok(n))
        rss = f"{max(sv) / 1024:.1f} / {max(cv) / 1024:.1f}" if sv and max(sv) else "–"
        w(
            f"| `{n}` | {f(mb)} | {f(fwd, 3) if n.startswith('ut') else 'n/a'} | "
            f"{' / '.join(f(x, 2) for x in pp)} | {' / '.join(signed(x) for x in add)} | "
            f"{f(cpu, 2) if n != DIRECT else '–'} | {rss} | {hits if n != DIRECT else '–'} |"
        )
    w("")
    w(
        "Forwarding latency is the worst of the tunnel's four `ut_forward_latency_seconds` series "
        "with ≥ 20 samples over the test (median over rounds). Ping: every 100 ms during the load, "
        'all rounds pooled; "added" subtracts direct WireGuard\'s idle percentile (idle p50 '
        f"{f(pct(idle_d, 50), 2)} ms, p95 {f(pct(idle_d, 95), 2)} ms)."
    )
    w("")
    series = ("client.up", "server.up", "server.down", "client.down")
    fwd_names = [n for n in R.names if any((r.get("test") or {}).get("fwd_p95") for r in R.ok(n))]
    if fwd_names:
        w(
            "Forwarding latency p95 by series, ms (median over rounds; `up` = home→cloud: client "
            "reads from WireGuard and queues for a lane, server writes to WireGuard; `down` carries "
            "the inner TCP's ACKs here):"
        )
        w("")
        w("| carrier | " + " | ".join(series) + " |")
        w("|---|" + "---|" * len(series))
        for n in fwd_names:
            cells = []
            for sname in series:

                def get(r, sname=sname):
                    v = ((r.get("test") or {}).get("fwd_p95") or {}).get(sname) or {}
                    return v.get("p95_ms")

                cells.append(f(med(R.values(n, get)), 3))
            w(f"| `{n}` | " + " | ".join(cells) + " |")
        w("")
    ut_drops(w, R, ["the load"], single=True)
    failures(w, R)


# ---------------------------------------------------------------------- lossy / slow
OPENVPN = "openvpn"
LINK_REFS = (DIRECT, OPENVPN, REF, "ut-1lane")


def _test_table(w, R, tests, cell) -> None:
    """A markdown table: one row per carrier, one column per test, ``cell(name, test)``."""
    w("| carrier | " + " | ".join(TEST_LABEL[t] for t in tests) + " |")
    w("|---|" + "---|" * len(tests))
    for n in R.names:
        w(f"| `{n}` | " + " | ".join(cell(n, t) for t in tests) + " |")


def _test_pings(R, n, t):
    return _pool(R, n, lambda r: _loaded_samples(r, [t]))


def _retr_pct(t):
    """Inner TCP retransmissions of test ``t`` as % of the segments sent (≈ bytes ÷ MSS)."""

    def g(r):
        v = (r.get("tests") or {}).get(t) or {}
        by = v.get("sent_bytes") or v.get("bytes")
        return (100 * v["retransmits"] / (by / 1340)
                if v.get("retransmits") is not None and by else None)

    return g


def _link_lost(r):
    s = [v.get("link") for v in (r.get("tests") or {}).values() if v.get("link")]
    seen = sum(x[d]["seen"] for x in s for d in x)
    return 100 * sum(x[d]["lost"] for x in s for d in x) / seen if seen else None


def _link_overflow(t):
    def g(r):
        x = ((r.get("tests") or {}).get(t) or {}).get("link")
        return sum(x[d].get("overflow", 0) for d in x) if x else None

    return g


def link_title(prof, kind):
    link = prof.get("link") or {}
    rate = link.get("rate_mbit") or 0
    if kind == "slow":
        head = "Slow profile (a slow home uplink)"
    else:
        head = "Lossy profile"
    parts = [f"{link.get('delay_ms', 20):g} ms one-way delay"]
    if link.get("loss_pct"):
        parts.append(f"{link.get('loss_pct'):g} % loss")
    if rate:
        parts.append(f"{rate:g} Mbit/s with a {link.get('limit')}-packet queue")
    return f"{head}: " + ", ".join(parts)


def lossy_section(w, prof, order, kind="lossy"):
    w("## " + link_title(prof, kind))
    w("")
    if prof.get("skipped"):
        w(
            f"**TODO — not measured.** {prof['skipped']}. Planned: ut-tunnel with 1 lane vs 5 lanes "
            "vs v2ray, inner-TCP goodput up and down, round-robin vs backlog-avoiding lane picking."
        )
        w("")
        return
    if prof.get("error"):
        w(f"**Profile failed:** {prof['error']}\n")
        return
    link = prof.get("link") or {}
    R = Rounds(prof, order)
    tests = prof.get("tests", [])
    rtt = link.get("link_rtt_ms") or []
    w(
        f"{R.n_rounds} round(s); home and cloud joined by {link.get('emulator')}, the link's "
        "delay, loss, rate and queue applied in **both** directions (one parameter set for the "
        "link); every carrier, and direct WireGuard, uses that link instead of the veth, whose "
        "UDP is dropped like the veth's. TCP congestion control: the carriers' outer TCP "
        f"**{prof.get('tcp_cc')}** (the namespace default, inherited from the host; not "
        "changeable here), the inner iperf3 TCP "
        f"**{prof.get('inner_cc') or prof.get('tcp_cc')}**. Bare link RTT p50 "
        f"{f(pct(rtt, 50), 1)} ms. iperf3 {prof.get('duration_s')} s per test; up = home→cloud, "
        "down = cloud→home (`-R`), ×10 = `-P 10`. `openvpn` carries IP on its own TUN devices "
        "(not WireGuard): its iperf3 and pings go to its tunnel address. Ping: ICMP every "
        "100 ms during each test, all rounds pooled."
    )
    w("")
    w("### Goodput, Mbit/s (iperf3 receiver; median [min–max])")
    w("")
    w("| carrier | " + " | ".join(TEST_LABEL[t] for t in tests)
      + " | loaded ping p50 / p95, ms (all tests) | link lost % |")
    w("|---|" + "---|" * (len(tests) + 2))
    for n in R.names:
        cells = []
        for t in tests:
            v = R.values(n, _get("tests", t, "mbps"))
            errs = sum(1 for r in R.recs
                       if r["carrier"] == n and (r.get("tests") or {}).get(t, {}).get("error"))
            cell = f"{f(med(v), 1)} [{f(min(v), 1)}–{f(max(v), 1)}]" if v else "–"
            if errs:
                cell += f" ({errs} failed)" if v else f" **failed {errs}×**"
            cells.append(cell)
        pings = _pool(R, n, _loaded_samples)
        cells.append(f"{f(pct(pings, 50), 1)} / {f(pct(pings, 95), 1)}")
        cells.append(f(med(R.values(n, _link_lost)), 2))
        w(f"| `{n}` | " + " | ".join(cells) + " |")
    w("")
    refs = [x for x in LINK_REFS if x in R.names]
    if refs:
        w("### Goodput ratios (median of per-round ratios)")
        w("")
        w("| carrier | " + " | ".join(f"{TEST_LABEL[t]} ÷ {ref}" for ref in refs for t in tests)
          + " |")
        w("|---|" + "---|" * (len(tests) * len(refs)))
        for n in R.names:
            cells = [
                "–" if n == ref else fr(R.paired_ratio(n, ref, _get("tests", t, "mbps")))
                for ref in refs for t in tests
            ]
            w(f"| `{n}` | " + " | ".join(cells) + " |")
        w("")
    link_bytes_table(w, R, tests, idle_title="idle pings before the tests")
    w("### Loaded ping p50 / p95 by test, ms (all rounds pooled)")
    w("")
    def pings(n, t):
        s_ = _test_pings(R, n, t)
        return f"{f(pct(s_, 50), 1)} / {f(pct(s_, 95), 1)}" if s_ else "–"

    _test_table(w, R, tests, pings)
    w("")
    w("### Inner TCP retransmissions (iperf3 sender; median per test)")
    w("")
    w(
        "Count, and in brackets % of the segments sent (≈ bytes ÷ 1340-byte MSS). The sender is "
        "the iperf3 client for up, the server for down (`-R`: the client's JSON carries the "
        "server's count). Through a TCP carrier the link's own loss is repaired by the outer TCP, "
        "so what remains is reordering (across lanes), queue overflow inside the tunnel path and "
        "drops at wireguard-go's socket; direct WireGuard's count includes the link's loss."
        + (" `overflow`: packets the link's queue dropped (median per test, both directions)."
           if link.get("rate_mbit") else "")
    )
    w("")
    ov = bool(link.get("rate_mbit"))
    w("| carrier | " + " | ".join(TEST_LABEL[t] for t in tests)
      + (" | " + " | ".join(f"overflow {TEST_LABEL[t]}" for t in tests) if ov else "") + " |")
    w("|---|" + "---|" * (len(tests) * (2 if ov else 1)))
    for n in R.names:
        cells = []
        for t in tests:
            c = med(R.values(n, _get("tests", t, "retransmits")))
            p_ = med(R.values(n, _retr_pct(t)))
            cells.append(f"{f(c)} ({f(p_, 2)} %)" if c is not None else "–")
        if ov:
            cells += [f(med(R.values(n, _link_overflow(t)))) for t in tests]
        w(f"| `{n}` | " + " | ".join(cells) + " |")
    w("")
    leaks = {n: sum(r.get("udp_dropped") or 0 for r in R.ok(n)) for n in R.names}
    checked = [n for n in R.names if any("udp_dropped" in r for r in R.ok(n))]
    if checked:
        bad = {n: k for n, k in leaks.items() if k}
        w(
            "UDP caught by the drop rules on the veth and the emulated link while a carrier ran "
            "(all rounds): "
            + (", ".join(f"`{n}` **{k}**" for n, k in bad.items()) if bad
               else f"0 for every carrier ({', '.join(f'`{n}`' for n in checked)})")
            + "."
        )
        w("")
    dc = {r.get("data_channel") for r in R.ok(OPENVPN) if r.get("data_channel")}
    if dc:
        w(f"`openvpn` data channel (its log): {'; '.join(sorted(dc))}.")
        w("")
    ut_drops(w, R, tests)
    failures(w, R)


def issue14_targets(w, lossy, slow, order, pooled=False):
    """Issue 14's targets for ut-tunnel with the spec defaults (`ut`)."""
    have_l = lossy and lossy.get("rounds")
    have_s = slow and slow.get("rounds")
    if not have_l and not have_s:
        return
    w("## Issue 14 targets for `ut` (spec defaults), " + ("these runs pooled" if pooled else "this run"))
    w("")
    w("Ratios are medians of per-round ratios; pings pool every loaded sample of every round.")
    w("")
    w("| profile | target | measured | met? |\n|---|---|---|---|")

    def row(prof, what, measured, ok):
        w(f"| {prof} | {what} | {measured} | "
          f"{'yes' if ok else ('**no**' if ok is not None else '–')} |")

    if have_l:
        R = Rounds(lossy, order)
        tests = lossy.get("tests", [])
        for ref, need in ((OPENVPN, 1.5), (REF, 2.0)):
            if "ut" not in R.names or ref not in R.names:
                row("lossy", f"goodput ≥ {need}× {ref}", f"`ut` or `{ref}` not measured", None)
                continue
            for t in tests:
                r_ = R.paired_ratio("ut", ref, _get("tests", t, "mbps"))
                row("lossy", f"goodput {TEST_LABEL[t]} ≥ {need}× {ref}", fr(r_),
                    None if r_ is None else r_ >= need)
        if "ut" in R.names and OPENVPN in R.names:
            a = pct(_pool(R, "ut", _loaded_samples), 95)
            b = pct(_pool(R, OPENVPN, _loaded_samples), 95)
            row("lossy", "loaded ping p95 ≤ openvpn's (all tests)",
                f"{f(a, 1)} ms vs {f(b, 1)} ms", None if a is None or b is None else a <= b)
            for t in tests:
                a = pct(_test_pings(R, "ut", t), 95)
                b = pct(_test_pings(R, OPENVPN, t), 95)
                row("lossy", f"loaded ping p95 {TEST_LABEL[t]} ≤ openvpn's",
                    f"{f(a, 1)} ms vs {f(b, 1)} ms", None if a is None or b is None else a <= b)
    if have_s:
        R = Rounds(slow, order)
        tests = slow.get("tests", [])
        if "ut" in R.names and DIRECT in R.names:
            for t in tests:
                r_ = R.paired_ratio("ut", DIRECT, _get("tests", t, "mbps"))
                row("slow", f"goodput {TEST_LABEL[t]} ≥ 0.9× direct", fr(r_),
                    None if r_ is None else r_ >= 0.9)
            a = pct(_pool(R, "ut", _loaded_samples), 50)
            b = pct(_pool(R, DIRECT, _loaded_samples), 50)
            row("slow", "loaded ping p50 ≤ 2× direct's (all tests)",
                f"{f(a, 1)} ms vs {f(b, 1)} ms: {fr(a / b if a and b else None)}",
                None if a is None or not b else a / b <= 2)
            for t in tests:
                a = pct(_test_pings(R, "ut", t), 50)
                b = pct(_test_pings(R, DIRECT, t), 50)
                row("slow", f"loaded ping p50 {TEST_LABEL[t]} ≤ 2× direct's",
                    f"{f(a, 1)} ms vs {f(b, 1)} ms: {fr(a / b if a and b else None)}",
                    None if a is None or not b else a / b <= 2)
        else:
            row("slow", "goodput ≥ 0.9× direct, ping p50 ≤ 2× direct's",
                "`ut` or `direct` not measured", None)
    w("")


# ---------------------------------------------------------------------- small
def small_section(w, prof, order):
    w("## Small datagrams: udpmon probe/echo through the carrier, no WireGuard")
    w("")
    if prof.get("error"):
        w(f"**Profile failed:** {prof['error']}\n")
        return
    R = Rounds(prof, order)
    w(
        f"{R.n_rounds} round(s); `ut-tunnel udpmon echo` in cloud where WireGuard would listen "
        "(127.0.0.1, the carrier's far end; `direct`: the cloud's veth address with the UDP drop off), "
        f"`udpmon probe` in home against the carrier's UDP port, {prof.get('duration_s')} s per probe: "
        + "; ".join(f"`{k}` = `{v}`" for k, v in (prof.get("probes") or {}).items())
        + ". The Python probe and echo themselves top out near 50 kpps on this machine. "
        "CPU µs/datagram: both tunnel processes, each datagram counted once per crossing "
        "(request and echo)."
    )
    w("")
    probes = list(prof.get("probes") or {})
    w(
        "| carrier | probe | achieved pps | loss % | RTT p50 / p95 / p99, ms | reordered | CPU µs/datagram |"
    )
    w("|---|---|---|---|---|---|---|")
    for n in R.names:
        for pn in probes:

            def val(key, sub=None, pn=pn, n=n):
                def get(r):
                    v = ((r.get("probes") or {}).get(pn) or {}).get(key)
                    return (v or {}).get(sub) if sub else v

                return med(R.values(n, get))

            pps = val("achieved_pps")
            loss = val("loss_pct")
            rtt = [val("rtt_ms", q) for q in ("p50", "p95", "p99")]
            reo = val("reordered")
            cpu = val("cpu_us_per_dgram")
            w(
                f"| `{n}` | {pn} | {f(pps)} | {f(loss, 2)} | {' / '.join(f(x, 2) for x in rtt)} | {f(reo)} | "
                f"{f(cpu, 1) if n != DIRECT else '–'} |"
            )
    w("")
    w("RTT percentiles: median over rounds of each round's udpmon percentile.")
    w("")
    failures(w, R)


# ---------------------------------------------------------------------- micro
def micro_section(w, prof):
    w("## Micro-benchmarks: compiled fast path vs pure-Python twin (bench/micro.py)")
    w("")
    if prof.get("error"):
        w(f"**Profile failed:** {prof['error']}\n")
        return
    w(prof.get("note", ""))
    w("")
    w("| benchmark | unit | compiled | pure | speed-up |\n|---|---|---|---|---|")
    for b in prof.get("benchmarks", []):
        c, p = b.get("compiled"), b.get("pure")
        sp = (c / p) if c and p else None
        w(f"| {b['name']} | {b['unit']} | {_si(c)} | {_si(p)} | {fr(sp) if sp else '–'} |")
    errs = [b for b in prof.get("benchmarks", []) if b.get("error")]
    for b in errs:
        w(f"\n- {b['name']}: {b['error']}")
    w("")


def _si(x):
    if x is None:
        return "–"
    for div, s in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= div:
            return f"{x / div:.2f} {s}"
    return f"{x:.0f}"


def main(argv=None) -> int:
    argv = argv if argv is not None else sys.argv[1:]
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    runs = [json.loads(Path(a).read_text()) for a in argv]
    res = runs[0] if len(runs) == 1 else pool(runs, argv)
    sys.stdout.write(render(res, argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
