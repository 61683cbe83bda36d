"""Traffic's return after a server outage (issue 19, point 5 and its target: "traffic
resumes within 2 s (median) of the server listening again" after a 35 s outage).

Real processes on loopback: a ``ut-tunnel`` server and client with the default dial
backoff (``tcp.dial_backoff_min_seconds`` 5, ``_max_`` 60), a UDP echo standing in for
WireGuard behind the server, and a probe in front of the client sending a datagram every
10-100 ms throughout. Each trial stops the server (SIGTERM), waits ``--outage`` seconds,
starts a new server process on the same port, and times from the moment the port listens
(seen in ``/proc/net/tcp``, no connection made) to the first echo back at the probe. The
client runs through all trials (its session and backoff are the code under test).

    python bench/recovery.py --trials 7 --outage 35 --json bench/results/issue19-recovery.json
    python bench/recovery.py --simulate        # the schedules alone, Monte Carlo, no processes

``--simulate`` draws the waits of ``ut.client.dial_delays`` (the schedule in use) and of
the previous one (full jitter, the cap doubling from the first failure) and reports the
time from the server's return to the next dial, after the same outage.
"""

from __future__ import annotations

import argparse
import json
import random
import select
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tunnelprocs import (  # noqa: E402 - after the path line, as run as a script
    UdpEchoThread,
    UtProcess,
    free_port,
    make_pki,
    wait_listening,
    write_config,
)

from ut.client import FAST_RETRY_SECONDS, dial_delays  # noqa: E402


def previous_schedule(min_seconds: float, max_seconds: float) -> Iterator[float]:
    """The schedule before this change (commit 62b1218): the cap doubles at once."""
    yield random.uniform(0.0, min(FAST_RETRY_SECONDS, min_seconds))
    cap = min_seconds
    while True:
        yield random.uniform(0.0, cap)
        cap = min(cap * 2, max_seconds)


def _wait_after(outage: float, which: str, min_s: float, max_s: float) -> float:
    t = 0.0
    gen = (dial_delays(min_s, max_s, clock=lambda: t) if which == "current"
           else previous_schedule(min_s, max_s))
    for _ in range(100000):
        t += next(gen)
        if t >= outage:
            return t - outage
    raise RuntimeError("no dial after the outage")


def simulate(outage: float, draws: int = 20000) -> dict:
    out = {}
    for which in ("previous", "current"):
        waits = sorted(_wait_after(outage, which, 5.0, 60.0) for _ in range(draws))
        out[which] = {"median": statistics.median(waits), "mean": statistics.mean(waits),
                      "p90": waits[int(0.9 * draws)], "max": waits[-1]}
    return out


class Probe:
    """The WireGuard peer in front of the client: sends numbered datagrams, notes when
    echoes come back."""

    def __init__(self, client_addr: tuple[str, int]) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.addr = client_addr
        self.seq = 0

    def send(self) -> None:
        self.seq += 1
        try:
            self.sock.sendto(self.seq.to_bytes(8, "big") + bytes(100), self.addr)
        except OSError:
            pass

    def echoes(self, wait: float) -> int:
        """Echoes read within ``wait`` seconds (returns at the first batch)."""
        ready, _, _ = select.select([self.sock], [], [], wait)
        n = 0
        while ready:
            try:
                self.sock.recv(2048)
                n += 1
            except BlockingIOError:
                break
        return n


def run_for(probe: Probe, seconds: float, every: float) -> int:
    """Send a datagram every ``every`` s for ``seconds``; return the echoes seen."""
    end = time.monotonic() + seconds
    got = 0
    while time.monotonic() < end:
        probe.send()
        got += probe.echoes(min(every, max(0.0, end - time.monotonic())))
    return got


def trial(server: UtProcess, start_server, probe: Probe, port: int, outage: float,
          deadline: float = 90.0) -> tuple[UtProcess, dict]:
    stop_seconds = server.stop()
    t_down = time.monotonic()
    stray = run_for(probe, outage, 0.1)  # the client keeps failing to dial
    server = start_server()
    # Keep sending while the new process starts; note the moment its port listens.
    t_listen = None
    while t_listen is None and time.monotonic() - t_down < outage + 30:
        probe.send()
        probe.echoes(0.02)
        try:
            t_listen = wait_listening(port, timeout=0.02, interval=0.002)
        except TimeoutError:
            continue
    if t_listen is None:
        raise RuntimeError("the server did not listen again")
    t_first = None
    while time.monotonic() - t_listen < deadline:
        probe.send()
        if probe.echoes(0.01):
            t_first = time.monotonic()
            break
    if t_first is None:
        raise RuntimeError(f"no traffic {deadline} s after the server listened again")
    run_for(probe, 1.0, 0.05)  # let the other lanes come up before the next trial
    return server, {"resumed_seconds": t_first - t_listen, "outage_seconds": t_first - t_down,
                    "server_stop_seconds": stop_seconds, "echoes_during_outage": stray}


def measure(trials: int, outage: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="ut-recovery-") as tmp:
        root = Path(tmp)
        pki = make_pki(root / "pki")
        echo = UdpEchoThread()
        port, udp_port = free_port(), free_port(socket.SOCK_DGRAM)
        scfg = write_config(root / "server.yaml", pki, "server", server_port=port,
                            wg_addr=echo.address)
        ccfg = write_config(root / "client.yaml", pki, "client", server_port=port,
                            client_udp_port=udp_port)
        runs = []
        server = client = None
        probe = Probe(("127.0.0.1", udp_port))

        def start_server() -> UtProcess:
            return UtProcess(scfg, root / "server.log")

        try:
            server = start_server()
            wait_listening(port)
            client = UtProcess(ccfg, root / "client.log")
            if not run_for(probe, 10.0, 0.1):
                raise RuntimeError("no echo through the tunnel at the start")
            for i in range(trials):
                server, r = trial(server, start_server, probe, port, outage)
                runs.append(r)
                print(f"trial {i + 1}/{trials}: traffic back {r['resumed_seconds']:.3f} s after "
                      f"the server listened ({r['outage_seconds']:.1f} s without traffic)",
                      flush=True)
        finally:
            for p in (client, server):
                if p is not None:
                    p.stop(timeout=10)
            echo.stop()
            probe.sock.close()
    resumed = sorted(r["resumed_seconds"] for r in runs)
    return {"trials": runs, "outage": outage, "median_resumed_seconds": statistics.median(resumed),
            "max_resumed_seconds": resumed[-1], "min_resumed_seconds": resumed[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=7)
    ap.add_argument("--outage", type=float, default=35.0)
    ap.add_argument("--simulate", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    result: dict = {"simulated": simulate(args.outage)}
    for which, r in result["simulated"].items():
        print(f"simulated {which} schedule, {args.outage:g} s outage: next dial "
              f"median {r['median']:.2f} s, mean {r['mean']:.2f}, p90 {r['p90']:.2f}, "
              f"max {r['max']:.2f}")
    if not args.simulate:
        result["measured"] = measure(args.trials, args.outage)
        m = result["measured"]
        print(f"measured: median {m['median_resumed_seconds']:.3f} s "
              f"(min {m['min_resumed_seconds']:.3f}, max {m['max_resumed_seconds']:.3f}) over "
              f"{len(m['trials'])} trials")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
