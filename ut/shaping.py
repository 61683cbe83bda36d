"""Record shaping: how long each lane write looks to an observer of the TLS stream.

Theory of operation: TLS hides the bytes of a lane, not their count. Without help, one
lane write is one TLS record whose length is the write's length plus a constant, and at
low rates one write is one WireGuard message, whose sizes are fixed (handshake
initiation 148 bytes, response 92, cookie 64, keepalive 32). A passive observer could then
spot WireGuard by record lengths alone ("179 bytes up, then 123 down one round trip
later"). So every write ends with a PAD frame (docs/protocol.md, "Padding") whose length
``pad_length`` draws at random:

* a *small* write (less than ``SMALL_WRITE`` bytes with its PAD frame: every fixed-size
  WireGuard message, a HELLO, a GOODBYE, a lone inner TCP ACK) grows to a length drawn
  uniformly from ``[SMALL_WRITE, SMALL_WRITE + SMALL_SPREAD)``, whatever it carried: its
  record length says nothing about which message it was;
* a larger write gets ``0 .. SPREAD - 1`` extra bytes (fewer, ``0 .. BULK_SPREAD - 1``,
  from ``BULK_WRITE`` bytes on), so that its length is no longer a sum of the datagram
  sizes (bulk WireGuard records were ``k × 1461 + 17`` bytes).

The cost is bytes, not round trips: at most ``SMALL_WRITE + SMALL_SPREAD`` bytes for a small
write, on average ``SPREAD / 2 + 10`` for a medium one and ``BULK_SPREAD / 2 + 10`` for a
bulk one (``bench/`` states what that costs in throughput). And never a packet:
``fit_padding`` cuts a larger write's padding to the room left in the TCP segment where
its records end. A write on a lane with nothing waiting goes out at once (TCP_NODELAY),
and padding that spilled over a segment boundary would send a segment of a few dozen
bytes on its own: a whole WireGuard datagram with its frame and record is 1,447 bytes at
WireGuard MTU 1380, one byte short of a 1,448-byte segment, so every padded one went out
as two packets. On a 20 Mbit/s uplink whose router queue counts packets that cost 7 %
of the goodput (issue 14, bench/README.md). Small writes keep their padding whole (it
never comes near a segment's end). Padding is only sent to a peer
that announced it understands PAD frames (``FLAG_PAD`` on its HELLO); the client's own first
HELLO is padded anyway (an older server ignores the unknown control kind).

The lengths come from the operating system's random source, read in blocks: a
predictable generator would let an observer subtract the padding.
"""

from __future__ import annotations

import os

from ut.fastpath import HEADER_LEN

__all__ = ["PAD_FRAME_OVERHEAD", "SMALL_WRITE", "SMALL_SPREAD", "SPREAD", "BULK_WRITE",
           "BULK_SPREAD", "TLS_RECORD_OVERHEAD", "fit_padding", "pad_length"]

#: Bytes a PAD frame adds before its padding: the frame header and the control kind.
PAD_FRAME_OVERHEAD = HEADER_LEN + 1
#: Writes shorter than this (with their PAD frame) are padded to a length drawn from
#: [SMALL_WRITE, SMALL_WRITE + SMALL_SPREAD). 176 covers the longest fixed-size WireGuard
#: message as a numbered frame (148 + 9 + 4) plus the PAD frame's own 10 bytes.
SMALL_WRITE = 176
SMALL_SPREAD = 256
#: Extra bytes for a medium write: 0 .. SPREAD - 1.
SPREAD = 256
#: From this many bytes on, a write is bulk traffic: 0 .. BULK_SPREAD - 1 extra bytes.
BULK_WRITE = 1024
BULK_SPREAD = 64
#: Bytes TLS 1.3 adds to each record (5-byte header, content type, 16-byte AEAD tag), and
#: the most plaintext one record holds.
TLS_RECORD_OVERHEAD = 22
TLS_RECORD_MAX = 16384

_BLOCK = 4096  # random bytes read at once (one read per few thousand writes)
_pool = b""
_next = 0


def _random_byte() -> int:
    global _pool, _next
    if _next >= len(_pool):
        _pool = os.urandom(_BLOCK)
        _next = 0
    value = _pool[_next]
    _next += 1
    return value


def _random_below(n: int) -> int:
    """Uniform in ``0 .. n - 1`` for ``n`` a power of two not above 65536."""
    if n <= 256:
        return _random_byte() & (n - 1)
    return ((_random_byte() << 8) | _random_byte()) & (n - 1)


def pad_length(n: int) -> int:
    """Padding bytes for the PAD frame that ends a lane write of ``n`` bytes of frames.

    The write then is ``n + PAD_FRAME_OVERHEAD + pad_length(n)`` bytes long: at least
    ``SMALL_WRITE`` and uniform over ``SMALL_SPREAD`` values for a small write, ``n`` plus
    ``PAD_FRAME_OVERHEAD`` plus ``0 .. SPREAD - 1`` (``BULK_SPREAD`` for bulk) otherwise.

    >>> SMALL_WRITE <= 41 + PAD_FRAME_OVERHEAD + pad_length(41) < SMALL_WRITE + SMALL_SPREAD
    True
    """
    full = n + PAD_FRAME_OVERHEAD
    if full < SMALL_WRITE:
        return SMALL_WRITE - full + _random_below(SMALL_SPREAD)
    if full < BULK_WRITE:
        return _random_below(SPREAD)
    return _random_below(BULK_SPREAD)


def _on_the_wire(n: int) -> int:
    """Bytes of TLS records carrying ``n`` bytes of frames."""
    return n + -(-n // TLS_RECORD_MAX) * TLS_RECORD_OVERHEAD


def fit_padding(n: int, pad: int, mss: int) -> int:
    """``pad`` (``pad_length(n)``) for a write of ``n`` bytes of frames that goes out at
    once as TCP segments of ``mss`` bytes, cut so that the padded write's records end in
    the segment where the unpadded write's end; -1 (no PAD frame) if not even an empty
    one fits there. Small writes (below ``SMALL_WRITE`` with their PAD frame), an
    unknown ``mss`` (0) and ``pad`` -1 are returned as they are.

    >>> fit_padding(1425, 40, 1448)  # a 1412-byte datagram, numbered: 1447 bytes of record
    -1
    >>> fit_padding(1485, 40, 1448)  # 1,507 bytes of record: 1,389 free in the second segment
    40
    """
    if pad < 0 or mss <= 0 or n + PAD_FRAME_OVERHEAD < SMALL_WRITE:
        return pad
    wire = _on_the_wire(n)
    room = -(-wire // mss) * mss - _on_the_wire(n + PAD_FRAME_OVERHEAD)
    if room < 0:
        return -1
    return pad if pad <= room else pad % (room + 1)
