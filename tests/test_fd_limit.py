"""At its file descriptor limit a real ``ut-tunnel`` server refuses new connections with
a reason, counted and logged once per window, while an established session and the
metrics endpoint keep working (issue 19: ~1,000 sessions at ``ulimit -n 1024`` locked a
new client out for a whole attack, 447 ``accept_fail`` lines, 3 of 5 scrapes failed).

The server runs with ``RLIMIT_NOFILE`` 200; ~250 plain TCP connections that never start
TLS (each a pending lane, one descriptor) take it to the top, where its reserve
(``ut.server.FD_RESERVE``) is kept for the rest. Visitors relayed to ``fallback.addr``
(two descriptors each) stop lower (``ut.server.WEB_FD_RESERVE``): they are turned away
while a client's lane still gets in.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

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


def _refused(metrics_port: int, reason: str) -> int:
    text = _scrape(metrics_port) or ""
    for line in text.splitlines():
        if line.startswith(f'ut_limit_refusals_total{{reason="{reason}"}}'):
            return int(float(line.split()[-1]))
    return -1


def _start_server(pki, tmp_path: Path, tcp_port: int, metrics_port: int,
                  wg: tuple[str, int], **sections: dict) -> tuple[subprocess.Popen, Any, Path]:
    """A ``ut-tunnel`` server process at ``RLIMIT_NOFILE`` ``NOFILE``: (process, its log
    file, the config's path)."""
    cfg: dict[str, Any] = {
        "role": "server",
        "tcp": {"listen_addr": f"127.0.0.1:{tcp_port}", "connect_timeout_seconds": 60},
        "udp": {"wg_udp_addr": f"{wg[0]}:{wg[1]}"},
        "metrics": {"enabled": True, "listen_addr": f"127.0.0.1:{metrics_port}"},
        "tls": {"ca_cert": str(pki.ca), "cert": str(pki.server_cert),
                "key": str(pki.server_key)},
        "limits": {"max_pending": 1000},
        **sections,
    }
    path = tmp_path / "server.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 - closed by the caller
    proc = subprocess.Popen([sys.executable, "-m", "ut", "-config", str(path)],
                            stdout=log, stderr=subprocess.STDOUT, preexec_fn=_limit_nofile,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return proc, log, path


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def test_fd_limit_refuses_new_lanes_keeps_session_and_metrics(pki, tmp_path: Path):
    tcp_port, metrics_port = _free_port(), _free_port()

    async def main():
        echo = UdpEcho().start()
        proc, log, path = _start_server(pki, tmp_path, tcp_port, metrics_port, echo.address)
        log_path = tmp_path / "server.log"
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
                return _refused(metrics_port, "fds")

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
            _stop(proc)
            log.close()
            echo.close()
        events = [json.loads(line) for line in log_path.read_text().splitlines()
                  if line.startswith("{")]
        refusals = [e for e in events if e["event"] == "lane_refused" and e.get("reason") == "fds"]
        # Debounced: one line per reason per 5 s window, however many were refused.
        assert 1 <= len(refusals) <= 3, len(refusals)
        assert not [e for e in events if e["event"] == "accept_fail"]

    run_on("uvloop", main(), timeout=90)


RELAYS = 80  # visitors relayed to the fallback, two descriptors each: past the web face's bound


def test_fd_limit_turns_web_relays_away_before_lanes(pki, tmp_path: Path):
    """``tls.client_auth: proof`` with ``fallback.addr``: visitors (TLS, an HTTP request,
    no proof) are relayed to a web server that holds them. Near the limit they are turned
    away (``web_fds``), below where lanes stop, so a client's lane still gets its session
    and no lane is refused."""
    tcp_port, metrics_port = _free_port(), _free_port()

    async def main():
        echo = UdpEcho().start()
        held: list[asyncio.StreamWriter] = []

        async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            held.append(writer)  # a web server that never answers: the relay stays

        fallback = await asyncio.start_server(hold, "127.0.0.1", 0)
        fb_port = fallback.sockets[0].getsockname()[1]
        proc, log, path = _start_server(pki, tmp_path, tcp_port, metrics_port, echo.address,
                                        fallback={"addr": f"127.0.0.1:{fb_port}"})
        log_path = tmp_path / "server.log"
        visitors: list[asyncio.StreamWriter] = []
        honest = None
        ctx = ssl.create_default_context(cafile=str(pki.ca))
        try:
            deadline = time.monotonic() + 20
            while _scrape(metrics_port) is None:
                assert time.monotonic() < deadline and proc.poll() is None
                await asyncio.sleep(0.1)
            turned_away = 0
            for _ in range(RELAYS):  # one at a time: each is relayed or refused first
                before = len(held)
                try:
                    r, w = await asyncio.wait_for(asyncio.open_connection(
                        "127.0.0.1", tcp_port, ssl=ctx, server_hostname=pki.server_name), 5)
                except (OSError, ssl.SSLError):  # closed before TLS: turned away too
                    turned_away += 1
                    continue
                w.write(b"GET / HTTP/1.1\r\nHost: example.org\r\n\r\n")
                visitors.append(w)
                read = asyncio.ensure_future(r.read(4096))
                t0 = time.monotonic()
                while len(held) == before and not read.done() and time.monotonic() - t0 < 5:
                    await asyncio.sleep(0.01)
                if read.done():  # closed, or nginx's 502: turned away
                    turned_away += 1
                else:
                    read.cancel()
                    assert len(held) > before, "neither relayed nor turned away in 5 s"
            print(f"\n{len(held)} relayed, {turned_away} turned away of {RELAYS}")
            assert turned_away > 0 and len(held) > 10
            assert _refused(metrics_port, "web_fds") >= turned_away
            # A client's lane still gets in, below the lanes' own bound.
            server = type("S", (), {"address": ("127.0.0.1", tcp_port),
                                    "config": ut.load_config(str(path))})()
            honest = await RawLane.open(pki, server)
            honest.send(control_frame(Hello(1, 0, 1)))
            assert await honest.read_some()
            assert _refused(metrics_port, "fds") == 0
            assert all(_scrape(metrics_port) is not None for _ in range(3))
            assert proc.poll() is None
        finally:
            if honest is not None:
                honest.close()
            for w in visitors:
                w.close()
            for w in held:
                w.close()
            fallback.close()
            _stop(proc)
            log.close()
            echo.close()
        events = [json.loads(line) for line in log_path.read_text().splitlines()
                  if line.startswith("{")]
        refusals = [e for e in events if e["event"] == "web_refused"]
        assert 1 <= len(refusals) <= 3, len(refusals)  # debounced

    run_on("uvloop", main(), timeout=90)
