"""At its file descriptor limit a real ``ut-tunnel`` server refuses new connections with
a reason, counted and logged once per window, while an established session and the
metrics endpoint keep working (issue 19: ~1,000 sessions at ``ulimit -n 1024`` locked a
new client out for a whole attack, 447 ``accept_fail`` lines, 3 of 5 scrapes failed).

The server runs with ``RLIMIT_NOFILE`` 200; ~250 plain TCP connections that never start
TLS (each a pending lane, one descriptor) take it to the top, where its reserve
(``ut.server.FD_RESERVE``) is kept for the rest.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

import ut
from ut import fastpath
from ut._testbase.rawlane import RawLane
from ut._testbase.tunnelkit import UdpEcho, run_on, wait_for
from ut.control import Hello, control_frame

NOFILE = 200
FLOOD = 250


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _limit_nofile() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, hard))


def _scrape(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return r.read().decode()
    except OSError:
        return None


def test_fd_limit_refuses_new_lanes_keeps_session_and_metrics(pki, tmp_path: Path):
    tcp_port, metrics_port = _free_port(), _free_port()

    async def main():
        echo = UdpEcho().start()
        cfg = {
            "role": "server",
            "tcp": {"listen_addr": f"127.0.0.1:{tcp_port}", "connect_timeout_seconds": 60},
            "udp": {"wg_udp_addr": f"{echo.address[0]}:{echo.address[1]}"},
            "metrics": {"enabled": True, "listen_addr": f"127.0.0.1:{metrics_port}"},
            "tls": {"ca_cert": str(pki.ca), "cert": str(pki.server_cert),
                    "key": str(pki.server_key)},
            "limits": {"max_pending": 1000},
        }
        path = tmp_path / "server.yaml"
        path.write_text(yaml.safe_dump(cfg))
        log_path = tmp_path / "server.log"
        log = open(log_path, "wb")  # noqa: SIM115 - closed below
        proc = subprocess.Popen([sys.executable, "-m", "ut", "-config", str(path)],
                                stdout=log, stderr=subprocess.STDOUT, preexec_fn=_limit_nofile,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        flood: list[socket.socket] = []
        honest = None
        try:
            deadline = time.monotonic() + 20
            while _scrape(metrics_port) is None:
                assert time.monotonic() < deadline and proc.poll() is None
                await asyncio.sleep(0.1)
            server = type("S", (), {"address": ("127.0.0.1", tcp_port),
                                    "config": ut.load_config(str(path))})()
            honest = await RawLane.open(pki, server)
            honest.send(control_frame(Hello(1, 0, 1)))
            assert await honest.read_some()

            async def echoed(tag: bytes) -> bool:
                honest.send(fastpath.encode_data([tag]))
                for _ in range(20):
                    if any(p == tag for t, _f, p in honest.frames if t == fastpath.TYPE_DATA):
                        return True
                    await honest.read_some(timeout=0.25)
                return False

            assert await echoed(b"before")
            for _ in range(FLOOD):
                s = socket.socket()
                s.setblocking(False)
                try:
                    s.connect(("127.0.0.1", tcp_port))
                except BlockingIOError:
                    pass
                flood.append(s)
            await asyncio.sleep(1.0)

            def refused() -> int:
                text = _scrape(metrics_port) or ""
                for line in text.splitlines():
                    if line.startswith('ut_limit_refusals_total{reason="fds"}'):
                        return int(float(line.split()[-1]))
                return -1

            assert await wait_for(lambda: refused() > 0, timeout=10)
            print(f"\nrefused at the fd limit: {refused()} of {FLOOD} connections")
            # Established: still carries datagrams. Metrics: every scrape answers.
            assert await echoed(b"after")
            assert all(_scrape(metrics_port) is not None for _ in range(5))
            # A new client is refused quickly (closed before TLS), not left hanging.
            t0 = time.monotonic()
            try:
                late = await asyncio.wait_for(RawLane.open(pki, server), 5)
                late.send(control_frame(Hello(2, 0, 1)))
                assert not await late.read_some(timeout=3)
            except (OSError, asyncio.TimeoutError, ConnectionError):
                pass
            assert time.monotonic() - t0 < 5
            assert proc.poll() is None
        finally:
            if honest is not None:
                honest.close()
            for s in flood:
                s.close()
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            log.close()
            echo.close()
        events = [json.loads(line) for line in log_path.read_text().splitlines()
                  if line.startswith("{")]
        refusals = [e for e in events if e["event"] == "lane_refused" and e.get("reason") == "fds"]
        # Debounced: one line per reason per 5 s window, however many were refused.
        assert 1 <= len(refusals) <= 3, len(refusals)
        assert not [e for e in events if e["event"] == "accept_fail"]

    run_on("uvloop", main(), timeout=90)
