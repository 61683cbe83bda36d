# Batched UDP system calls: recv_batch, recv_batch_with_drops, send_batch, HAVE_MMSG,
# HAVE_GSO, HAVE_RXQ_OVFL. Included by _fastpath.pyx.
#
# The C lives in includes/mmsg.h, declared in includes/mmsg.pxd (uvloop's includes/ layout):
# ut_recvmmsg/ut_sendmmsg are recvmmsg/sendmmsg on Linux, and elsewhere (macOS) or when
# built with UT_NO_MMSG=1 (so Linux CI proves that path) the same contract done with one
# recvmsg/sendmsg per message; ut_set_gso attaches UDP_SEGMENT where it exists;
# ut_want_ovfl/ut_read_ovfl carry the kernel's SO_RXQ_OVFL drop counter where it exists.
# The C preprocessor decides, not Cython's deprecated compile-time IF.

from cpython.exc cimport PyErr_CheckSignals, PyErr_SetFromErrno
from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdint cimport uint16_t, uint32_t

from ut.includes.mmsg cimport (
    AF_INET,
    AF_INET6,
    EWOULDBLOCK,
    MSG_DONTWAIT,
    UT_HAVE_GSO,
    UT_HAVE_MMSG,
    UT_HAVE_RXQ_OVFL,
    htonl,
    htons,
    inet_ntop,
    inet_pton,
    iovec,
    ntohl,
    ntohs,
    sockaddr_in,
    sockaddr_in6,
    sockaddr_storage,
    socklen_t,
    ut_gso_ctrl,
    ut_mmsghdr,
    ut_ovfl_ctrl,
    ut_read_ovfl,
    ut_recvmmsg,
    ut_sendmmsg,
    ut_set_gso,
    ut_want_ovfl,
)


#: True when ``recv_batch``/``send_batch`` use ``recvmmsg``/``sendmmsg``: Linux, unless
#: built with UT_NO_MMSG=1. Always False in the pure-Python twin.
HAVE_MMSG = bool(UT_HAVE_MMSG)

#: True when ``recv_batch_with_drops`` can read the kernel's per-socket drop counter
#: (``SO_RXQ_OVFL``, Linux) from the datagrams it receives; False elsewhere (macOS).
HAVE_RXQ_OVFL = bool(UT_HAVE_RXQ_OVFL)

cdef bint _kernel_has_gso():
    # Linux < 4.18 has no UDP_SEGMENT and ignores the control message: it would send a
    # whole run as ONE datagram. The socket option of the same name came with it.
    try:
        with _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM) as s:
            s.getsockopt(_socket.IPPROTO_UDP, 103)  # UDP_SEGMENT
        return True
    except OSError:
        return False


cdef bint _gso_ok = UT_HAVE_GSO and _kernel_has_gso()

#: True when ``send_batch(..., gso=True)`` can send runs of equal-size datagrams as one
#: ``UDP_SEGMENT`` message: Linux 4.18 or later, unless built with UT_NO_MMSG=1 (the
#: macOS-like build).
HAVE_GSO = bool(_gso_ok)

cdef enum:
    _VLEN = 64                    # messages per system call (headers live on the C stack)
    _RX_SCRATCH_MAX = 4194304     # receive scratch per call: 64 x 64 KiB
    GSO_MAX_SEGMENTS = 64         # the kernel's UDP_MAX_SEGMENTS on older kernels
    GSO_MAX_BYTES = 65000         # one message's payload stays under the 64 KiB IP limit
    # Datagrams in view per sendmmsg call: a run may start at any of the first _VLEN and
    # still see its whole GSO_MAX_SEGMENTS, so runs never depend on where a call begins.
    _TX_WINDOW = _VLEN + GSO_MAX_SEGMENTS


cdef Py_ssize_t _gso_run(const iovec* v, Py_ssize_t n) noexcept nogil:
    # The length of the run that starts at v[0], of the n datagrams v[0..n): datagrams of
    # one size, the last possibly shorter, at most GSO_MAX_SEGMENTS and GSO_MAX_BYTES; a
    # zero-length datagram is a run of its own. 1 <= result <= n (n >= 1). The same rules
    # as _purepy._gso_runs (tests/test_differential.py holds the two together); together
    # they keep to the kernel's (udp_send_skb): every segment but the last is gso_size
    # bytes, at most UDP_MAX_SEGMENTS of them, the payload within one IP packet.
    cdef size_t seg = v[0].iov_len
    cdef size_t total = seg
    cdef size_t ln
    cdef Py_ssize_t j = 1
    if seg == 0:
        return 1
    while j < n and j < GSO_MAX_SEGMENTS:
        ln = v[j].iov_len
        if ln == 0 or ln > seg or total + ln > GSO_MAX_BYTES:
            break
        total += ln
        j += 1
        if ln < seg:  # a shorter datagram can only end a run
            break
    return j


def _gso_runs(sizes):
    """How ``send_batch`` with ``gso`` groups datagrams of these sizes: each run's length.
    A run is datagrams of one size, its last possibly shorter, at most 64 datagrams and
    65000 bytes; a zero-length datagram is a run of its own."""
    cdef Py_ssize_t n = len(sizes)
    cdef Py_ssize_t i, r
    cdef iovec* v
    cdef list runs = []
    if n == 0:
        return runs
    v = <iovec*>PyMem_Malloc(n * sizeof(iovec))
    if v == NULL:
        raise MemoryError()
    try:
        for i in range(n):
            v[i].iov_base = NULL
            v[i].iov_len = sizes[i]
        i = 0
        while i < n:
            r = _gso_run(&v[i], n - i)
            runs.append(r)
            i += r
    finally:
        PyMem_Free(v)
    return runs


# Receive scratch shared by recv_batch calls (the GIL is held throughout). If a call
# re-enters while it is in use (a finaliser, a signal handler) it gets a private one.
cdef char* _rx_scratch = NULL
cdef Py_ssize_t _rx_scratch_len = 0
cdef bint _rx_scratch_busy = False


cdef object _sockaddr_to_py(sockaddr_storage* ss):
    # The address tuple socket.recvfrom() would return (CPython uses inet_ntop too).
    cdef char host[64]
    cdef sockaddr_in* sin
    cdef sockaddr_in6* sin6
    if ss.ss_family == AF_INET:
        sin = <sockaddr_in*>ss
        inet_ntop(AF_INET, &sin.sin_addr, host, sizeof(host))
        return ((<char*>host).decode("ascii"), ntohs(sin.sin_port))
    if ss.ss_family == AF_INET6:
        sin6 = <sockaddr_in6*>ss
        inet_ntop(AF_INET6, &sin6.sin6_addr, host, sizeof(host))
        return ((<char*>host).decode("ascii"), ntohs(sin6.sin6_port),
                ntohl(sin6.sin6_flowinfo), sin6.sin6_scope_id)
    return None


cdef socklen_t _py_to_sockaddr(int family, object addr, sockaddr_storage* ss,
                               bint* numeric) except 0:
    # Parse an (host, port[, flowinfo[, scope_id]]) tuple as socket.sendto() does:
    # numeric hosts directly, names through socket.getaddrinfo (blocking, like sendto).
    # ``numeric[0]`` says whether the host was an address (the result may be cached).
    cdef sockaddr_in* sin = <sockaddr_in*>ss
    cdef sockaddr_in6* sin6 = <sockaddr_in6*>ss
    cdef bytes hostb
    cdef long port
    cdef unsigned long flowinfo = 0, scope_id = 0
    cdef void* dst
    name = "AF_INET" if family == AF_INET else "AF_INET6"
    if type(addr) is not tuple:
        raise TypeError(f"{name} address must be tuple, not {type(addr).__name__}")
    if (family == AF_INET and len(addr) != 2) or not 2 <= len(addr) <= 4:
        raise TypeError(f"{name} address must be a tuple (host, port...)")
    host = addr[0]
    port = addr[1]
    if family == AF_INET6 and len(addr) > 2:
        flowinfo = addr[2]
        if len(addr) > 3:
            scope_id = addr[3]
    if port < 0 or port > 0xFFFF:
        raise OverflowError("port must be 0-65535.")
    if flowinfo > 0xFFFFF:
        raise OverflowError("flowinfo must be 0-1048575.")
    if host == "":
        host = "0.0.0.0" if family == AF_INET else "::"
    elif host == "<broadcast>" and family == AF_INET:
        host = "255.255.255.255"
    memset(ss, 0, sizeof(sockaddr_storage))
    dst = <void*>&sin.sin_addr if family == AF_INET else <void*>&sin6.sin6_addr
    hostb = host.encode("idna") if isinstance(host, str) else bytes(host)
    numeric[0] = True
    if inet_pton(family, hostb, dst) != 1:
        numeric[0] = False
        resolved = _socket.getaddrinfo(host, port, family, _socket.SOCK_DGRAM)[0][4][0]
        if inet_pton(family, resolved.encode("ascii"), dst) != 1:
            raise OSError(f"cannot parse resolved address {resolved!r}")
    if family == AF_INET:
        sin.sin_family = AF_INET
        sin.sin_port = htons(<uint16_t>port)
        return sizeof(sockaddr_in)
    sin6.sin6_family = AF_INET6
    sin6.sin6_port = htons(<uint16_t>port)
    sin6.sin6_flowinfo = htonl(<uint32_t>flowinfo)
    sin6.sin6_scope_id = <uint32_t>scope_id
    return sizeof(sockaddr_in6)


def _recv_loop(sock, Py_ssize_t max_count, Py_ssize_t bufsize):
    # Socket families other than IPv4/IPv6: the twin's recvfrom loop.
    out = []
    for _ in range(max_count):
        try:
            out.append(sock.recvfrom(bufsize, MSG_DONTWAIT))
        except (BlockingIOError, InterruptedError):
            break
        except OSError:
            if out:
                break
            raise
    return out


# ``socket.family`` wraps the number in an IntEnum on every read (about a
# microsecond); the base ``_socket.socket`` getter hands back the plain int.
_family_getter = _csocket.socket.__dict__["family"].__get__

# The last numeric destination ``send_batch`` parsed: a client sends every batch to
# the same WireGuard address, and parsing it (idna encode + inet_pton) each time
# showed in profiles. Reused only for an equal tuple in the same family.
cdef object _dest_key = None
cdef int _dest_family = -1
cdef sockaddr_storage _dest_cached
cdef socklen_t _dest_cached_len = 0


cdef socklen_t _dest_sockaddr(int family, object addr, sockaddr_storage* ss) except 0:
    global _dest_key, _dest_family, _dest_cached_len
    cdef bint numeric = False
    cdef socklen_t n
    if family == _dest_family and _dest_key is not None and (
            addr is _dest_key or addr == _dest_key):
        memcpy(ss, &_dest_cached, _dest_cached_len)
        return _dest_cached_len
    n = _py_to_sockaddr(family, addr, ss, &numeric)
    if numeric:
        memcpy(&_dest_cached, ss, n)
        _dest_cached_len = n
        _dest_key = addr
        _dest_family = family
    return n


cdef inline int _family_of(sock) except? -1:
    return _family_getter(sock)


def _send_loop(sock, list items, addr):
    # Socket families other than IPv4/IPv6: the twin's sendto loop.
    cdef Py_ssize_t sent = 0
    for d in items:
        try:
            sock.sendto(d, MSG_DONTWAIT, addr)
        except (BlockingIOError, InterruptedError):
            break
        except OSError:
            if sent:
                break
            raise
        sent += 1
    return sent


cdef int _raise_errno(int err) except -1:
    global errno
    errno = err
    PyErr_SetFromErrno(OSError)
    return -1


def recv_batch(sock, Py_ssize_t max_count, Py_ssize_t bufsize=65535):
    """Receive up to ``max_count`` datagrams without blocking; return
    ``[(data, address), ...]`` (``[]`` when none is waiting). Addresses are as
    ``socket.recvfrom`` returns them; a datagram longer than ``bufsize`` is truncated.
    Uses ``recvmmsg`` when ``HAVE_MMSG``, else a ``recvfrom`` loop.
    """
    cdef long long drops = -1
    return _recv(sock, max_count, bufsize, False, &drops)


def recv_batch_with_drops(sock, Py_ssize_t max_count, Py_ssize_t bufsize=65535):
    """``recv_batch``, and the kernel's count of datagrams dropped at ``sock``: return
    ``(datagrams, drops)``.

    ``drops`` is the socket's cumulative drop counter (u32, wrapping) as it stood when the
    last datagram that carried it was queued, or -1 when none did. The kernel attaches it
    (``SO_RXQ_OVFL`` control message) only on a socket with that option set
    (``ut.sockdrops.enable_drop_counter``), only once the count is non-zero, and only where
    ``HAVE_RXQ_OVFL``. Reading it costs no system call: it rides on the datagrams. Drops
    therefore show with the next datagram queued after them.
    """
    cdef long long drops = -1
    out = _recv(sock, max_count, bufsize, True, &drops)
    return out, drops


cdef list _recv(sock, Py_ssize_t max_count, Py_ssize_t bufsize, bint want_drops,
                long long* drops):
    # recv_batch's body; with want_drops, each message gets room for the SO_RXQ_OVFL
    # control message and drops[0] is set from the last one that carries it.
    global _rx_scratch, _rx_scratch_len, _rx_scratch_busy
    cdef ut_mmsghdr hdrs[_VLEN]
    cdef iovec iovs[_VLEN]
    cdef sockaddr_storage addrs[_VLEN]
    cdef ut_ovfl_ctrl ctrls[_VLEN]
    cdef uint32_t counter
    cdef int fd, family, r, err, i, prev
    cdef Py_ssize_t n, per_call, need, got = 0
    cdef char* data = NULL
    cdef bint own = False
    cdef size_t mlen
    cdef list out = []
    if bufsize < 0:
        raise ValueError("negative buffersize in recvfrom")
    family = _family_of(sock)
    if family != AF_INET and family != AF_INET6:
        return _recv_loop(sock, max_count, bufsize)
    if max_count <= 0:
        return out
    want_drops = want_drops and UT_HAVE_RXQ_OVFL
    fd = sock.fileno()
    per_call = _VLEN
    if bufsize and per_call * bufsize > _RX_SCRATCH_MAX:
        per_call = _RX_SCRATCH_MAX // bufsize
        if per_call < 1:
            per_call = 1
    need = per_call * bufsize + 1
    if _rx_scratch_busy:
        own = True
        data = <char*>PyMem_Malloc(need)
        if data == NULL:
            raise MemoryError()
    else:
        if _rx_scratch_len < need:
            data = <char*>PyMem_Realloc(_rx_scratch, need)
            if data == NULL:
                raise MemoryError()
            _rx_scratch = data
            _rx_scratch_len = need
        data = _rx_scratch
        _rx_scratch_busy = True
    try:
        while got < max_count:
            n = max_count - got
            if n > per_call:
                n = per_call
            memset(hdrs, 0, n * sizeof(ut_mmsghdr))
            for i in range(n):
                iovs[i].iov_base = data + i * bufsize
                iovs[i].iov_len = bufsize
                hdrs[i].msg_hdr.msg_name = &addrs[i]
                hdrs[i].msg_hdr.msg_namelen = sizeof(sockaddr_storage)
                hdrs[i].msg_hdr.msg_iov = &iovs[i]
                hdrs[i].msg_hdr.msg_iovlen = 1
                if want_drops:
                    ut_want_ovfl(&hdrs[i].msg_hdr, &ctrls[i])
            r = ut_recvmmsg(fd, hdrs, <unsigned int>n, MSG_DONTWAIT)
            if r < 0:
                err = errno
                if err == EINTR:
                    PyErr_CheckSignals()
                    continue
                if err == EAGAIN or err == EWOULDBLOCK or got:
                    break
                _raise_errno(err)
            prev = -1
            for i in range(r):
                mlen = hdrs[i].msg_len
                if mlen > <size_t>bufsize:
                    mlen = bufsize
                # Consecutive datagrams mostly come from one peer: reuse its tuple.
                if (prev < 0 or hdrs[i].msg_hdr.msg_namelen != hdrs[prev].msg_hdr.msg_namelen
                        or memcmp(&addrs[i], &addrs[prev], hdrs[i].msg_hdr.msg_namelen) != 0):
                    addr = _sockaddr_to_py(&addrs[i])
                    prev = i
                out.append((PyBytes_FromStringAndSize(data + i * bufsize, mlen), addr))
                if want_drops and ut_read_ovfl(&hdrs[i].msg_hdr, &counter):
                    drops[0] = counter  # in order, not the largest: the counter wraps
            got += r
            if r < n:
                break
    finally:
        if own:
            PyMem_Free(data)
        else:
            _rx_scratch_busy = False
    return out


def send_batch(sock, datagrams, addr=None, bint gso=False):
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
    cdef ut_mmsghdr hdrs[_VLEN]
    cdef iovec iovs[_TX_WINDOW]
    cdef ut_gso_ctrl ctrls[_VLEN]
    cdef Py_ssize_t segs[_VLEN]
    cdef sockaddr_storage dest
    cdef socklen_t destlen = 0
    cdef int fd, family, r, err
    cdef unsigned int m
    cdef Py_ssize_t i, j, k, n, window, count, sent = 0
    cdef list items = datagrams if type(datagrams) is list else list(datagrams)
    cdef object d
    count = len(items)
    for i in range(count):
        d = items[i]
        if type(d) is not bytes:
            if items is datagrams:
                items = list(items)
            items[i] = bytes(memoryview(d))
    family = _family_of(sock)
    # UDP_SEGMENT means nothing to other families: an AF_UNIX socket would ignore it and
    # send a whole run as ONE datagram.
    gso = gso and _gso_ok and (family == AF_INET or family == AF_INET6)
    if addr is not None:
        if family != AF_INET and family != AF_INET6:
            return _send_loop(sock, items, addr)
        destlen = _dest_sockaddr(family, addr, &dest)
    if count == 0:
        return 0
    fd = sock.fileno()
    # One message per datagram, or per run with gso: the runs _gso_runs makes of the whole
    # list, whatever the calls. A call starts runs only among the first _VLEN datagrams in
    # view, and each of those sees GSO_MAX_SEGMENTS datagrams ahead (or the list's end).
    window = _TX_WINDOW if gso else _VLEN
    while sent < count:
        n = count - sent
        if n > window:
            n = window
        for i in range(n):
            d = items[sent + i]
            iovs[i].iov_base = PyBytes_AS_STRING(d)
            iovs[i].iov_len = PyBytes_GET_SIZE(d)
        m = 0
        i = 0
        while i < n and i < _VLEN:  # m <= i: at most _VLEN messages
            j = i + (_gso_run(&iovs[i], n - i) if gso else 1)
            memset(&hdrs[m], 0, sizeof(ut_mmsghdr))
            if destlen:
                hdrs[m].msg_hdr.msg_name = &dest
                hdrs[m].msg_hdr.msg_namelen = destlen
            hdrs[m].msg_hdr.msg_iov = &iovs[i]
            hdrs[m].msg_hdr.msg_iovlen = j - i
            if j - i > 1:
                ut_set_gso(&hdrs[m].msg_hdr, &ctrls[m], <uint16_t>iovs[i].iov_len)
            segs[m] = j - i
            m += 1
            i = j
        r = ut_sendmmsg(fd, hdrs, m, MSG_DONTWAIT)
        if r < 0:
            err = errno
            if err == EINTR:
                PyErr_CheckSignals()
                continue
            if err == EAGAIN or err == EWOULDBLOCK or sent:
                break
            _raise_errno(err)
        if r == 0:
            break
        for k in range(r):
            sent += segs[k]
    return sent
