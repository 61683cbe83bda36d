"""``udpmon probe``: paced, sequence-numbered datagrams to an echo, and what came back.

Theory of operation
-------------------
The probe sends on an absolute schedule (datagram ``k`` of the run is due at
``start + k / rate``) from a connected, non-blocking UDP socket, and reads the
replies with a reader callback on the same event loop. Each datagram carries the
header of :mod:`.traffic`; a reply whose magic, run id, sequence number or send time
does not match a datagram of this run is counted as *foreign* and otherwise ignored.

Pacing: the sender wakes on a timer tick (about 1 ms; event-loop timers have no
finer grain) and sends every datagram whose time has come, so at high rates a tick
sends a few datagrams (``rate x tick``). If it falls more than ``max(4, 5 ms of
datagrams)`` behind (a stalled loop, a slow machine), it does not burst to catch
up: the missed slots are *skipped* and counted, and the report says the probe could
not keep up (achieved rate below 95% of the asked one).

What the numbers mean is :mod:`.stats`' business; how they are reported, :mod:`.result`'s.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ut.addr import format_addr

from .result import ProbeResult
from .sockets import READ_BATCH, open_connected_socket, parse_cli_addr
from .stats import ProbeStats
from .traffic import HEADER, HEADER_SIZE, MAGIC, check_size, parse_bitrate, parse_sizes

_TICK = 0.001  # shortest sender sleep (uvloop rounds timers to whole milliseconds)
_LINGER = 0.05  # after every reply is in, wait this long (at most `wait`) for duplicates


@dataclass(frozen=True)
class _ProbeLoad:
    """The traffic a probe offers, checked: what :func:`_plan_load` makes of its arguments."""

    rate_pps: float
    bitrate_bps: float | None  # as asked; None when the rate was given
    size: int | None  # the one size, or None with ``sizes``
    sizes: tuple[int, ...] | None  # the cycle of sizes, or None with ``size``
    sizes_name: str | None  # ``"imix"`` or the comma list, for the report

    @property
    def cycle(self) -> tuple[int, ...]:
        """Sizes by sequence number modulo its length (one entry with ``size``)."""
        return self.sizes if self.sizes is not None else (self.size or 0,)


def _plan_load(
    *,
    rate: float | None = 1000.0,
    bitrate: float | str | None = None,
    size: int = 64,
    sizes: str | Sequence[int] | None = None,
) -> _ProbeLoad:
    """Check :func:`run_probe`'s load arguments and derive the rate from a ``bitrate``
    (``bitrate / (8 x mean size)``). Raises ``ValueError``."""
    sizes_name: str | None = None
    size_cycle: tuple[int, ...] | None = None
    size_out: int | None = None
    if sizes is not None:
        if isinstance(sizes, str):
            sizes_name = sizes.strip().lower() if sizes.strip().lower() == "imix" else sizes
            size_cycle = parse_sizes(sizes)
        else:
            size_cycle = tuple(int(x) for x in sizes)
            sizes_name = ",".join(str(x) for x in size_cycle)
        for n in size_cycle:
            check_size(n)
        if not size_cycle:
            raise ValueError("sizes is empty")
        mean_size = sum(size_cycle) / len(size_cycle)
    else:
        size_out = check_size(int(size))
        mean_size = float(size_out)
    bitrate_bps: float | None = None
    if bitrate is not None:
        bitrate_bps = parse_bitrate(bitrate) if isinstance(bitrate, str) else float(bitrate)
        if not bitrate_bps > 0:
            raise ValueError("bitrate must be positive")
        rate = bitrate_bps / (8.0 * mean_size)
    if rate is None or not (rate > 0 and math.isfinite(rate)):
        raise ValueError("rate must be a positive number of datagrams per second")
    return _ProbeLoad(float(rate), bitrate_bps, size_out, size_cycle, sizes_name)


async def run_probe(
    target: str | tuple[str, int],
    *,
    rate: float | None = 1000.0,
    bitrate: float | str | None = None,
    size: int = 64,
    sizes: str | Sequence[int] | None = None,
    duration: float | None = 5.0,
    count: int | None = None,
    wait: float = 1.0,
    bind: str | tuple[str, int] | None = None,
    max_loss: float | None = None,
    stop: asyncio.Event | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> ProbeResult:
    """Probe the UDP echo at ``target`` and return what was measured.

    ``rate`` is in datagrams per second; ``bitrate`` (bit/s of UDP payload, or a
    string like ``"100M"``) replaces it when given. ``sizes`` (``"imix"`` or a list
    of byte counts, cycled by sequence number) replaces ``size``. Sending stops
    after ``duration`` seconds or ``count`` datagrams (whichever comes first), or
    when ``stop`` is set; then replies are awaited for up to ``wait`` seconds.
    ``progress`` gets a dict each second (``t, sent, received`` in that second and
    ``sent_total, received_total``).
    """
    load = _plan_load(rate=rate, bitrate=bitrate, size=size, sizes=sizes)
    if duration is None and count is None:
        raise ValueError("give a duration or a count")
    if duration is not None and duration < 0:
        raise ValueError("duration must be >= 0")
    if count is not None and count < 0:
        raise ValueError("count must be >= 0")
    rate = load.rate_pps

    if isinstance(target, str):
        target = parse_cli_addr(target)
    host, port = target
    bind_addr = parse_cli_addr(bind, need_port=False) if isinstance(bind, str) else bind
    loop = asyncio.get_running_loop()
    sock = await open_connected_socket(host, port, bind_addr)
    stop = stop or asyncio.Event()
    run_id = secrets.randbits(64)
    stats = ProbeStats()  # timeline origin set to the schedule start below
    counters = {"unreachable": 0, "send_errors": 0, "blocked": 0, "send_failed": 0}
    send_error: list[str] = []  # the first failed send's error, for the report
    all_in = asyncio.Event()
    sending = True
    ticker: asyncio.Future[None] | None = None
    try:
        buf = bytearray(65536)
        unpack_from = HEADER.unpack_from
        on_reply = stats.on_reply
        perf_ns = time.perf_counter_ns

        def on_readable() -> None:
            recv_into = sock.recv_into
            for _ in range(READ_BATCH):
                try:
                    n = recv_into(buf)
                except (BlockingIOError, InterruptedError):
                    break
                except ConnectionRefusedError:
                    counters["unreachable"] += 1
                    continue
                except OSError:
                    counters["send_errors"] += 1
                    continue
                now = perf_ns()
                if n < HEADER_SIZE:
                    stats.foreign += 1
                    continue
                magic, rid, seq, ts = unpack_from(buf)
                if magic != MAGIC or rid != run_id:
                    stats.foreign += 1
                    continue
                on_reply(seq, ts / 1e9, now / 1e9, n)
            if not sending and stats.received >= stats.sent:
                all_in.set()

        loop.add_reader(sock, on_readable)

        pads = {n: bytes(n - HEADER_SIZE) for n in load.cycle}
        pack = HEADER.pack
        started_at = time.time()
        start_ns = time.perf_counter_ns()
        start = start_ns / 1e9  # perf_counter() and perf_counter_ns() share one clock
        stats.start = start
        if progress is not None:
            ticker = asyncio.ensure_future(_probe_ticker(start, stats, progress))
        interval = 1.0 / rate
        # sys.maxsize stands for "no limit": it keeps slot arithmetic in ints.
        total_slots = math.ceil(duration * rate - 1e-9) if duration is not None else sys.maxsize
        n_max = count if count is not None else sys.maxsize
        max_lag = min(max(4, math.ceil(rate * 0.005)), 4096)
        slot = seq = skipped = 0
        cycle, ncycle, one_size = load.cycle, len(load.cycle), load.cycle[0]
        send_end = start
        try:
            while seq < n_max and slot < total_slots and not stop.is_set():
                blocked = False
                now = time.perf_counter()
                due = min(math.floor((now - start) * rate) + 1, total_slots)
                if due - slot > max_lag:
                    skipped += due - slot - max_lag
                    slot = due - max_lag
                while slot < due and seq < n_max:
                    sz = cycle[seq % ncycle] if ncycle > 1 else one_size
                    ts_ns = perf_ns()
                    data = pack(MAGIC, run_id, seq, ts_ns) + pads[sz]
                    try:
                        sock.send(data)
                    except (BlockingIOError, InterruptedError):
                        counters["blocked"] += 1  # kernel buffer full: retry next tick
                        blocked = True
                        break
                    except OSError as exc:
                        err: OSError | None = exc
                        if isinstance(exc, ConnectionRefusedError):
                            # an earlier datagram drew an ICMP port-unreachable; retry once
                            counters["unreachable"] += 1
                            try:
                                sock.send(data)
                                err = None
                            except OSError as exc2:
                                err = exc2
                        if err is not None:
                            # The kernel refused this datagram (EPERM from a firewall
                            # rule, ENETUNREACH, ...). Its slot is used up all the same:
                            # the schedule, --duration and --count hold however many
                            # sends fail, and the failure decides the exit status.
                            counters["send_errors"] += 1
                            counters["send_failed"] += 1
                            if not send_error:
                                send_error.append(str(err))
                            seq += 1
                            slot += 1
                            continue
                    stats.on_send(seq, ts_ns / 1e9, sz)
                    seq += 1
                    slot += 1
                send_end = time.perf_counter()
                if slot >= total_slots or seq >= n_max:
                    break
                delay = start + slot * interval - send_end
                if delay > 0.05:  # slow rates: stay responsive to `stop`
                    try:
                        await asyncio.wait_for(stop.wait(), delay)
                    except asyncio.TimeoutError:
                        pass
                elif delay > 0 or blocked:
                    await asyncio.sleep(max(delay, _TICK))
                else:
                    # Behind schedule (sending a tick's worth took longer than a tick):
                    # only yield, so replies get read, and carry on.
                    await asyncio.sleep(0)
        finally:
            sending = False
        stopped_early = stop.is_set()
        send_elapsed = max(send_end - start, slot * interval)
        # Grace period for late replies; finish early once every datagram is back.
        if stats.received >= stats.sent:
            all_in.set()
        grace_end = time.perf_counter() + wait
        try:
            await asyncio.wait_for(all_in.wait(), wait)
        except asyncio.TimeoutError:
            pass
        linger = min(_LINGER, grace_end - time.perf_counter())
        if linger > 0:
            await asyncio.sleep(linger)
        on_readable()  # anything already queued
    finally:
        if ticker is not None:
            ticker.cancel()
        try:
            loop.remove_reader(sock)
        except Exception:
            pass
        sock.close()

    return ProbeResult(
        target=format_addr((host, port)) or "",
        run_id=run_id,
        started_at=started_at,
        rate_pps=rate,
        bitrate_bps=load.bitrate_bps,
        size=load.size,
        sizes=load.sizes,
        sizes_name=load.sizes_name,
        duration=duration,
        count=count,
        wait=wait,
        max_loss_pct=max_loss,
        stats=stats,
        send_elapsed=send_elapsed,
        skipped=skipped,
        send_blocked=counters["blocked"],
        send_errors=counters["send_errors"],
        unreachable=counters["unreachable"],
        stopped_early=stopped_early,
        send_failed=counters["send_failed"],
        send_error=send_error[0] if send_error else None,
    )


async def _probe_ticker(start: float, stats: ProbeStats, progress: Callable[[dict[str, Any]], None]) -> None:
    """Call ``progress`` at each whole second after ``start`` (cancelled by the caller)."""
    t, last_s, last_r = 0, 0, 0
    while True:
        t += 1
        await asyncio.sleep(max(start + t - time.perf_counter(), 0.0))
        s, r = stats.sent, stats.received
        progress({"t": t, "sent": s - last_s, "received": r - last_r, "sent_total": s, "received_total": r})
        last_s, last_r = s, r
