"""Real ``ut-tunnel`` processes on loopback for the issue-19 benches (recovery.py, abuse.py).

A throwaway PKI, YAML configs, processes started with ``python -m ut -config FILE`` (the
console script) and always stopped by their own pid, a UDP echo standing in for WireGuard
(a thread of the bench process), and small probes of a process from ``/proc``: whether a
TCP port listens, its RSS, its file descriptors. Loopback only; no root needed.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from ut._testbase.certs import TestPki, make_test_pki

__all__ = [
    "UdpEchoThread",
    "UtProcess",
    "fd_count",
    "free_port",
    "listening",
    "make_pki",
    "raise_nofile",
    "rss_mib",
    "stopping",
    "wait_listening",
    "write_config",
]


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A loopback port free right now (for a config that needs a fixed one)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_nofile(want: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards ``want`` (children inherit it)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    new = min(want, hard) if hard != resource.RLIM_INFINITY else want
    if new > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def make_pki(root: Path, clients: tuple[str, ...] = ("home",)) -> TestPki:
    pki = make_test_pki(root)
    for cn in clients:
        pki.client(cn)
    return pki


def write_config(path: Path, pki: TestPki, role: str, *, server_port: int,
                 client_udp_port: int = 0, wg_addr: tuple[str, int] = ("127.0.0.1", 9),
                 cn: str = "home", metrics_port: int = 0, **sections: dict) -> Path:
    """A server or client YAML file on loopback; ``sections`` are merged in (dicts)."""
    tls: dict[str, Any] = {"ca_cert": str(pki.ca)}
    if role == "server":
        tls.update(cert=str(pki.server_cert), key=str(pki.server_key))
        cfg: dict[str, Any] = {
            "role": "server",
            "tcp": {"listen_addr": f"127.0.0.1:{server_port}"},
            "udp": {"wg_udp_addr": f"{wg_addr[0]}:{wg_addr[1]}"},
        }
    else:
        cert, key = pki.client(cn)
        tls.update(cert=str(cert), key=str(key), server_name=pki.server_name)
        cfg = {
            "role": "client",
            "tcp": {"server_addr": f"127.0.0.1:{server_port}"},
            "udp": {"listen_addr": f"127.0.0.1:{client_udp_port}"},
        }
    cfg["metrics"] = ({"enabled": True, "listen_addr": f"127.0.0.1:{metrics_port}"}
                      if metrics_port else {"enabled": False})
    cfg["tls"] = tls
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


class UtProcess:
    """One ``ut-tunnel`` process; ``stop()`` signals it by pid and reaps it."""

    def __init__(self, config: Path, log: Path, env: dict[str, str] | None = None,
                 command: list[str] | None = None) -> None:
        """``command``: what to run instead of ``python -m ut`` (e.g. ``lagserver.py``),
        given ``-config FILE``."""
        self.config, self.log = config, log
        self._log_file = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*(command or [sys.executable, "-m", "ut"]), "-config", str(config)],
            stdout=self._log_file, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        )
        self.pid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> float:
        """Send ``sig``; return the seconds until the process exited (SIGKILL after
        ``timeout``, and then the result is ``inf``)."""
        t0 = time.monotonic()
        took = 0.0
        if self.alive():
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
                took = time.monotonic() - t0
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                took = float("inf")
        self._log_file.close()
        return took


def listening(port: int) -> bool:
    """Whether a TCP socket of this namespace listens on ``port`` (``/proc/net/tcp``,
    no connection made: the server under test sees nothing)."""
    hexport = f":{port:04X}"
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            with open(table) as f:
                next(f, None)
                for line in f:
                    fields = line.split()
                    if fields[1].endswith(hexport) and fields[3] == "0A":
                        return True
        except OSError:
            continue
    return False


def wait_listening(port: int, timeout: float = 20.0, interval: float = 0.002) -> float:
    """Poll until ``port`` listens; return the ``time.monotonic()`` it was first seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if listening(port):
            return time.monotonic()
        time.sleep(interval)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class UdpEchoThread:
    """WireGuard's stand-in: a UDP socket on loopback that sends every datagram back,
    in a thread (select with a timeout, so ``stop()`` ends it within 0.1 s)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind(("127.0.0.1", 0))
        self.address: tuple[str, int] = self.sock.getsockname()
        self.echoed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="udp-echo", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sock = self.sock
        while not self._stop.is_set():
            ready, _, _ = select.select([sock], [], [], 0.1)
            if not ready:
                continue
            try:
                data, addr = sock.recvfrom(65535)
                sock.sendto(data, addr)
                self.echoed += 1
            except OSError:
                continue

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@contextlib.contextmanager
def stopping(*procs: UtProcess) -> Iterator[None]:
    """Stop every process given (SIGTERM, then SIGKILL) however the block ends."""
    try:
        yield
    finally:
        for p in procs:
            p.stop(timeout=10)
