#!/usr/bin/env python3
"""Micro-benchmarks: the compiled fast path (ut._fastpath) against its pure twin (ut._purepy).

    python bench/micro.py [--quick] [--json]

Each benchmark is timed with ``timeit`` on both implementations, alternating
compiled/pure repeats so a noisy neighbour hits both alike; the figure is the median
rate over the repeats (operations per second in the benchmark's unit) and the speed-up
is compiled ÷ pure. No network: the batch-syscall benchmark uses two UDP sockets on
127.0.0.1 in whatever namespace it runs in.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import timeit
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WG_SIZE = 1420  # a full WireGuard datagram at MTU 1380 (+ 32 bytes of WireGuard + IP/UDP)
BATCH = 32


def _impls():
    import ut._purepy as pure

    out = {"pure": pure}
    try:
        import ut._fastpath as fast

        out["compiled"] = fast
    except ImportError as exc:  # noqa: F841
        pass
    return out


def _wg_datagram(size: int, i: int = 0) -> bytes:
    # a WireGuard transport message: type 4, 3 reserved, receiver index, counter, payload
    head = bytes([4, 0, 0, 0]) + (0x1234 + (i % 7)).to_bytes(4, "little") + i.to_bytes(8, "little")
    return (head + bytes(size))[:size]


# Each factory takes the module and returns (callable, ops per call, unit).
def b_encode_data(size):
    def make(m):
        dg = [_wg_datagram(size, i) for i in range(BATCH)]
        enc = m.encode_data
        return (lambda: enc(dg)), BATCH, "frames/s"

    return make


def b_encode_frame(size):
    def make(m):
        d = _wg_datagram(size)
        enc, t = m.encode_frame, m.TYPE_DATA
        return (lambda: enc(t, d)), 1, "frames/s"

    return make


def b_deframe_feed(size, chunk=65536):
    def make(m):
        stream = m.encode_data(
            [_wg_datagram(size, i) for i in range(max(BATCH, 4 * chunk // (size + 9)))]
        )
        chunks = [stream[i : i + chunk] for i in range(0, len(stream), chunk)]
        n = len(stream) // (size + 9)
        D = m.Deframer

        def run():
            d = D()
            for c in chunks:
                d.feed(c)

        return run, n, "frames/s"

    return make


def b_deframe_buffered(size, chunk=65536):
    """asyncio.BufferedProtocol style: get_buffer, copy the received bytes in, buffer_updated."""

    def make(m):
        stream = m.encode_data(
            [_wg_datagram(size, i) for i in range(max(BATCH, 4 * chunk // (size + 9)))]
        )
        chunks = [memoryview(stream[i : i + chunk]) for i in range(0, len(stream), chunk)]
        n = len(stream) // (size + 9)
        D = m.Deframer

        def run():
            d = D()
            for c in chunks:
                buf = d.get_buffer(len(c))
                k = min(len(buf), len(c))
                buf[:k] = c[:k]
                d.buffer_updated(k)
                if k < len(c):
                    rest = c[k:]
                    buf = d.get_buffer(len(rest))
                    buf[: len(rest)] = rest
                    d.buffer_updated(len(rest))

        return run, n, "frames/s"

    return make


def b_queue(size):
    def make(m):
        q = m.RingQueue(4096, 8 << 20)
        dg = [_wg_datagram(size, i) for i in range(BATCH)]
        push, pop_batch = q.push, q.pop_batch

        def run():
            for d in dg:
                push(d, 1.0)
            pop_batch(BATCH)

        return run, BATCH, "push+pop/s"

    return make


def b_queue_single(size):
    def make(m):
        q = m.RingQueue(4096, 8 << 20)
        d = _wg_datagram(size)
        push, pop = q.push, q.pop

        def run():
            push(d, 1.0)
            pop()

        return run, 1, "push+pop/s"

    return make


def b_picker(strategy):
    def make(m):
        p = m.LanePicker(5, strategy)
        for i in range(5):
            p.set_ready(i, True)
        pick = p.pick
        keys = [m.flow_key(_wg_datagram(64, i)) for i in range(BATCH)]
        if strategy == "hash":

            def run():
                for k in keys:
                    pick(k)
        else:

            def run():
                for _ in keys:
                    pick()

        return run, BATCH, "picks/s"

    return make


def b_flow_key():
    def make(m):
        dg = [_wg_datagram(WG_SIZE, i) for i in range(BATCH)]
        fk = m.flow_key

        def run():
            for d in dg:
                fk(d)

        return run, BATCH, "keys/s"

    return make


def b_udp_batch(size):
    """send_batch of 32 datagrams to a loopback UDP socket, then recv_batch them back."""

    def make(m):
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rx.bind(("127.0.0.1", 0))
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        rx.setblocking(False)
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tx.connect(rx.getsockname())
        tx.setblocking(False)
        dg = [_wg_datagram(size, i) for i in range(BATCH)]
        send, recv = m.send_batch, m.recv_batch
        make.socks = (rx, tx)

        def run():
            n = send(tx, dg)
            got = 0
            while got < n:
                got += len(recv(rx, BATCH))

        return run, BATCH, "datagrams/s"

    return make


BENCHMARKS = [
    ("encode_data, batch of 32 × 1420 B", b_encode_data(WG_SIZE)),
    ("encode_data, batch of 32 × 64 B", b_encode_data(64)),
    ("encode_frame, 1 × 1420 B", b_encode_frame(WG_SIZE)),
    ("Deframer.feed, 64 KiB reads, 1420 B frames", b_deframe_feed(WG_SIZE)),
    ("Deframer.feed, 64 KiB reads, 64 B frames", b_deframe_feed(64)),
    ("Deframer get_buffer/buffer_updated, 1420 B frames", b_deframe_buffered(WG_SIZE)),
    ("RingQueue push ×32 + pop_batch(32), 1420 B", b_queue(WG_SIZE)),
    ("RingQueue push + pop, 1420 B", b_queue_single(WG_SIZE)),
    ("LanePicker.pick rr, 5 lanes", b_picker("rr")),
    ("LanePicker.pick hash, 5 lanes", b_picker("hash")),
    ("flow_key, WireGuard transport datagram", b_flow_key()),
    ("send_batch + recv_batch, 32 × 1420 B over loopback UDP", b_udp_batch(WG_SIZE)),
    ("send_batch + recv_batch, 32 × 64 B over loopback UDP", b_udp_batch(64)),
]


def _calibrate(fn, target: float) -> int:
    t = timeit.Timer(fn)
    number = 1
    while True:
        dt = t.timeit(number)
        if dt >= target / 4 or number >= 1 << 24:
            return max(1, int(number * target / max(dt, 1e-9)))
        number *= 4


def run(quick: bool = False) -> dict:
    target = 0.05 if quick else 0.15
    repeats = 3 if quick else 7
    impls = _impls()
    out = []
    for name, factory in BENCHMARKS:
        rec: dict = {"name": name}
        try:
            made = {k: factory(m) for k, m in impls.items()}
            rec["unit"] = next(iter(made.values()))[2]
            numbers = {k: _calibrate(fn, target) for k, (fn, _, _) in made.items()}
            rates: dict[str, list[float]] = {k: [] for k in made}
            for _ in range(repeats):
                for k, (fn, ops, _) in made.items():
                    dt = timeit.Timer(fn).timeit(numbers[k])
                    rates[k].append(ops * numbers[k] / dt)
            for k, v in rates.items():
                rec[k] = statistics.median(v)
        except Exception as exc:  # noqa: BLE001 - the API may move under us; report it
            rec["error"] = f"{type(exc).__name__}: {exc}"
            rec.setdefault("unit", "")
        out.append(rec)
    impl_note = (
        "compiled module not importable: only the pure twin was timed"
        if "compiled" not in impls
        else f"{repeats} alternating repeats of ~{target * 1000:.0f} ms each; median rate; "
        f"compiled `ut._fastpath` (HAVE_MMSG={getattr(impls['compiled'], 'HAVE_MMSG', '?')}) vs "
        "pure `ut._purepy` in one process (Python "
        f"{sys.version.split()[0]}). Speed-up = compiled ÷ pure."
    )
    return {"benchmarks": out, "note": impl_note}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    res = run(a.quick)
    if a.json:
        print(json.dumps(res, indent=2))
        return 0
    print(res["note"])
    print(f"{'benchmark':58s} {'unit':12s} {'compiled':>12s} {'pure':>12s} {'speed-up':>9s}")
    for b in res["benchmarks"]:
        c, q = b.get("compiled"), b.get("pure")
        sp = f"{c / q:.2f}x" if c and q else "-"
        print(
            f"{b['name']:58s} {b['unit']:12s} {c or 0:12.0f} {q or 0:12.0f} {sp:>9s}"
            + (f"  ERROR {b['error']}" if b.get("error") else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
