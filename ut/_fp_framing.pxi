# PDU v1 framing: encode_frame, encode_data, Deframer. Included by _fastpath.pyx.
# Docstrings are copied verbatim from ut/_purepy.py (a test checks they match).


cdef inline int _check_type(int ftype) except -1:
    if ftype != UT_TYPE_DATA and ftype != UT_TYPE_CTRL:
        raise ValueError(f"unknown frame type {ftype!r}")
    return 0


cdef inline int _check_len(Py_ssize_t n) except -1:
    if n > UT_MAX_PAYLOAD:
        raise ValueError(f"payload of {n} bytes > MAX_PAYLOAD ({UT_MAX_PAYLOAD})")
    return 0


def encode_frame(int ftype, payload, int flags=0):
    """Return one PDU v1 frame: the 9-byte header followed by ``payload``.

    ``ftype`` is ``TYPE_DATA`` or ``TYPE_CTRL``; ``payload`` is any bytes-like object of at
    most ``MAX_PAYLOAD`` bytes; ``flags`` is 0..255. Raises ``ValueError`` otherwise.

    >>> encode_frame(TYPE_DATA, b"hello").hex()
    '55540101000000000568656c6c6f'
    """
    cdef Py_buffer view
    cdef bytes frame
    cdef uint8_t* out
    _check_type(ftype)
    if flags < 0 or flags > 0xFF:
        raise ValueError(f"flags {flags!r} out of range 0..255")
    PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
    try:
        _check_len(view.len)
        frame = PyBytes_FromStringAndSize(NULL, UT_HEADER_LEN + view.len)
        out = <uint8_t*>PyBytes_AS_STRING(frame)
        ut_write_header(out, <uint8_t>ftype, <uint8_t>flags, <uint32_t>view.len)
        memcpy(out + UT_HEADER_LEN, view.buf, view.len)
        return frame
    finally:
        PyBuffer_Release(&view)


cdef inline Py_ssize_t _pad_total(Py_ssize_t pad) except -1:
    # Bytes of the PAD frame that ``pad`` asks for: none for pad < 0.
    if pad < 0:
        return 0
    if pad >= UT_MAX_PAYLOAD:
        raise ValueError(f"pad {pad!r} out of range 0..{UT_MAX_PAYLOAD - 1}")
    return UT_HEADER_LEN + 1 + pad


cdef inline void _write_pad(uint8_t* out, Py_ssize_t pad) noexcept:
    ut_write_header(out, UT_TYPE_CTRL, 0, <uint32_t>(pad + 1))
    out[UT_HEADER_LEN] = _KIND_PAD
    memset(out + UT_HEADER_LEN + 1, 0, pad)


def pad_frame(Py_ssize_t pad):
    """Return one PAD control frame: a CTRL frame whose payload is ``KIND_PAD`` and ``pad``
    zero bytes (``pad`` 0 .. ``MAX_PAYLOAD - 1``, else ``ValueError``). Receivers discard it.

    >>> pad_frame(2).hex()
    '555401100000000003040000'
    """
    cdef bytes frame
    if pad < 0:
        raise ValueError(f"pad {pad!r} out of range 0..{UT_MAX_PAYLOAD - 1}")
    frame = PyBytes_FromStringAndSize(NULL, _pad_total(pad))
    _write_pad(<uint8_t*>PyBytes_AS_STRING(frame), pad)
    return frame


def encode_data(datagrams, Py_ssize_t pad=-1):
    """Return every datagram of ``datagrams`` as consecutive DATA frames in one ``bytes``.

    One datagram is one DATA frame (SPEC: a datagram is never split). Items are bytes-like,
    each at most ``MAX_PAYLOAD`` bytes, else ``ValueError`` and nothing is encoded.
    ``pad`` >= 0 appends one PAD control frame (``pad_frame(pad)``) after the datagrams.

    >>> encode_data([b"a", b""]).hex()
    '55540101000000000161555401010000000000'
    """
    cdef list items = datagrams if type(datagrams) is list else list(datagrams)
    cdef Py_ssize_t count = len(items)
    cdef Py_ssize_t i, n, total = 0, padding
    cdef bint all_bytes = True
    cdef object d
    cdef bytes frame
    cdef uint8_t* out
    cdef uint8_t* stop
    cdef Py_buffer view
    # Pass 1: sizes and limits, so the output is allocated once.
    for i in range(count):
        d = items[i]
        if type(d) is bytes:
            n = PyBytes_GET_SIZE(d)
        else:
            all_bytes = False
            n = memoryview(d).nbytes
        _check_len(n)
        total += UT_HEADER_LEN + n
    padding = _pad_total(pad)
    frame = PyBytes_FromStringAndSize(NULL, total + padding)
    out = <uint8_t*>PyBytes_AS_STRING(frame)
    stop = out + total
    # Pass 2: headers and payloads. A non-bytes item is re-measured: its size must not have
    # changed since pass 1 (the output has no slack, and must have no gap either).
    for i in range(count):
        d = items[i]
        if all_bytes or type(d) is bytes:
            n = PyBytes_GET_SIZE(d)
            ut_write_header(out, UT_TYPE_DATA, 0, <uint32_t>n)
            memcpy(out + UT_HEADER_LEN, PyBytes_AS_STRING(d), n)
        else:
            PyObject_GetBuffer(d, &view, PyBUF_SIMPLE)
            n = view.len
            if n > UT_MAX_PAYLOAD or n > stop - out - UT_HEADER_LEN:
                PyBuffer_Release(&view)
                raise ValueError("datagram changed size while being encoded")
            ut_write_header(out, UT_TYPE_DATA, 0, <uint32_t>n)
            memcpy(out + UT_HEADER_LEN, view.buf, n)
            PyBuffer_Release(&view)
        out += UT_HEADER_LEN + n
    if out != stop:
        raise ValueError("datagram changed size while being encoded")
    if padding:
        _write_pad(out, pad)
    return frame


def encode_data_seq(datagrams, seq, Py_ssize_t pad=-1):
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
    cdef list items = datagrams if type(datagrams) is list else list(datagrams)
    cdef Py_ssize_t count = len(items)
    cdef Py_ssize_t i, n, total = 0, padding
    cdef object d
    cdef bytes frame
    cdef uint8_t* out
    cdef uint8_t* stop
    cdef Py_buffer view
    cdef uint32_t s
    if not 0 <= seq <= 0xFFFFFFFF:
        raise ValueError(f"seq {seq!r} out of range 0..{0xFFFFFFFF}")
    s = <uint32_t>seq
    # Pass 1: sizes and limits, so the output is allocated once.
    for i in range(count):
        d = items[i]
        n = PyBytes_GET_SIZE(d) if type(d) is bytes else memoryview(d).nbytes
        _check_len(n)
        total += UT_HEADER_LEN + n + (_SEQ_LEN if n <= UT_MAX_PAYLOAD - _SEQ_LEN else 0)
    padding = _pad_total(pad)
    frame = PyBytes_FromStringAndSize(NULL, total + padding)
    out = <uint8_t*>PyBytes_AS_STRING(frame)
    stop = out + total
    for i in range(count):
        d = items[i]
        PyObject_GetBuffer(d, &view, PyBUF_SIMPLE)
        try:
            n = view.len
            if n > UT_MAX_PAYLOAD - _SEQ_LEN:
                if n > UT_MAX_PAYLOAD or n > stop - out - UT_HEADER_LEN:
                    raise ValueError("datagram changed size while being encoded")
                ut_write_header(out, UT_TYPE_DATA, 0, <uint32_t>n)
                out += UT_HEADER_LEN
            else:
                if n > stop - out - UT_HEADER_LEN - _SEQ_LEN:
                    raise ValueError("datagram changed size while being encoded")
                ut_write_header(out, UT_TYPE_DATA, _FLAG_SEQ, <uint32_t>(n + _SEQ_LEN))
                ut_store_be32(out + UT_HEADER_LEN, s)
                s += 1
                out += UT_HEADER_LEN + _SEQ_LEN
            memcpy(out, view.buf, n)
            out += n
        finally:
            PyBuffer_Release(&view)
    if out != stop:
        raise ValueError("datagram changed size while being encoded")
    if padding:
        _write_pad(out, pad)
    return frame, s


cdef object _header_error(const uint8_t* h, uint32_t max_payload):
    # The FrameError for a bad header; same checks, order and words as ut/_purepy.py.
    cdef uint32_t length = ut_load_be32(h + 5)
    if h[0] != 0x55 or h[1] != 0x54:
        return FrameError("bad_magic", f"expected b'UT', got {(<char*>h)[:2]!r}")
    if h[2] != UT_VERSION:
        return FrameError("bad_version", f"version {h[2]}, expected {UT_VERSION}")
    if h[3] != UT_TYPE_DATA and h[3] != UT_TYPE_CTRL:
        return FrameError("bad_type", f"type 0x{h[3]:02x}")
    if length > max_payload:
        return FrameError("too_long", f"length {length} > {max_payload}")
    return None


cdef class Deframer:
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

    def __cinit__(self, int max_payload=UT_MAX_PAYLOAD):
        if max_payload < 0 or max_payload > UT_MAX_PAYLOAD:
            raise ValueError(f"max_payload {max_payload!r} out of range 0..{UT_MAX_PAYLOAD}")
        self._max_payload = <uint32_t>max_payload
        self._limit = UT_HEADER_LEN + max_payload + UT_READ_CHUNK
        self._buf = bytearray()
        self._data = <uint8_t*>PyByteArray_AS_STRING(self._buf)
        self._view = None
        self._cap = 0
        self._start = 0
        self._end = 0
        self.error = None
        self.controls = 0

    @property
    def buffered(self):
        """Bytes held that are not yet part of a whole frame (0 after an error)."""
        return self._end - self._start

    cdef int _reserve(self, Py_ssize_t want) except -1:
        cdef Py_ssize_t pending = self._end - self._start
        cdef Py_ssize_t new_cap, grown
        cdef bytearray buf
        if pending == 0:
            self._start = self._end = 0
        if self._cap - self._end >= want:
            return 0
        if self._start > 0:
            memmove(self._data, self._data + self._start, pending)
            self._start = 0
            self._end = pending
            if self._cap - pending >= want:
                return 0
        grown = self._cap * 2
        if grown < UT_MIN_BUFFER:
            grown = UT_MIN_BUFFER
        if grown > self._limit:
            grown = self._limit
        new_cap = pending + want
        if new_cap < grown:
            new_cap = grown
        buf = PyByteArray_FromStringAndSize(NULL, new_cap)
        memcpy(PyByteArray_AS_STRING(buf), self._data, pending)
        self._buf = buf
        self._data = <uint8_t*>PyByteArray_AS_STRING(buf)
        self._cap = new_cap
        self._view = None
        return 0

    cdef Py_ssize_t _parse(self, const uint8_t* p, Py_ssize_t pos, Py_ssize_t end,
                           list out) except -1:
        cdef const uint8_t* h
        cdef Py_ssize_t stop
        cdef uint32_t max_payload = self._max_payload
        while end - pos >= UT_HEADER_LEN:
            h = p + pos
            if not ut_header_ok(h, max_payload):
                self.error = _header_error(h, max_payload)
                return pos
            stop = pos + UT_HEADER_LEN + ut_load_be32(h + 5)
            if stop > end:
                break
            self._emit(h, stop - pos - UT_HEADER_LEN, out)
            pos = stop
        return pos

    cdef int _emit(self, const uint8_t* h, Py_ssize_t payload_len, list out) except -1:
        if h[3] == UT_TYPE_CTRL:
            if payload_len > 0 and h[UT_HEADER_LEN] == _KIND_PAD:
                return 0
            self.controls += 1
        out.append((h[3], h[4], PyBytes_FromStringAndSize(
            <const char*>h + UT_HEADER_LEN, payload_len)))
        return 0

    cdef list feed_ptr(self, const uint8_t* p, Py_ssize_t n):
        cdef list out = []
        cdef Py_ssize_t pos = 0, take, total
        cdef uint8_t* h
        if self._end > self._start:
            # Finish the frame already started in _buf, then parse the rest in place.
            if self._end - self._start < UT_HEADER_LEN:
                take = UT_HEADER_LEN - (self._end - self._start)
                if take > n:
                    take = n
                self._reserve(take)
                memcpy(self._data + self._end, p, take)
                self._end += take
                pos = take
                if self._end - self._start < UT_HEADER_LEN:
                    return out
                h = self._data + self._start
                if not ut_header_ok(h, self._max_payload):
                    self.error = _header_error(h, self._max_payload)
                    self._start = self._end = 0
                    return out
            total = UT_HEADER_LEN + ut_load_be32(self._data + self._start + 5)
            take = total - (self._end - self._start)
            if take > n - pos:
                take = n - pos
            if take:
                self._reserve(take)
                memcpy(self._data + self._end, p + pos, take)
                self._end += take
                pos += take
            if self._end - self._start < total:
                return out
            self._emit(self._data + self._start, total - UT_HEADER_LEN, out)
            self._start = self._end = 0
        pos = self._parse(p, pos, n, out)
        if self.error is not None:
            self._start = self._end = 0
            return out
        take = n - pos
        if take:
            self._reserve(take)
            memcpy(self._data + self._end, p + pos, take)
            self._end += take
        return out

    def feed(self, data):
        """Add received bytes; return ``[(type, flags, payload), ...]`` for every whole frame
        now available (possibly none). Raises ``FrameError`` if the deframer already failed.
        """
        cdef Py_buffer view
        if self.error is not None:
            raise self.error
        self.controls = 0
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            return self.feed_ptr(<const uint8_t*>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)

    def get_buffer(self, Py_ssize_t sizehint=-1):
        """Return a writable ``memoryview`` (at least 1 byte) to receive into; then call
        ``buffer_updated(nbytes)``. A ``sizehint`` <= 0 means "as much as is convenient";
        the view is never longer than needed to make the buffer ``HEADER_LEN + max_payload
        + 64 KiB`` long. Only the latest view may be written to.
        """
        cdef Py_ssize_t want = UT_READ_CHUNK
        if 0 < sizehint < UT_READ_CHUNK:
            want = sizehint
        self._reserve(want)
        if self._view is None:
            self._view = memoryview(self._buf)
        return self._view[self._end:]

    def buffer_updated(self, Py_ssize_t nbytes):
        """Account for ``nbytes`` written into the view from ``get_buffer``; return the whole
        frames now available, as ``feed`` does. Raises ``FrameError`` if the deframer already
        failed, ``ValueError`` if ``nbytes`` does not fit the view.
        """
        cdef list out = []
        if self.error is not None:
            raise self.error
        if nbytes < 0 or nbytes > self._cap - self._end:
            raise ValueError(f"nbytes {nbytes!r} does not fit the buffer from get_buffer()")
        self._end += nbytes
        self.controls = 0
        self._start = self._parse(self._data, self._start, self._end, out)
        if self.error is not None or self._start == self._end:
            self._start = self._end = 0
        return out

    def eof(self):
        """The stream ended. Raises ``FrameError("truncated")`` if part of a frame is
        buffered, or the earlier error if the deframer already failed."""
        cdef Py_ssize_t held = self._end - self._start
        if self.error is not None:
            raise self.error
        if held:
            raise FrameError("truncated", f"{held} bytes of an unfinished frame at end of stream")
