"""``ut-tunnel udpmon``: a UDP echo and a paced, sequence-numbered UDP probe.

The probe sends numbered, timestamped datagrams to any echo that returns the payload
unchanged and reports loss, duplicates, reordering, RTT and rate; the echo is one
such echo. One module per job:

- :mod:`.traffic`: the datagram header, size limits, IMIX, bitrates;
- :mod:`.stats`: sans-I/O accounting of a probe run (:class:`ProbeStats`);
- :mod:`.result`: what a run reports (:class:`ProbeResult`, :class:`EchoStats`);
- :mod:`.sockets`: addresses (``ut.addr``), resolution, sockets (``ut.udp``);
- :mod:`.echo`: :class:`UdpEcho`, :func:`run_echo`;
- :mod:`.probe`: :func:`run_probe` and its pacing;
- :mod:`.cli`: ``ut-tunnel udpmon`` and ``python -m ut.udpmon``.

User documentation: ``docs/udpmon.md``. Example (an echo and a probe on loopback)::

    echo = UdpEcho("127.0.0.1", 0)
    addr = await echo.start()
    task = asyncio.ensure_future(echo.run())
    result = await run_probe(addr, rate=1000, count=100, duration=None)
    echo.stop(); await task
"""

from __future__ import annotations

from .cli import add_udpmon_parser, main, run_udpmon
from .echo import UdpEcho, run_echo
from .probe import run_probe
from .result import (
    EXIT_ERROR,
    EXIT_LOSS,
    EXIT_OK,
    EXIT_SEND_FAILED,
    JSON_SCHEMA,
    KEEP_UP_RATIO,
    EchoStats,
    ProbeResult,
    format_echo_tick,
)
from .sockets import parse_cli_addr
from .stats import ProbeStats, percentile
from .traffic import HEADER, HEADER_SIZE, IMIX_SIZES, MAGIC, MAX_SIZE, parse_bitrate, parse_sizes

__all__ = [
    "EXIT_ERROR",
    "EXIT_LOSS",
    "EXIT_OK",
    "EXIT_SEND_FAILED",
    "HEADER",
    "HEADER_SIZE",
    "IMIX_SIZES",
    "JSON_SCHEMA",
    "KEEP_UP_RATIO",
    "MAGIC",
    "MAX_SIZE",
    "EchoStats",
    "ProbeResult",
    "ProbeStats",
    "UdpEcho",
    "add_udpmon_parser",
    "format_echo_tick",
    "main",
    "parse_bitrate",
    "parse_cli_addr",
    "parse_sizes",
    "percentile",
    "run_echo",
    "run_probe",
    "run_udpmon",
]
