# Lane picking (SPEC "Lane picking") and the flow key for the hash strategy.
# Included by _fastpath.pyx.


cdef class LanePicker:
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

    def __cinit__(self, int n_lanes, str strategy="rr"):
        if n_lanes < 1 or n_lanes > 65536:
            raise ValueError(f"n_lanes {n_lanes!r} out of range 1..65536")
        if strategy != "rr" and strategy != "hash":
            raise ValueError(f"unknown lane strategy {strategy!r} (expected 'rr' or 'hash')")
        self._ready = <uint8_t*>PyMem_Malloc(n_lanes * sizeof(uint8_t))
        self._ready_ids = <int*>PyMem_Malloc(n_lanes * sizeof(int))
        if self._ready == NULL or self._ready_ids == NULL:
            raise MemoryError()
        memset(self._ready, 0, n_lanes * sizeof(uint8_t))
        self._n = n_lanes
        self._ready_count = 0
        self._last = n_lanes - 1
        self._hash = strategy == "hash"

    def __dealloc__(self):
        PyMem_Free(self._ready)
        PyMem_Free(self._ready_ids)

    @property
    def n_lanes(self):
        """Number of lanes (ids 0 .. n_lanes-1)."""
        return self._n

    @property
    def strategy(self):
        """``"rr"`` or ``"hash"``."""
        return "hash" if self._hash else "rr"

    @property
    def ready_count(self):
        """Number of lanes that may be picked."""
        return self._ready_count

    cdef int _check_id(self, Py_ssize_t lane_id) except -1:
        if lane_id < 0 or lane_id >= self._n:
            raise IndexError(f"lane_id {lane_id!r} out of range 0..{self._n - 1}")
        return 0

    def set_ready(self, Py_ssize_t lane_id, ready):
        """Mark a lane ready (open, not paused) or not. ``IndexError`` for a bad id."""
        cdef uint8_t flag = 1 if ready else 0
        cdef int i, k = 0
        self._check_id(lane_id)
        if self._ready[lane_id] != flag:
            self._ready[lane_id] = flag
            for i in range(self._n):
                if self._ready[i]:
                    self._ready_ids[k] = i
                    k += 1
            self._ready_count = k

    def is_ready(self, Py_ssize_t lane_id):
        """Whether the lane may be picked. ``IndexError`` for a bad id."""
        self._check_id(lane_id)
        return self._ready[lane_id] != 0

    cdef int pick_c(self, int64_t key) noexcept:
        cdef int lane
        cdef int64_t idx
        if self._ready_count == 0:
            return -1
        if self._hash:
            idx = key % self._ready_count  # C remainder: negative for negative keys
            if idx < 0:
                idx += self._ready_count
            return self._ready_ids[idx]
        lane = self._last
        while True:
            lane += 1
            if lane == self._n:
                lane = 0
            if self._ready[lane]:
                self._last = lane
                return lane

    def pick(self, int64_t key=0):
        """Return the lane for the next datagram, or -1 when no lane is ready. ``key``
        (a signed 64-bit int, e.g. ``flow_key(datagram)``) is used by "hash" only."""
        return self.pick_c(key)


cdef enum:
    _FNV_OFFSET = 0x811C9DC5
    _FNV_PRIME = 0x01000193


cdef inline bint _has_ports(uint8_t protocol) noexcept nogil:
    # TCP, UDP, SCTP and UDP-Lite: the first 4 bytes of the header are the two ports.
    return protocol == 6 or protocol == 17 or protocol == 132 or protocol == 136


cdef inline uint32_t _mix_word(uint32_t h, uint32_t w) noexcept nogil:
    return (h ^ w) * <uint32_t>_FNV_PRIME


cdef inline uint32_t _fmix32(uint32_t h) noexcept nogil:
    # MurmurHash3's finaliser: every bit of h reaches the low bits, which pick() reduces
    # modulo the ready-lane count (a product alone leaves the low bits to the low bits, so
    # flows differing only in an even source port would share a lane).
    h ^= h >> 16
    h *= <uint32_t>0x85EBCA6B
    h ^= h >> 13
    h *= <uint32_t>0xC2B2AE35
    h ^= h >> 16
    return h


cdef uint32_t _ip_flow_key(const uint8_t* p, Py_ssize_t n) noexcept nogil:
    # The caller checked the version nibble and the fixed header's length (20 or 40 bytes).
    cdef uint32_t h = _FNV_OFFSET
    cdef Py_ssize_t ihl, i
    if p[0] >> 4 == 4:
        ihl = (p[0] & 15) * 4
        h = _mix_word(h, p[9])
        h = _mix_word(h, ut_load_be32(p + 12))
        h = _mix_word(h, ut_load_be32(p + 16))
        if (_has_ports(p[9]) and ihl >= 20 and n >= ihl + 4
                and ((<uint32_t>p[6] << 8) | p[7]) & 0x3FFF == 0):
            h = _mix_word(h, ut_load_be32(p + ihl))
    else:
        h = _mix_word(h, p[6])
        for i in range(8, 40, 4):
            h = _mix_word(h, ut_load_be32(p + i))
        if _has_ports(p[6]) and n >= 44:
            h = _mix_word(h, ut_load_be32(p + 40))
    return _fmix32(h)


def flow_key(datagram):
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
    cdef Py_buffer view
    cdef const uint8_t* p
    cdef Py_ssize_t n, i
    cdef uint32_t h = _FNV_OFFSET
    cdef uint8_t kind
    PyObject_GetBuffer(datagram, &view, PyBUF_SIMPLE)
    p = <const uint8_t*>view.buf
    n = view.len
    try:
        if n:
            kind = p[0]
            if (kind == 4 and n >= 16) or ((kind == 1 or kind == 3) and n >= 8):
                return ut_load_le32(p + 4)
            if kind == 2 and n >= 12:
                return ut_load_le32(p + 8)
            if (kind >> 4 == 4 and n >= 20) or (kind >> 4 == 6 and n >= 40):
                return _ip_flow_key(p, n)
        if n > 16:
            n = 16
        for i in range(n):
            h = (h ^ p[i]) * <uint32_t>_FNV_PRIME
        return h
    finally:
        PyBuffer_Release(&view)
