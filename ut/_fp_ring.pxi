# The drop-oldest ring queue (SPEC "Backpressure"). Included by _fastpath.pyx.
# A real ring: a C array of owned references plus a C array of stamps; a push costs one
# INCREF and two stores (the arrays grow x2 on demand, up to max_packets slots).

cdef enum:
    _RING_MIN_CAP = 16  # first allocation, in slots


cdef class QueueBudget:
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

    def __cinit__(self, Py_ssize_t max_bytes):
        if max_bytes < 1:
            raise ValueError(f"max_bytes {max_bytes!r} < 1")
        self._max_bytes = max_bytes
        self._nbytes = 0

    @property
    def max_bytes(self):
        """The budget, in payload bytes."""
        return self._max_bytes

    @property
    def nbytes(self):
        """Payload bytes held by all the queues sharing this budget."""
        return self._nbytes

    @property
    def over(self):
        """True when the queues hold more than ``max_bytes``."""
        return self._nbytes > self._max_bytes


cdef class RingQueue:
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

    def __cinit__(self, Py_ssize_t max_packets=4096, Py_ssize_t max_bytes=8388608,
                  QueueBudget budget=None):
        if max_packets < 1:
            raise ValueError(f"max_packets {max_packets!r} < 1")
        if max_bytes < 1:
            raise ValueError(f"max_bytes {max_bytes!r} < 1")
        self._max_packets = max_packets
        self._max_bytes = max_bytes
        self._items = NULL
        self._stamps = NULL
        self._cap = 0
        self._head = 0
        self._count = 0
        self._nbytes = 0
        self._dropped = 0
        self._dropped_bytes = 0
        self._budget = budget

    def __dealloc__(self):
        self._discard_all()
        PyMem_Free(self._items)
        PyMem_Free(self._stamps)

    cdef int _grow(self) except -1:
        # Re-lay the ring out from slot 0 in arrays twice as long (at most max_packets).
        cdef Py_ssize_t new_cap = self._cap * 2
        cdef Py_ssize_t i, j
        cdef PyObject** items
        cdef double* stamps
        if new_cap < _RING_MIN_CAP:
            new_cap = _RING_MIN_CAP
        if new_cap > self._max_packets:
            new_cap = self._max_packets
        items = <PyObject**>PyMem_Malloc(new_cap * sizeof(PyObject*))
        stamps = <double*>PyMem_Malloc(new_cap * sizeof(double))
        if items == NULL or stamps == NULL:
            PyMem_Free(items)
            PyMem_Free(stamps)
            raise MemoryError()
        memset(items, 0, new_cap * sizeof(PyObject*))
        j = self._head
        for i in range(self._count):
            items[i] = self._items[j]
            stamps[i] = self._stamps[j]
            j += 1
            if j == self._cap:
                j = 0
        PyMem_Free(self._items)
        PyMem_Free(self._stamps)
        self._items = items
        self._stamps = stamps
        self._cap = new_cap
        self._head = 0
        return 0

    cdef PyObject* _take_head(self) noexcept:
        # Unlink the oldest datagram and return its (now the caller's) reference.
        cdef PyObject* d = self._items[self._head]
        cdef Py_ssize_t n = PyBytes_GET_SIZE(<object>d)
        self._items[self._head] = NULL
        self._head += 1
        if self._head == self._cap:
            self._head = 0
        self._count -= 1
        self._nbytes -= n
        if self._budget is not None:
            self._budget._nbytes -= n
        return d

    cdef void _discard_all(self) noexcept:
        cdef PyObject* d
        while self._count:
            d = self._take_head()
            Py_XDECREF(d)
        self._head = 0

    cdef Py_ssize_t push_bytes(self, bytes datagram, double stamp) except -1:
        cdef Py_ssize_t n = PyBytes_GET_SIZE(datagram)
        cdef Py_ssize_t drops = 0, tail
        cdef PyObject* old
        if n > self._max_bytes:
            self._dropped += 1
            self._dropped_bytes += n
            return 1
        while self._count >= self._max_packets or self._nbytes + n > self._max_bytes:
            old = self._take_head()
            self._dropped_bytes += PyBytes_GET_SIZE(<object>old)
            Py_DECREF(<object>old)
            drops += 1
        self._dropped += drops
        if self._count == self._cap:
            self._grow()
        tail = self._head + self._count
        if tail >= self._cap:
            tail -= self._cap
        Py_INCREF(datagram)
        self._items[tail] = <PyObject*>datagram
        self._stamps[tail] = stamp
        self._count += 1
        self._nbytes += n
        if self._budget is not None:
            self._budget._nbytes += n
        return drops

    cdef bytes pop_unchecked(self):
        cdef PyObject* d = self._take_head()
        cdef bytes out = <bytes>d
        Py_DECREF(out)  # the ring's reference; `out` holds its own
        return out

    @property
    def max_packets(self):
        """Most datagrams held at once."""
        return self._max_packets

    @property
    def max_bytes(self):
        """Most payload bytes held at once."""
        return self._max_bytes

    def push(self, datagram, double stamp=0.0):
        """Append ``datagram`` (bytes-like; non-``bytes`` is copied); return how many
        datagrams were dropped, oldest first, to keep within both limits. A datagram longer
        than ``max_bytes`` on its own is refused: it is not stored and counts as 1 dropped.
        Every drop adds to ``dropped`` and ``dropped_bytes``.
        """
        if type(datagram) is not bytes:
            datagram = bytes(memoryview(datagram))
        return self.push_bytes(<bytes>datagram, stamp)

    def pop(self):
        """Remove and return the oldest datagram; ``IndexError`` when empty."""
        if self._count == 0:
            raise IndexError("pop from an empty RingQueue")
        return self.pop_unchecked()

    def pop_batch(self, Py_ssize_t max_count, Py_ssize_t max_bytes=1 << 30):
        """Remove and return up to ``max_count`` datagrams, oldest first, totalling at most
        ``max_bytes`` -- except that the first is always taken when the queue is not empty
        and ``max_count`` >= 1, however long it is.
        """
        cdef list out = []
        cdef Py_ssize_t total = 0, taken = 0, n
        while self._count and taken < max_count:
            n = PyBytes_GET_SIZE(<object>self._items[self._head])
            if taken and total + n > max_bytes:
                break
            out.append(self.pop_unchecked())
            total += n
            taken += 1
        return out

    def clear(self):
        """Discard everything queued; return how many datagrams that was. These are not
        added to ``dropped`` (the caller counts them under its own reason)."""
        cdef Py_ssize_t n = self._count
        self._discard_all()
        return n

    def drop_stale(self, double before):
        """Remove the datagrams at the head whose stamp is older than ``before`` (stamps
        below it); return how many. Stops at the first younger one: a queue's stamps are
        in push order, so a caller that stamps with one clock drops exactly what is older.
        Costs one comparison when nothing is stale. These are not added to ``dropped``
        (the caller counts them under its own reason, ``stale``)."""
        cdef Py_ssize_t n = 0
        cdef PyObject* d
        while self._count and self._stamps[self._head] < before:
            d = self._take_head()
            Py_DECREF(<object>d)
            n += 1
        return n

    def shrink_to(self, Py_ssize_t max_nbytes):
        """Drop the oldest datagrams until at most ``max_nbytes`` payload bytes are left;
        return how many. The budget's shedding (``ut.budget``): not added to ``dropped``
        (the caller counts them under its own reason, ``budget``)."""
        cdef Py_ssize_t n = 0
        cdef PyObject* d
        while self._count and self._nbytes > max_nbytes:
            d = self._take_head()
            Py_DECREF(<object>d)
            n += 1
        return n

    @property
    def budget(self):
        """The ``QueueBudget`` this queue counts towards, or None."""
        return self._budget

    def __len__(self):
        return self._count

    @property
    def nbytes(self):
        """Payload bytes queued."""
        return self._nbytes

    @property
    def dropped(self):
        """Datagrams dropped (oldest, or refused as oversize) since creation."""
        return self._dropped

    @property
    def dropped_bytes(self):
        """Payload bytes of the datagrams counted in ``dropped``."""
        return self._dropped_bytes

    @property
    def head_stamp(self):
        """Stamp of the oldest queued datagram; 0.0 when empty."""
        if self._count == 0:
            return 0.0
        return self._stamps[self._head]
