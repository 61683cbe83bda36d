"""Real WireGuard end to end through ut-tunnel (issue 3).

Two homes and a cloud in network namespaces (ut/_testbase/netbed.py); nftables drops every UDP
packet on the links between them; wireguard-go on each side; the ``ut-tunnel`` console
script runs as real processes: the server in the cloud (TCP on the cloud's link address,
WireGuard at 127.0.0.1:51820), a client in each home (UDP 127.0.0.1:15000, which is the
home WireGuard's peer endpoint). See docs/testing.md.
"""

from __future__ import annotations

import os
import time

import pytest

from ut._testbase.netbed import NetBed, make_random_file, metric_sum, sha256_file

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LANES = 5
FIRST_PING_WITHIN = 15.0  # seconds for the first ping (dial 5 lanes + WireGuard handshake)
RESUME_BOUND = 10.0  # seconds from the restarted server being up to a WireGuard ping reply
DOWNTIME = 2.0  # seconds the killed server stays down (the client's dial backoff grows meanwhile)
IDLE = 2  # idle_seconds for the idle-close test
FAST = {"tcp": {"dial_backoff_min_seconds": 0.2, "dial_backoff_max_seconds": 2}}
PER_LANE = {"metrics": {"per_lane_id": True}}


def _merge(*parts: dict) -> dict:
    out: dict = {}
    for p in parts:
        for k, v in p.items():
            out[k] = {**out.get(k, {}), **v} if isinstance(v, dict) else v
    return out


def _lanes(bed: NetBed, node) -> float | None:
    return metric_sum(bed.metrics(node), "ut_lanes_active_total")


def _poll(fn, want, within: float, step: float = 0.2):
    """Call ``fn`` until ``want(value)``; return (value, seconds) or (last value, None)."""
    t0 = time.monotonic()
    value = fn()
    while not want(value):
        if time.monotonic() - t0 > within:
            return value, None
        time.sleep(step)
        value = fn()
    return value, time.monotonic() - t0


def _start_tunnel(bed: NetBed, homes=None, server=None, client=None):
    """Server in the cloud, a client per home, WireGuard pointed at the clients, fresh
    WireGuard sessions. Returns (server proc, [client procs])."""
    homes = homes or [bed.home]
    srv = bed.start_server(server)
    clients = [bed.start_client(h, _merge(FAST, client or {})) for h in homes]
    for h in homes:
        bed.use_tunnel(h)
    bed.reset_wireguard()
    return srv, clients


def _alive(*procs) -> None:
    for p in procs:
        assert p.poll() is None, f"{p.bed_name} exited {p.returncode}:\n{NetBed.log_text(p, 30)}"


def _events(proc, name: str) -> list[dict]:
    return [e for e in NetBed.log_events(proc) if e.get("event") == name]


# --------------------------------------------------------------------------- the bed itself
def test_direct_wireguard_blocked_by_udp_drop(plain_bed):
    """Control: without the drop rule direct WireGuard works; with it, no handshake at all.
    So a pass of the tests below proves the tunnel carried WireGuard."""
    bed = plain_bed
    bed.set_drop_udp(False)
    bed.use_direct()
    bed.reset_wireguard()
    assert bed.ping(bed.home, bed.cloud, count=2)["received"] == 2
    assert bed.latest_handshake(bed.home) > 0

    bed.set_drop_udp(True)
    bed.reset_wireguard()
    dropped = bed.udp_dropped()
    res = bed.ping(bed.home, bed.cloud, count=3, timeout=1.0)
    assert res["received"] == 0, res
    assert bed.latest_handshake(bed.home) == 0
    assert bed.latest_handshake(bed.cloud) == 0
    assert bed.udp_dropped() > dropped, "the handshake attempt should hit the drop rule"


# --------------------------------------------------------------------------- 1. ping
def test_ping_through_tunnel(tun):
    bed = tun
    srv, (cli,) = _start_tunnel(bed)
    dropped = bed.udp_dropped()
    first = bed.wait_ping(bed.home, bed.cloud, within=FIRST_PING_WITHIN)
    res = bed.ping(bed.home, bed.cloud, count=5, interval=0.1)
    print(f"\nfirst ping after {first:.2f}s; then {res['received']}/5, rtt ms {res['rtt_ms']}")
    assert res["received"] == 5, res
    assert bed.latest_handshake(bed.home) > 0
    assert bed.udp_dropped() == dropped, "no UDP may cross the links"
    assert bed.wg_endpoint(bed.cloud).startswith("127.0.0.1:"), "cloud WG sees the ut server"
    _alive(srv, cli)


# --------------------------------------------------------------------------- 2. 64 MiB both ways
def test_http_64mib_download_and_upload(tun, big_file, http_url):
    bed = tun
    path, digest = big_file
    srv, (cli,) = _start_tunnel(bed)
    bed.wait_ping(bed.home, bed.cloud, within=FIRST_PING_WITHIN)

    dest = bed.wd / "download.bin"
    secs = bed.download(bed.home, f"{http_url}/{path.name}", dest, max_time=180)
    assert dest.stat().st_size == path.stat().st_size
    assert sha256_file(dest) == digest
    down_mbit = path.stat().st_size * 8 / secs / 1e6

    reply, usecs = bed.upload(bed.home, dest, f"{http_url}/upload/up.bin", max_time=180)
    assert reply == {"sha256": digest, "bytes": path.stat().st_size}
    assert sha256_file(bed.wd / "www" / "uploads" / "up.bin") == digest
    up_mbit = path.stat().st_size * 8 / usecs / 1e6
    print(f"\n64 MiB down {secs:.1f}s ({down_mbit:.0f} Mbit/s), up {usecs:.1f}s ({up_mbit:.0f} Mbit/s)")
    dest.unlink()
    (bed.wd / "www" / "uploads" / "up.bin").unlink()
    _alive(srv, cli)


# --------------------------------------------------------------------------- tls.client_auth: proof
PROOF = {"tls": {"client_auth": "proof"}}


def test_64mib_both_ways_with_client_proof(tun, big_file, http_url):
    """Issue 17: no CertificateRequest; the client proves itself after the handshake.
    WireGuard runs through as with handshake mTLS; the server saw no visitor."""
    bed = tun
    srv, (cli,) = _start_tunnel(bed, server=PROOF, client=PROOF)
    bed.wait_ping(bed.home, bed.cloud, within=FIRST_PING_WITHIN)
    down, up = bed.both_ways(bed.home, *big_file, http_url, "proof")
    print(f"\nproof mode: 64 MiB down {down:.0f} Mbit/s, up {up:.0f} Mbit/s")
    s = bed.metrics(bed.cloud)
    assert metric_sum(s, "ut_lanes_active_total") == LANES
    assert metric_sum(s, "ut_web_face_connections_total") == 0
    assert metric_sum(s, "ut_tls_handshake_failures_total") == 0
    assert {e.get("client_cn") for e in _events(srv, "session_open")} == {"home"}
    _alive(srv, cli)


# --------------------------------------------------------------------------- 3. lanes in metrics
def _lane_frames(samples) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, labels, value in samples:
        if name == "ut_lane_frames_total" and "lane_id" in labels:
            out[labels["lane_id"]] = out.get(labels["lane_id"], 0.0) + value
    return out


def test_metrics_show_all_lanes_carrying_the_download(tun, big_file, http_url):
    bed = tun
    path, digest = big_file
    srv, (cli,) = _start_tunnel(bed, server=PER_LANE, client=PER_LANE)
    bed.wait_ping(bed.home, bed.cloud, within=FIRST_PING_WITHIN)

    dest = bed.wd / "download-metrics.bin"
    curl = bed.spawn(bed.home, bed.curl_download_cmd(f"{http_url}/{path.name}", dest, 180),
                     name="curl-metrics")
    samples = []  # (t, client samples, server samples) taken while curl runs
    deadline = time.monotonic() + 190
    while curl.poll() is None and time.monotonic() < deadline:
        samples.append((time.monotonic(), bed.metrics(bed.home), bed.metrics(bed.cloud)))
        time.sleep(0.3)
    assert curl.wait(timeout=10) == 0, NetBed.log_text(curl)
    assert sha256_file(dest) == digest
    dest.unlink()
    assert len(samples) >= 2, "the download ended before two scrapes: nothing to compare"

    during = samples[1:-1] or samples
    c_lanes = [metric_sum(c, "ut_lanes_active_total") for _, c, _ in during]
    s_lanes = [metric_sum(s, "ut_lanes_active_total") for _, _, s in during]
    print(f"\n{len(samples)} scrapes; client lanes {sorted(set(c_lanes))}, server {sorted(set(s_lanes))}")
    assert all(v == LANES for v in c_lanes), f"client ut_lanes_active_total during download: {c_lanes}"
    assert all(v == LANES for v in s_lanes), f"server ut_lanes_active_total during download: {s_lanes}"
    assert metric_sum(samples[-1][2], "ut_sessions_active") == 1

    for side, idx in (("client", 1), ("server", 2)):
        first, last = _lane_frames(samples[0][idx]), _lane_frames(samples[-1][idx])
        delta = {k: last.get(k, 0) - first.get(k, 0) for k in last}
        print(f"{side} frames per lane during the download: {delta}")
        busy = [k for k, v in delta.items() if v > 0]
        assert len(busy) == LANES, f"{side}: lanes with data {busy} of {sorted(last)}: {delta}"
        # Round-robin striping: no lane idle while others carry the load.
        assert min(delta.values()) > 0.5 * max(delta.values()) / LANES, delta
    _alive(srv, cli)


# --------------------------------------------------------------------------- 4. idle close
def test_idle_close_then_ping_rebuilds(tun):
    bed = tun
    idle = {"tcp": {"idle_seconds": IDLE}}
    srv, (cli,) = _start_tunnel(bed, server=idle, client=idle)
    wg_pids = [n.wg_proc.pid for n in bed.nodes]
    bed.wait_ping(bed.home, bed.cloud, within=FIRST_PING_WITHIN)
    lanes, _ = _poll(lambda: _lanes(bed, bed.home), lambda v: v == LANES, 5)
    assert lanes == LANES, f"client lanes after the first ping: {lanes}"
    opened = len(_events(cli, "lane_open"))

    # Traffic stops: the lanes close after idle_seconds (a WireGuard passive keepalive,
    # sent 10 s after the last reply, may reopen them once; allow for it).
    lanes, closed_after = _poll(lambda: _lanes(bed, bed.home), lambda v: v == 0, IDLE + 15)
    assert closed_after is not None, f"client lanes still {lanes} {IDLE + 15}s after traffic stopped"
    s_lanes, _ = _poll(lambda: _lanes(bed, bed.cloud), lambda v: v == 0, 5)
    assert s_lanes == 0, f"server lanes {s_lanes} after the client closed its lanes"
    assert _events(cli, "lane_close"), "client logged no lane_close"
    print(f"\nlanes closed {closed_after:.1f}s after the last ping (idle_seconds={IDLE})")

    # The next ping rebuilds them; WireGuard was never restarted.
    back = bed.wait_ping(bed.home, bed.cloud, within=10)
    assert bed.ping(bed.home, bed.cloud, count=3, interval=0.1)["received"] == 3
    lanes, _ = _poll(lambda: _lanes(bed, bed.home), lambda v: v == LANES, 5)
    assert lanes == LANES, f"client lanes after the rebuild: {lanes}"
    assert len(_events(cli, "lane_open")) >= opened + LANES
    assert [n.wg_proc.pid for n in bed.nodes] == wg_pids
    assert all(n.wg_proc.poll() is None for n in bed.nodes)
    print(f"ping after idle close answered in {back:.2f}s")
    _alive(srv, cli)


# --------------------------------------------------------------------------- 5. server crash
def test_server_kill9_midtransfer_resumes(tun, big_file, http_url):
    bed = tun
    path, digest = big_file
    srv, (cli,) = _start_tunnel(bed)
    wg_pids = [n.wg_proc.pid for n in bed.nodes]
    bed.wait_ping(bed.home, bed.cloud, within=FIRST_PING_WITHIN)

    dest = bed.wd / "download-crash.bin"
    curl = bed.spawn(bed.home, bed.curl_download_cmd(f"{http_url}/{path.name}", dest, 150),
                     name="curl-crash")
    size, t = _poll(lambda: dest.stat().st_size if dest.exists() else 0,
                    lambda v: v >= 8 << 20 or curl.poll() is not None, 60, step=0.05)
    assert curl.poll() is None, f"download finished before the crash ({size} bytes)"
    assert t is not None, f"download stalled at {size} bytes before the crash"

    t_kill = time.monotonic()
    bed.kill9(srv)
    time.sleep(DOWNTIME)
    srv2 = bed.start_server()  # same config; returns once its metrics answer
    t_up = time.monotonic()
    bed.wait_ping(bed.home, bed.cloud, within=RESUME_BOUND + 20, interval=0.1)
    resumed = time.monotonic() - t_up
    print(f"\nkill -9 at {size >> 20} MiB; server back up in {t_up - t_kill:.2f}s; "
          f"WireGuard ping answered {resumed:.2f}s after that ({time.monotonic() - t_kill:.2f}s "
          f"after the kill)")
    assert resumed <= RESUME_BOUND, f"traffic resumed only after {resumed:.1f}s"

    rc = curl.wait(timeout=160)
    assert rc == 0, f"curl exit {rc}: {NetBed.log_text(curl)}"
    assert sha256_file(dest) == digest, "the download survived the crash but is corrupt"
    print(f"download completed {time.monotonic() - t_kill:.1f}s after the kill, sha256 ok")
    dest.unlink()
    # Neither WireGuard nor the client was restarted.
    assert [n.wg_proc.pid for n in bed.nodes] == wg_pids
    _alive(cli, srv2, *(n.wg_proc for n in bed.nodes))


# --------------------------------------------------------------------------- 6. two clients
def test_two_clients_share_one_server(tun, http_url):
    bed = tun
    h1, h2 = bed.home_nodes[:2]
    size = 16 << 20
    mid = bed.wd / "www" / "mid.bin"
    if not mid.exists():
        make_random_file(mid, size)
    digest = sha256_file(mid)
    srv, (c1, c2) = _start_tunnel(bed, homes=[h1, h2])
    bed.wait_ping(h1, bed.cloud, within=FIRST_PING_WITHIN)
    bed.wait_ping(h2, bed.cloud, within=FIRST_PING_WITHIN)

    before = {h.name: bed.wg_transfer(h) for h in (h1, h2)}
    dests = {h.name: bed.wd / f"mid-{h.name}.bin" for h in (h1, h2)}
    curls = [bed.spawn(h, bed.curl_download_cmd(f"{http_url}/mid.bin", dests[h.name], 120),
                       name=f"curl-{h.name}") for h in (h1, h2)]
    # Both paths stay interactive while both downloads run. Not "every echo": a
    # saturated wireguard-go (and the kernel's UDP buffers in front of it) may drop a
    # packet whatever carries it -- the benchmark loses loaded pings on direct
    # WireGuard too -- and a CI run once lost 1 of 5 with no drop inside ut-tunnel.
    pings = {h.name: bed.ping(h, bed.cloud, count=10, interval=0.1) for h in (h1, h2)}
    for c in curls:
        assert c.wait(timeout=130) == 0, NetBed.log_text(c)
    drops = {n.name: metric_sum(bed.metrics(n), "ut_udp_drop_total") for n in bed.nodes}
    for h in (h1, h2):
        assert sha256_file(dests[h.name]) == digest, f"{h.name} got a corrupt file"
        assert pings[h.name]["received"] >= 8, (h.name, pings[h.name], "ut drops", drops)
        print(f"{h.name}: {pings[h.name]}, ut drops {drops}")
        dests[h.name].unlink()

    # One session per CN on the server, each with its own UDP socket (own WireGuard endpoint).
    s = bed.metrics(bed.cloud)
    assert metric_sum(s, "ut_sessions_active") == 2
    for cn in ("home", "home2"):
        got = metric_sum(s, "ut_udp_in_bytes_total", client_cn=cn)
        assert got and got > 0, f"no per-CN traffic for {cn} (client_cn label on by default)"
    ep1, ep2 = bed.wg_endpoint(bed.cloud, h1), bed.wg_endpoint(bed.cloud, h2)
    print(f"\ncloud WireGuard endpoints: home {ep1}, home2 {ep2}")
    assert ep1 and ep2 and ep1.startswith("127.0.0.1:") and ep2.startswith("127.0.0.1:")
    assert ep1 != ep2, "both peers behind one server socket: sessions mixed"
    opened = {e.get("client_cn") for e in _events(srv, "session_open")}
    assert {"home", "home2"} <= opened, f"session_open CNs: {opened}"

    # No mixing: each client delivered to its WireGuard at most what the server read from
    # cloud WireGuard for that client's own session (a datagram of the other session would
    # push it over). WireGuard's own receive count is no exact referee: under load
    # wireguard-go drops datagrams its socket buffer cannot hold.
    s = bed.metrics(bed.cloud)
    for h in (h1, h2):
        rx = bed.wg_transfer(h)[0] - before[h.name][0]
        delivered = metric_sum(bed.metrics(h), "ut_udp_out_bytes_total", dir="down")
        sent_for_cn = metric_sum(s, "ut_udp_in_bytes_total", client_cn=h.name, dir="down")
        print(f"{h.name}: WireGuard rx {rx} B, client delivered {delivered} B, "
              f"server read {sent_for_cn} B for this CN")
        assert rx >= size, f"{h.name} WireGuard received only {rx} bytes"
        assert delivered is not None and sent_for_cn is not None
        assert delivered <= sent_for_cn, (
            f"{h.name}: client delivered {delivered} B, more than the server read for its "
            f"session ({sent_for_cn} B): foreign datagrams"
        )
    _alive(srv, c1, c2)


@pytest.fixture(autouse=True)
def _time_each(request):
    t0 = time.monotonic()
    yield
    if os.environ.get("UT_E2E_TIMINGS"):
        print(f"\n[{request.node.name}] {time.monotonic() - t0:.1f}s")
