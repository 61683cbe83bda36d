# Resequencing of numbered datagrams (issue 14). Included by _fastpath.pyx.
# Same algorithm, words and numbers as ut/_purepy.py's Resequencer (read its docstring);
# here the per-frame loop, the sequence arithmetic and the slicing run in C. Held
# datagrams live in a dict keyed by number: a session holds few of them at a time, and
# a dict costs nothing while nothing is held (thousands of sessions stay cheap).

cdef class Resequencer:
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

    cdef readonly Py_ssize_t max_packets
    cdef readonly Py_ssize_t max_bytes
    cdef readonly double max_wait
    cdef readonly double min_wait
    cdef readonly Py_ssize_t pass_bytes
    cdef uint32_t _window
    cdef dict _held          # seq -> (datagram, arrival)
    cdef Py_ssize_t _held_bytes
    cdef uint32_t _next
    cdef uint32_t _low
    cdef list _out
    cdef Py_ssize_t _out_bytes
    cdef double _out_stamp
    cdef double _estimate
    cdef double _rtt_hint
    cdef double _last_skip
    cdef double _last_skip_wait
    cdef readonly unsigned long long skipped
    cdef readonly unsigned long long late
    cdef readonly unsigned long long resyncs

    def __cinit__(self, Py_ssize_t max_packets=4096, Py_ssize_t max_bytes=8388608,
                  double max_wait=0.2, double min_wait=0.001, Py_ssize_t pass_bytes=0):
        if max_packets < 1 or max_bytes < 1:
            raise ValueError("max_packets and max_bytes must be at least 1")
        if not (0.0 <= min_wait <= max_wait):
            raise ValueError("need 0 <= min_wait <= max_wait")
        self.max_packets = max_packets
        self.max_bytes = max_bytes
        self.max_wait = max_wait
        self.min_wait = min_wait
        self.pass_bytes = pass_bytes
        self._window = <uint32_t>(2 * max_packets) if max_packets < 0x40000000 else 0x80000000u
        self._held = {}
        self._out = []

    @property
    def held(self):
        """Datagrams waiting for a gap before them to fill."""
        return len(self._held)

    @property
    def held_bytes(self):
        """Bytes of the datagrams held."""
        return self._held_bytes

    cdef inline double _wait(self) noexcept:
        cdef double w = self._estimate * 1.5
        if w < self._rtt_hint:
            w = self._rtt_hint
        if w < self.min_wait:
            w = self.min_wait
        return w if w < self.max_wait else self.max_wait

    @property
    def wait(self):
        """How long a gap is waited for now (seconds)."""
        return self._wait()

    cdef inline double _low_stamp(self):
        return <double>(<tuple>self._held[self._low])[1]

    @property
    def deadline(self):
        """When ``expire`` has work (``inf`` while nothing is held)."""
        if not self._held:
            return float("inf")
        return self._low_stamp() + self._wait()

    @property
    def next_seq(self):
        """The number released next."""
        return self._next

    def set_rtt_hint(self, double seconds):
        """How long a lane may take to repair a loss, as the owner measures it (e.g. the
        slowest lane's retransmission timeout plus its round trip): a floor for ``wait``."""
        self._rtt_hint = seconds if seconds > 0.0 else 0.0

    def feed(self, list frames, double now):
        """Take a ``Deframer``'s frames, as read from one lane at time ``now``.

        DATA frames are consumed: numbered ones (``FLAG_SEQ``) go through the reordering,
        plain ones are released at once. Returns ``(others, data_frames, data_bytes)``:
        the non-DATA frames in their order, and how many DATA frames and payload bytes
        (sequence numbers included) were consumed. Raises ``FrameError("bad_seq")`` for a
        numbered frame too short to hold its number; the frames before it are consumed.
        """
        cdef list others = []
        cdef Py_ssize_t n = 0, nbytes = 0, size
        cdef object frame, payload
        cdef int ftype, flags
        cdef const uint8_t* p
        for frame in frames:
            ftype = (<tuple>frame)[0]
            if ftype != UT_TYPE_DATA:
                others.append(frame)
                continue
            flags = (<tuple>frame)[1]
            payload = (<tuple>frame)[2]
            size = PyBytes_GET_SIZE(payload)
            if flags & _FLAG_SEQ:
                if size < _SEQ_LEN:
                    raise FrameError("bad_seq", f"numbered DATA frame of {size} bytes")
                n += 1
                nbytes += size
                p = <const uint8_t*>PyBytes_AS_STRING(payload)
                self._push(ut_load_be32(p),
                           PyBytes_FromStringAndSize(<const char*>p + _SEQ_LEN, size - _SEQ_LEN),
                           now)
            else:
                n += 1
                nbytes += size
                self._release(payload, now)
        return others, n, nbytes

    cdef inline void _release(self, object datagram, double stamp):
        if not self._out:
            self._out_stamp = stamp
        elif stamp < self._out_stamp:
            self._out_stamp = stamp
        self._out.append(datagram)
        self._out_bytes += PyBytes_GET_SIZE(datagram)

    cdef inline void _sample(self, double seconds) noexcept:
        if seconds > self._estimate:
            self._estimate = seconds
        else:
            self._estimate += (seconds - self._estimate) * 0.00390625

    cdef int _push(self, uint32_t seq, bytes datagram, double now) except -1:
        cdef uint32_t off = seq - self._next
        if off == 0:
            if self._held:
                self._sample(now - self._low_stamp())
            self._release(datagram, now)
            self._next = seq + 1
            if self._held:
                self._drain()
            return 0
        if off >= self._window:
            if off > 0xFFFFFFFFu - self._window:  # just behind: its gap was given up
                self.late += 1
                self._sample(now - self._last_skip + self._last_skip_wait)
                self._release(datagram, now)
                return 0
            self._give_up_all(now)
            if <uint32_t>(seq - self._next) >= self._window:
                self.resyncs += 1
                self._next = seq
            return self._push(seq, datagram, now)
        if seq in self._held:  # the same number twice: a broken peer; keep both
            self._release(datagram, now)
            return 0
        if not self._held or off < <uint32_t>(self._low - self._next):
            self._low = seq
        if PyBytes_GET_SIZE(datagram) <= self.pass_bytes:
            self._release(datagram, now)
            self._held[seq] = (None, now)
        else:
            self._held[seq] = (datagram, now)
            self._held_bytes += PyBytes_GET_SIZE(datagram)
        while self._held and (len(self._held) > self.max_packets
                              or self._held_bytes > self.max_bytes):
            self._skip_gap(now)
        return 0

    cdef int _drain(self) except -1:
        cdef dict held = self._held
        cdef uint32_t nxt = self._next
        cdef uint32_t best = 0, d, key
        cdef tuple item
        cdef object k
        while True:
            item = held.pop(nxt, None)
            if item is None:
                break
            if item[0] is not None:
                self._held_bytes -= PyBytes_GET_SIZE(item[0])
                self._release(item[0], <double>item[1])
            nxt += 1
        self._next = nxt
        if held:
            best = 0xFFFFFFFFu
            for k in held:
                key = <uint32_t>k
                d = key - nxt
                if d <= best:
                    best = d
                    self._low = key
        return 0

    cdef int _skip_gap(self, double now) except -1:
        self.skipped += <uint32_t>(self._low - self._next)
        self._last_skip = now
        self._last_skip_wait = self._wait()
        self._next = self._low
        return self._drain()

    cdef int _give_up_all(self, double now) except -1:
        while self._held:
            self._skip_gap(now)
        return 0

    def expire(self, double now):
        """Give up on every gap whose wait is over at ``now``; returns the numbers given
        up. What that releases is returned by the next ``take``."""
        cdef unsigned long long before = self.skipped
        while self._held and now >= self._low_stamp() + self._wait():
            self._skip_gap(now)
        return self.skipped - before

    def flush(self, double now):
        """Give up on every gap (the lanes are gone): release everything held."""
        cdef unsigned long long before = self.skipped
        self._give_up_all(now)
        return self.skipped - before

    def take(self):
        """Return and forget the datagrams released so far, in order:
        ``(datagrams, their bytes, arrival time of the earliest of them)``."""
        cdef list out = self._out
        cdef Py_ssize_t nbytes = self._out_bytes
        cdef double stamp = self._out_stamp
        if not out:
            return out, 0, 0.0
        self._out = []
        self._out_bytes = 0
        self._out_stamp = 0.0
        return out, nbytes, stamp
