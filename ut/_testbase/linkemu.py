"""A userspace link emulator between two network namespaces (the kernel here has no netem).

Two TUN devices (layer 3, ``IFF_TUN | IFF_NO_PI``) are created in the root namespace by
opening ``/dev/net/tun``, moved into namespace A and B (``ip link set DEV netns NS``;
the open file descriptors keep working), and given addresses on one /24. A forwarder
*process* (so the caller's GIL and event loop cannot disturb its timing) copies every IP
packet A->B and B->A, applying per direction:

==============  =================================================================
``delay_ms``    fixed one-way delay (added to each packet's departure time)
``jitter_ms``   uniform extra delay in [0, jitter_ms) (reorders by itself if large)
``loss_pct``    independent (Bernoulli) loss per packet, in percent
``reorder_pct`` this share of packets skips the delay line and leaves at once, so it
                overtakes the ones in flight (netem's ``reorder``; needs a delay)
``rate_mbit``   serialisation at this rate (0 = unlimited), tail drop past ``limit``
``limit``       most packets queued per direction (default 10000)
``blackhole``   drop everything both ways (a partition); False restores the link
==============  =================================================================

Example::

    with NetnsPair() as (a, b), LinkEmu(a, b) as link:   # 10.x.y.1 in a, 10.x.y.2 in b
        link.set(delay_ms=20, loss_pct=1)
        ... ip netns exec {a} ping {link.addr_b} ...
        link.set(blackhole=True); time.sleep(25); link.set(blackhole=False)
        print(link.stats())

Accuracy: packets leave at ``arrival + delay`` on the forwarder's monotonic clock, woken by
``epoll`` with a millisecond timeout rounded up, so a packet is late by 0..1 ms plus
scheduling noise (measured: ping RTT over a 20 ms link is 40.2-41.5 ms, see
tests/e2e/test_faults.py). Cost: one read and one write syscall per packet, no copies
beyond that; about 100k packets/s on one core. Devices are not persistent: they vanish
when the forwarder exits, even if it is killed.

Cleanup: ``LinkEmu.stop()`` ends the forwarder by pid (SIGTERM, then SIGKILL).
``NetnsPair`` names its namespaces ``utbed-<pid>-<tag>-{a,b}``, the pattern that
``ut/_testbase/netbed.py``'s stale-bed sweep removes once this process is gone, and deletes them
(after ending any process left inside, by pid) on exit.

Also a program: ``python ut/_testbase/linkemu.py forward ...`` is the forwarder itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import heapq
import json
import os
import random
import secrets
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import TextIO

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
HERE = Path(__file__).resolve()
FINE_SLEEP = 0.002  # seconds before a departure when the forwarder stops polling and sleeps
DEFAULTS = {"delay_ms": 0.0, "jitter_ms": 0.0, "loss_pct": 0.0, "reorder_pct": 0.0,
            "rate_mbit": 0.0, "limit": 10000, "blackhole": False, "seed": None}


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if check and res.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {res.stderr.strip()}")
    return res


def open_tun(name: str) -> int:
    """Create a (non-persistent) TUN device ``name`` and return its fd (non-blocking)."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    except BaseException:
        os.close(fd)
        raise
    return fd


class NetnsPair:
    """Two fresh namespaces with loopback up; deleted (with anything left inside) on exit."""

    def __init__(self, prefix: str = "utbed") -> None:
        tag = secrets.token_hex(3)
        self.names = (f"{prefix}-{os.getpid()}-{tag}-a", f"{prefix}-{os.getpid()}-{tag}-b")
        self.tag = tag
        self._made: list[str] = []

    def __enter__(self) -> tuple[str, str]:
        try:
            for ns in self.names:
                _ip("netns", "add", ns)
                self._made.append(ns)
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self.names

    def close(self) -> list[str]:
        problems = []
        for ns in self._made:
            res = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
            for pid in (int(p) for p in res.stdout.split() if p.isdigit()):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for ns in self._made:
            res = _ip("netns", "del", ns, check=False)
            if res.returncode != 0:
                problems.append(res.stderr.strip())
        self._made = []
        return problems

    def __exit__(self, *exc: object) -> None:
        self.close()


class LinkEmu:
    """A point-to-point link between namespaces ``ns_a`` and ``ns_b`` with faults on demand."""

    def __init__(self, ns_a: str, ns_b: str, *, subnet: str | None = None, mtu: int = 1500,
                 **params: object) -> None:
        self.ns_a, self.ns_b = ns_a, ns_b
        tag = secrets.token_hex(3)
        self.dev_a, self.dev_b = f"ule{tag}a", f"ule{tag}b"
        if subnet is None:
            rnd = random.Random(tag)
            subnet = f"10.{rnd.randint(160, 199)}.{rnd.randint(0, 255)}"
        self.addr_a, self.addr_b = f"{subnet}.1", f"{subnet}.2"
        self.mtu = mtu
        self.params = {**DEFAULTS, **params}
        self.proc: subprocess.Popen | None = None
        self._ctl: socket.socket | None = None
        self._ctl_file: TextIO | None = None

    # -- life cycle ---------------------------------------------------------------
    def start(self) -> LinkEmu:
        fds: list[int] = []
        try:
            fds = [open_tun(self.dev_a), open_tun(self.dev_b)]
            parent, child = socket.socketpair()
            self._ctl = parent
            for fd in fds:
                os.set_inheritable(fd, True)
            child.set_inheritable(True)
            self.proc = subprocess.Popen(
                [sys.executable, str(HERE), "forward", str(fds[0]), str(fds[1]),
                 str(child.fileno()), json.dumps(self.params)],
                pass_fds=(*fds, child.fileno()), stdin=subprocess.DEVNULL,
                start_new_session=True)
            child.close()
            for fd in fds:  # the forwarder owns them now: the devices die with it
                os.close(fd)
            fds = []
            self._ctl_file = parent.makefile("rw", buffering=1)
            self._call({"cmd": "ping"})
            for dev, ns, addr in ((self.dev_a, self.ns_a, self.addr_a),
                                  (self.dev_b, self.ns_b, self.addr_b)):
                _ip("link", "set", dev, "netns", ns)
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                _ip("-n", ns, "link", "set", dev, "mtu", str(self.mtu), "up")
        except BaseException:
            for fd in fds:
                os.close(fd)
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self._ctl_file is not None:
            with contextlib.suppress(Exception):
                self._ctl_file.close()
            self._ctl_file = None
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None
        p = self.proc
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=3)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        self.proc = None

    def __enter__(self) -> LinkEmu:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- control ------------------------------------------------------------------
    def _call(self, msg: dict) -> dict:
        assert self._ctl_file is not None, "not started"
        self._ctl_file.write(json.dumps(msg) + "\n")
        line = self._ctl_file.readline()
        if not line:
            raise RuntimeError(f"link emulator exited ({self.proc and self.proc.poll()})")
        reply = json.loads(line)
        if "error" in reply:
            raise ValueError(reply["error"])
        return reply

    def set(self, **params: object) -> dict:
        """Change parameters (see the module doc); returns all current parameters."""
        unknown = set(params) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"unknown link parameters: {sorted(unknown)}")
        self.params.update(params)
        return self._call({"cmd": "set", "params": params})["params"]

    def stats(self) -> dict:
        """Per direction (``ab``, ``ba``): packets ``seen``, ``sent``, ``lost`` (loss_pct),
        ``blackholed``, ``overflow`` (limit), ``reordered``, ``write_errors``, ``queued`` now."""
        return self._call({"cmd": "stats"})["stats"]


# ------------------------------------------------------------------------------------
# The forwarder (child process)
# ------------------------------------------------------------------------------------

def forward(fd_a: int, fd_b: int, ctl_fd: int, params: dict) -> None:
    p = {**DEFAULTS, **params}
    rng = random.Random(p.get("seed"))
    ctl = socket.socket(fileno=ctl_fd)
    ctl.setblocking(False)
    ctl_buf = b""
    out = {fd_a: fd_b, fd_b: fd_a}
    name = {fd_a: "ab", fd_b: "ba"}
    heaps: dict[int, list] = {fd_a: [], fd_b: []}  # keyed by source fd
    next_free = {fd_a: 0.0, fd_b: 0.0}  # rate limiting: when the "wire" is free
    stats = {d: dict.fromkeys(("seen", "sent", "lost", "blackholed", "overflow", "reordered",
                               "write_errors"), 0)
             for d in ("ab", "ba")}
    seq = 0
    ep = select.epoll()
    ep.register(fd_a, select.EPOLLIN)
    ep.register(fd_b, select.EPOLLIN)
    ep.register(ctl_fd, select.EPOLLIN)
    stop = False

    def on_term(*_a):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    monotonic = time.monotonic
    while not stop:
        soonest = min((h[0][0] for h in heaps.values() if h), default=None)
        timeout = -1 if soonest is None else max(0.0, soonest - monotonic())
        try:
            if soonest is not None and timeout < FINE_SLEEP:
                # epoll rounds its timeout up to whole milliseconds; the last stretch
                # is slept with nanosleep (~0.1 ms precision) so departures are on time.
                time.sleep(timeout)
                events = ep.poll(0)
            else:
                events = ep.poll(timeout - FINE_SLEEP / 2 if soonest is not None else -1)
        except InterruptedError:
            continue
        for fd, _ev in events:
            if fd == ctl_fd:
                try:
                    chunk = ctl.recv(65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    stop = True
                    break
                ctl_buf += chunk
                while b"\n" in ctl_buf:
                    line, ctl_buf = ctl_buf.split(b"\n", 1)
                    msg = json.loads(line)
                    reply: dict = {}
                    if msg["cmd"] == "set":
                        p.update(msg["params"])
                        if "seed" in msg["params"]:
                            rng.seed(p["seed"])
                        reply = {"params": p}
                    elif msg["cmd"] == "stats":
                        reply = {"stats": {d: {**s, "queued": len(heaps[f])}
                                           for f, d in name.items() for s in [stats[d]]}}
                    elif msg["cmd"] == "ping":
                        reply = {"pong": True}
                    else:
                        reply = {"error": f"unknown command {msg['cmd']!r}"}
                    ctl.setblocking(True)
                    ctl.sendall(json.dumps(reply).encode() + b"\n")
                    ctl.setblocking(False)
                continue
            st = stats[name[fd]]
            heap = heaps[fd]
            for _ in range(256):  # bounded work per wake-up
                try:
                    pkt = os.read(fd, 65536)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    break
                now = monotonic()
                st["seen"] += 1
                if p["blackhole"]:
                    st["blackholed"] += 1
                    continue
                if p["loss_pct"] and rng.random() * 100.0 < p["loss_pct"]:
                    st["lost"] += 1
                    continue
                if len(heap) >= p["limit"]:
                    st["overflow"] += 1
                    continue
                due = now
                if p["reorder_pct"] and rng.random() * 100.0 < p["reorder_pct"]:
                    st["reordered"] += 1  # skips the delay line
                else:
                    due += p["delay_ms"] / 1000.0
                    if p["jitter_ms"]:
                        due += rng.random() * p["jitter_ms"] / 1000.0
                if p["rate_mbit"]:
                    start = max(due, next_free[fd])
                    next_free[fd] = start + len(pkt) * 8 / (p["rate_mbit"] * 1e6)
                    due = next_free[fd]
                seq += 1
                heapq.heappush(heap, (due, seq, pkt))
        now = monotonic()
        for src, heap in heaps.items():
            dst = out[src]
            st = stats[name[src]]
            while heap and heap[0][0] <= now:
                _due, _s, pkt = heapq.heappop(heap)
                if p["blackhole"]:  # packets in flight when the partition starts are lost too
                    st["blackholed"] += 1
                    continue
                try:
                    os.write(dst, pkt)
                    st["sent"] += 1
                except OSError:  # e.g. the far device not up yet
                    st["write_errors"] += 1
    ep.close()


def main(argv: list[str]) -> int:
    if len(argv) == 5 and argv[0] == "forward":
        forward(int(argv[1]), int(argv[2]), int(argv[3]), json.loads(argv[4]))
        return 0
    print("usage: linkemu.py forward FD_A FD_B CTL_FD PARAMS_JSON", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
