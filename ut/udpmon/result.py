"""What a run reports: :class:`ProbeResult` (``--json`` document, text report, exit
status) and :class:`EchoStats` (the echo's totals and per-second lines)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .stats import ProbeStats, to_ms

KEEP_UP_RATIO = 0.95  # below this share of the asked rate the report says "could not keep up"
JSON_SCHEMA = "ut-tunnel/udpmon-probe/1"
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_LOSS = 3
EXIT_SEND_FAILED = 4  # the local kernel refused sends (EPERM, ENETUNREACH, ...)


def _fmt_rate(bps: float) -> str:
    """``1.5e6`` -> ``"1.50 Mbit/s"``."""
    for unit, div in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bps >= div:
            return f"{bps / div:.2f} {unit}"
    return f"{bps:.0f} bit/s"


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
        """The CLI's exit status: 4 if sends failed locally, else 3 over ``--max-loss``, else 0."""
        if not self.sends_ok:
            return EXIT_SEND_FAILED
        return EXIT_OK if self.loss_ok else EXIT_LOSS

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` document, schema :data:`JSON_SCHEMA` (keys in ``docs/udpmon.md``)."""
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
            "rtt_ms": {k: to_ms(v) for k, v in self._rtt.items()},
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
        """The report for people (its layout is not stable; parse :meth:`to_json`)."""
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
        """The echo's ``--json`` summary."""
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
        """The one-line summary the echo prints on exit."""
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
