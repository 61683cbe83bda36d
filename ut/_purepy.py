"""Pure-Python twin of the compiled fast path ``ut._fastpath``.

Same API, same docstrings, same results and same errors as ``ut/_fastpath.pyx``
(``tests/test_differential.py`` holds the two to that). Use it through
``ut.fastpath``, which picks the compiled module unless ``UT_NO_EXTENSIONS`` is set.

Theory of operation
-------------------
PDU v1 (docs/protocol.md, SPEC "Wire format")::

    "U" "T" | Ver(1)=0x01 | Type(1) | Flags(1) | Len(4, big-endian) | Payload(Len)

* ``encode_frame``/``encode_data`` build frames; ``encode_data`` packs a whole batch of
  datagrams into one ``bytes`` so a lane does one TLS write per batch.
* ``Deframer`` is a sans-I/O streaming decoder. It keeps one ``bytearray``
  (``_buf``) with a window ``[_start, _end)`` of bytes received but not yet returned as
  frames. ``feed()`` parses straight from the caller's data and copies only the unfinished
  tail; ``get_buffer``/``buffer_updated`` let an ``asyncio.BufferedProtocol`` receive into
  ``_buf`` itself. ``_buf`` is never resized in place (a view handed out by ``get_buffer``
  may still be alive); when it must grow a new one replaces it. Its size never exceeds
  ``HEADER_LEN + max_payload + 64 KiB``: between calls at most one unfinished frame is held.
  A header is judged as soon as its 9 bytes are in; a bad one poisons the deframer (the
  lane must be closed, SPEC: "that lane is closed and the error counted").
* ``encode_data_seq`` numbers the datagrams of a batch (``FLAG_SEQ``) and ``Resequencer``
  puts a session's numbered datagrams back in order at the receiving end, waiting for a
  gap at most an adaptive, capped time (issue 14: TCP inside WireGuard reads reordering
  across lanes as loss).
* ``RingQueue`` is the session's drop-oldest backpressure queue (SPEC "Backpressure").
* ``LanePicker`` chooses the lane for each datagram: round-robin or flow hash.
* ``recv_batch``/``send_batch`` move many UDP datagrams per call (the compiled module uses
  ``recvmmsg``/``sendmmsg`` where the platform has them; this twin loops).
  ``recv_batch_with_drops`` also reads the kernel's per-socket drop counter that rides
  on each datagram (``SO_RXQ_OVFL``), so counting drops needs no system call of its own.
"""

from __future__ import annotations

import os
import socket
import struct
import sys
from collections import deque
from typing import Any

from ut.errors import FrameError
from ut.tunroute import link_local

__all__ = [
    "MAGIC",
    "VERSION",
    "TYPE_DATA",
    "TYPE_CTRL",
    "HEADER_LEN",
    "MAX_PAYLOAD",
    "HAVE_MMSG",
    "HAVE_GSO",
    "HAVE_RXQ_OVFL",
    "encode_frame",
    "encode_data",
    "encode_data_seq",
    "pad_frame",
    "FLAG_SEQ",
    "FLAG_PAD",
    "KIND_PAD",
    "SEQ_LEN",
    "Deframer",
    "QueueBudget",
    "RingQueue",
    "Resequencer",
    "LanePicker",
    "flow_key",
    "recv_batch",
    "recv_batch_with_drops",
    "send_batch",
    "FLAG_OFFLOAD",
    "TUN_READ_HEADROOM",
    "VNET_HDR_LEN",
    "gso_split",
    "tun_read_batch",
    "tun_write_batch",
]

MAGIC = b"UT"
VERSION = 1
TYPE_DATA = 0x01
TYPE_CTRL = 0x10
HEADER_LEN = 9
MAX_PAYLOAD = 65535
#: DATA frame flag: the payload starts with a 4-byte sequence number (docs/protocol.md,
#: "Sequence numbers"). On a HELLO frame: "send me numbered DATA frames".
FLAG_SEQ = 0x01
#: Bytes of the sequence number in front of a numbered datagram.
SEQ_LEN = 4
#: HELLO frame flag: "I understand PAD frames, pad what you send me" (docs/protocol.md,
#: "Padding").
FLAG_PAD = 0x02
#: HELLO frame flag: "in TUN mode my DATA payloads are a virtio_net_hdr and a packet,
#: maybe a GSO super-packet, and I take such payloads" (docs/protocol.md, "TUN offloads");
#: a session uses them when both HELLOs carry it.
FLAG_OFFLOAD = 0x04
#: The control kind of a PAD frame: its body is padding, which receivers discard.
KIND_PAD = 0x04
_PAD_KIND_BYTE = bytes([KIND_PAD])
#: True when ``recv_batch``/``send_batch`` use ``recvmmsg``/``sendmmsg`` (never in this twin).
HAVE_MMSG = False
#: True when ``recv_batch_with_drops`` can read the kernel's per-socket drop counter
#: (``SO_RXQ_OVFL``, Linux) from the datagrams it receives; False elsewhere (macOS).
HAVE_RXQ_OVFL = sys.platform.startswith("linux") and hasattr(socket.socket, "recvmsg")
_SO_RXQ_OVFL = 40  # asm-generic/socket.h (the socket module does not name it)
_OVFL_SPACE = socket.CMSG_SPACE(4) if HAVE_RXQ_OVFL else 0  # one u32 control message
_U32 = struct.Struct("=I")
_SOL_UDP = 17  # IPPROTO_UDP
_UDP_SEGMENT = 103  # linux/udp.h


def _kernel_has_gso() -> bool:
    # Linux < 4.18 has no UDP_SEGMENT and ignores the control message: it would send a
    # whole run as ONE datagram. The socket option of the same name came with it.
    if not (sys.platform.startswith("linux") and hasattr(socket.socket, "sendmsg")):
        return False
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.getsockopt(_SOL_UDP, _UDP_SEGMENT)
        return True
    except OSError:
        return False


#: True when ``send_batch(..., gso=True)`` sends runs of equal-size datagrams as one
#: ``UDP_SEGMENT`` message (Linux 4.18 or later; this twin uses ``socket.sendmsg`` with
#: the control message).
HAVE_GSO = _kernel_has_gso()
_GSO_MAX_SEGMENTS = 64  # the kernel's UDP_MAX_SEGMENTS on older kernels
_GSO_MAX_BYTES = 65000  # one message's payload stays under the 64 KiB IP limit

# Receive window offered by get_buffer() when the caller gives no useful size hint, and the
# slack the deframer's buffer may hold beyond one whole frame.
_READ_CHUNK = 65536
# Smallest buffer allocated once the deframer needs one at all.
_MIN_BUFFER = 4096

_HEADER = struct.Struct(">2sBBBI")  # magic, version, type, flags, length
_HEADER_PACK = _HEADER.pack
_HEADER_UNPACK_FROM = _HEADER.unpack_from
_FNV_OFFSET = 0x811C9DC5
_FNV_PRIME = 0x01000193
# flow_key of IP packets: protocols whose header starts with the two ports (TCP, UDP,
# SCTP, UDP-Lite), and big-endian 32-bit words of the addresses and the ports
_PORTED_PROTOCOLS = frozenset((6, 17, 132, 136))
_IPV4_ADDRS = struct.Struct(">2I").unpack_from
_IPV6_ADDRS = struct.Struct(">8I").unpack_from
_U32_BE = struct.Struct(">I").unpack_from
_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1
_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)


def _check_type(ftype: int) -> None:
    if ftype != TYPE_DATA and ftype != TYPE_CTRL:
        raise ValueError(f"unknown frame type {ftype!r}")


def encode_frame(ftype: int, payload: Any, flags: int = 0) -> bytes:
    """Return one PDU v1 frame: the 9-byte header followed by ``payload``.

    ``ftype`` is ``TYPE_DATA`` or ``TYPE_CTRL``; ``payload`` is any bytes-like object of at
    most ``MAX_PAYLOAD`` bytes; ``flags`` is 0..255. Raises ``ValueError`` otherwise.

    >>> encode_frame(TYPE_DATA, b"hello").hex()
    '55540101000000000568656c6c6f'
    """
    _check_type(ftype)
    if not 0 <= flags <= 0xFF:
        raise ValueError(f"flags {flags!r} out of range 0..255")
    with memoryview(payload) as view:
        n = view.nbytes
        if n > MAX_PAYLOAD:
            raise ValueError(f"payload of {n} bytes > MAX_PAYLOAD ({MAX_PAYLOAD})")
        return _HEADER_PACK(MAGIC, VERSION, ftype, flags, n) + view.tobytes()


def encode_data(datagrams: list, pad: int = -1) -> bytes:
    """Return every datagram of ``datagrams`` as consecutive DATA frames in one ``bytes``.

    One datagram is one DATA frame (SPEC: a datagram is never split). Items are bytes-like,
    each at most ``MAX_PAYLOAD`` bytes, else ``ValueError`` and nothing is encoded.
    ``pad`` >= 0 appends one PAD control frame (``pad_frame(pad)``) after the datagrams.

    >>> encode_data([b"a", b""]).hex()
    '55540101000000000161555401010000000000'
    """
    parts: list[Any] = []
    append = parts.append
    for d in datagrams:
        n = len(d) if type(d) is bytes else memoryview(d).nbytes
        if n > MAX_PAYLOAD:
            raise ValueError(f"payload of {n} bytes > MAX_PAYLOAD ({MAX_PAYLOAD})")
        append(_HEADER_PACK(MAGIC, VERSION, TYPE_DATA, 0, n))
        append(d)
    if pad >= 0:
        append(pad_frame(pad))
    return b"".join(parts)


def pad_frame(pad: int) -> bytes:
    """Return one PAD control frame: a CTRL frame whose payload is ``KIND_PAD`` and ``pad``
    zero bytes (``pad`` 0 .. ``MAX_PAYLOAD - 1``, else ``ValueError``). Receivers discard it.

    >>> pad_frame(2).hex()
    '555401100000000003040000'
    """
    if not 0 <= pad < MAX_PAYLOAD:
        raise ValueError(f"pad {pad!r} out of range 0..{MAX_PAYLOAD - 1}")
    return _HEADER_PACK(MAGIC, VERSION, TYPE_CTRL, 0, pad + 1) + _PAD_KIND_BYTE + bytes(pad)


_SEQ_PACK = struct.Struct(">2sBBBII").pack  # a numbered DATA header: header + seq u32
_SEQ_UNPACK_FROM = struct.Struct(">I").unpack_from
_SEQ_MASK = 0xFFFFFFFF


def encode_data_seq(datagrams: list, seq: int, pad: int = -1) -> tuple[bytes, int]:
    """Like ``encode_data``, but numbers the datagrams ``seq, seq + 1, ...`` (mod 2**32).

    Each numbered frame has ``FLAG_SEQ`` set and its payload is the sequence number
    (u32, big-endian) followed by the datagram. A datagram too long to carry its number
    (more than ``MAX_PAYLOAD - SEQ_LEN`` bytes) goes out as a plain DATA frame and takes
    no number. Returns ``(frames, next_seq)``. ``seq`` must be 0..2**32-1. ``pad`` as in
    ``encode_data``.

    >>> encode_data_seq([b"hi"], 7)[0].hex()
    '555401010100000006000000076869'
    >>> encode_data_seq([b"a", b"b"], 0xFFFFFFFF)[1]
    1
    """
    if not 0 <= seq <= _SEQ_MASK:
        raise ValueError(f"seq {seq!r} out of range 0..{_SEQ_MASK}")
    parts: list[Any] = []
    append = parts.append
    for d in datagrams:
        n = len(d) if type(d) is bytes else memoryview(d).nbytes
        if n > MAX_PAYLOAD:
            raise ValueError(f"payload of {n} bytes > MAX_PAYLOAD ({MAX_PAYLOAD})")
        if n > MAX_PAYLOAD - SEQ_LEN:
            append(_HEADER_PACK(MAGIC, VERSION, TYPE_DATA, 0, n))
        else:
            append(_SEQ_PACK(MAGIC, VERSION, TYPE_DATA, FLAG_SEQ, n + SEQ_LEN, seq))
            seq = (seq + 1) & _SEQ_MASK
        append(d)
    if pad >= 0:
        append(pad_frame(pad))
    return b"".join(parts), seq


def _header_error(head: Any, max_payload: int) -> FrameError | None:
    """The error for a bad 9-byte header, or None. Checked in this order: magic, version,
    type, length (so a header with several faults reports the first)."""
    magic, version, ftype, _flags, length = _HEADER_UNPACK_FROM(head, 0)
    if magic != MAGIC:
        return FrameError("bad_magic", f"expected b'UT', got {magic!r}")
    if version != VERSION:
        return FrameError("bad_version", f"version {version}, expected {VERSION}")
    if ftype != TYPE_DATA and ftype != TYPE_CTRL:
        return FrameError("bad_type", f"type 0x{ftype:02x}")
    if length > max_payload:
        return FrameError("too_long", f"length {length} > {max_payload}")
    return None


class Deframer:
    """Streaming PDU v1 decoder (sans-I/O): bytes in, whole frames out.

    Each frame comes out as a tuple ``(type, flags, payload)``, except PAD frames (CTRL frames
    whose payload starts with ``KIND_PAD``): they exist only to change the length of a write
    and are dropped here. ``controls`` is the number of CTRL frames in the list the last call
    returned (0 in the common case: DATA only). A header is validated as soon
    as its 9 bytes are in, in the order magic, version, type, length (``Len`` may not exceed
    ``max_payload``). On a bad header the frames before it are still returned, ``error`` is
    set to the ``FrameError`` and every later ``feed``/``buffer_updated``/``eof`` raises it;
    buffered bytes are discarded. The lane must then be closed.

    Two ways in, which may be mixed:

    * ``feed(data)`` -- data from ``Protocol.data_received``;
    * ``get_buffer(sizehint)`` then ``buffer_updated(nbytes)`` -- ``asyncio.BufferedProtocol``
      receives straight into the deframer's own buffer.

    Memory stays below ``HEADER_LEN + max_payload + 64 KiB`` per deframer.

    >>> d = Deframer()
    >>> d.feed(encode_frame(TYPE_DATA, b"hi")[:5])
    []
    >>> d.feed(encode_frame(TYPE_DATA, b"hi")[5:])
    [(1, 0, b'hi')]
    """

    __slots__ = ("_buf", "_view", "_start", "_end", "_max_payload", "_limit", "error",
                 "controls")

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        if not 0 <= max_payload <= MAX_PAYLOAD:
            raise ValueError(f"max_payload {max_payload!r} out of range 0..{MAX_PAYLOAD}")
        self._max_payload = max_payload
        # Invariant: len(_buf) <= _limit. Between calls at most one unfinished frame
        # (< HEADER_LEN + max_payload bytes) is held, and a read window is at most _READ_CHUNK.
        self._limit = HEADER_LEN + max_payload + _READ_CHUNK
        self._buf = bytearray()
        self._view = memoryview(self._buf)
        self._start = 0  # first byte not yet returned in a frame
        self._end = 0  # one past the last byte received; _start <= _end <= len(_buf)
        self.error: FrameError | None = None
        self.controls = 0  # CTRL frames in the list the last call returned (PAD not counted)

    @property
    def buffered(self) -> int:
        """Bytes held that are not yet part of a whole frame (0 after an error)."""
        return self._end - self._start

    def _reserve(self, want: int) -> None:
        # Make at least `want` bytes free after _end: compact first, grow only if needed.
        start = self._start
        pending = self._end - start
        if pending == 0:
            self._start = self._end = start = 0
        cap = len(self._buf)
        if cap - self._end >= want:
            return
        if start > 0:
            self._buf[0:pending] = self._view[start : start + pending]
            self._start = 0
            self._end = pending
            if cap - pending >= want:
                return
        new_cap = max(pending + want, min(max(cap * 2, _MIN_BUFFER), self._limit))
        buf = bytearray(new_cap)
        buf[0:pending] = self._view[0:pending]
        self._buf = buf
        self._view = memoryview(buf)

    def _parse(self, data: Any, pos: int, end: int, out: list) -> int:
        # Append every whole frame of data[pos:end] to out; return the offset of the first
        # byte not consumed. A bad header sets self.error and stops at that header.
        max_payload = self._max_payload
        while end - pos >= HEADER_LEN:
            magic, version, ftype, flags, length = _HEADER_UNPACK_FROM(data, pos)
            if (
                magic != MAGIC
                or version != VERSION
                or (ftype != TYPE_DATA and ftype != TYPE_CTRL)
                or length > max_payload
            ):
                self.error = _header_error(data[pos : pos + HEADER_LEN], max_payload)
                return pos
            stop = pos + HEADER_LEN + length
            if stop > end:
                break
            if ftype == TYPE_CTRL:
                if length and data[pos + HEADER_LEN] == KIND_PAD:
                    pos = stop
                    continue  # padding: it only changed the length of the write
                self.controls += 1
            out.append((ftype, flags, bytes(data[pos + HEADER_LEN : stop])))
            pos = stop
        return pos

    def _fail(self) -> None:
        self._start = self._end = 0

    def feed(self, data: Any) -> list[tuple[int, int, bytes]]:
        """Add received bytes; return ``[(type, flags, payload), ...]`` for every whole frame
        now available (possibly none). Raises ``FrameError`` if the deframer already failed.
        """
        if self.error is not None:
            raise self.error
        self.controls = 0
        view = memoryview(data)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        n = view.nbytes
        out: list[tuple[int, int, bytes]] = []
        pos = 0
        if self._end > self._start:
            # Finish the frame already started in _buf, then parse the rest in place.
            if self._end - self._start < HEADER_LEN:
                take = min(HEADER_LEN - (self._end - self._start), n)
                self._reserve(take)
                self._buf[self._end : self._end + take] = view[0:take]
                self._end += take
                pos = take
                if self._end - self._start < HEADER_LEN:
                    return out
                self.error = _header_error(self._view[self._start : self._end], self._max_payload)
                if self.error is not None:
                    self._fail()
                    return out
            start = self._start
            total = HEADER_LEN + int.from_bytes(self._view[start + 5 : start + 9], "big")
            take = min(total - (self._end - start), n - pos)
            if take:
                self._reserve(take)
                start = self._start
                self._buf[self._end : self._end + take] = view[pos : pos + take]
                self._end += take
                pos += take
            if self._end - start < total:
                return out
            buf = self._view
            ftype = buf[start + 3]
            is_pad = ftype == TYPE_CTRL and total > HEADER_LEN and buf[start + HEADER_LEN] == KIND_PAD
            if not is_pad:
                self.controls += ftype == TYPE_CTRL
                out.append((ftype, buf[start + 4], bytes(buf[start + HEADER_LEN : self._end])))
            self._start = self._end = 0
        pos = self._parse(view, pos, n, out)
        if self.error is not None:
            self._fail()
            return out
        rest = n - pos
        if rest:
            self._reserve(rest)
            self._buf[self._end : self._end + rest] = view[pos:n]
            self._end += rest
        return out

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Return a writable ``memoryview`` (at least 1 byte) to receive into; then call
        ``buffer_updated(nbytes)``. A ``sizehint`` <= 0 means "as much as is convenient";
        the view is never longer than needed to make the buffer ``HEADER_LEN + max_payload
        + 64 KiB`` long. Only the latest view may be written to.
        """
        want = _READ_CHUNK if sizehint <= 0 else min(sizehint, _READ_CHUNK)
        self._reserve(want)
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> list[tuple[int, int, bytes]]:
        """Account for ``nbytes`` written into the view from ``get_buffer``; return the whole
        frames now available, as ``feed`` does. Raises ``FrameError`` if the deframer already
        failed, ``ValueError`` if ``nbytes`` does not fit the view.
        """
        if self.error is not None:
            raise self.error
        if not 0 <= nbytes <= len(self._buf) - self._end:
            raise ValueError(f"nbytes {nbytes!r} does not fit the buffer from get_buffer()")
        self._end += nbytes
        self.controls = 0
        out: list[tuple[int, int, bytes]] = []
        self._start = self._parse(self._view, self._start, self._end, out)
        if self.error is not None or self._start == self._end:
            self._fail()
        return out

    def eof(self) -> None:
        """The stream ended. Raises ``FrameError("truncated")`` if part of a frame is
        buffered, or the earlier error if the deframer already failed."""
        if self.error is not None:
            raise self.error
        held = self._end - self._start
        if held:
            raise FrameError("truncated", f"{held} bytes of an unfinished frame at end of stream")


class QueueBudget:
    """One process-wide budget of queued payload bytes, shared by many ``RingQueue`` s
    (issue 19: a server with many sessions whose queues fill must stay within its memory).

    Every queue made with ``budget=`` adds its pushes to ``nbytes`` and takes its pops,
    drops and clears away, so ``nbytes`` is always the sum of their ``nbytes``. The budget
    refuses nothing by itself: the owner of the queues sheds datagrams (``RingQueue.
    shrink_to``) when ``over`` says so, choosing whose (``ut.budget.shed``).

    >>> b = QueueBudget(3)
    >>> q = RingQueue(budget=b)
    >>> q.push(b"ab"), q.push(b"cd"), b.nbytes, b.over
    (0, 0, 4, True)
    >>> q.shrink_to(2), b.nbytes, b.over
    (1, 2, False)
    """

    __slots__ = ("_max_bytes", "_nbytes")

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes {max_bytes!r} < 1")
        self._max_bytes = max_bytes
        self._nbytes = 0

    @property
    def max_bytes(self) -> int:
        """The budget, in payload bytes."""
        return self._max_bytes

    @property
    def nbytes(self) -> int:
        """Payload bytes held by all the queues sharing this budget."""
        return self._nbytes

    @property
    def over(self) -> bool:
        """True when the queues hold more than ``max_bytes``."""
        return self._nbytes > self._max_bytes


class RingQueue:
    """FIFO of datagrams with drop-oldest backpressure (SPEC "Backpressure").

    Holds at most ``max_packets`` datagrams and ``max_bytes`` bytes of payload; a ``push``
    that would exceed either limit first drops the oldest datagrams. Each datagram carries a
    ``stamp`` (e.g. its arrival time) so the caller can measure queueing delay.

    >>> q = RingQueue(max_packets=2)
    >>> q.push(b"a"), q.push(b"b"), q.push(b"c")
    (0, 0, 1)
    >>> q.pop_batch(10)
    [b'b', b'c']
    """

    __slots__ = (
        "_items",
        "_stamps",
        "_max_packets",
        "_max_bytes",
        "_nbytes",
        "_dropped",
        "_dropped_bytes",
        "_budget",
    )

    def __init__(self, max_packets: int = 4096, max_bytes: int = 8388608,
                 budget: QueueBudget | None = None) -> None:
        if max_packets < 1:
            raise ValueError(f"max_packets {max_packets!r} < 1")
        if max_bytes < 1:
            raise ValueError(f"max_bytes {max_bytes!r} < 1")
        self._items: deque[bytes] = deque()
        self._stamps: deque[float] = deque()
        self._max_packets = max_packets
        self._max_bytes = max_bytes
        self._nbytes = 0
        self._dropped = 0
        self._dropped_bytes = 0
        self._budget = budget

    def __del__(self) -> None:
        # As the compiled ring's dealloc: what a queue held no longer counts. (A queue
        # whose __init__ refused its arguments never got a budget.)
        budget = getattr(self, "_budget", None)
        if budget is not None:
            budget._nbytes -= self._nbytes

    def _taken(self, n: int) -> None:
        """``n`` payload bytes left the queue (popped, dropped or cleared)."""
        self._nbytes -= n
        if self._budget is not None:
            self._budget._nbytes -= n

    @property
    def max_packets(self) -> int:
        """Most datagrams held at once."""
        return self._max_packets

    @property
    def max_bytes(self) -> int:
        """Most payload bytes held at once."""
        return self._max_bytes

    def push(self, datagram: Any, stamp: float = 0.0) -> int:
        """Append ``datagram`` (bytes-like; non-``bytes`` is copied); return how many
        datagrams were dropped, oldest first, to keep within both limits. A datagram longer
        than ``max_bytes`` on its own is refused: it is not stored and counts as 1 dropped.
        Every drop adds to ``dropped`` and ``dropped_bytes``.
        """
        if type(datagram) is not bytes:
            datagram = bytes(memoryview(datagram))
        n = len(datagram)
        stamp = float(stamp)
        if n > self._max_bytes:
            self._dropped += 1
            self._dropped_bytes += n
            return 1
        items = self._items
        drops = 0
        while len(items) >= self._max_packets or self._nbytes + n > self._max_bytes:
            old = items.popleft()
            self._stamps.popleft()
            self._taken(len(old))
            self._dropped_bytes += len(old)
            drops += 1
        self._dropped += drops
        items.append(datagram)
        self._stamps.append(stamp)
        self._nbytes += n
        if self._budget is not None:
            self._budget._nbytes += n
        return drops

    def pop(self) -> bytes:
        """Remove and return the oldest datagram; ``IndexError`` when empty."""
        if not self._items:
            raise IndexError("pop from an empty RingQueue")
        d = self._items.popleft()
        self._stamps.popleft()
        self._taken(len(d))
        return d

    def pop_batch(self, max_count: int, max_bytes: int = 1 << 30) -> list[bytes]:
        """Remove and return up to ``max_count`` datagrams, oldest first, totalling at most
        ``max_bytes`` -- except that the first is always taken when the queue is not empty
        and ``max_count`` >= 1, however long it is.
        """
        out: list[bytes] = []
        items = self._items
        stamps = self._stamps
        total = 0
        while items and len(out) < max_count:
            n = len(items[0])
            if out and total + n > max_bytes:
                break
            out.append(items.popleft())
            stamps.popleft()
            total += n
        self._taken(total)
        return out

    def clear(self) -> int:
        """Discard everything queued; return how many datagrams that was. These are not
        added to ``dropped`` (the caller counts them under its own reason)."""
        n = len(self._items)
        self._items.clear()
        self._stamps.clear()
        self._taken(self._nbytes)
        return n

    def drop_stale(self, before: float) -> int:
        """Remove the datagrams at the head whose stamp is older than ``before`` (stamps
        below it); return how many. Stops at the first younger one: a queue's stamps are
        in push order, so a caller that stamps with one clock drops exactly what is older.
        Costs one comparison when nothing is stale. These are not added to ``dropped``
        (the caller counts them under its own reason, ``stale``)."""
        stamps = self._stamps
        if not stamps or stamps[0] >= before:
            return 0
        items = self._items
        n = 0
        while stamps and stamps[0] < before:
            stamps.popleft()
            self._taken(len(items.popleft()))
            n += 1
        return n

    def shrink_to(self, max_nbytes: int) -> int:
        """Drop the oldest datagrams until at most ``max_nbytes`` payload bytes are left;
        return how many. The budget's shedding (``ut.budget``): not added to ``dropped``
        (the caller counts them under its own reason, ``budget``)."""
        items, stamps = self._items, self._stamps
        n = 0
        while items and self._nbytes > max_nbytes:
            stamps.popleft()
            self._taken(len(items.popleft()))
            n += 1
        return n

    @property
    def budget(self) -> QueueBudget | None:
        """The ``QueueBudget`` this queue counts towards, or None."""
        return self._budget

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        """Payload bytes queued."""
        return self._nbytes

    @property
    def dropped(self) -> int:
        """Datagrams dropped (oldest, or refused as oversize) since creation."""
        return self._dropped

    @property
    def dropped_bytes(self) -> int:
        """Payload bytes of the datagrams counted in ``dropped``."""
        return self._dropped_bytes

    @property
    def head_stamp(self) -> float:
        """Stamp of the oldest queued datagram; 0.0 when empty."""
        return self._stamps[0] if self._stamps else 0.0


class Resequencer:
    """Puts one session's numbered datagrams back in sequence order (issue 14).

    Datagrams striped over several TCP lanes arrive out of order whenever one lane lags
    (a loss repaired a round trip later); TCP inside WireGuard reads that as loss. The
    sending end numbers them (``encode_data_seq``); this receiving end releases them in
    order. For a gap it waits at most ``wait`` seconds, counted from when the first
    datagram behind the gap arrived; then it gives up on the gap (``skipped`` counts the
    numbers given up) and releases what follows. A datagram that turns up after its gap
    was given up is released at once (``late``): nothing is dropped here.

    ``wait`` adapts: about 1.5 x the longest recent time a gap took to fill (a late
    datagram counts with its whole delay), at least ``rtt_hint`` (the longest a lane
    takes to repair a loss, set by the owner) and ``min_wait``, never above ``max_wait``.
    A gap that would still fill is better waited for: giving up on it turns delay into
    the reordering this class exists to hide. The owner calls ``flush`` when a lane dies.

    Numbered datagrams of at most ``pass_bytes`` bytes never wait: they are released at
    once and their number is marked done. Through WireGuard these are the inner TCP
    acknowledgements (and keepalives); TCP takes acknowledgements in any order, and
    holding them behind a gap would only stall the inner ACK clock.

    Bounds: at most ``max_packets`` datagrams and ``max_bytes`` bytes are held; past
    either the oldest gap is given up at once. A number more than ``2 * max_packets``
    away from the next expected one, ahead or behind (a peer that restarted its count),
    releases everything held and follows the new count (``resyncs``). Counts start at 0.

    Sans-I/O: the caller passes the time (``now``, seconds on one monotonic clock) and
    calls ``expire(now)`` at ``deadline``.

    >>> r = Resequencer()
    >>> frames, _ = encode_data_seq([b"a", b"b", b"c"], 0)
    >>> d = Deframer().feed(frames)
    >>> r.feed([d[1], d[2]], 0.0)
    ([], 2, 10)
    >>> r.take()
    ([], 0, 0.0)
    >>> r.feed([d[0]], 0.001)
    ([], 1, 5)
    >>> r.take()
    ([b'a', b'b', b'c'], 3, 0.0)
    >>> r.skipped, r.late, r.held
    (0, 0, 0)
    """

    def __init__(
        self,
        max_packets: int = 4096,
        max_bytes: int = 8 * 1024 * 1024,
        max_wait: float = 0.2,
        min_wait: float = 0.001,
        pass_bytes: int = 0,
    ) -> None:
        if max_packets < 1 or max_bytes < 1:
            raise ValueError("max_packets and max_bytes must be at least 1")
        if not 0.0 <= min_wait <= max_wait:
            raise ValueError("need 0 <= min_wait <= max_wait")
        self.max_packets = max_packets
        self.max_bytes = max_bytes
        self.max_wait = max_wait
        self.min_wait = min_wait
        self.pass_bytes = pass_bytes
        self._window = 2 * max_packets  # numbers further ahead than this are a restart
        # seq -> (datagram, arrival); datagram None: released early (at most pass_bytes)
        self._held: dict[int, tuple[bytes | None, float]] = {}
        self._held_bytes = 0
        self._next = 0  # next number to release (a sender starts its count at 0)
        self._low = 0  # lowest held number (valid while _held)
        self._out: list = []
        self._out_bytes = 0
        self._out_stamp = 0.0
        self._estimate = 0.0  # decaying maximum of recent gap-fill times
        self._rtt_hint = 0.0
        self._last_skip = 0.0  # when a gap was last given up, and the wait then
        self._last_skip_wait = 0.0
        #: Numbers given up (their datagrams never came in time; they may come late).
        self.skipped = 0
        #: Datagrams released after their number had been given up.
        self.late = 0
        #: Times the count jumped too far ahead and started again.
        self.resyncs = 0

    # -- public state ------------------------------------------------------------
    @property
    def held(self) -> int:
        """Datagrams waiting for a gap before them to fill."""
        return len(self._held)

    @property
    def held_bytes(self) -> int:
        """Bytes of the datagrams held."""
        return self._held_bytes

    @property
    def wait(self) -> float:
        """How long a gap is waited for now (seconds)."""
        w = self._estimate * 1.5
        if w < self._rtt_hint:
            w = self._rtt_hint
        if w < self.min_wait:
            w = self.min_wait
        return w if w < self.max_wait else self.max_wait

    @property
    def deadline(self) -> float:
        """When ``expire`` has work (``inf`` while nothing is held)."""
        if not self._held:
            return float("inf")
        return self._held[self._low][1] + self.wait

    @property
    def next_seq(self) -> int:
        """The number released next."""
        return self._next

    def set_rtt_hint(self, seconds: float) -> None:
        """How long a lane may take to repair a loss, as the owner measures it (e.g. the
        slowest lane's retransmission timeout plus its round trip): a floor for ``wait``."""
        self._rtt_hint = seconds if seconds > 0.0 else 0.0

    # -- in ------------------------------------------------------------------------
    def feed(self, frames: list, now: float) -> tuple[list, int, int]:
        """Take a ``Deframer``'s frames, as read from one lane at time ``now``.

        DATA frames are consumed: numbered ones (``FLAG_SEQ``) go through the reordering,
        plain ones are released at once. Returns ``(others, data_frames, data_bytes)``:
        the non-DATA frames in their order, and how many DATA frames and payload bytes
        (sequence numbers included) were consumed. Raises ``FrameError("bad_seq")`` for a
        numbered frame too short to hold its number; the frames before it are consumed.
        """
        others = []
        n = nbytes = 0
        for frame in frames:
            ftype, flags, payload = frame
            if ftype != TYPE_DATA:
                others.append(frame)
                continue
            size = len(payload)
            if flags & FLAG_SEQ:
                if size < SEQ_LEN:
                    raise FrameError("bad_seq", f"numbered DATA frame of {size} bytes")
                n += 1
                nbytes += size
                self._push(_SEQ_UNPACK_FROM(payload)[0], payload[SEQ_LEN:], now)
            else:
                n += 1
                nbytes += size
                self._release(payload, now)
        return others, n, nbytes

    def _release(self, datagram: bytes, stamp: float) -> None:
        if not self._out:
            self._out_stamp = stamp
        elif stamp < self._out_stamp:
            self._out_stamp = stamp
        self._out.append(datagram)
        self._out_bytes += len(datagram)

    def _sample(self, seconds: float) -> None:
        # Peak-hold with a slow decay: one long reorder raises the wait at once, and it
        # comes down over a few hundred quieter gaps (seconds, on a lossy path).
        if seconds > self._estimate:
            self._estimate = seconds
        else:
            self._estimate += (seconds - self._estimate) * 0.00390625

    def _push(self, seq: int, datagram: bytes, now: float) -> None:
        off = (seq - self._next) & _SEQ_MASK
        if off == 0:
            if self._held:
                self._sample(now - self._held[self._low][1])
            self._release(datagram, now)
            self._next = (seq + 1) & _SEQ_MASK
            if self._held:
                self._drain()
            return
        if off >= self._window:
            if off > _SEQ_MASK - self._window:  # just behind: its gap was given up
                self.late += 1
                self._sample(now - self._last_skip + self._last_skip_wait)
                self._release(datagram, now)
                return
            # Far ahead or far behind: the peer's count started again (a new session
            # on the other end). Release what is held and follow the new count.
            self._give_up_all(now)
            if ((seq - self._next) & _SEQ_MASK) >= self._window:
                self.resyncs += 1
                self._next = seq
            self._push(seq, datagram, now)
            return
        if seq in self._held:  # the same number twice: a broken peer; keep both
            self._release(datagram, now)
            return
        if not self._held or ((seq - self._next) & _SEQ_MASK) < ((self._low - self._next) & _SEQ_MASK):
            self._low = seq
        if len(datagram) <= self.pass_bytes:
            self._release(datagram, now)
            self._held[seq] = (None, now)
        else:
            self._held[seq] = (datagram, now)
            self._held_bytes += len(datagram)
        while self._held and (
            len(self._held) > self.max_packets or self._held_bytes > self.max_bytes
        ):
            self._skip_gap(now)

    def _drain(self) -> None:
        # Release held datagrams from _next on, then find the new lowest held number.
        held = self._held
        nxt = self._next
        while nxt in held:
            datagram, stamp = held.pop(nxt)
            if datagram is not None:
                self._held_bytes -= len(datagram)
                self._release(datagram, stamp)
            nxt = (nxt + 1) & _SEQ_MASK
        self._next = nxt
        if held:
            self._low = min(held, key=lambda k: (k - nxt) & _SEQ_MASK)

    def _skip_gap(self, now: float) -> None:
        # Give up on the numbers before the lowest held one.
        self.skipped += (self._low - self._next) & _SEQ_MASK
        self._last_skip = now
        self._last_skip_wait = self.wait
        self._next = self._low
        self._drain()

    def _give_up_all(self, now: float) -> None:
        while self._held:
            self._skip_gap(now)

    # -- out -----------------------------------------------------------------------
    def expire(self, now: float) -> int:
        """Give up on every gap whose wait is over at ``now``; returns the numbers given
        up. What that releases is returned by the next ``take``."""
        before = self.skipped
        while self._held and now >= self._held[self._low][1] + self.wait:
            self._skip_gap(now)
        return self.skipped - before

    def flush(self, now: float) -> int:
        """Give up on every gap (the lanes are gone): release everything held."""
        before = self.skipped
        self._give_up_all(now)
        return self.skipped - before

    def take(self) -> tuple[list, int, float]:
        """Return and forget the datagrams released so far, in order:
        ``(datagrams, their bytes, arrival time of the earliest of them)``."""
        out, nbytes, stamp = self._out, self._out_bytes, self._out_stamp
        if not out:
            return out, 0, 0.0
        self._out = []
        self._out_bytes = 0
        self._out_stamp = 0.0
        return out, nbytes, stamp


class LanePicker:
    """Chooses the lane for each datagram (SPEC "Lane picking": whole datagrams only).

    ``strategy`` "rr": the next ready lane after the one picked last, cyclically, so load
    spreads evenly. "hash": the ready lanes in id order, indexed by ``key % ready_count``,
    so one flow (see ``flow_key``) stays on one lane while the ready set is stable.
    Lanes start not ready.

    >>> p = LanePicker(3)
    >>> p.set_ready(0, True); p.set_ready(2, True)
    >>> [p.pick() for _ in range(4)]
    [0, 2, 0, 2]
    """

    __slots__ = ("_ready", "_ready_ids", "_last", "_hash")

    def __init__(self, n_lanes: int, strategy: str = "rr") -> None:
        if not 1 <= n_lanes <= 65536:
            raise ValueError(f"n_lanes {n_lanes!r} out of range 1..65536")
        if strategy not in ("rr", "hash"):
            raise ValueError(f"unknown lane strategy {strategy!r} (expected 'rr' or 'hash')")
        self._ready = [False] * n_lanes
        self._ready_ids: list[int] = []  # ready lane ids, ascending
        self._last = n_lanes - 1  # lane picked last; rr starts at lane 0
        self._hash = strategy == "hash"

    @property
    def n_lanes(self) -> int:
        """Number of lanes (ids 0 .. n_lanes-1)."""
        return len(self._ready)

    @property
    def strategy(self) -> str:
        """``"rr"`` or ``"hash"``."""
        return "hash" if self._hash else "rr"

    @property
    def ready_count(self) -> int:
        """Number of lanes that may be picked."""
        return len(self._ready_ids)

    def set_ready(self, lane_id: int, ready: bool) -> None:
        """Mark a lane ready (open, not paused) or not. ``IndexError`` for a bad id."""
        if not 0 <= lane_id < len(self._ready):
            raise IndexError(f"lane_id {lane_id!r} out of range 0..{len(self._ready) - 1}")
        ready = bool(ready)
        if self._ready[lane_id] != ready:
            self._ready[lane_id] = ready
            self._ready_ids = [i for i, r in enumerate(self._ready) if r]

    def is_ready(self, lane_id: int) -> bool:
        """Whether the lane may be picked. ``IndexError`` for a bad id."""
        if not 0 <= lane_id < len(self._ready):
            raise IndexError(f"lane_id {lane_id!r} out of range 0..{len(self._ready) - 1}")
        return self._ready[lane_id]

    def pick(self, key: int = 0) -> int:
        """Return the lane for the next datagram, or -1 when no lane is ready. ``key``
        (a signed 64-bit int, e.g. ``flow_key(datagram)``) is used by "hash" only."""
        if not _INT64_MIN <= key <= _INT64_MAX:
            raise OverflowError("key does not fit in a signed 64-bit int")
        ids = self._ready_ids
        if not ids:
            return -1
        if self._hash:
            return ids[key % len(ids)]
        ready = self._ready
        n = len(ready)
        lane = self._last
        while True:
            lane += 1
            if lane == n:
                lane = 0
            if ready[lane]:
                self._last = lane
                return lane


def _ip_flow_key(view: memoryview, n: int) -> int:
    """``flow_key`` of an IP packet (the caller checked the version and the fixed header's
    length)."""
    h = _FNV_OFFSET
    if view[0] >> 4 == 4:
        protocol = view[9]
        words: tuple[int, ...] = _IPV4_ADDRS(view, 12)
        ihl = (view[0] & 15) * 4
        if (
            protocol in _PORTED_PROTOCOLS
            and ihl >= 20
            and n >= ihl + 4
            and ((view[6] << 8) | view[7]) & 0x3FFF == 0
        ):
            words += _U32_BE(view, ihl)
    else:
        protocol = view[6]
        words = _IPV6_ADDRS(view, 8)
        if protocol in _PORTED_PROTOCOLS and n >= 44:
            words += _U32_BE(view, 40)
    h = ((h ^ protocol) * _FNV_PRIME) & 0xFFFFFFFF
    for w in words:
        h = ((h ^ w) * _FNV_PRIME) & 0xFFFFFFFF
    # MurmurHash3's finaliser: every bit of h reaches the low bits, which pick() reduces
    # modulo the ready-lane count (a product alone leaves the low bits to the low bits, so
    # flows differing only in an even source port would share a lane).
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def flow_key(datagram: Any) -> int:
    """Return a deterministic unsigned 32-bit key naming the flow of ``datagram``.

    WireGuard messages (type in the first byte) give their session index, read
    little-endian: transport data (4, at least 16 bytes) and cookie reply (3) the receiver
    index at bytes 4..8; handshake initiation (1) the sender index at 4..8; handshake
    response (2) the receiver index at 8..12.

    IP packets (TUN mode: version 4 and at least 20 bytes, or version 6 and at least 40)
    give a hash of their inner flow: the protocol (IPv6: the next header) and both
    addresses, plus both ports for TCP, UDP, SCTP and UDP-Lite (6, 17, 132, 136) when the
    packet holds them (and an IPv4 header length of at least 20). An IPv4 fragment (MF set
    or a non-zero offset) gives no ports, so all fragments of one packet share a key; an
    IPv6 packet with extension headers gives none either. Identification, checksum, TTL,
    flow label, length and payload do not change the key. The hash: FNV-1a over 32-bit
    big-endian words (the protocol, the addresses, the ports), then MurmurHash3's 32-bit
    finaliser.

    Anything else (or too short for its field) gives the 32-bit FNV-1a hash of its first
    16 bytes at most.
    """
    view = memoryview(datagram)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    n = view.nbytes
    if n:
        kind = view[0]
        if (kind == 4 and n >= 16) or ((kind == 1 or kind == 3) and n >= 8):
            return int.from_bytes(view[4:8], "little")
        if kind == 2 and n >= 12:
            return int.from_bytes(view[8:12], "little")
        if (kind >> 4 == 4 and n >= 20) or (kind >> 4 == 6 and n >= 40):
            return _ip_flow_key(view, n)
    h = _FNV_OFFSET
    for b in view[:16].tobytes():
        h = ((h ^ b) * _FNV_PRIME) & 0xFFFFFFFF
    return h


def recv_batch(sock: socket.socket, max_count: int, bufsize: int = 65535) -> list[tuple[bytes, Any]]:
    """Receive up to ``max_count`` datagrams without blocking; return
    ``[(data, address), ...]`` (``[]`` when none is waiting). Addresses are as
    ``socket.recvfrom`` returns them; a datagram longer than ``bufsize`` is truncated.
    Uses ``recvmmsg`` when ``HAVE_MMSG``, else a ``recvfrom`` loop.
    """
    out: list[tuple[bytes, Any]] = []
    recvfrom = sock.recvfrom
    for _ in range(max_count):
        try:
            out.append(recvfrom(bufsize, _DONTWAIT))
        except (BlockingIOError, InterruptedError):
            break
        except OSError:
            if out:
                break
            raise
    return out


def recv_batch_with_drops(
    sock: socket.socket, max_count: int, bufsize: int = 65535
) -> tuple[list[tuple[bytes, Any]], int]:
    """``recv_batch``, and the kernel's count of datagrams dropped at ``sock``: return
    ``(datagrams, drops)``.

    ``drops`` is the socket's cumulative drop counter (u32, wrapping) as it stood when the
    last datagram that carried it was queued, or -1 when none did. The kernel attaches it
    (``SO_RXQ_OVFL`` control message) only on a socket with that option set
    (``ut.sockdrops.enable_drop_counter``), only once the count is non-zero, and only where
    ``HAVE_RXQ_OVFL``. Reading it costs no system call: it rides on the datagrams. Drops
    therefore show with the next datagram queued after them.
    """
    if bufsize < 0:
        raise ValueError("negative buffersize in recvfrom")
    if not HAVE_RXQ_OVFL or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return recv_batch(sock, max_count, bufsize), -1
    out: list[tuple[bytes, Any]] = []
    drops = -1
    recvmsg = sock.recvmsg
    for _ in range(max_count):
        try:
            data, ancdata, _flags, addr = recvmsg(bufsize, _OVFL_SPACE, _DONTWAIT)
        except (BlockingIOError, InterruptedError):
            break
        except OSError:
            if out:
                break
            raise
        out.append((data, addr))
        for level, kind, value in ancdata:
            if level == socket.SOL_SOCKET and kind == _SO_RXQ_OVFL and len(value) >= 4:
                drops = _U32.unpack_from(value)[0]  # in order, not the largest: it wraps
    return out, drops


def _gso_runs(sizes: list[int]) -> list[int]:
    """How ``send_batch`` with ``gso`` groups datagrams of these sizes: each run's length.
    A run is datagrams of one size, its last possibly shorter, at most 64 datagrams and
    65000 bytes; a zero-length datagram is a run of its own."""
    runs = []
    i, n = 0, len(sizes)
    while i < n:
        j = i + 1
        seg = sizes[i]
        if seg > 0:
            total = seg
            while j < n and j - i < _GSO_MAX_SEGMENTS:
                ln = sizes[j]
                if ln == 0 or ln > seg or total + ln > _GSO_MAX_BYTES:
                    break
                total += ln
                j += 1
                if ln < seg:  # a shorter datagram can only end a run
                    break
        runs.append(j - i)
        i = j
    return runs


def send_batch(sock: socket.socket, datagrams: list, addr: Any = None, gso: bool = False) -> int:
    """Send ``datagrams`` in order without blocking; return how many were sent. Stops at
    the first that would block (EAGAIN). Another error is raised if nothing was sent yet,
    else the count so far is returned. ``addr`` None means the socket is connected.
    Uses ``sendmmsg`` when ``HAVE_MMSG``, else a ``send``/``sendto`` loop.

    With ``gso`` (where ``HAVE_GSO``), each run of datagrams of one size (its last may be
    shorter), up to 64 datagrams and 65000 bytes, goes out as one ``UDP_SEGMENT``
    message: the receiver still gets the same datagrams, and the sending kernel routes
    and filters once per run. A run is sent whole or not at all; an error for a run
    (``EIO``/``EINVAL`` where the route cannot segment) is raised like any other.
    """
    if not isinstance(datagrams, (list, tuple)):
        datagrams = list(datagrams)
    if gso and HAVE_GSO and sock.family in (socket.AF_INET, socket.AF_INET6):
        runs = _gso_runs([len(d) for d in datagrams])
    else:
        runs = [1] * len(datagrams)
    sent = 0
    for run in runs:
        try:
            if run > 1:
                part = datagrams[sent : sent + run]
                anc = [(_SOL_UDP, _UDP_SEGMENT, struct.pack("=H", len(part[0])))]
                if addr is None:
                    sock.sendmsg(part, anc, _DONTWAIT)
                else:
                    sock.sendmsg(part, anc, _DONTWAIT, addr)
            elif addr is None:
                sock.send(datagrams[sent], _DONTWAIT)
            else:
                sock.sendto(datagrams[sent], _DONTWAIT, addr)
        except (BlockingIOError, InterruptedError):
            break
        except OSError:
            if sent:
                break
            raise
        sent += run
    return sent


# -- TUN device I/O -------------------------------------------------------------------

#: Bytes ``tun_read_batch`` reads beyond ``mtu``: room for a packet up to that much
#: longer (less one) than the MTU it was told (an MTU raised under it); a read that fills
#: the buffer may be a longer packet cut short, and is dropped.
TUN_READ_HEADROOM = 256
_TUN_MAX_READ = 65536 + TUN_READ_HEADROOM


#: Bytes of the ``virtio_net_hdr`` before each packet of a device with offloads
#: (``tun_read_batch(..., vnet=1)`` keeps it, ``gso_split`` reads it).
VNET_HDR_LEN = 10
_VNET_MAX_READ = VNET_HDR_LEN + 65536 + TUN_READ_HEADROOM
_VNET_ZERO = bytes(VNET_HDR_LEN)
_VNET_NEEDS_CSUM = 1
_GSO_NONE, _GSO_TCPV4, _GSO_TCPV6, _GSO_UDP_L4, _GSO_ECN = 0, 1, 4, 5, 0x80
# A super-packet kept whole (vnet=1) must fit one numbered DATA frame with its header.
_VNET_KEEP_MAX = MAX_PAYLOAD - SEQ_LEN
_LITTLE = sys.byteorder == "little"


def _csum(data: Any, start: int = 0) -> int:
    """The Internet checksum (RFC 1071) of ``data`` with ``start`` (a sum of big-endian
    16-bit words) added: the 16-bit value to store."""
    if len(data) & 1:
        data = bytes(data) + b"\0"
    # A one's complement sum is the same in either byte order, swapped: sum the words
    # natively, fold, and swap back on a little-endian host.
    total = sum(memoryview(data).cast("H"))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    if _LITTLE:
        total = ((total & 0xFF) << 8) | (total >> 8)
    total += start
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _gso_split_into(frame: Any, out: list, header: bool) -> int:
    """``gso_split`` appending to ``out``: how many packets (0: a header it cannot follow)."""
    f = bytes(frame)
    p = f[VNET_HDR_LEN:]
    plen = len(p)
    if plen <= 0:
        return 0
    flags, gtype = f[0], f[1] & ~_GSO_ECN
    gso_size, l4, csum_off = struct.unpack_from("<HHH", f, 4)
    lead = _VNET_ZERO if header else b""
    if gtype == _GSO_NONE:
        if not flags & _VNET_NEEDS_CSUM:
            out.append(lead + p)
            return 1
        if l4 + csum_off + 2 > plen:
            return 0
        q = bytearray(p)
        # A computed 0 goes out as all ones, as the kernel's skb_checksum_help does (for
        # UDP, 0 means "no checksum": IPv6 receivers drop it)
        struct.pack_into("!H", q, l4 + csum_off, _csum(memoryview(q)[l4:]) or 0xFFFF)
        out.append(lead + bytes(q))
        return 1
    version = p[0] >> 4
    if gtype not in (_GSO_TCPV4, _GSO_TCPV6, _GSO_UDP_L4) or version not in (4, 6):
        return 0
    if (gtype == _GSO_TCPV4 and version != 4) or (gtype == _GSO_TCPV6 and version != 6):
        return 0
    ihl = (p[0] & 15) * 4
    if (version == 4 and (ihl < 20 or l4 < ihl)) or (version == 6 and l4 < 40):
        return 0
    if gtype == _GSO_UDP_L4:
        proto, l4_end, csum_off = 17, l4 + 8, 6
        if l4_end > plen:
            return 0
        seq0 = 0
    else:
        proto, csum_off = 6, 16
        if l4 + 20 > plen:
            return 0
        l4_end = l4 + (p[l4 + 12] >> 4) * 4
        if l4_end < l4 + 20 or l4_end > plen:
            return 0
        seq0 = int.from_bytes(p[l4 + 4 : l4 + 8], "big")
    ip_id = int.from_bytes(p[4:6], "big") if version == 4 else 0
    payload = plen - l4_end
    if gso_size == 0 or payload <= 0:
        return 0
    head = p[:l4_end]
    count = off = 0
    while off < payload:
        seg = min(gso_size, payload - off)
        size = l4_end + seg
        q = bytearray(head)
        if version == 4:
            struct.pack_into("!HH", q, 2, size, (ip_id + count) & 0xFFFF)
            q[10:12] = b"\0\0"
            struct.pack_into("!H", q, 10, _csum(memoryview(q)[:ihl]))
            addresses = q[12:20]
        else:
            struct.pack_into("!H", q, 4, size - 40)
            addresses = q[8:40]
        if proto == 6:
            struct.pack_into("!I", q, l4 + 4, (seq0 + off) & 0xFFFFFFFF)
            if off + seg < payload:
                q[l4 + 13] &= ~0x09  # FIN and PSH only on the last segment
            if off:
                q[l4 + 13] &= ~0x80  # CWR only on the first
        else:
            struct.pack_into("!H", q, l4 + 4, size - l4)
        q[l4 + csum_off : l4 + csum_off + 2] = b"\0\0"
        q += p[l4_end + off : l4_end + off + seg]
        pseudo = bytes(addresses) + struct.pack("!HH", proto, size - l4)
        field = _csum(bytes(pseudo) + bytes(q[l4:]))
        if proto == 17 and field == 0:
            field = 0xFFFF  # UDP: a computed 0 is sent as all ones (0 means "none")
        struct.pack_into("!H", q, l4 + csum_off, field)
        out.append(lead + bytes(q))
        count += 1
        off += seg
    return count


def gso_split(frame: Any, header: bool = False) -> list[bytes]:
    """The IP packets of ``frame``, a ``virtio_net_hdr`` (``VNET_HDR_LEN`` bytes,
    little-endian) and the packet behind it, as a device without offloads would have
    given them: a TCP (``GSO_TCPV4``/``GSO_TCPV6``) or UDP (``GSO_UDP_L4``) super-packet
    cut into segments of ``gso_size`` payload bytes, each with its own IP and transport
    headers (IPv4 total length, identification + 1 per segment and header checksum; IPv6
    payload length; TCP sequence number, FIN and PSH on the last segment only, CWR on the
    first only; UDP length) and a full transport checksum; a packet whose checksum is
    left to finish (``NEEDS_CSUM``) with it finished. A list of ``bytes``, each preceded
    by a zeroed header if ``header``; ``[]`` for a header this cannot follow (an unknown
    GSO type, offsets outside the packet).
    """
    out: list[bytes] = []
    _gso_split_into(frame, out, header)
    return out


def tun_read_batch(fd: int, max_packets: int, mtu: int, vnet: int = 0) -> list[bytes]:
    """Read up to ``max_packets`` packets from non-blocking TUN descriptor ``fd``
    (``IFF_NO_PI``: one read, one IP packet); return them as a list of ``bytes`` (``[]``
    when none is waiting).

    ``vnet``: 0 for a device without offloads; for one opened with ``IFF_VNET_HDR``
    (each read a ``virtio_net_hdr`` and a packet, maybe a GSO super-packet), 1 keeps the
    header in front of each packet (for a peer that takes them: ``FLAG_OFFLOAD``; a
    packet too long for one DATA frame with its header is split as ``gso_split(...,
    header=True)`` does), 2 gives plain IP packets (``gso_split``).

    Each read takes at most ``mtu + TUN_READ_HEADROOM`` bytes (with ``vnet``, the header
    and 64 KiB + ``TUN_READ_HEADROOM``; the compiled twin reads into one reused buffer
    and makes a ``bytes`` only for a packet it keeps). Stops, without raising, at EAGAIN,
    at end of file and at any other error (a device that went away: the caller closes
    it). Reads that yield nothing to carry still count against ``max_packets``: packets
    the kernel sends to the link itself (``ut.tunroute.link_local``: IPv6 neighbour
    discovery, MLD, IPv4 local multicast and broadcast), reads that fill the whole buffer
    (the kernel truncates a longer packet to it) and headers ``gso_split`` cannot follow
    are dropped here.
    """
    out: list[bytes] = []
    if max_packets <= 0:
        return out
    if mtu < 0:
        raise ValueError("mtu must not be negative")
    if vnet not in (0, 1, 2):
        raise ValueError("vnet must be 0, 1 or 2")
    lead = VNET_HDR_LEN if vnet else 0
    size = _VNET_MAX_READ if vnet else min(mtu + TUN_READ_HEADROOM, _TUN_MAX_READ)
    read = os.read
    for _ in range(max_packets):
        try:
            packet = read(fd, size)
        except OSError:
            break  # EAGAIN: drained; anything else: the device went away
        if not packet:
            break
        n = len(packet)
        if n >= size or n <= lead or link_local(packet[lead:] if lead else packet):
            continue  # maybe cut short (the kernel truncates to the buffer); link chatter
        if vnet == 0 or (vnet == 1 and n <= _VNET_KEEP_MAX):
            out.append(packet)
        elif vnet == 2 and packet[0] == 0 and packet[1] == _GSO_NONE:
            out.append(packet[VNET_HDR_LEN:])
        else:
            _gso_split_into(packet, out, vnet == 1)
    return out


def tun_write_batch(fd: int, packets: Any, vnet: bool = False) -> tuple[int, int, int]:
    """Write ``packets`` (bytes-like, one IP packet each) to TUN descriptor ``fd`` in
    order, one ``write`` each, until one fails; return ``(sent, sent_bytes, errno)``:
    how many were written (``packets[:sent]``), their bytes, and the error of the write
    that stopped the batch (``packets[sent]``), 0 when all were written.

    ``vnet``: the device takes a ``virtio_net_hdr`` before each packet. A packet that
    starts as an IP packet does (version 4 or 6 in its first byte's high half) goes behind
    a zeroed header (``writev``; ``sent_bytes`` counts the packet's bytes only); one that
    starts otherwise carries its own header (its first byte is the header's flags) and is
    written as it is.

    Never raises for a write error: EAGAIN (a full device queue), EINVAL or EMSGSIZE (a
    packet the kernel does not take) and the rest come back as the errno, for the caller
    to decide whether to skip that packet and go on. EINTR is retried.
    """
    sent = sent_bytes = 0
    write = os.write
    for packet in packets:
        try:
            if vnet and packet and packet[0] >> 4 in (4, 6):
                sent_bytes += os.writev(fd, (_VNET_ZERO, packet)) - VNET_HDR_LEN
            else:
                sent_bytes += write(fd, packet)
        except OSError as exc:
            return sent, sent_bytes, exc.errno or 0
        sent += 1
    return sent, sent_bytes, 0
