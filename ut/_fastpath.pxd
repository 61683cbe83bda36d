# cython: language_level=3
"""C-level declarations of the compiled fast path, for other Cython code.

``cimport ut._fastpath`` (or ``from ut._fastpath cimport Deframer, ut_load_be32``) gives
typed access to the classes below and the inline PDU helpers. Shipped in the wheel
(``pyproject.toml`` package-data), as asyncpg ships pgproto's ``.pxd`` files.

PDU v1 header (docs/protocol.md)::

    0      2     3      4       5              9
    | "UT" | Ver | Type | Flags | Len (u32, BE) | Payload (Len bytes) ...
"""

from libc.stdint cimport int64_t, uint8_t, uint32_t
from cpython.ref cimport PyObject


cdef enum:
    UT_HEADER_LEN = 9
    UT_VERSION = 1
    UT_TYPE_DATA = 0x01
    UT_TYPE_CTRL = 0x10
    UT_MAX_PAYLOAD = 65535
    UT_READ_CHUNK = 65536     # read window offered by Deframer.get_buffer without a size hint
    UT_MIN_BUFFER = 4096      # smallest Deframer buffer once one is needed


cdef inline uint32_t ut_load_be32(const uint8_t* p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline uint32_t ut_load_le32(const uint8_t* p) noexcept nogil:
    return (<uint32_t>p[3] << 24) | (<uint32_t>p[2] << 16) | (<uint32_t>p[1] << 8) | p[0]


cdef inline void ut_store_be32(uint8_t* p, uint32_t v) noexcept nogil:
    p[0] = <uint8_t>(v >> 24)
    p[1] = <uint8_t>(v >> 16)
    p[2] = <uint8_t>(v >> 8)
    p[3] = <uint8_t>v


cdef inline void ut_write_header(uint8_t* p, uint8_t ftype, uint8_t flags,
                                 uint32_t length) noexcept nogil:
    # Writes the 9 header bytes at p. The caller guarantees length <= UT_MAX_PAYLOAD.
    p[0] = 0x55  # 'U'
    p[1] = 0x54  # 'T'
    p[2] = UT_VERSION
    p[3] = ftype
    p[4] = flags
    ut_store_be32(p + 5, length)


cdef inline bint ut_header_ok(const uint8_t* p, uint32_t max_payload) noexcept nogil:
    # True when the 9 bytes at p are a valid header whose Len is at most max_payload.
    return (p[0] == 0x55 and p[1] == 0x54 and p[2] == UT_VERSION
            and (p[3] == UT_TYPE_DATA or p[3] == UT_TYPE_CTRL)
            and ut_load_be32(p + 5) <= max_payload)


cdef class Deframer:
    # Receive buffer. Never resized in place (a view from get_buffer may be alive): when it
    # must grow a new bytearray replaces it. Invariant: _cap <= _limit.
    cdef bytearray _buf
    # memoryview of _buf for get_buffer(); None until first needed and after a regrowth.
    cdef object _view
    # PyByteArray_AS_STRING(_buf), valid as long as _buf is (it is never resized).
    cdef uint8_t* _data
    # len(_buf).
    cdef Py_ssize_t _cap
    # Offset of the first byte not yet returned in a frame.
    cdef Py_ssize_t _start
    # One past the last byte received; _start <= _end <= _cap. Between calls
    # _end - _start < HEADER_LEN + _max_payload (at most one unfinished frame).
    cdef Py_ssize_t _end
    # Largest Len accepted; a bigger one is a "too_long" error. <= UT_MAX_PAYLOAD.
    cdef uint32_t _max_payload
    # Ceiling of _cap: HEADER_LEN + _max_payload + UT_READ_CHUNK.
    cdef Py_ssize_t _limit
    # None, or the FrameError that poisoned this deframer.
    cdef readonly object error
    # CTRL frames in the list the last call returned (PAD frames are dropped, not counted).
    cdef readonly Py_ssize_t controls

    # Make at least `want` bytes free after _end (compact, then grow). want <= _limit - held.
    cdef int _reserve(self, Py_ssize_t want) except -1
    # Append the whole frames of p[pos:end] to out (PAD frames dropped, CTRL frames counted
    # in controls); return the offset of the first byte not consumed. A bad header sets
    # self.error and returns that header's offset.
    cdef Py_ssize_t _parse(self, const uint8_t* p, Py_ssize_t pos, Py_ssize_t end,
                           list out) except -1
    # feed() on a C buffer: the C-level entry point for other Cython code.
    cdef list feed_ptr(self, const uint8_t* p, Py_ssize_t n)
    # Append the whole frame at h (header + payload) to out, or drop it if it is a PAD frame.
    cdef int _emit(self, const uint8_t* h, Py_ssize_t payload_len, list out) except -1


cdef class QueueBudget:
    # Payload bytes held by every RingQueue that shares this budget (issue 19).
    cdef Py_ssize_t _nbytes
    # The budget: a caller sheds queued datagrams once _nbytes is above it.
    cdef Py_ssize_t _max_bytes


cdef class RingQueue:
    # Ring of owned references to bytes objects; live slots are _head .. _head+_count-1
    # (mod _cap), all others NULL.
    cdef PyObject** _items
    # Stamp of each live slot, same indexes as _items.
    cdef double* _stamps
    # Allocated slots; grows x2 on demand up to _max_packets.
    cdef Py_ssize_t _cap
    # Slot of the oldest datagram.
    cdef Py_ssize_t _head
    # Datagrams queued; <= _max_packets.
    cdef Py_ssize_t _count
    # Limits: never more than _max_packets datagrams or _max_bytes payload bytes held.
    cdef Py_ssize_t _max_packets
    cdef Py_ssize_t _max_bytes
    # Payload bytes queued; <= _max_bytes.
    cdef Py_ssize_t _nbytes
    # Datagrams (and their bytes) dropped as oldest or refused as oversize, ever.
    cdef unsigned long long _dropped
    cdef unsigned long long _dropped_bytes
    # The process-wide budget this queue's bytes count towards, or None.
    cdef QueueBudget _budget

    cdef int _grow(self) except -1
    # Unlink the oldest datagram and hand its reference to the caller (_count > 0).
    cdef PyObject* _take_head(self) noexcept
    # Drop every queued reference (no counters change).
    cdef void _discard_all(self) noexcept
    # push() for a bytes object: the C-level entry point. Returns datagrams dropped.
    cdef Py_ssize_t push_bytes(self, bytes datagram, double stamp) except -1
    # pop() without the empty check: the caller guarantees _count > 0.
    cdef bytes pop_unchecked(self)


cdef class LanePicker:
    # One flag per lane: 1 when ready (open and not paused).
    cdef uint8_t* _ready
    # Ready lane ids in ascending order; the first _ready_count entries are valid.
    cdef int* _ready_ids
    # Number of lanes, 1..65536.
    cdef int _n
    cdef int _ready_count
    # Lane picked last by "rr" (starts at _n - 1 so the first pick is lane 0).
    cdef int _last
    # True for the "hash" strategy.
    cdef bint _hash

    # IndexError unless 0 <= lane_id < _n.
    cdef int _check_id(self, Py_ssize_t lane_id) except -1
    # pick() at C level: lane id or -1.
    cdef int pick_c(self, int64_t key) noexcept
