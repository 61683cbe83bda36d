#!/usr/bin/env python3
"""What UDP segmentation offload saves on a loopback send (the tunnel's hand-off to a local
WireGuard): ``send_batch`` of 32 full-size datagrams per call, with and without ``gso``.

    python bench/gso_probe.py                 # plain, gso, three times each
    python bench/gso_probe.py --rounds 5 --size 1452 --batch 32

The receiver is a plain socket in a child process, like wireguard-go's (no ``UDP_GRO``),
so the kernel splits each run back into datagrams for it. CPU is ``getrusage`` of each
process (user + system, which includes the loopback delivery the sender's system call
does). The sender sleeps 2 ms every 50 calls so that the receiver can keep up; the
receiver may still drop some with ``gso`` (it is the slower side then): "recv" shows it.
No network beyond 127.0.0.1; at most ``--total`` datagrams per run.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import struct
import time

from ut import fastpath


def _receiver(port_w: int, done_w: int) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    s.bind(("127.0.0.1", 0))
    os.write(port_w, struct.pack("=H", s.getsockname()[1]))
    s.settimeout(1.0)
    n = 0
    try:
        while True:
            s.recv(65535)
            n += 1
    except TimeoutError:
        pass
    ru = resource.getrusage(resource.RUSAGE_SELF)
    os.write(done_w, struct.pack("=idd", n, ru.ru_utime, ru.ru_stime))
    os._exit(0)


def run(gso: bool, size: int, batch: int, total: int) -> dict:
    port_r, port_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        _receiver(port_w, done_w)
    port = struct.unpack("=H", os.read(port_r, 2))[0]
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect(("127.0.0.1", port))
    payload = [bytes([i % 256]) * size for i in range(batch)]
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    sent = calls = 0
    while sent < total:
        sent += fastpath.send_batch(s, payload, None, gso)
        calls += 1
        if calls % 50 == 0:
            time.sleep(0.002)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    got, ru, rs = struct.unpack("=idd", os.read(done_r, 20))
    os.waitpid(pid, 0)
    for fd in (port_r, port_w, done_r, done_w):
        os.close(fd)
    s.close()
    snd = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return {"sent": sent, "recv": got, "sender_us": snd / sent * 1e6,
            "receiver_us": (ru + rs) / max(got, 1) * 1e6}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--size", type=int, default=1452, help="datagram bytes (WireGuard MTU 1420 + 32)")
    p.add_argument("--batch", type=int, default=32, help="datagrams per send_batch call")
    p.add_argument("--total", type=int, default=400_000, help="datagrams per run")
    a = p.parse_args()
    print(f"implementation {fastpath.IMPLEMENTATION}, HAVE_GSO {fastpath.HAVE_GSO}")
    res: dict[str, list] = {"plain": [], "gso": []}
    for _ in range(a.rounds):
        for mode in res:
            r = run(mode == "gso", a.size, a.batch, a.total)
            res[mode].append(r)
            print(f"{mode:5s} sent {r['sent']} recv {r['recv']}  sender {r['sender_us']:.2f} "
                  f"µs/datagram  receiver {r['receiver_us']:.2f} µs/datagram")
    med = {m: statistics.median(x["sender_us"] for x in v) for m, v in res.items()}
    print(f"median sender µs/datagram: plain {med['plain']:.2f}, gso {med['gso']:.2f} "
          f"({med['gso'] / med['plain']:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
