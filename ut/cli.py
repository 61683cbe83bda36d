"""The ``ut-tunnel`` console script.

``ut-tunnel -config FILE`` runs the role the file names until SIGINT/SIGTERM
(which close every lane with GOODBYE and exit 0). Helper subcommands have
flags of their own: ``pki`` (certificates), ``demo`` (a self-contained local
run) and ``udpmon`` (a UDP probe and echo).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from . import fastpath, runtime
from ._version import __version__
from .errors import ConfigError
from .logs import event, setup_logging

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    from .pki import add_pki_parser
    from .udpmon import add_udpmon_parser

    parser = argparse.ArgumentParser(
        prog="ut-tunnel",
        description="Carry WireGuard's UDP over several TCP+mTLS lanes.",
        epilog="Run the tunnel: ut-tunnel -config /etc/ut/ut.yaml",
    )
    parser.add_argument("-config", "--config", metavar="PATH", help="YAML configuration file")
    parser.add_argument(
        "--version", action="version",
        version=f"ut-tunnel {__version__} ({fastpath.IMPLEMENTATION} fast path)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_pki_parser(sub)
    demo = sub.add_parser("demo", help="run a server, a client and a UDP echo on loopback")
    demo.add_argument("--seconds", type=float, default=3.0, help="traffic duration (default 3)")
    demo.add_argument("--lanes", type=int, default=5, help="lanes (default 5)")
    demo.add_argument("--rate", type=int, default=2000, help="datagrams per second (default 2000)")
    demo.add_argument("--size", type=int, default=1200, help="datagram bytes (default 1200)")
    add_udpmon_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "pki":
        from .pki import run_pki

        return run_pki(args)
    if args.command == "udpmon":
        from .udpmon import run_udpmon

        return run_udpmon(args)
    if args.command == "demo":
        from .demo import main as demo_main

        return demo_main(args)
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


async def _serve(cfg) -> int:  # type: ignore[no-untyped-def]
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
