"""``ut-tunnel udpmon``: a UDP echo and a paced, sequence-numbered UDP probe.

Theory of operation
-------------------
``probe`` sends datagrams on an absolute schedule (datagram ``k`` of the run is due
at ``start + k / rate``) from a connected, non-blocking UDP socket, and reads the
replies with a reader callback on the same event loop. Each datagram starts with a
28-byte header (:data:`HEADER`)::

    magic "UTPM" (4) | run id u64 (8) | sequence u64 (8) | send time ns u64 (8)

all big-endian, then zero padding up to the asked size. Any echo that returns the
payload unchanged works: the probe needs nothing from the far side but the bytes
back. A reply whose magic, run id, sequence number or send time does not match a
datagram of this run is counted as *foreign* and otherwise ignored.

Pacing: the sender wakes on a timer tick (about 1 ms; event-loop timers have no
finer grain) and sends every datagram whose time has come, so at high rates a tick
sends a few datagrams (``rate x tick``). If it falls more than ``max(4, 5 ms of
datagrams)`` behind (a stalled loop, a slow machine), it does not burst to catch
up: the missed slots are *skipped* and counted, and the report says the probe could
not keep up (achieved rate below 95% of the asked one).

Accounting is sans-I/O: :class:`ProbeStats` is fed ``on_send(seq, send_ts, size)``
and ``on_reply(seq, send_ts, recv_ts, size)`` and computes loss, duplicates,
reordering, RTT percentiles and the per-second timeline. Definitions (also in
``docs/udpmon.md``):

- *received*: distinct sequence numbers that came back; *lost* = sent - received.
- *duplicates*: every further copy of a sequence number already received.
- *reordered*: a first copy whose sequence number is below the highest sequence
  number received before it; its *displacement* is that highest number minus its
  own. ``reorder_max_displacement`` is the largest such value.
- RTT percentiles use the nearest-rank method on first copies: the ``p``-th
  percentile of ``n`` sorted values is the value at rank ``ceil(p/100 * n)``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import secrets
import signal
import socket
import struct
import sys
import time
from array import array
from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ut.addr import format_addr

MAGIC = b"UTPM"
HEADER = struct.Struct("!4sQQQ")
HEADER_SIZE = HEADER.size  # 28
MAX_SIZE = 65507  # largest UDP payload over IPv4
# Classic 7:4:1 IMIX of 64, 576 and 1500-byte IPv4 packets, as UDP payload sizes
# (IP 20 + UDP 8 bytes subtracted), interleaved so no size comes in a long run.
IMIX_SIZES: tuple[int, ...] = (36, 548, 36, 36, 548, 36, 1472, 36, 548, 36, 548, 36)
KEEP_UP_RATIO = 0.95
JSON_SCHEMA = "ut-tunnel/udpmon-probe/1"
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_LOSS = 3
EXIT_SEND_FAILED = 4  # the local kernel refused sends (EPERM, ENETUNREACH, ...)

_TICK = 0.001  # shortest sender sleep (uvloop rounds timers to whole milliseconds)
_LINGER = 0.05  # after every reply is in, wait this long (at most `wait`) for duplicates
_SOCK_BUF = 4 * 1024 * 1024
_READ_BATCH = 512  # datagrams read per readable callback, so the sender stays on time


# --------------------------------------------------------------------------- helpers


def percentile(sorted_values: Sequence[float], p: float) -> float | None:
    """Nearest-rank ``p``-th percentile of ascending ``sorted_values`` (None if empty)."""
    n = len(sorted_values)
    if n == 0:
        return None
    rank = math.ceil(p / 100.0 * n)
    return sorted_values[min(max(rank, 1), n) - 1]


def parse_bitrate(text: str) -> float:
    """``"100M"`` -> 100e6 bit/s. Suffixes k, M, G, T are powers of 1000.

    An optional trailing ``bit``, ``bps`` or ``b/s`` is accepted (``"1.5Gbps"``).
    """
    s = text.strip()
    for tail in ("bit/s", "b/s", "bps", "bit"):
        if s.lower().endswith(tail):
            s = s[: -len(tail)]
            break
    mult = 1.0
    if s and s[-1] in "kKmMgGtT":
        mult = {"k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}[s[-1].lower()]
        s = s[:-1]
    try:
        value = float(s) * mult
    except ValueError:
        raise ValueError(f"bad bitrate {text!r} (try 100M, 2.5G, 500k)") from None
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"bitrate must be positive: {text!r}")
    return value


def parse_sizes(text: str) -> tuple[int, ...]:
    """``"imix"`` -> :data:`IMIX_SIZES`; ``"64,576,1500"`` -> that cycle of sizes."""
    if text.strip().lower() == "imix":
        return IMIX_SIZES
    try:
        sizes = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"bad --sizes {text!r}: 'imix' or a comma list of byte counts") from None
    if not sizes:
        raise ValueError("--sizes is empty")
    return sizes


def _check_size(n: int) -> int:
    if not HEADER_SIZE <= n <= MAX_SIZE:
        raise ValueError(f"datagram size {n} out of range {HEADER_SIZE}..{MAX_SIZE}")
    return n


def parse_cli_addr(text: str, *, default_host: str | None = None, need_port: bool = True) -> tuple[str, int]:
    """``"host:port"``, ``"[v6]:port"``, ``":port"`` or ``"port"`` -> ``(host, port)``.

    Without a port (``"127.0.0.1"``, ``"::1"``, ``"[::1]"``) the port is 0 unless
    ``need_port``.
    """
    s = text.strip()
    host: str | None
    port: str | None
    if s.startswith("["):
        end = s.find("]")
        if end < 0:
            raise ValueError(f"bad address {text!r}")
        host, rest = s[1:end], s[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"bad address {text!r}")
        port = rest[1:] if rest else None
    elif s.count(":") == 1:
        host, port = s.split(":")
    elif s.count(":") > 1:  # bare IPv6 literal
        host, port = s, None
    elif s.isdigit():
        host, port = "", s
    else:
        host, port = s, None
    if not host:
        if default_host is None:
            raise ValueError(f"address {text!r} has no host")
        host = default_host
    if port is None or port == "":
        if need_port:
            raise ValueError(f"address {text!r} has no port")
        return host, 0
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"bad port in {text!r}")
    return host, int(port)


def _fmt_rate(bps: float) -> str:
    for unit, div in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bps >= div:
            return f"{bps / div:.2f} {unit}"
    return f"{bps:.0f} bit/s"


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000.0, 4)


# Linux SO_RCVBUFFORCE / SO_SNDBUFFORCE (not in the socket module): root may exceed
# net.core.rmem_max / wmem_max, so bursts at high rates do not overflow our own socket.
_FORCE = {socket.SO_RCVBUF: 33, socket.SO_SNDBUF: 32} if sys.platform.startswith("linux") else {}


def _set_bufs(sock: socket.socket) -> None:
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, _SOCK_BUF)
            # Linux reports twice the size set; less than asked means capped by *mem_max
            if opt in _FORCE and sock.getsockopt(socket.SOL_SOCKET, opt) < _SOCK_BUF:
                sock.setsockopt(socket.SOL_SOCKET, _FORCE[opt], _SOCK_BUF)
        except OSError:
            pass


async def _resolve(host: str, port: int, family: int = 0, passive: bool = False) -> tuple[int, tuple[Any, ...]]:
    loop = asyncio.get_running_loop()
    flags = socket.AI_PASSIVE if passive else 0
    try:
        infos = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_DGRAM, flags=flags)
    except socket.gaierror as e:
        raise OSError(f"cannot resolve {host!r}: {e.strerror or e}") from None
    if not infos:
        raise OSError(f"cannot resolve {host!r}")
    fam, _, _, _, sockaddr = infos[0]
    return fam, sockaddr


# --------------------------------------------------------------------- accounting


class ProbeStats:
    """Sans-I/O accounting of one probe run.

    Feed it ``on_send(seq, send_ts, size)`` for ``seq`` = 0, 1, 2, ... in order
    and ``on_reply(seq, send_ts, recv_ts, size)`` for every reply, timestamps in
    seconds on one monotonic clock. ``start`` is the origin of the per-second
    timeline (default: the first send time).
    """

    OK, DUPLICATE, FOREIGN = "ok", "duplicate", "foreign"

    def __init__(self, start: float | None = None) -> None:
        self.start = start
        self.sent = 0
        self.bytes_sent = 0
        self.received = 0
        self.bytes_received = 0
        self.duplicates = 0
        self.reordered = 0
        self.reorder_max_displacement = 0
        self.foreign = 0
        self._highest = -1
        self._send_ts = array("d")
        self._rtt = array("d")  # NaN until the first copy arrives
        self._dup_seqs: dict[int, int] = {}
        self._reordered_seqs: list[int] = []

    def on_send(self, seq: int, send_ts: float, size: int = 0) -> None:
        if seq != self.sent:
            raise ValueError(f"on_send: expected seq {self.sent}, got {seq}")
        if self.start is None:
            self.start = send_ts
        self._send_ts.append(send_ts)
        self._rtt.append(math.nan)
        self.sent += 1
        self.bytes_sent += size

    def on_foreign(self) -> None:
        """Count a datagram that is not a reply of this run (bad magic, run id, length)."""
        self.foreign += 1

    def on_reply(self, seq: int, send_ts: float, recv_ts: float, size: int = 0) -> str:
        """Account one reply; returns :attr:`OK`, :attr:`DUPLICATE` or :attr:`FOREIGN`."""
        if not 0 <= seq < self.sent or abs(self._send_ts[seq] - send_ts) > 1e-6:
            self.foreign += 1
            return self.FOREIGN
        rtt = self._rtt
        if rtt[seq] == rtt[seq]:  # not NaN: seen before
            self.duplicates += 1
            self._dup_seqs[seq] = self._dup_seqs.get(seq, 0) + 1
            return self.DUPLICATE
        rtt[seq] = recv_ts - send_ts
        self.received += 1
        self.bytes_received += size
        if seq < self._highest:
            self.reordered += 1
            self._reordered_seqs.append(seq)
            disp = self._highest - seq
            if disp > self.reorder_max_displacement:
                self.reorder_max_displacement = disp
        else:
            self._highest = seq
        return self.OK

    @property
    def lost(self) -> int:
        return self.sent - self.received

    @property
    def loss_pct(self) -> float:
        return 100.0 * self.lost / self.sent if self.sent else 0.0

    def rtts(self) -> list[float]:
        """Round-trip times of first copies, ascending, in seconds."""
        return sorted(x for x in self._rtt if x == x)

    def rtt_summary(self) -> dict[str, float | None]:
        """``min, mean, p50, p95, p99, max`` in seconds (None when nothing came back)."""
        r = self.rtts()
        return {
            "min": r[0] if r else None,
            "mean": math.fsum(r) / len(r) if r else None,
            "p50": percentile(r, 50),
            "p95": percentile(r, 95),
            "p99": percentile(r, 99),
            "max": r[-1] if r else None,
        }

    def timeline(self) -> list[dict[str, Any]]:
        """Per-second buckets by *send* time: second ``t`` holds datagrams sent in
        ``[start + t, start + t + 1)``. RTT values in milliseconds."""
        if not self.sent:
            return []
        start = self.start if self.start is not None else self._send_ts[0]
        last_t = int(self._send_ts[-1] - start)
        dups = sorted(self._dup_seqs.items())
        dup_seqs = [s for s, _ in dups]
        dup_cum = [0]
        for _, c in dups:
            dup_cum.append(dup_cum[-1] + c)
        reord = sorted(self._reordered_seqs)
        out = []
        lo = 0
        for t in range(last_t + 1):
            hi = bisect_left(self._send_ts, start + t + 1, lo)
            r = sorted(x for x in self._rtt[lo:hi] if x == x)
            sent = hi - lo
            d_lo, d_hi = bisect_left(dup_seqs, lo), bisect_left(dup_seqs, hi)
            out.append({
                "t": t,
                "sent": sent,
                "received": len(r),
                "lost": sent - len(r),
                "loss_pct": round(100.0 * (sent - len(r)) / sent, 4) if sent else 0.0,
                "duplicates": dup_cum[d_hi] - dup_cum[d_lo],
                "reordered": bisect_left(reord, hi) - bisect_left(reord, lo),
                "rtt_p50_ms": _ms(percentile(r, 50)),
                "rtt_max_ms": _ms(r[-1] if r else None),
            })
            lo = hi
        return out


@dataclass
class ProbeResult:
    """What a probe run measured. ``to_json()`` gives the stable ``--json`` document."""

    target: str
    run_id: int
    started_at: float
    rate_pps: float
    bitrate_bps: float | None
    size: int | None
    sizes: tuple[int, ...] | None
    sizes_name: str | None
    duration: float | None
    count: int | None
    wait: float
    max_loss_pct: float | None
    stats: ProbeStats
    send_elapsed: float
    skipped: int = 0
    send_blocked: int = 0
    send_errors: int = 0
    unreachable: int = 0
    stopped_early: bool = False
    send_failed: int = 0  # datagrams the kernel refused (sendto error): never sent
    send_error: str | None = None  # the first such error, e.g. "[Errno 1] Operation not permitted"
    _rtt: dict[str, float | None] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._rtt = self.stats.rtt_summary()

    # headline numbers
    @property
    def mean_size(self) -> float:
        if self.sizes:
            return sum(self.sizes) / len(self.sizes)
        return float(self.size or 0)

    @property
    def offered_bps(self) -> float:
        if self.bitrate_bps is not None:
            return self.bitrate_bps
        return self.rate_pps * self.mean_size * 8.0

    @property
    def achieved_pps(self) -> float:
        return self.stats.sent / self.send_elapsed if self.send_elapsed > 0 else 0.0

    @property
    def achieved_bps(self) -> float:
        return self.stats.bytes_sent * 8.0 / self.send_elapsed if self.send_elapsed > 0 else 0.0

    @property
    def kept_up(self) -> bool:
        return self.achieved_pps >= KEEP_UP_RATIO * self.rate_pps

    @property
    def loss_ok(self) -> bool:
        return self.max_loss_pct is None or self.stats.loss_pct <= self.max_loss_pct

    @property
    def sends_ok(self) -> bool:
        """False when the local kernel refused any datagram (it was never sent)."""
        return self.send_failed == 0

    @property
    def exit_status(self) -> int:
        if not self.sends_ok:
            return EXIT_SEND_FAILED
        return EXIT_OK if self.loss_ok else EXIT_LOSS

    def to_json(self) -> dict[str, Any]:
        s = self.stats
        return {
            "schema": JSON_SCHEMA,
            "run_id": f"{self.run_id:016x}",
            "target": self.target,
            "started_at": round(self.started_at, 6),
            "config": {
                "rate_pps": self.rate_pps,
                "bitrate_bps": self.bitrate_bps,
                "size": self.size,
                "sizes": self.sizes_name,
                "duration_s": self.duration,
                "count": self.count,
                "wait_s": self.wait,
                "max_loss_pct": self.max_loss_pct,
            },
            "sent": s.sent,
            "received": s.received,
            "lost": s.lost,
            "loss_pct": round(s.loss_pct, 6),
            "duplicates": s.duplicates,
            "reordered": s.reordered,
            "reorder_max_displacement": s.reorder_max_displacement,
            "foreign": s.foreign,
            "bytes_sent": s.bytes_sent,
            "bytes_received": s.bytes_received,
            "send_errors": self.send_errors,
            "send_failed": self.send_failed,
            "send_error": self.send_error,
            "unreachable": self.unreachable,
            "rtt_ms": {k: _ms(v) for k, v in self._rtt.items()},
            "rate": {
                "offered_pps": round(self.rate_pps, 3),
                "achieved_pps": round(self.achieved_pps, 3),
                "offered_bps": round(self.offered_bps, 1),
                "achieved_bps": round(self.achieved_bps, 1),
                "send_elapsed_s": round(self.send_elapsed, 6),
                "skipped": self.skipped,
                "send_blocked": self.send_blocked,
                "kept_up": self.kept_up,
            },
            "timeline": s.timeline(),
            "stopped_early": self.stopped_early,
            "loss_ok": self.loss_ok,
            "sends_ok": self.sends_ok,
            "exit_status": self.exit_status,
        }

    def format_text(self) -> str:
        s, r = self.stats, self._rtt
        size = self.sizes_name or f"{self.size} B"
        lim = f"{self.duration:g} s" if self.duration is not None else f"{self.count} datagrams"
        lines = [
            f"udpmon probe -> {self.target}  run {self.run_id:016x}  {size}  "
            f"{self.rate_pps:.0f} pps for {lim}",
            f"  sent      {s.sent} datagrams, {s.bytes_sent} B in {self.send_elapsed:.3f} s",
            f"  rate      offered {self.rate_pps:.0f} pps / {_fmt_rate(self.offered_bps)}, "
            f"achieved {self.achieved_pps:.0f} pps / {_fmt_rate(self.achieved_bps)}",
            f"  received  {s.received}  lost {s.lost} ({s.loss_pct:.3f}%)  duplicates {s.duplicates}"
            f"  reordered {s.reordered} (max displacement {s.reorder_max_displacement})"
            f"  foreign {s.foreign}",
        ]
        if r["p50"] is not None:
            lines.append(
                "  rtt ms    " + "  ".join(f"{k} {v * 1000:.3f}" for k, v in r.items() if v is not None)
            )
        else:
            lines.append("  rtt ms    (no replies)")
        if self.send_errors or self.unreachable:
            hint = "  (nothing listening at the target?)" if self.unreachable and not s.received else ""
            lines.append(f"  errors    send {self.send_errors}  icmp unreachable {self.unreachable}{hint}")
        tl = s.timeline()
        if tl:
            lines.append("  timeline (by send second)")
            lines.append("       t     sent     recv     lost   loss%    dup  reord   p50 ms   max ms")
            for b in tl:
                p50 = "-" if b["rtt_p50_ms"] is None else f"{b['rtt_p50_ms']:.3f}"
                mx = "-" if b["rtt_max_ms"] is None else f"{b['rtt_max_ms']:.3f}"
                lines.append(
                    f"  {b['t']:6d} {b['sent']:8d} {b['received']:8d} {b['lost']:8d} "
                    f"{b['loss_pct']:7.3f} {b['duplicates']:6d} {b['reordered']:6d} {p50:>8} {mx:>8}"
                )
        if self.stopped_early:
            lines.append("  note: stopped early by a signal")
        if not self.kept_up and self.sends_ok:  # failed sends explain themselves below
            pct = 100.0 * self.achieved_pps / self.rate_pps if self.rate_pps else 0.0
            lines.append(
                f"  WARNING: could not keep up: achieved {self.achieved_pps:.0f} pps of "
                f"{self.rate_pps:.0f} asked ({pct:.1f}%), {self.skipped} slots skipped"
            )
        if not self.sends_ok:
            attempted = s.sent + self.send_failed
            lines.append(
                f"  FAIL: {self.send_failed} of {attempted} sends failed locally "
                f"({self.send_error}): a firewall rule on this host, or no route to the target?"
            )
        elif self.max_loss_pct is not None:
            verdict = "OK" if self.loss_ok else "FAIL"
            op = "<=" if self.loss_ok else ">"
            lines.append(f"  {verdict}: loss {s.loss_pct:.3f}% {op} --max-loss {self.max_loss_pct:g}%")
        return "\n".join(lines)


@dataclass
class EchoStats:
    """Totals of one echo run."""

    listen: str = ""
    elapsed: float = 0.0
    in_datagrams: int = 0
    in_bytes: int = 0
    out_datagrams: int = 0
    out_bytes: int = 0
    dropped: int = 0  # replies the kernel would not take (send buffer full, errors)
    peers: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "listen": self.listen,
            "elapsed_s": round(self.elapsed, 6),
            "in_datagrams": self.in_datagrams,
            "in_bytes": self.in_bytes,
            "out_datagrams": self.out_datagrams,
            "out_bytes": self.out_bytes,
            "dropped": self.dropped,
            "peers": self.peers,
        }

    def format_text(self) -> str:
        e = self.elapsed or 1e-9
        return (
            f"udpmon echo {self.listen} summary: {self.elapsed:.1f} s, "
            f"in {self.in_datagrams} datagrams / {self.in_bytes} B, "
            f"out {self.out_datagrams} datagrams / {self.out_bytes} B, "
            f"dropped {self.dropped}, peers {self.peers}, "
            f"avg {self.in_datagrams / e:.0f} pps / {_fmt_rate(self.in_bytes * 8 / e)} in"
        )


def format_echo_tick(tick: dict[str, Any]) -> str:
    """One per-second echo line from the dict given to ``run_echo(report=...)``."""
    return (
        f"t={tick['t']:>5}s  in {tick['in_datagrams']:>8} dg {tick['in_bytes']:>11} B  "
        f"out {tick['out_datagrams']:>8} dg {tick['out_bytes']:>11} B"
        + (f"  dropped {tick['dropped']}" if tick["dropped"] else "")
    )


# ---------------------------------------------------------------------------- echo

_MAX_PEERS = 65536


class UdpEcho:
    """A UDP echo on the running loop: ``await start()``, then ``await run()``."""

    def __init__(self, host: str, port: int, *, report: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.host, self.port = host, port
        self.report = report
        self.stats = EchoStats()
        self._sock: socket.socket | None = None
        self._buf = bytearray(65536)
        self._mv = memoryview(self._buf)
        self._peers: set[Any] = set()
        self._t0 = 0.0
        self._stop = asyncio.Event()

    async def start(self) -> tuple[str, int]:
        fam, sockaddr = await _resolve(self.host, self.port, passive=True)
        sock = socket.socket(fam, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            _set_bufs(sock)
            sock.bind(sockaddr)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        addr = sock.getsockname()
        self.stats.listen = format_addr(addr)
        self._t0 = time.perf_counter()
        asyncio.get_running_loop().add_reader(sock, self._on_readable)
        return addr[0], addr[1]

    def _on_readable(self) -> None:
        sock, buf, mv, st = self._sock, self._buf, self._mv, self.stats
        assert sock is not None
        recv, send = sock.recvfrom_into, sock.sendto
        n_in = b_in = n_out = b_out = dropped = 0
        peers = self._peers
        for _ in range(_READ_BATCH):
            try:
                n, addr = recv(buf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue
            n_in += 1
            b_in += n
            if len(peers) < _MAX_PEERS:
                peers.add(addr)
            try:
                send(mv[:n], addr)
                n_out += 1
                b_out += n
            except OSError:
                dropped += 1
        st.in_datagrams += n_in
        st.in_bytes += b_in
        st.out_datagrams += n_out
        st.out_bytes += b_out
        st.dropped += dropped

    async def run(self, duration: float | None = None, stop: asyncio.Event | None = None) -> EchoStats:
        """Echo until ``duration`` seconds pass or ``stop`` is set; report each second."""
        if stop is not None:
            self._stop = stop
        stop = self._stop
        end = self._t0 + duration if duration is not None else math.inf
        last = (0, 0, 0, 0, 0)
        t = 0
        try:
            while not stop.is_set():
                now = time.perf_counter()
                if now >= end:
                    break
                nxt = min(self._t0 + t + 1, end)
                try:
                    await asyncio.wait_for(stop.wait(), max(nxt - now, 0.0))
                except asyncio.TimeoutError:
                    pass
                if time.perf_counter() >= self._t0 + t + 1 - 1e-4:
                    t += 1
                    st = self.stats
                    cur = (st.in_datagrams, st.in_bytes, st.out_datagrams, st.out_bytes, st.dropped)
                    if self.report is not None:
                        d = [a - b for a, b in zip(cur, last, strict=True)]
                        self.report({
                            "t": t, "in_datagrams": d[0], "in_bytes": d[1],
                            "out_datagrams": d[2], "out_bytes": d[3], "dropped": d[4],
                        })
                    last = cur
        finally:
            self.close()
        return self.stats

    def stop(self) -> None:
        """Make :meth:`run` return (it closes the socket)."""
        self._stop.set()

    def close(self) -> EchoStats:
        if self._sock is not None:
            try:
                asyncio.get_running_loop().remove_reader(self._sock)
            except RuntimeError:
                pass
            self._sock.close()
            self._sock = None
            self.stats.elapsed = time.perf_counter() - self._t0
            self.stats.peers = len(self._peers)
        return self.stats


async def run_echo(
    host: str,
    port: int,
    *,
    duration: float | None = None,
    report: Callable[[dict[str, Any]], None] | None = None,
    stop: asyncio.Event | None = None,
    ready: Callable[[tuple[str, int]], None] | None = None,
) -> EchoStats:
    """Echo every datagram on ``host:port`` until ``duration`` or ``stop``.

    ``report`` gets a dict per second (``t, in_datagrams, in_bytes, out_datagrams,
    out_bytes, dropped`` for that second); ``ready`` gets the bound address (useful
    with port 0). Cancelling the task also stops it.
    """
    echo = UdpEcho(host, port, report=report)
    try:
        addr = await echo.start()
    except BaseException:
        echo.close()
        raise
    if ready is not None:
        ready(addr)
    return await echo.run(duration, stop)


# --------------------------------------------------------------------------- probe


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
    sizes_name: str | None = None
    size_cycle: tuple[int, ...] | None = None
    if sizes is not None:
        if isinstance(sizes, str):
            sizes_name = sizes.strip().lower() if sizes.strip().lower() == "imix" else sizes
            size_cycle = parse_sizes(sizes)
        else:
            size_cycle = tuple(int(x) for x in sizes)
            sizes_name = ",".join(str(x) for x in size_cycle)
        for n in size_cycle:
            _check_size(n)
        if not size_cycle:
            raise ValueError("sizes is empty")
        size_out: int | None = None
        mean_size = sum(size_cycle) / len(size_cycle)
    else:
        size_out = _check_size(int(size))
        mean_size = float(size_out)
    bitrate_bps: float | None = None
    if bitrate is not None:
        bitrate_bps = parse_bitrate(bitrate) if isinstance(bitrate, str) else float(bitrate)
        if not bitrate_bps > 0:
            raise ValueError("bitrate must be positive")
        rate = bitrate_bps / (8.0 * mean_size)
    if rate is None or not (rate > 0 and math.isfinite(rate)):
        raise ValueError("rate must be a positive number of datagrams per second")
    if duration is None and count is None:
        raise ValueError("give a duration or a count")
    if duration is not None and duration < 0:
        raise ValueError("duration must be >= 0")
    if count is not None and count < 0:
        raise ValueError("count must be >= 0")
    rate = float(rate)

    if isinstance(target, str):
        target = parse_cli_addr(target)
    host, port = target
    bind_addr = parse_cli_addr(bind, need_port=False) if isinstance(bind, str) else bind
    loop = asyncio.get_running_loop()
    fam, sockaddr = await _resolve(host, port)
    sock = socket.socket(fam, socket.SOCK_DGRAM)
    stop = stop or asyncio.Event()
    run_id = secrets.randbits(64)
    stats = ProbeStats()  # timeline origin set to the schedule start below
    counters = {"unreachable": 0, "send_errors": 0, "blocked": 0, "send_failed": 0}
    send_error: list[str] = []  # the first failed send's error, for the report
    all_in = asyncio.Event()
    sending = True
    ticker: asyncio.Future[None] | None = None
    try:
        sock.setblocking(False)
        _set_bufs(sock)
        if bind_addr is not None:
            _, baddr = await _resolve(bind_addr[0], bind_addr[1], family=fam, passive=True)
            sock.bind(baddr)
        sock.connect(sockaddr)

        buf = bytearray(65536)
        unpack_from = HEADER.unpack_from
        on_reply = stats.on_reply
        perf_ns = time.perf_counter_ns

        def on_readable() -> None:
            recv_into = sock.recv_into
            for _ in range(_READ_BATCH):
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

        pads = {n: bytes(n - HEADER_SIZE) for n in (size_cycle or (size_out,))}  # type: ignore[union-attr]
        pack = HEADER.pack
        started_at = time.time()
        start_ns = time.perf_counter_ns()
        start = start_ns / 1e9  # perf_counter() and perf_counter_ns() share one clock
        stats.start = start
        if progress is not None:
            ticker = asyncio.ensure_future(_probe_ticker(start, stats, progress))
        interval = 1.0 / rate
        total_slots = math.ceil(duration * rate - 1e-9) if duration is not None else math.inf
        n_max = count if count is not None else math.inf
        max_lag = min(max(4, math.ceil(rate * 0.005)), 4096)
        slot = seq = skipped = 0
        ncycle = len(size_cycle) if size_cycle else 0
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
                    sz = size_cycle[seq % ncycle] if ncycle else size_out
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
        target=format_addr((host, port)),
        run_id=run_id,
        started_at=started_at,
        rate_pps=rate,
        bitrate_bps=bitrate_bps,
        size=size_out,
        sizes=size_cycle,
        sizes_name=sizes_name,
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
    t, last_s, last_r = 0, 0, 0
    while True:
        t += 1
        await asyncio.sleep(max(start + t - time.perf_counter(), 0.0))
        s, r = stats.sent, stats.received
        progress({"t": t, "sent": s - last_s, "received": r - last_r, "sent_total": s, "received_total": r})
        last_s, last_r = s, r


# ----------------------------------------------------------------------------- CLI


def _nonneg_float(text: str) -> float:
    v = float(text)
    if not (v >= 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a number >= 0: {text!r}")
    return v


def _pos_float(text: str) -> float:
    v = float(text)
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a number > 0: {text!r}")
    return v


def _count_arg(text: str) -> int:
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text!r}")
    return v


def _bitrate_arg(text: str) -> float:
    try:
        return parse_bitrate(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _size_arg(text: str) -> int:
    try:
        return _check_size(int(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _sizes_arg(text: str) -> str:
    try:
        for n in parse_sizes(text):
            _check_size(n)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _add_subcommands(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="udpmon_cmd", metavar="{echo,probe}")
    sub.required = True
    e = sub.add_parser("echo", help="echo every UDP datagram back to its sender",
                       description="Echo every UDP datagram; print a line per second and a summary on exit.")
    e.add_argument("--listen", required=True, metavar="ADDR",
                   help="address to listen on: HOST:PORT, [V6]:PORT or PORT (all IPv4 addresses)")
    e.add_argument("--duration", type=_pos_float, default=None, metavar="S",
                   help="stop after S seconds (default: until SIGINT/SIGTERM)")
    e.add_argument("--quiet", action="store_true", help="no per-second lines, only the summary")
    e.add_argument("--json", action="store_true", help="print the summary as one JSON object")

    q = sub.add_parser("probe", help="send paced, numbered datagrams to an echo and report",
                       description="Send sequence-numbered, timestamped datagrams to a UDP echo at a "
                                   "fixed rate; report loss, duplicates, reordering, RTT and rate.")
    q.add_argument("--target", required=True, metavar="ADDR", help="the echo: HOST:PORT or [V6]:PORT")
    g = q.add_mutually_exclusive_group()
    g.add_argument("--rate", type=_pos_float, default=None, metavar="PPS",
                   help="datagrams per second (default 1000)")
    g.add_argument("--bitrate", type=_bitrate_arg, default=None, metavar="BPS",
                   help="UDP payload bit/s instead of --rate, e.g. 100M, 2.5G, 500k")
    s = q.add_mutually_exclusive_group()
    s.add_argument("--size", type=_size_arg, default=64, metavar="N",
                   help=f"UDP payload bytes per datagram, {HEADER_SIZE}..{MAX_SIZE} (default 64)")
    s.add_argument("--sizes", type=_sizes_arg, default=None, metavar="MIX",
                   help="'imix' (7:4:1 of 36, 548, 1472-byte payloads) or a comma list to cycle")
    q.add_argument("--duration", type=_nonneg_float, default=None, metavar="S",
                   help="seconds of sending (default 5, or unbounded when --count is given)")
    q.add_argument("--count", type=_count_arg, default=None, metavar="N",
                   help="stop after N datagrams (and after --duration if also given)")
    q.add_argument("--wait", type=_nonneg_float, default=1.0, metavar="S",
                   help="grace period for late replies after the last send (default 1)")
    q.add_argument("--max-loss", type=_nonneg_float, default=None, metavar="PCT",
                   help=f"exit with status {EXIT_LOSS} when loss exceeds PCT percent")
    q.add_argument("--bind", default=None, metavar="ADDR", help="local address to send from: HOST[:PORT]")
    q.add_argument("--json", action="store_true", help="print the result as JSON (schema in docs/udpmon.md)")
    q.add_argument("--quiet", action="store_true", help="no per-second progress lines on stderr")


def add_udpmon_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``udpmon`` (with ``echo`` and ``probe``) to an argparse ``subparsers``."""
    p = subparsers.add_parser("udpmon", help="UDP echo and probe for checking a tunnel",
                              description="UDP echo and probe: loss, duplicates, reordering, RTT, rate.")
    _add_subcommands(p)
    p.set_defaults(func=run_udpmon)
    return p


def _install_signals(stop: asyncio.Event) -> list[int]:
    loop = asyncio.get_running_loop()
    done = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
            done.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):
            pass
    return done


def _remove_signals(sigs: list[int]) -> None:
    loop = asyncio.get_running_loop()
    for sig in sigs:
        loop.remove_signal_handler(sig)


async def _echo_main(args: argparse.Namespace) -> int:
    host, port = parse_cli_addr(args.listen, default_host="0.0.0.0")
    stop = asyncio.Event()
    sigs = _install_signals(stop)
    out = sys.stdout

    def ready(addr: tuple[str, int]) -> None:
        print(f"udpmon echo listening on {format_addr(addr)}", file=out, flush=True)

    def report(tick: dict[str, Any]) -> None:
        print(format_echo_tick(tick), file=out, flush=True)

    try:
        st = await run_echo(host, port, duration=args.duration, stop=stop, ready=ready,
                            report=None if args.quiet else report)
    finally:
        _remove_signals(sigs)
    if args.json:
        print(json.dumps(st.to_json()), file=out, flush=True)
    else:
        print(st.format_text(), file=out, flush=True)
    return EXIT_OK


async def _probe_main(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    sigs = _install_signals(stop)

    def progress(p: dict[str, Any]) -> None:
        print(f"t={p['t']:>4}s  sent {p['sent']:>8}  recv {p['received']:>8}  "
              f"(total sent {p['sent_total']}, recv {p['received_total']})", file=sys.stderr, flush=True)

    try:
        res = await run_probe(
            args.target,
            rate=args.rate if args.rate is not None else 1000.0,
            bitrate=args.bitrate,
            size=args.size,
            sizes=args.sizes,
            duration=args.duration if (args.duration is not None or args.count is not None) else 5.0,
            count=args.count,
            wait=args.wait,
            bind=args.bind,
            max_loss=args.max_loss,
            stop=stop,
            progress=None if (args.json or args.quiet) else progress,
        )
    finally:
        _remove_signals(sigs)
    if args.json:
        print(json.dumps(res.to_json(), indent=2))
    else:
        print(res.format_text())
    sys.stdout.flush()
    return res.exit_status


def _run(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    if hasattr(uvloop, "run"):
        return uvloop.run(coro)
    uvloop.install()  # pragma: no cover - old uvloop
    return asyncio.run(coro)


def run_udpmon(args: argparse.Namespace) -> int:
    """Run ``udpmon echo`` or ``udpmon probe`` from parsed ``args``; returns the exit status."""
    try:
        if args.udpmon_cmd == "echo":
            return _run(_echo_main(args))
        return _run(_probe_main(args))
    except (OSError, ValueError) as e:
        print(f"udpmon {args.udpmon_cmd}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ut.udpmon {echo,probe} ...``"""
    p = argparse.ArgumentParser(prog="python -m ut.udpmon",
                                description="UDP echo and probe (ut-tunnel udpmon).")
    _add_subcommands(p)
    args = p.parse_args(argv)
    return run_udpmon(args)


if __name__ == "__main__":
    sys.exit(main())
