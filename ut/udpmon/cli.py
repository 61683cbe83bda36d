"""The ``udpmon`` command line: ``ut-tunnel udpmon echo|probe`` and ``python -m ut.udpmon``.

Options, exit statuses and the ``--json`` schema are documented in ``docs/udpmon.md``.
Each run gets a fresh event loop from :func:`ut.runtime.run` (uvloop unless
``UT_NO_UVLOOP=1``, as for the tunnel); SIGINT and SIGTERM end it with a report.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import signal
import sys
from collections.abc import Sequence
from typing import Any

from ut import runtime
from ut.addr import format_addr

from .echo import run_echo
from .probe import run_probe
from .result import EXIT_ERROR, EXIT_LOSS, EXIT_OK, format_echo_tick
from .sockets import parse_cli_addr
from .traffic import HEADER_SIZE, MAX_SIZE, check_size, parse_bitrate, parse_sizes


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
        return check_size(int(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _sizes_arg(text: str) -> str:
    try:
        for n in parse_sizes(text):
            check_size(n)
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


def _install_signals(stop: asyncio.Event) -> list[signal.Signals]:
    """SIGINT and SIGTERM set ``stop`` (the run then ends and reports) where the loop can."""
    loop = asyncio.get_running_loop()
    done = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
            done.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):
            pass
    return done


def _remove_signals(sigs: list[signal.Signals]) -> None:
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


def run_udpmon(args: argparse.Namespace) -> int:
    """Run ``udpmon echo`` or ``udpmon probe`` from parsed ``args``; returns the exit status."""
    try:
        if args.udpmon_cmd == "echo":
            return runtime.run(_echo_main(args))
        return runtime.run(_probe_main(args))
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
