# cython: language_level=3
# C declarations of includes/mmsg.h (batched UDP system calls, UDP GSO) for _fp_mmsg.pxi,
# as uvloop declares its includes/*.h in includes/*.pxd. The header decides per platform
# (recvmmsg/sendmmsg and UDP_SEGMENT on Linux, a recvmsg/sendmsg loop elsewhere or with
# UT_NO_MMSG=1); these declarations are the same for every platform.

from libc.stdint cimport uint16_t, uint32_t


cdef extern from "includes/mmsg.h":
    ctypedef unsigned int socklen_t
    ctypedef unsigned short sa_family_t

    cdef struct iovec:
        void* iov_base
        size_t iov_len

    cdef struct msghdr:
        void* msg_name
        socklen_t msg_namelen
        iovec* msg_iov
        size_t msg_iovlen
        void* msg_control
        size_t msg_controllen
        int msg_flags

    # struct mmsghdr where the platform has it, else a struct of the same two fields.
    ctypedef struct ut_mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len       # bytes received or sent for this message

    cdef struct sockaddr_storage:
        sa_family_t ss_family

    cdef struct in_addr:
        uint32_t s_addr

    cdef struct in6_addr:
        pass

    cdef struct sockaddr_in:
        sa_family_t sin_family
        uint16_t sin_port
        in_addr sin_addr

    cdef struct sockaddr_in6:
        sa_family_t sin6_family
        uint16_t sin6_port
        uint32_t sin6_flowinfo
        in6_addr sin6_addr
        uint32_t sin6_scope_id

    int AF_INET
    int AF_INET6
    int MSG_DONTWAIT
    int EWOULDBLOCK

    const char* inet_ntop(int af, const void* src, char* dst, socklen_t size)
    int inet_pton(int af, const char* src, void* dst)
    uint16_t htons(uint16_t)
    uint16_t ntohs(uint16_t)
    uint32_t htonl(uint32_t)
    uint32_t ntohl(uint32_t)

    # 1 when ut_recvmmsg/ut_sendmmsg are the kernel's recvmmsg/sendmmsg, 0 for the loop.
    int UT_HAVE_MMSG
    # The recvmmsg/sendmmsg contract on every platform: the count of messages done, or -1
    # and errno if none was.
    int ut_recvmmsg(int fd, ut_mmsghdr* v, unsigned int n, int flags)
    int ut_sendmmsg(int fd, ut_mmsghdr* v, unsigned int n, int flags)

    # 1 when ut_set_gso attaches a UDP_SEGMENT control message (Linux build; the running
    # kernel must still be 4.18 or later), 0 where it does nothing.
    int UT_HAVE_GSO
    # Control-message buffer for one UDP_SEGMENT message, aligned for a cmsghdr.
    ctypedef struct ut_gso_ctrl:
        pass
    # Point m's control data at ctrl, holding UDP_SEGMENT = size (the segment length).
    void ut_set_gso(msghdr* m, ut_gso_ctrl* ctrl, uint16_t size)

    # 1 when ut_want_ovfl/ut_read_ovfl carry the kernel's SO_RXQ_OVFL drop counter
    # (Linux), 0 where they do nothing (no such option: macOS).
    int UT_HAVE_RXQ_OVFL
    # Control-message buffer for one SO_RXQ_OVFL message (a u32), aligned for a cmsghdr.
    ctypedef struct ut_ovfl_ctrl:
        pass
    # Point m's control buffer at ctrl before the receive.
    void ut_want_ovfl(msghdr* m, ut_ovfl_ctrl* ctrl)
    # After the receive: 1 and out[0] = the socket's cumulative drop count when m carries
    # it, else 0.
    int ut_read_ovfl(msghdr* m, uint32_t* out)
