# TUN device I/O: tun_read_batch, tun_write_batch, gso_split, TUN_READ_HEADROOM,
# VNET_HDR_LEN. Included by _fastpath.pyx.
#
# A Linux TUN device (IFF_TUN | IFF_NO_PI) has no recvmmsg: one read() is one IP packet,
# one write() one IP packet. What batching buys here is the loop itself in C: one reused
# receive buffer instead of a 64 KiB bytes object per read, no exception per EAGAIN, the
# link-local filter (ut.tunroute.link_local) on the buffer before any object exists, and
# one call per readiness callback / per send batch. Plain read()/write() exist on every
# platform, so this builds on macOS too (where ut.tun_darwin's utun keeps its own path:
# its packets carry a 4-byte header).
#
# A device opened with IFF_VNET_HDR and offloads on (ut.tun, tun.offload) puts a 10-byte
# virtio_net_hdr before each packet and may hand over TCP/UDP "super-packets" of up to
# 64 KiB that the kernel has not cut to the MTU (GSO), with the transport checksum left
# to finish (NEEDS_CSUM). Between two such ends they travel as they are: one read, one
# datagram through the session, one write (the receiving kernel takes them as GRO'd).
# For a peer that cannot take them, gso_split does what the kernel would have done:
# segments of gso_size bytes with their own headers and full checksums.

from posix.uio cimport iovec, writev as _c_writev

from cpython.bytes cimport PyBytes_CheckExact
from posix.unistd cimport read as _c_read, write as _c_write

#: Bytes ``tun_read_batch`` reads beyond ``mtu``: room for a packet up to that much
#: longer (less one) than the MTU it was told (an MTU raised under it); a read that fills
#: the buffer may be a longer packet cut short, and is dropped.
TUN_READ_HEADROOM = 256

#: Bytes of the ``virtio_net_hdr`` before each packet of a device with offloads
#: (``tun_read_batch(..., vnet=1)`` keeps it, ``gso_split`` reads it).
VNET_HDR_LEN = 10

cdef enum:
    _TUN_HEADROOM = 256
    _TUN_MAX_READ = 65536 + _TUN_HEADROOM
    _VNET_LEN = 10
    _VNET_MAX_READ = _VNET_LEN + 65536 + _TUN_HEADROOM
    # virtio_net_hdr: flags, gso_type (virtio spec 5.1.6; linux/virtio_net.h)
    _VNET_NEEDS_CSUM = 1
    _GSO_NONE = 0
    _GSO_TCPV4 = 1
    _GSO_TCPV6 = 4
    _GSO_UDP_L4 = 5
    _GSO_ECN = 0x80
    # A super-packet kept whole (vnet=1) must fit one numbered DATA frame with its header.
    _VNET_KEEP_MAX = UT_MAX_PAYLOAD - _SEQ_LEN

cdef unsigned char _VNET_ZERO[10]
memset(_VNET_ZERO, 0, 10)

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


cdef inline uint64_t _csum_add(const unsigned char* p, Py_ssize_t n, uint64_t s) noexcept nogil:
    # The Internet checksum's sum (RFC 1071) of big-endian 16-bit words; an odd last byte
    # is the high half of a word.
    while n >= 2:
        s += (<uint64_t>p[0] << 8) | p[1]
        p += 2
        n -= 2
    if n:
        s += <uint64_t>p[0] << 8
    return s


cdef inline uint16_t _csum_fold(uint64_t s) noexcept nogil:
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return <uint16_t>(~s & 0xFFFF)


cdef inline unsigned int _le16(const unsigned char* p) noexcept nogil:
    return p[0] | (<unsigned int>p[1] << 8)


cdef inline void _put16(unsigned char* p, unsigned int v) noexcept nogil:
    p[0] = (v >> 8) & 0xFF
    p[1] = v & 0xFF


cdef Py_ssize_t _gso_split(const unsigned char* f, Py_ssize_t n, list out, bint header) except -1:
    # ``gso_split`` on a buffer: append the packets to ``out``; how many (0: malformed).
    cdef unsigned int flags, gtype, gso_size, l4, l4_end, csum_off, version, ihl, proto
    cdef const unsigned char* p = f + _VNET_LEN
    cdef Py_ssize_t plen = n - _VNET_LEN, payload, off, seg, size, count = 0
    cdef unsigned char* q
    cdef uint32_t seq0 = 0, seq
    cdef unsigned int ip_id = 0, field
    cdef uint64_t s
    cdef unsigned int lead = _VNET_LEN if header else 0
    cdef object packet
    if plen <= 0:
        return 0
    flags, gtype = f[0], f[1] & ~_GSO_ECN
    gso_size, l4, csum_off = _le16(f + 4), _le16(f + 6), _le16(f + 8)
    if gtype == _GSO_NONE:
        if flags & _VNET_NEEDS_CSUM and l4 + csum_off + 2 > <unsigned int>plen:
            return 0
        packet = PyBytes_FromStringAndSize(NULL, lead + plen)
        q = <unsigned char*>PyBytes_AS_STRING(packet)
        memset(q, 0, lead)
        q += lead
        memcpy(q, p, plen)
        if flags & _VNET_NEEDS_CSUM:  # the field holds the pseudo-header's sum: finish it
            field = _csum_fold(_csum_add(q + l4, plen - l4, 0))
            # A computed 0 goes out as all ones, as the kernel's skb_checksum_help does
            # (for UDP, 0 means "no checksum": IPv6 receivers drop it)
            _put16(q + l4 + csum_off, field if field else 0xFFFF)
        out.append(packet)
        return 1
    version = p[0] >> 4
    if gtype == _GSO_TCPV4 and version != 4 or gtype == _GSO_TCPV6 and version != 6:
        return 0
    if gtype == _GSO_UDP_L4 and version != 4 and version != 6:
        return 0
    if gtype != _GSO_TCPV4 and gtype != _GSO_TCPV6 and gtype != _GSO_UDP_L4:
        return 0
    if version == 4:
        ihl = (p[0] & 15) * 4
        if ihl < 20 or l4 < ihl:
            return 0
    elif l4 < 40:
        return 0
    if gtype == _GSO_UDP_L4:
        proto, l4_end, csum_off = 17, l4 + 8, 6
        if l4_end > <unsigned int>plen:
            return 0
    else:
        proto, csum_off = 6, 16
        if l4 + 20 > <unsigned int>plen:
            return 0
        l4_end = l4 + (p[l4 + 12] >> 4) * 4
        if l4_end < l4 + 20 or l4_end > <unsigned int>plen:
            return 0
        seq0 = ((<uint32_t>p[l4 + 4] << 24) | (<uint32_t>p[l4 + 5] << 16)
                | (<uint32_t>p[l4 + 6] << 8) | p[l4 + 7])
    if version == 4:
        ip_id = (p[4] << 8) | p[5]
    payload = plen - l4_end
    if gso_size == 0 or payload <= 0:
        return 0
    off = 0
    while off < payload:
        seg = gso_size if payload - off > gso_size else payload - off
        size = l4_end + seg
        packet = PyBytes_FromStringAndSize(NULL, lead + size)
        q = <unsigned char*>PyBytes_AS_STRING(packet)
        memset(q, 0, lead)
        q += lead
        memcpy(q, p, l4_end)
        memcpy(q + l4_end, p + l4_end + off, seg)
        if version == 4:
            _put16(q + 2, size)
            _put16(q + 4, (ip_id + count) & 0xFFFF)
            q[10] = q[11] = 0
            _put16(q + 10, _csum_fold(_csum_add(q, ihl, 0)))
            s = _csum_add(q + 12, 8, 0)
        else:
            _put16(q + 4, size - 40)
            s = _csum_add(q + 8, 32, 0)
        s += proto + (size - l4)
        if proto == 6:
            seq = seq0 + <uint32_t>off
            q[l4 + 4], q[l4 + 5] = (seq >> 24) & 0xFF, (seq >> 16) & 0xFF
            q[l4 + 6], q[l4 + 7] = (seq >> 8) & 0xFF, seq & 0xFF
            if off + seg < payload:
                q[l4 + 13] &= ~0x09  # FIN and PSH only on the last segment
            if off:
                q[l4 + 13] &= ~0x80  # CWR only on the first
        else:
            _put16(q + l4 + 4, size - l4)
        q[l4 + csum_off] = q[l4 + csum_off + 1] = 0
        field = _csum_fold(_csum_add(q + l4, size - l4, s))
        if proto == 17 and field == 0:
            field = 0xFFFF  # UDP: a computed 0 is sent as all ones (0 means "none")
        _put16(q + l4 + csum_off, field)
        out.append(packet)
        count += 1
        off += seg
    return count


def gso_split(frame, bint header=False):
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
    cdef Py_buffer view
    cdef list out = []
    PyObject_GetBuffer(frame, &view, PyBUF_SIMPLE)
    try:
        _gso_split(<const unsigned char*>view.buf, view.len, out, header)
    finally:
        PyBuffer_Release(&view)
    return out


def tun_read_batch(int fd, Py_ssize_t max_packets, Py_ssize_t mtu, int vnet=0):
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
    global _tun_buf, _tun_buf_len, _tun_buf_busy
    cdef Py_ssize_t size, i, n, lead
    cdef char* buf
    cdef char* grown
    cdef bint private = False
    cdef list out = []
    cdef int err
    cdef const unsigned char* h
    if max_packets <= 0:
        return out
    if mtu < 0:
        raise ValueError("mtu must not be negative")
    if vnet < 0 or vnet > 2:
        raise ValueError("vnet must be 0, 1 or 2")
    lead = _VNET_LEN if vnet else 0
    if vnet:
        size = _VNET_MAX_READ
    else:
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
    h = <const unsigned char*>buf
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
            if n >= size or n <= lead:
                continue  # maybe cut short: the kernel truncates to the buffer
            if _tun_link_local(h + lead, n - lead):
                continue
            if vnet == 0 or (vnet == 1 and n <= _VNET_KEEP_MAX):
                out.append(PyBytes_FromStringAndSize(buf, n))
            elif vnet == 2 and h[0] == 0 and h[1] == _GSO_NONE:
                out.append(PyBytes_FromStringAndSize(buf + _VNET_LEN, n - _VNET_LEN))
            else:
                _gso_split(h, n, out, vnet == 1)
    finally:
        if private:
            PyMem_Free(buf)
        else:
            _tun_buf_busy = False
    return out


cdef inline Py_ssize_t _tun_write(int fd, const void* data, Py_ssize_t n, bint prefix) noexcept nogil:
    cdef iovec iov[2]
    cdef unsigned char version = (<const unsigned char*>data)[0] >> 4 if n > 0 else 0
    if not prefix or (version != 4 and version != 6):
        return _c_write(fd, data, n)
    iov[0].iov_base = <void*>_VNET_ZERO
    iov[0].iov_len = _VNET_LEN
    iov[1].iov_base = <void*>data
    iov[1].iov_len = n
    n = _c_writev(fd, iov, 2)
    return n - _VNET_LEN if n >= _VNET_LEN else n


def tun_write_batch(int fd, packets, bint vnet=False):
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
    cdef Py_ssize_t sent = 0
    cdef Py_ssize_t sent_bytes = 0
    cdef Py_ssize_t n
    cdef Py_buffer view
    cdef int err = 0
    cdef object packet
    for packet in packets:
        if PyBytes_CheckExact(packet):
            while True:
                n = _tun_write(fd, PyBytes_AS_STRING(packet), PyBytes_GET_SIZE(packet), vnet)
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
                    n = _tun_write(fd, view.buf, view.len, vnet)
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
