#!/usr/bin/env python3
"""CPU seconds per GB of a ut-tunnel client+server pair on loopback, no WireGuard.

Starts a server and a client as real processes (``python -m ut -config``), a UDP
echo behind the server, and blasts fixed-size datagrams at the client at a paced
rate for a fixed time; reports datagrams carried and the two processes' CPU time
(user+sys from /proc) per GB carried each way. Repeatable enough to compare two
versions of the hot path on a busy machine when run back to back.

    python bench/loopback_cpu.py [--rate 40000] [--size 1400] [--seconds 5] [--lanes 5]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start(cfg: dict, path: Path, env: dict) -> tuple[subprocess.Popen, dict]:
    path.write_text(json.dumps(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "ut", "-config", str(path)],
                            stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stderr:  # type: ignore[union-attr]
        e = json.loads(line)
        if e.get("event") == "start":
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return proc, e
    raise RuntimeError("tunnel did not start")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=int, default=40000, help="datagrams/s offered")
    ap.add_argument("--size", type=int, default=1400)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--lanes", type=int, default=5)
    ap.add_argument("--tcp-buf", type=int, default=0)
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        subprocess.run([sys.executable, "-m", "ut", "pki", "init", str(d), "--server-name",
                        "localhost"], check=True, capture_output=True, env=env)
        subprocess.run([sys.executable, "-m", "ut", "pki", "client", str(d), "bench"],
                       check=True, capture_output=True, env=env)
        echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        echo.bind(("127.0.0.1", 0))
        echo.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        stop = threading.Event()

        def echo_loop() -> None:
            echo.settimeout(0.2)
            while not stop.is_set():
                try:
                    data, addr = echo.recvfrom(65535)
                except TimeoutError:
                    continue
                echo.sendto(data, addr)

        threading.Thread(target=echo_loop, daemon=True).start()
        tls = {"ca_cert": str(d / "ca.pem")}
        tcp = {"lanes": args.lanes, "tcp_buf": args.tcp_buf}
        server, sev = start({
            "role": "server", "tcp": {"listen_addr": "127.0.0.1:0", **tcp},
            "udp": {"wg_udp_addr": f"127.0.0.1:{echo.getsockname()[1]}"},
            "metrics": {"enabled": False},
            "tls": {**tls, "cert": str(d / "server.pem"), "key": str(d / "server.key")},
        }, d / "s.json", env)
        port = int(sev["tcp_listen"].rsplit(":", 1)[1])
        client, cev = start({
            "role": "client", "tcp": {"server_addr": f"127.0.0.1:{port}", **tcp},
            "udp": {"listen_addr": "127.0.0.1:0"}, "metrics": {"enabled": False},

            "tls": {**tls, "cert": str(d / "bench.pem"), "key": str(d / "bench.key"),
                    "server_name": "localhost"},
        }, d / "c.json", env)
        uport = int(cev["udp_listen"].rsplit(":", 1)[1])
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        tx.connect(("127.0.0.1", uport))
        tx.send(b"warm-up")
        tx.settimeout(5)
        tx.recv(100)
        received = 0

        def rx_loop() -> None:
            nonlocal received
            tx.settimeout(0.5)
            while True:
                try:
                    tx.recv(65535)
                except (TimeoutError, OSError):
                    if stop.is_set():
                        return
                    continue
                received += 1

        rt = threading.Thread(target=rx_loop, daemon=True)
        rt.start()
        payload = b"x" * args.size
        c0 = cpu_seconds(server.pid) + cpu_seconds(client.pid)
        t0 = time.perf_counter()
        sent, tick = 0, 0.001
        while (now := time.perf_counter() - t0) < args.seconds:
            due = int(now * args.rate)
            while sent < due:
                try:
                    tx.send(payload)
                except OSError:
                    pass
                sent += 1
            time.sleep(tick)
        time.sleep(1.0)
        c1 = cpu_seconds(server.pid) + cpu_seconds(client.pid)
        stop.set()
        rt.join(2)
        for p in (client, server):
            p.terminate()
            p.wait(5)
        gb = received * args.size / 1e9
        print(json.dumps({
            "sent": sent, "received": received, "loss_pct": round(100 * (1 - received / sent), 2),
            "mbit_s_each_way": round(received * args.size * 8 / args.seconds / 1e6, 1),
            "cpu_s": round(c1 - c0, 2),
            "cpu_s_per_gb_each_way": round((c1 - c0) / gb, 2) if gb else None,
            "lanes": args.lanes, "rate": args.rate, "size": args.size,
        }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
