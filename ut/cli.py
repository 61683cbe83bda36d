"""The ``ut-tunnel`` console script.

``ut-tunnel -config FILE`` runs the role the file names until SIGINT/SIGTERM
(which close every lane with GOODBYE and exit 0). ``ut-tunnel check -config
FILE`` validates the file as start-up would and prints the effective
configuration. ``-config``/``--config`` may stand before or after ``check``.
Helper subcommands have flags of their own: ``pki`` (certificates), ``demo`` (a
self-contained local run) and ``udpmon`` (a UDP probe and echo).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Callable
from typing import Any

from . import fastpath, runtime
from ._version import __version__
from .config import MAX_LANES, Config
from .errors import ConfigError
from .logs import event, setup_logging
from .udpmon import HEADER_SIZE, MAX_SIZE

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
DEMO_MAX_SECONDS = 3600.0
DEMO_MAX_RATE = 1_000_000


def build_parser() -> argparse.ArgumentParser:
    from .pki import add_pki_parser
    from .udpmon import add_udpmon_parser

    parser = argparse.ArgumentParser(
        prog="ut-tunnel",
        description="Carry WireGuard's UDP over several TCP+mTLS lanes.",
        epilog="Run the tunnel: ut-tunnel -config /etc/ut/ut.yaml   "
               "Check a config: ut-tunnel check -config /etc/ut/ut.yaml",
    )
    parser.add_argument("-config", "--config", metavar="PATH", help="YAML configuration file")
    parser.add_argument(
        "--version", action="version",
        version=f"ut-tunnel {__version__} ({fastpath.IMPLEMENTATION} fast path)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    check = sub.add_parser(
        "check", help="validate a config file and print the effective configuration",
        description="Validate FILE as start-up would (keys, types, ranges, TLS files) and print "
                    "the effective configuration, defaults filled in. Exit status 0 if valid, "
                    "2 if not.",
    )
    # SUPPRESS: when given after `check` it sets args.config; when not, it leaves the
    # top-level value (given before `check`) alone.
    check.add_argument("-config", "--config", metavar="PATH", default=argparse.SUPPRESS,
                       help="YAML configuration file")
    add_pki_parser(sub)
    demo = sub.add_parser("demo", help="run a server, a client and a UDP echo on loopback")
    demo.add_argument("--seconds", type=_bounded(float, 0.1, DEMO_MAX_SECONDS), default=3.0,
                      help=f"traffic duration, 0.1..{DEMO_MAX_SECONDS:g} (default 3)")
    demo.add_argument("--lanes", type=_bounded(int, 1, MAX_LANES), default=5,
                      help=f"lanes, 1..{MAX_LANES} (default 5)")
    demo.add_argument("--rate", type=_bounded(int, 1, DEMO_MAX_RATE), default=2000,
                      help=f"datagrams per second, 1..{DEMO_MAX_RATE} (default 2000)")
    demo.add_argument("--size", type=_bounded(int, HEADER_SIZE, MAX_SIZE), default=1200,
                      help=f"datagram bytes, {HEADER_SIZE}..{MAX_SIZE} (default 1200)")
    add_udpmon_parser(sub)
    return parser


def _bounded(kind: type, low: float, high: float) -> Callable[[str], Any]:
    """An argparse ``type=`` that accepts ``kind`` values in ``[low, high]`` only, so a
    bad value is a one-line usage error (exit 2) rather than a traceback."""
    what = "a whole number" if kind is int else "a number"

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
        if not (low <= value <= high):  # also refuses nan
            raise argparse.ArgumentTypeError(f"must be between {low:g} and {high:g}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config is not None and args.command in ("pki", "udpmon", "demo"):
        parser.print_usage(sys.stderr)
        print(f"ut-tunnel: error: -config is not used by {args.command}; run the tunnel with "
              "`ut-tunnel -config PATH`, check a file with `ut-tunnel check -config PATH`",
              file=sys.stderr)
        return EXIT_USAGE
    if args.command == "pki":
        from .pki import run_pki

        return run_pki(args)
    if args.command == "udpmon":
        from .udpmon import run_udpmon

        return run_udpmon(args)
    if args.command == "demo":
        from .demo import main as demo_main

        return demo_main(args)
    if args.command == "check":
        if args.config is None:
            parser.print_usage(sys.stderr)
            print("ut-tunnel: error: check needs -config PATH", file=sys.stderr)
            return EXIT_USAGE
        from .check import check_config

        return check_config(args.config)
    if args.config is None:
        parser.print_usage(sys.stderr)
        print("ut-tunnel: error: give -config PATH (or a subcommand)", file=sys.stderr)
        return EXIT_USAGE
    return run_config(args.config)


def run_config(path: str) -> int:
    """Load ``path`` and run its role until a stop signal."""
    from .config import load_config

    try:
        cfg = load_config(path)
    except ConfigError as exc:
        print(f"ut-tunnel: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    setup_logging(cfg.log.level)
    try:
        return runtime.run(_serve(cfg))
    except KeyboardInterrupt:
        return EXIT_OK


async def _serve(cfg: Config) -> int:
    from .client import Client
    from .server import Server

    node = Client(cfg) if cfg.role == "client" else Server(cfg)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await node.start()
    except (OSError, ConfigError) as exc:
        event("start_fail", 40, role=cfg.role, err=str(exc))
        print(f"ut-tunnel: cannot start: {exc}", file=sys.stderr)
        await node.close()
        return EXIT_ERROR
    await stop.wait()
    event("signal", role=cfg.role, loop=runtime.loop_name())
    await node.close()
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
