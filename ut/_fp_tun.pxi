# TUN device I/O: tun_read_batch, tun_write_batch, TUN_READ_HEADROOM. Included by
# _fastpath.pyx.
#
# A Linux TUN device (IFF_TUN | IFF_NO_PI) has no recvmmsg: one read() is one IP packet,
# one write() one IP packet. What batching buys here is the loop itself in C: one reused
# receive buffer instead of a 64 KiB bytes object per read, no exception per EAGAIN, the
# link-local filter (ut.tunroute.link_local) on the buffer before any object exists, and
# one call per readiness callback / per send batch. Plain read()/write() exist on every
# platform, so this builds on macOS too (where ut.tun_darwin's utun keeps its own path:
# its packets carry a 4-byte header).

from cpython.bytes cimport PyBytes_CheckExact
from posix.unistd cimport read as _c_read, write as _c_write

#: Bytes ``tun_read_batch`` reads beyond ``mtu``: room for a packet up to that much
#: longer (less one) than the MTU it was told (an MTU raised under it); a read that fills
#: the buffer may be a longer packet cut short, and is dropped.
TUN_READ_HEADROOM = 256

cdef enum:
    _TUN_HEADROOM = 256
    _TUN_MAX_READ = 65536 + _TUN_HEADROOM

# The receive buffer shared by tun_read_batch calls (the GIL is held throughout). A call
# that re-enters while it is in use (a signal handler run on EINTR) gets a private one.
cdef char* _tun_buf = NULL
cdef Py_ssize_t _tun_buf_len = 0
cdef bint _tun_buf_busy = False


cdef inline bint _tun_link_local(const unsigned char* p, Py_ssize_t n) noexcept nogil:
    # ut.tunroute.link_local on a buffer: IPv6 from a link-local or unspecified source
    # or to a link-scope multicast group; IPv4 to 224.0.0.0/24 or 255.255.255.255.
    cdef Py_ssize_t i
    cdef int version
    if n <= 0:
        return False
    version = p[0] >> 4
    if version == 6 and n >= 40:
        if p[8] == 0xFE and (p[9] & 0xC0) == 0x80:
            return True
        if p[24] == 0xFF and (p[25] & 0x0F) <= 2:
            return True
        for i in range(8, 24):
            if p[i] != 0:
                return False
        return True
    if version == 4 and n >= 20:
        if p[16] == 0xE0 and p[17] == 0 and p[18] == 0:
            return True
        return p[16] == 0xFF and p[17] == 0xFF and p[18] == 0xFF and p[19] == 0xFF
    return False


def tun_read_batch(int fd, Py_ssize_t max_packets, Py_ssize_t mtu):
    """Read up to ``max_packets`` packets from non-blocking TUN descriptor ``fd``
    (``IFF_NO_PI``: one read, one IP packet); return them as a list of ``bytes`` (``[]``
    when none is waiting).

    Each read takes at most ``mtu + TUN_READ_HEADROOM`` bytes (the compiled twin reads
    into one reused buffer and makes a ``bytes`` only for a packet it keeps). Stops,
    without raising, at EAGAIN, at end of file and at any other error (a device that went
    away: the caller closes it). Reads that yield nothing to carry still count against
    ``max_packets``: packets the kernel sends to the link itself (``ut.tunroute.link_local``:
    IPv6 neighbour discovery, MLD, IPv4 local multicast and broadcast) and reads that
    fill the whole buffer (the kernel truncates a longer packet to it) are dropped here.
    """
    global _tun_buf, _tun_buf_len, _tun_buf_busy
    cdef Py_ssize_t size, i, n
    cdef char* buf
    cdef char* grown
    cdef bint private = False
    cdef list out = []
    cdef int err
    if max_packets <= 0:
        return out
    if mtu < 0:
        raise ValueError("mtu must not be negative")
    size = mtu + _TUN_HEADROOM
    if size > _TUN_MAX_READ:
        size = _TUN_MAX_READ
    if _tun_buf_busy:
        buf = <char*>PyMem_Malloc(size)
        if buf == NULL:
            raise MemoryError()
        private = True
    else:
        if _tun_buf_len < size:
            grown = <char*>PyMem_Realloc(_tun_buf, size)
            if grown == NULL:
                raise MemoryError()
            _tun_buf, _tun_buf_len = grown, size
        buf = _tun_buf
        _tun_buf_busy = True
    try:
        i = 0
        while i < max_packets:
            n = _c_read(fd, buf, size)
            if n < 0:
                err = errno
                if err == EINTR:
                    PyErr_CheckSignals()  # a handler's exception propagates, as os.read's
                    continue
                break  # EAGAIN: drained; anything else: the device went away
            if n == 0:
                break
            i += 1
            if n >= size:
                continue  # maybe cut short: the kernel truncates to the buffer
            if _tun_link_local(<const unsigned char*>buf, n):
                continue
            out.append(PyBytes_FromStringAndSize(buf, n))
    finally:
        if private:
            PyMem_Free(buf)
        else:
            _tun_buf_busy = False
    return out


def tun_write_batch(int fd, packets):
    """Write ``packets`` (bytes-like, one IP packet each) to TUN descriptor ``fd`` in
    order, one ``write`` each, until one fails; return ``(sent, sent_bytes, errno)``:
    how many were written (``packets[:sent]``), their bytes, and the error of the write
    that stopped the batch (``packets[sent]``), 0 when all were written.

    Never raises for a write error: EAGAIN (a full device queue), EINVAL or EMSGSIZE (a
    packet the kernel does not take) and the rest come back as the errno, for the caller
    to decide whether to skip that packet and go on. EINTR is retried.
    """
    cdef Py_ssize_t sent = 0
    cdef Py_ssize_t sent_bytes = 0
    cdef Py_ssize_t n
    cdef Py_buffer view
    cdef int err = 0
    cdef object packet
    for packet in packets:
        if PyBytes_CheckExact(packet):
            while True:
                n = _c_write(fd, PyBytes_AS_STRING(packet), PyBytes_GET_SIZE(packet))
                if n >= 0:
                    break
                err = errno
                if err != EINTR:
                    break
                err = 0
                PyErr_CheckSignals()
        else:
            PyObject_GetBuffer(packet, &view, PyBUF_SIMPLE)
            try:
                while True:
                    n = _c_write(fd, view.buf, view.len)
                    if n >= 0:
                        break
                    err = errno
                    if err != EINTR:
                        break
                    err = 0
                    PyErr_CheckSignals()
            finally:
                PyBuffer_Release(&view)
        if err:
            break
        sent += 1
        sent_bytes += n
    return sent, sent_bytes, err
