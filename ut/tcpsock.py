"""TCP socket options of a lane, and what the kernel says about its connection.

Both roles set these on every lane socket (``ut.transport`` calls them at the right
moment: before connecting, after the TCP handshake, on accepted sockets). Linux-only
readings (``TCP_INFO``, ``SIOCOUTQNSD``) return nothing elsewhere. The module constants
are read at call time, so a test or an embedding program may lower them before lanes
open.
"""

from __future__ import annotations

import fcntl
import random
import socket
import struct
import sys
from typing import Any, NamedTuple

__all__ = [
    "LANE_USER_TIMEOUT_SECONDS",
    "LANE_KEEPALIVE_IDLE_SECONDS",
    "LANE_KEEPALIVE_INTERVAL_SECONDS",
    "LANE_KEEPALIVE_COUNT",
    "LANE_NOTSENT_LOWAT",
    "TcpState",
    "tcp_state",
    "unsent_bytes",
    "set_notsent_lowat",
    "set_tcp_options",
    "set_sock_buf",
    "tune_connected_lane",
    "congestion_control",
    "set_congestion_control",
    "set_lane_liveness",
]

# Dead-path detection (hardening, issue 5). Without these a lane whose path
# died keeps "working" for as long as TCP retransmits (about 15 minutes with
# Linux's default tcp_retries2) and comes back only when an exponentially
# backed-off retransmission happens to get through. TCP_USER_TIMEOUT closes a
# lane whose written data stays unacknowledged this long (Linux also applies it
# to zero-window probes, so a peer that stops reading is caught too); kernel
# keepalive probes notice a silent dead path on a lane with nothing to send
# (e.g. the server side of a lane while the client is quiet). Keepalives are
# empty TCP segments, not protocol heartbeats: the PDU stream is unchanged.
# Module constants for now; proposed config keys: tcp.user_timeout_seconds
# and tcp.keepalive_seconds (see docs/security.md).
LANE_USER_TIMEOUT_SECONDS = 30.0
LANE_KEEPALIVE_IDLE_SECONDS = 30
LANE_KEEPALIVE_INTERVAL_SECONDS = 10
LANE_KEEPALIVE_COUNT = 3


# Kernel backlog bound for ``tcp.skip_slow_lanes``: a lane socket reports itself
# writable only while less than this is written but not yet sent. A lane whose TCP
# slowed down (loss recovery, a smaller window) then fills its user-space buffer to
# WRITE_HIGH_WATER within a burst or two, pauses, and the picker gives its datagrams to
# the other lanes instead of queueing them behind the slow one (where, with
# resequencing, they would hold back every lane's datagrams).
LANE_NOTSENT_LOWAT = 32 * 1024

_TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25 if sys.platform.startswith("linux") else None)
# struct tcp_info (linux/tcp.h): ca_state at byte 1; rto at 8; last_ack_recv
# (milliseconds ago) at 56; rtt, rttvar (microseconds) at 68, 72; total_retrans at 100,
# segs_out at 136, notsent_bytes at 144,
# min_rtt (microseconds) at 148 and delivery_rate (bytes per second) at 160 (Linux 4.9+). (Unsent bytes come
# from SIOCOUTQNSD, a cheaper call made per burst.)
_TCP_INFO = getattr(socket, "TCP_INFO", None) if sys.platform.startswith("linux") else None
_TCP_INFO_LEN = 168
_TCP_CA_LOSS = 4  # retransmission timeout: the lane sends nothing new until it recovers
# ioctl SIOCOUTQNSD (linux/sockios.h): bytes in a TCP socket's send queue not yet sent.
_SIOCOUTQNSD = 0x894B if sys.platform.startswith("linux") else None


_INT = struct.Struct("i")
_INT_ZERO = bytes(4)


class TcpState(NamedTuple):
    """What the kernel says about a lane's TCP connection (Linux ``TCP_INFO``)."""

    in_loss: bool  # in RTO recovery: stalled for at least a retransmission timeout
    rto_seconds: float  # the retransmission timeout now
    rtt_seconds: float  # smoothed round-trip time
    rttvar_seconds: float  # its mean deviation
    delivery_rate: int = 0  # bytes per second the lane delivered lately; 0 = unknown
    min_rtt_seconds: float = 0.0  # the lowest round trip seen (the path without queues)
    ack_age_seconds: float = 0.0  # since the last ACK: rtt is only as fresh as that
    notsent_bytes: int = 0  # written and not yet sent (the kernel's part of the backlog)
    retrans_segs: int = 0  # segments retransmitted since the connection began
    segs_out: int = 0  # segments sent since the connection began (retransmissions too)
    snd_mss: int = 0  # the payload bytes of a full segment it sends; 0 = unknown


def set_notsent_lowat(sock: Any, nbytes: int) -> None:
    """``TCP_NOTSENT_LOWAT`` on a lane socket, where the platform has it (Linux, macOS)."""
    if sock is None or _TCP_NOTSENT_LOWAT is None or not nbytes:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_NOTSENT_LOWAT, nbytes)
    except OSError:
        pass


def tcp_state(sock: Any) -> TcpState | None:
    """The kernel's view of a lane's TCP connection, or None where it cannot be read."""
    if sock is None or _TCP_INFO is None:
        return None
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_LEN)
    except OSError:
        return None
    if len(raw) < 76:
        return None
    rto = struct.unpack_from("=I", raw, 8)[0]
    rtt, rttvar = struct.unpack_from("=II", raw, 68)
    rate = min_rtt = notsent = retrans = segs = 0
    if len(raw) >= 168:
        retrans = struct.unpack_from("=I", raw, 100)[0]
        segs = struct.unpack_from("=I", raw, 136)[0]
        notsent, min_rtt = struct.unpack_from("=II", raw, 144)
        rate = struct.unpack_from("=Q", raw, 160)[0]
    ack_age = struct.unpack_from("=I", raw, 56)[0]
    mss = struct.unpack_from("=I", raw, 16)[0]
    return TcpState(raw[1] == _TCP_CA_LOSS, rto * 1e-6, rtt * 1e-6, rttvar * 1e-6, rate,
                    min_rtt * 1e-6, ack_age * 1e-3, notsent, retrans, segs, mss)


def set_tcp_options(sock: socket.socket | None, nodelay: bool) -> None:
    """Apply ``tcp.tcp_nodelay`` (before connecting, or on the listening socket)."""
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1 if nodelay else 0)
    except OSError:
        pass  # not a TCP socket (tests may use socketpairs); nothing to tune


def set_sock_buf(sock: socket.socket | None, buf_bytes: int) -> None:
    """Apply ``tcp.sock_buf`` (0 keeps kernel autotuning) to a *connected* lane socket.

    Called after the TCP handshake on purpose: Linux picks the window scale it offers in
    the SYN from the receive buffer it may grow to, so a small ``SO_RCVBUF`` set before
    connecting gives a SYN with window scale 0 (a window capped at 64 KiB for the life of
    the lane, and a TCP fingerprint no ordinary client has). Set afterwards, the buffers
    still bound what the lane holds, and the handshake looks like everybody else's.
    """
    if sock is None or not buf_bytes:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buf_bytes)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buf_bytes)
    except OSError:
        pass


_TCP_CONGESTION = getattr(socket, "TCP_CONGESTION", None)


def congestion_control(sock: Any) -> str | None:
    """The congestion control a TCP socket uses (Linux), or None where it cannot be read."""
    if sock is None or _TCP_CONGESTION is None:
        return None
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, _TCP_CONGESTION, 16).split(b"\0")[0].decode()
    except (OSError, UnicodeDecodeError):
        return None


def set_congestion_control(sock: Any, name: str) -> bool:
    """Switch a TCP socket, connected or not, to congestion control ``name``; False where
    the host refuses (not available, or not in ``tcp_allowed_congestion_control`` for a
    process without CAP_NET_ADMIN) or has no such option."""
    if sock is None or _TCP_CONGESTION is None:
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_CONGESTION, name.encode())
    except OSError:
        return False
    return True


def tune_connected_lane(sock: Any, tcp: Any) -> None:
    """What both roles apply to a lane socket once the TCP handshake is done:
    ``tcp.sock_buf`` (after the SYN, see ``set_sock_buf``), with ``tcp.skip_slow_lanes``
    the unsent-backlog bound ``TCP_NOTSENT_LOWAT``, and a ``tcp.congestion`` that names a
    control (``auto`` is the session's business, ut/lanecc.py)."""
    set_sock_buf(sock, tcp.sock_buf)
    if tcp.skip_slow_lanes:
        set_notsent_lowat(sock, LANE_NOTSENT_LOWAT)
    if tcp.congestion not in ("auto", "system"):
        set_congestion_control(sock, tcp.congestion)


def set_lane_liveness(sock: socket.socket | None) -> None:
    """Keepalive and ``TCP_USER_TIMEOUT`` on a lane socket (see the constants above).

    Read at call time, so a test or an embedding program may lower the module
    constants before lanes open. Options the platform lacks are skipped.
    """
    if sock is None:
        return
    opts = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    # Each lane gets its own idle time, up to a quarter off: lanes fall idle together
    # when traffic stops, and equal timers would send their probes in lock-step.
    keepidle = max(1, round(LANE_KEEPALIVE_IDLE_SECONDS * random.uniform(0.75, 1.25)))
    for name, value in (
        ("TCP_KEEPIDLE", keepidle),
        ("TCP_KEEPINTVL", LANE_KEEPALIVE_INTERVAL_SECONDS),
        ("TCP_KEEPCNT", LANE_KEEPALIVE_COUNT),
        ("TCP_USER_TIMEOUT", int(LANE_USER_TIMEOUT_SECONDS * 1000)),
    ):
        if hasattr(socket, name) and value:
            opts.append((socket.IPPROTO_TCP, getattr(socket, name), int(value)))
    for level, opt, value in opts:
        try:
            sock.setsockopt(level, opt, value)
        except OSError:
            pass  # not TCP, or not supported here


def unsent_bytes(sock: Any) -> int:
    """Bytes written to a TCP socket and not yet sent (Linux ``SIOCOUTQNSD``; 0 where it
    cannot be read)."""
    if _SIOCOUTQNSD is None or sock is None:
        return 0
    try:
        return _INT.unpack(fcntl.ioctl(sock.fileno(), _SIOCOUTQNSD, _INT_ZERO))[0]
    except (OSError, ValueError):
        return 0
