/* Batched UDP system calls for ut/_fp_mmsg.pxi, declared to Cython in mmsg.pxd.
 *
 * recvmmsg/sendmmsg exist on Linux only. This header gives the fast path one interface
 * either way: ut_recvmmsg/ut_sendmmsg are the real calls on Linux, and elsewhere (macOS)
 * or when built with UT_NO_MMSG=1 (so Linux CI proves that path) they are the same
 * contract done with one recvmsg/sendmsg per message. The C preprocessor decides, not
 * Cython's deprecated compile-time IF. (uvloop keeps its C the same way: uvloop/includes/.)
 */
#ifndef UT_INCLUDES_MMSG_H
#define UT_INCLUDES_MMSG_H

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/types.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <netinet/in.h>
#include <arpa/inet.h>

#if defined(__linux__) && !defined(UT_NO_MMSG)
#define UT_HAVE_MMSG 1
typedef struct mmsghdr ut_mmsghdr;
static inline int ut_recvmmsg(int fd, ut_mmsghdr *v, unsigned int n, int flags) {
    return recvmmsg(fd, v, n, flags, NULL);
}
static inline int ut_sendmmsg(int fd, ut_mmsghdr *v, unsigned int n, int flags) {
    return sendmmsg(fd, v, n, flags);
}
#else
#define UT_HAVE_MMSG 0
typedef struct { struct msghdr msg_hdr; unsigned int msg_len; } ut_mmsghdr;
/* The recvmmsg/sendmmsg contract: the count done, or -1 and errno if none was. */
static inline int ut_recvmmsg(int fd, ut_mmsghdr *v, unsigned int n, int flags) {
    unsigned int i;
    for (i = 0; i < n; i++) {
        ssize_t r = recvmsg(fd, &v[i].msg_hdr, flags);
        if (r < 0) { if (i) break; return -1; }
        v[i].msg_len = (unsigned int)r;
    }
    return (int)i;
}
static inline int ut_sendmmsg(int fd, ut_mmsghdr *v, unsigned int n, int flags) {
    unsigned int i;
    for (i = 0; i < n; i++) {
        ssize_t r = sendmsg(fd, &v[i].msg_hdr, flags);
        if (r < 0) { if (i) break; return -1; }
        v[i].msg_len = (unsigned int)r;
    }
    return (int)i;
}
#endif

/* UDP generic segmentation offload (Linux >= 4.18): one message carries a run of
   equal-size datagrams (the last may be shorter) and a UDP_SEGMENT control message with
   their size; the kernel splits it into datagrams once, after routing and netfilter.
   Kernel rules (net/ipv4/udp.c, udp_send_skb): at most UDP_MAX_SEGMENTS segments, the
   whole payload within one IP packet's 64 KiB, and the segment size plus headers within
   the route's MTU (else EINVAL). */
#if defined(__linux__) && !defined(UT_NO_MMSG)
#define UT_HAVE_GSO 1
#ifndef SOL_UDP
#define SOL_UDP 17
#endif
#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif
/* the cmsg(3) idiom: a buffer aligned for a cmsghdr */
typedef union {
    char buf[CMSG_SPACE(sizeof(uint16_t))];
    struct cmsghdr align;
} ut_gso_ctrl;
static inline void ut_set_gso(struct msghdr *m, ut_gso_ctrl *ctrl, uint16_t size) {
    struct cmsghdr *c;
    memset(ctrl->buf, 0, sizeof(ctrl->buf));
    m->msg_control = ctrl->buf;
    m->msg_controllen = sizeof(ctrl->buf);
    c = CMSG_FIRSTHDR(m);
    c->cmsg_level = SOL_UDP;
    c->cmsg_type = UDP_SEGMENT;
    c->cmsg_len = CMSG_LEN(sizeof(uint16_t));
    memcpy(CMSG_DATA(c), &size, sizeof(size));
}
#else
#define UT_HAVE_GSO 0
typedef union { char buf[16]; } ut_gso_ctrl;
static inline void ut_set_gso(struct msghdr *m, ut_gso_ctrl *ctrl, uint16_t size) {
    (void)m; (void)ctrl; (void)size;
}
#endif

/* The kernel's count of datagrams dropped at a socket (Linux >= 2.6.33): with the socket
   option SO_RXQ_OVFL on, each datagram received carries a SOL_SOCKET/SO_RXQ_OVFL control
   message, a u32 holding the socket's sk_drops as it was when that datagram was queued
   (cumulative since the socket was created, wrapping; the same counter as the "drops"
   column of /proc/net/udp). The kernel attaches it only once that count is non-zero.
   Elsewhere (macOS has no such option) the buffer is never attached and nothing is read. */
#if defined(__linux__) && defined(SO_RXQ_OVFL)
#define UT_HAVE_RXQ_OVFL 1
typedef union {
    char buf[CMSG_SPACE(sizeof(uint32_t))];
    struct cmsghdr align;
} ut_ovfl_ctrl;
/* Give the receive of m room for the drop counter's control message. */
static inline void ut_want_ovfl(struct msghdr *m, ut_ovfl_ctrl *ctrl) {
    m->msg_control = ctrl->buf;
    m->msg_controllen = sizeof(ctrl->buf);
}
/* 1 and *out = the counter when the received m carries it, else 0. */
static inline int ut_read_ovfl(struct msghdr *m, uint32_t *out) {
    struct cmsghdr *c;
    if (m->msg_control == NULL || m->msg_controllen < sizeof(struct cmsghdr))
        return 0;
    for (c = CMSG_FIRSTHDR(m); c != NULL; c = CMSG_NXTHDR(m, c)) {
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SO_RXQ_OVFL
                && c->cmsg_len >= CMSG_LEN(sizeof(uint32_t))) {
            memcpy(out, CMSG_DATA(c), sizeof(uint32_t));
            return 1;
        }
    }
    return 0;
}
#else
#define UT_HAVE_RXQ_OVFL 0
typedef union { char buf[16]; } ut_ovfl_ctrl;
static inline void ut_want_ovfl(struct msghdr *m, ut_ovfl_ctrl *ctrl) {
    (void)m; (void)ctrl;
}
static inline int ut_read_ovfl(struct msghdr *m, uint32_t *out) {
    (void)m; (void)out;
    return 0;
}
#endif

#endif /* UT_INCLUDES_MMSG_H */
