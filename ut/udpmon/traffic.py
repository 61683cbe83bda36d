"""What a probe sends: the datagram header, size limits, size mixes and bitrates.

Each datagram starts with a 28-byte header (:data:`HEADER`), all big-endian::

    magic "UTPM" (4) | run id u64 (8) | sequence u64 (8) | send time ns u64 (8)

then zero padding up to the asked size. Any echo that returns the payload unchanged
works: the probe needs nothing from the far side but the bytes back
(``docs/udpmon.md``, "Wire format").
"""

from __future__ import annotations

import math
import struct

MAGIC = b"UTPM"
HEADER = struct.Struct("!4sQQQ")
HEADER_SIZE = HEADER.size  # 28
MAX_SIZE = 65507  # largest UDP payload over IPv4
# Classic 7:4:1 IMIX of 64, 576 and 1500-byte IPv4 packets, as UDP payload sizes
# (IP 20 + UDP 8 bytes subtracted), interleaved so no size comes in a long run.
IMIX_SIZES: tuple[int, ...] = (36, 548, 36, 36, 548, 36, 1472, 36, 548, 36, 548, 36)


def check_size(n: int) -> int:
    """``n`` if a datagram of ``n`` payload bytes can carry the header and fit UDP/IPv4."""
    if not HEADER_SIZE <= n <= MAX_SIZE:
        raise ValueError(f"datagram size {n} out of range {HEADER_SIZE}..{MAX_SIZE}")
    return n


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
