"""Mass events against a real server (issue 19, points 4 and 7: the figures about time).

Real processes on loopback: a ``ut-tunnel`` server with a UDP echo behind it (WireGuard's
stand-in), an honest ``ut-tunnel`` client (CN ``honest``) with a probe in front sending a
datagram every ``--probe-ms`` and timing each echo, and in this process a flood client
(CN ``flood``, a valid certificate) that opens sessions as cheaply as a client can: one
TLS connection each (resuming one TLS session), HELLO with a new session id, held open.

Phases, each bounded in count and time:

1. **open**: ``--sessions`` sessions, ``--concurrency`` handshakes in flight. Reports
   sessions opened per second, the server's RSS and file descriptors, and the honest
   client's round trip while it happens (p50 / p99 / max).
2. **expiry**: every flood connection is closed at once; the server lingers each session
   ``tcp.session_linger_seconds`` (``--linger``) and then closes them all within the
   same instant. Reports the honest client's worst round trip in that window (the event
   loop's stall, as a user sees it) and how long the server took to release the
   sessions' sockets.
3. **full** (``--full-sessions``, 0 = skip): that many more sessions each send
   ``--full-datagrams`` datagrams up and never read their lane, so the echo's replies
   fill the server's return queues: the server's RSS then (issue 19 target: under
   512 MiB; ``--budget`` sets ``limits.queue_budget_bytes``, 1073741824 = no budget).
4. **sigterm**: the sessions are opened again and the server gets SIGTERM: the time to
   exit (target < 5 s; the systemd unit kills at 15 s).
5. **crowd** (``--crowd N``, 0 = skip): N more clients, each a ``ut.Client`` with its own
   CN and ``--crowd-lanes`` lanes (in one helper process, this script run with
   ``--crowd-child``), all lanes up; then every lane of every one is cut at once (aborted
   at the client: the server sees them reset) and they all redial as clients do (the
   first lane at once, the others staggered). Reports the time until every client has a
   lane again and until every lane is back, the server's worst loop stall and the honest
   client's round trip meanwhile.

``--phases`` picks phases (default ``open,expiry,full,sigterm``; ``crowd`` runs when
listed, e.g. ``--phases crowd --crowd 300``). The server runs under ``lagserver.py``,
which records every gap of over 3 ms between two 1 ms ticks of its event loop: each
phase reports ``server_stall`` (the worst gap, in ms) beside the honest client's round
trip. The expiry phase's first 2 s (``honest_while_lanes_closed``, ``stall_while_lanes
_closed``) are the server taking every flood lane's reset at once.

``--per-cn`` sets ``limits.max_sessions_per_cn`` (default: high enough for the flood,
to measure the mass events; ``--per-cn 64``, the default of the config, shows the flood
refused and what the honest client sees meanwhile). ``--auth proof`` makes both ends
and the flood use ``tls.client_auth: proof`` (the flood sends the proof as a client).

    python bench/abuse.py --sessions 5000 --json bench/results/issue19-abuse.json
    python bench/abuse.py --sessions 500 --linger 5      # a quick look
    python bench/abuse.py --phases open --per-cn 64      # a flood refused by the cap
    python bench/abuse.py --phases crowd --crowd 300     # 300 clients reconnecting at once

Raises this process's ``RLIMIT_NOFILE`` (the server inherits it). Every process started
is stopped by its pid, whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lagserver import read_stalls  # noqa: E402 - after the path line, as run as a script
from tunnelprocs import (  # noqa: E402
    UdpEchoThread,
    UtProcess,
    fd_count,
    free_port,
    make_pki,
    raise_nofile,
    rss_mib,
    wait_listening,
    write_config,
)

from ut import fastpath  # noqa: E402
from ut.control import Err, Hello, control_frame, decode_control  # noqa: E402
from ut.proof import ClientProver  # noqa: E402
from ut.tls import client_context  # noqa: E402


class RttProbe:
    """The honest WireGuard peer: a datagram every ``interval`` s to the honest client,
    each echo's round trip noted with its send time (a thread: this process's own loop
    is busy flooding)."""

    def __init__(self, client_addr: tuple[str, int], interval: float) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.addr, self.interval = client_addr, interval
        self.samples: list[tuple[float, float]] = []  # (sent at, round trip)
        self.sent = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._send, daemon=True),
                         threading.Thread(target=self._recv, daemon=True)]
        for t in self._threads:
            t.start()

    def _send(self) -> None:
        seq = 0
        while not self._stop.is_set():
            seq += 1
            try:
                self.sock.sendto(seq.to_bytes(8, "big") + time.monotonic().hex().encode()
                                 + bytes(60), self.addr)
                self.sent += 1
            except OSError:
                pass
            time.sleep(self.interval)

    def _recv(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(2048)
            except (TimeoutError, OSError):
                continue
            now = time.monotonic()
            try:
                sent = float.fromhex(data[8:].rstrip(b"\0").decode())
            except ValueError:
                continue
            self.samples.append((sent, now - sent))

    def window(self, t0: float, t1: float) -> dict[str, Any]:
        """Round trips of the datagrams sent in [t0, t1), and how many were lost."""
        rtts = sorted(r for s, r in self.samples if t0 <= s < t1)
        expected = max(1, int((t1 - t0) / self.interval))
        if not rtts:
            return {"n": 0, "expected": expected}
        return {"n": len(rtts), "expected": expected,
                "p50_ms": 1000 * statistics.median(rtts),
                "p99_ms": 1000 * rtts[min(len(rtts) - 1, int(0.99 * len(rtts)))],
                "max_ms": 1000 * rtts[-1]}

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(2)
        self.sock.close()


class Flood:
    """Sessions opened by one authenticated client: TLS, HELLO with a new session id,
    wait for the server's HELLO, keep the connection."""

    def __init__(self, pki: Any, port: int, proof: bool = False) -> None:
        cert, key = pki.client("flood")
        self.ctx = client_context(pki.ca, cert, key)
        self.prover = ClientProver(pki.ca, cert, key) if proof else None
        self.server_name = pki.server_name
        self.port = port
        self.writers: list[asyncio.StreamWriter] = []
        self.failed = 0
        self.refused = 0  # ERR from the server (limit)

    async def _one(self) -> bool:
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection(
                "127.0.0.1", self.port, ssl=self.ctx, server_hostname=self.server_name), 20)
        except (OSError, asyncio.TimeoutError):
            return False
        if self.prover is not None:  # tls.client_auth: proof, as ut.transport does
            binding = w.get_extra_info("ssl_object").get_channel_binding("tls-unique") or b""
            w.write(self.prover.request(self.server_name, binding))
        w.write(control_frame(Hello(random.getrandbits(64), 0, 1)))
        deframer = fastpath.Deframer()
        try:
            while True:
                data = await asyncio.wait_for(r.read(65536), 20)
                if not data:
                    raise ConnectionError("closed before HELLO")
                for ftype, _flags, payload in deframer.feed(data):
                    if ftype == fastpath.TYPE_CTRL and isinstance(decode_control(payload), Err):
                        self.refused += 1
                        raise ConnectionError("refused")
                    if ftype == fastpath.TYPE_CTRL and isinstance(decode_control(payload), Hello):
                        if self.ctx.resume_session is None:  # tickets have arrived
                            self.ctx.resume_session = w.get_extra_info("ssl_object").session
                        self.writers.append(w)
                        return True
        except (OSError, asyncio.TimeoutError, ConnectionError, ValueError):
            w.close()
            return False

    async def open(self, n: int, concurrency: int, deadline: float) -> float:
        """Open ``n`` sessions (at most ``deadline`` seconds); return the seconds taken."""
        t0 = time.monotonic()
        todo = iter(range(n))

        async def worker() -> None:
            for _ in todo:
                if time.monotonic() - t0 > deadline:
                    return
                if not await self._one():
                    self.failed += 1

        await self._one()  # a first session alone: its TLS session is resumed by the rest
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.monotonic() - t0

    async def fill(self, datagrams: int, size: int = 1400) -> None:
        """Each session sends ``datagrams`` datagrams up (the echo sends them back down)
        and never reads: the server's return queues fill."""
        burst = fastpath.encode_data([bytes(size)] * 64)
        for _ in range(max(1, datagrams // 64)):
            for w in self.writers:
                w.write(burst)
            await asyncio.gather(*(w.drain() for w in self.writers), return_exceptions=True)

    async def close_all(self) -> None:
        for w in self.writers:
            w.transport.abort()  # at once, no TLS close: like a client that vanished
        self.writers = []
        await asyncio.sleep(0)


async def socket_fds(pid: int) -> int:
    """The server's sockets (a flood session holds two: its lane, its UDP port)."""
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        n += target.startswith("socket:")
    return n


class Crowd:
    """The helper process of the crowd phase (``--crowd-child``): N clients; this side
    sends it commands on stdin and reads one JSON line back for each."""

    def __init__(self, spec: Path, log: Path) -> None:
        self._log = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--crowd-child", str(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log)

    async def ask(self, command: str, timeout: float) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()
        line = await asyncio.wait_for(
            asyncio.get_running_loop().run_in_executor(None, self.proc.stdout.readline), timeout)
        if not line:
            raise RuntimeError(f"the crowd helper exited ({self.proc.poll()})")
        return json.loads(line)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(b"quit\n")
                self.proc.stdin.flush()
                self.proc.wait(15)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


async def crowd_child(spec_path: str) -> None:
    """The crowd: one ``ut.Client`` per certificate in the spec, in this process. Commands
    on stdin: ``up`` (start them, one datagram each so they dial, wait for every lane),
    ``cut`` (abort every lane at once, wait until all are back), ``quit``."""
    import ut

    spec = json.loads(Path(spec_path).read_text())
    loop = asyncio.get_running_loop()
    clients: list[Any] = []
    wg = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # their WireGuard: sends only
    wg.bind(("127.0.0.1", 0))
    limit = float(spec["max_seconds"])

    cut: set[Any] = set()  # lanes aborted by "cut": a lane back is one not among them

    def lanes_up() -> list[int]:
        return [sum(1 for lane in c.session.lanes if lane is not None and lane not in cut)
                for c in clients]

    async def until(pred: Any) -> float | None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < limit:
            if pred():
                return time.monotonic()
            await asyncio.sleep(0.005)
        return None

    def say(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    try:
        while True:
            line = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
            if line in ("", "quit"):
                return
            if line == "up":
                t0 = time.monotonic()
                for cert, key in spec["certs"]:
                    cfg = ut.load_config({
                        "role": "client",
                        "tcp": {"server_addr": f"127.0.0.1:{spec['port']}",
                                "lanes": spec["lanes"]},
                        "udp": {"listen_addr": "127.0.0.1:0"},
                        "metrics": {"enabled": False},
                        "tls": {"ca_cert": spec["ca"], "cert": cert, "key": key,
                                "server_name": spec["server_name"],
                                "client_auth": spec["auth"]},
                        "log": {"level": "warning"},
                    })
                    client = ut.Client(cfg)
                    await client.start()
                    clients.append(client)
                    wg.sendto(b"\0" * 32, client.udp_address[:2])
                    await asyncio.sleep(0.01)  # clients that came up over a few seconds
                t_up = await until(lambda: min(lanes_up()) >= spec["lanes"])
                say({"up_seconds": None if t_up is None else t_up - t0,
                     "lanes": sum(lanes_up())})
            elif line == "cut":
                cut.update(lane for c in clients for lane in c.session.lanes if lane is not None)
                t_cut = time.monotonic()
                for lane in cut:
                    if lane.transport is not None:
                        lane.transport.abort()
                t_cut_done = time.monotonic()
                t_sessions = await until(lambda: min(lanes_up()) >= 1)
                t_lanes = await until(lambda: min(lanes_up()) >= spec["lanes"])
                say({"t_cut": t_cut, "cut_seconds": t_cut_done - t_cut,
                     "sessions_back_seconds": None if t_sessions is None else t_sessions - t_cut,
                     "lanes_back_seconds": None if t_lanes is None else t_lanes - t_cut,
                     "lanes": sum(lanes_up()),
                     "clients_without_lane": sum(1 for n in lanes_up() if n == 0)})
    finally:
        for client in clients:
            await client.close()
        wg.close()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    phases = set(args.phases.split(","))
    unknown = phases - {"open", "expiry", "full", "sigterm", "crowd"}
    if unknown:
        raise SystemExit(f"--phases: unknown {sorted(unknown)}")
    nofile = raise_nofile(max(4 * args.sessions + 1024, 20000))
    result: dict[str, Any] = {"sessions": args.sessions, "nofile": nofile,
                              "linger_seconds": args.linger, "phases": sorted(phases)}
    with tempfile.TemporaryDirectory(prefix="ut-abuse-") as tmp:
        root = Path(tmp)
        crowd_cns = tuple(f"crowd-{i}" for i in range(args.crowd if "crowd" in phases else 0))
        pki = make_pki(root / "pki", ("honest", "flood", *crowd_cns))
        echo = UdpEchoThread()
        port, honest_udp = free_port(), free_port(socket.SOCK_DGRAM)
        server_tcp = {"session_linger_seconds": args.linger, "lanes": 5}
        # The flood speaks the spec's mTLS (certificate in the handshake, then HELLO) or
        # the proof (--auth proof): both ends say so, whatever tls.client_auth defaults to.
        auth = {"client_auth": args.auth}
        limits: dict[str, Any] = {
            "max_sessions_per_cn": args.per_cn,
            "max_sessions": max(10000, 2 * args.sessions + args.full_sessions),
            "max_lanes": max(20000, 2 * args.sessions + args.full_sessions)}
        if args.budget:
            limits["queue_budget_bytes"] = args.budget
        if args.accept_rate:  # 0: the config's default (a tree without the key: not sent)
            limits["accept_rate"] = args.accept_rate
        if args.accept_burst:
            limits["accept_burst"] = args.accept_burst
        result["limits"] = limits
        queue = {} if args.max_age is None else {"max_age_seconds": args.max_age}
        scfg = write_config(root / "server.yaml", pki, "server", server_port=port,
                            wg_addr=echo.address, tcp=server_tcp, tls=auth, limits=limits,
                            queue=queue)
        ccfg = write_config(root / "client.yaml", pki, "client", server_port=port,
                            client_udp_port=honest_udp, cn="honest", tls=auth)
        lagfile = str(root / "lag.txt")
        lagserver = [sys.executable, str(Path(__file__).resolve().parent / "lagserver.py"),
                     lagfile]
        server = client = None
        probe = None
        crowd = None
        flood = None

        def stall(t0: float, t1: float) -> dict[str, Any]:
            return read_stalls(lagfile, t0, t1)

        try:
            server = UtProcess(scfg, root / "server.log", command=lagserver)
            wait_listening(port)
            client = UtProcess(ccfg, root / "client.log")
            probe = RttProbe(("127.0.0.1", honest_udp), args.probe_ms / 1000)
            await asyncio.sleep(3)  # the honest client's lanes come up
            t = time.monotonic()
            result["idle"] = {"rss_mib": rss_mib(server.pid), "fds": fd_count(server.pid),
                              "honest": probe.window(t - 2, t), "server_stall": stall(t - 2, t)}
            print("idle:", result["idle"], flush=True)
            proof = args.auth == "proof"

            # 1. open
            if phases & {"open", "expiry"}:
                flood = Flood(pki, port, proof)
                t_open = time.monotonic()
                took = await flood.open(args.sessions, args.concurrency, args.max_seconds)
                t_opened = time.monotonic()
                await asyncio.sleep(1)
                opened = len(flood.writers)
                result["open"] = {
                    "opened": opened, "failed": flood.failed, "refused": flood.refused,
                    "seconds": took,
                    "attempts_per_second": (opened + flood.failed) / took if took else 0.0,
                    "sessions_per_second": opened / took if took else 0.0,
                    "rss_mib": rss_mib(server.pid), "fds": fd_count(server.pid),
                    "honest": probe.window(t_open, t_opened),
                    "server_stall": stall(t_open, t_opened),
                }
                print("open:", result["open"], flush=True)

            # 2. expiry: every flood lane gone at once, every session lingers, then ends.
            if "expiry" in phases and flood is not None:
                opened = len(flood.writers)
                base = await socket_fds(server.pid)
                await flood.close_all()
                t_closed = time.monotonic()
                released_at = None
                while time.monotonic() - t_closed < args.linger + 60:
                    await asyncio.sleep(0.2)
                    if await socket_fds(server.pid) <= base - opened * 2 + 50:
                        released_at = time.monotonic()
                        break
                await asyncio.sleep(1)
                t_end = (released_at or time.monotonic()) + 1
                result["expiry"] = {
                    "sessions": opened,
                    "released_seconds_after_linger":
                        None if released_at is None else released_at - t_closed - args.linger,
                    "honest": probe.window(t_closed + args.linger - 1, t_end),
                    "server_stall": stall(t_closed + args.linger - 1, t_end),
                    "rss_mib": rss_mib(server.pid),
                    "fds": fd_count(server.pid),
                    "honest_while_lanes_closed": probe.window(t_closed, t_closed + 2),
                    "stall_while_lanes_closed": stall(t_closed - 0.5, t_closed + 2),
                }
                print("expiry:", result["expiry"], flush=True)
            elif flood is not None:
                await flood.close_all()
                await asyncio.sleep(1)

            # 3. full return queues
            if "full" in phases and args.full_sessions:
                full = Flood(pki, port, proof)
                await full.open(args.full_sessions, args.concurrency, args.max_seconds)
                t_fill = time.monotonic()
                await asyncio.wait_for(full.fill(args.full_datagrams), args.max_seconds)
                peak = rss_mib(server.pid)
                for _ in range(20):  # what is still in flight lands in the queues
                    await asyncio.sleep(0.5)
                    peak = max(peak, rss_mib(server.pid))
                result["full"] = {"sessions": len(full.writers),
                                  "datagrams_each": args.full_datagrams,
                                  "fill_seconds": time.monotonic() - t_fill,
                                  "rss_mib_peak": peak, "fds": fd_count(server.pid)}
                print("full:", result["full"], flush=True)
                await full.close_all()

            # 5. crowd: hundreds of clients lose every lane at once and redial
            if "crowd" in phases and args.crowd:
                spec = root / "crowd.json"
                spec.write_text(json.dumps({
                    "port": port, "ca": str(pki.ca), "server_name": pki.server_name,
                    "auth": args.auth, "lanes": args.crowd_lanes,
                    "max_seconds": args.max_seconds,
                    "certs": [[str(p) for p in pki.client(cn)] for cn in crowd_cns]}))
                crowd = Crowd(spec, root / "crowd.log")
                up = await crowd.ask("up", args.max_seconds + 60)
                print("crowd up:", up, flush=True)
                await asyncio.sleep(2)
                back = await crowd.ask("cut", 2 * args.max_seconds + 30)
                t_cut = back["t_cut"]
                t_back = t_cut + (back["lanes_back_seconds"] or args.max_seconds)
                await asyncio.sleep(1)
                result["crowd"] = {
                    "clients": args.crowd, "lanes_each": args.crowd_lanes, "up": up, **back,
                    "honest": probe.window(t_cut, t_back + 0.5),
                    "server_stall": stall(t_cut - 0.1, t_back + 0.5),
                    "rss_mib": rss_mib(server.pid),
                }
                print("crowd:", result["crowd"], flush=True)

            # 4. SIGTERM with the sessions open again
            if "sigterm" in phases:
                flood = Flood(pki, port, proof)
                took = await flood.open(args.sessions, args.concurrency, args.max_seconds)
                await asyncio.sleep(1)
                n = len(flood.writers)
                rss = rss_mib(server.pid)
                stop_seconds = server.stop()
                result["sigterm"] = {"sessions": n, "exit_seconds": stop_seconds,
                                     "rss_mib": rss, "open_seconds": took}
                print("sigterm:", result["sigterm"], flush=True)
                await flood.close_all()
        finally:
            if crowd is not None:
                crowd.stop()
            if probe is not None:
                probe.stop()
            for p in (client, server):
                if p is not None:
                    p.stop(timeout=10)
            echo.stop()
            log = (root / "server.log").read_text(errors="replace").splitlines()
            result["server_log_lines"] = len(log)
            result["server_log_tail"] = log[-5:]
            if "crowd" in phases and (root / "crowd.log").exists():
                result["crowd_log_tail"] = (root / "crowd.log").read_text(
                    errors="replace").splitlines()[-5:]
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=5000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--linger", type=float, default=10.0)
    ap.add_argument("--probe-ms", type=float, default=10.0)
    ap.add_argument("--max-seconds", type=float, default=240.0, help="bound on each open phase")
    ap.add_argument("--per-cn", type=int, default=20000,
                    help="limits.max_sessions_per_cn (64 is the config's default)")
    ap.add_argument("--auth", choices=("handshake", "proof"), default="handshake")
    ap.add_argument("--full-sessions", type=int, default=0)
    ap.add_argument("--full-datagrams", type=int, default=6000)
    ap.add_argument("--budget", type=int, default=0,
                    help="limits.queue_budget_bytes (0: the config's default)")
    ap.add_argument("--max-age", type=float, default=None,
                    help="queue.max_age_seconds (0: off, so full queues stay full)")
    ap.add_argument("--phases", default="open,expiry,full,sigterm",
                    help="comma list of open, expiry, full, sigterm, crowd")
    ap.add_argument("--crowd", type=int, default=300, help="clients of the crowd phase")
    ap.add_argument("--crowd-lanes", type=int, default=5)
    ap.add_argument("--accept-rate", type=int, default=0,
                    help="limits.accept_rate (0: the config's default)")
    ap.add_argument("--accept-burst", type=int, default=0,
                    help="limits.accept_burst (0: the config's default)")
    ap.add_argument("--crowd-child", help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if args.crowd_child:
        asyncio.run(crowd_child(args.crowd_child))
        return
    result = asyncio.run(run(args))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
