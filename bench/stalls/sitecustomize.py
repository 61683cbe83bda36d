"""Loaded into ut-tunnel by ``bench/send_stalls.py`` (through PYTHONPATH): times each UDP send.

For every ``UdpPort.send_many`` call it takes wall time, the thread's CPU time and its
context switches (``getrusage(RUSAGE_THREAD)``). Sends slower than 0.5 ms are kept and
written as JSON to ``$UT_STALLS_DIR/sends-<pid>.json`` when the process exits. Not part
of the product: nothing in ``ut/`` imports it.
"""

import atexit
import json
import os
import resource
import sys
import time

SLOW_S = 0.0005


def _install() -> None:
    from ut import udp

    original = udp.UdpPort.send_many
    slow: list = []
    calls = [0, 0]  # send_many calls, datagrams

    def send_many(self, datagrams, addr=None):
        r0 = resource.getrusage(resource.RUSAGE_THREAD)
        w0, c0 = time.perf_counter(), time.thread_time()
        out = original(self, datagrams, addr)
        w1, c1 = time.perf_counter(), time.thread_time()
        calls[0] += 1
        calls[1] += len(datagrams)
        if w1 - w0 > SLOW_S:
            r1 = resource.getrusage(resource.RUSAGE_THREAD)
            slow.append((w1 - w0, c1 - c0, r1.ru_nivcsw - r0.ru_nivcsw,
                         r1.ru_nvcsw - r0.ru_nvcsw, len(datagrams)))
        return out

    udp.UdpPort.send_many = send_many

    def dump() -> None:
        path = os.path.join(os.environ["UT_STALLS_DIR"], f"sends-{os.getpid()}.json")
        with open(path, "w") as f:
            json.dump({"argv": sys.argv[1:], "calls": calls[0], "datagrams": calls[1], "slow": slow}, f)

    atexit.register(dump)


if os.environ.get("UT_STALLS_DIR"):
    _install()
