"""macOS ``utun`` devices for TUN mode (``ut.tun.open_port`` picks this on darwin).

A utun interface is a kernel control socket: ``socket(PF_SYSTEM, SOCK_DGRAM,
SYSPROTO_CONTROL)`` connected to the control ``com.apple.net.utun_control`` and a unit
(unit N + 1 is interface ``utunN``; unit 0 lets the kernel take the next free one).
Each datagram on it is one IP packet behind a 4-byte header: the packet's address
family in network byte order (``AF_INET`` 2, ``AF_INET6`` 30 on Darwin). Addresses, MTU
and routes are set with ``ifconfig`` and ``route``, as wireguard-go's ``wg-quick`` does
on macOS. References: xnu ``bsd/net/if_utun.c``, ``sys/kern_control.h``; CPython's
``AF_SYSTEM`` addresses (a control name, or ``(ctl_id, unit)``).

The framing (``add_family_header``, ``strip_family_header``) and the commands
(``utun_commands``) are pure and tested on every platform; ``UtunPort`` is ``TunPort``
with that framing (tested over a datagram socketpair). Only ``open_utun`` and running
the commands need macOS: they are not run in CI.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import re
import socket
import struct
import subprocess
import sys
from collections.abc import Iterable

from .tun import TunPort, TunUnavailable

__all__ = ["UtunPort", "add_family_header", "configure_utun", "open_utun",
           "strip_family_header", "utun_commands", "utun_unit"]

UTUN_CONTROL_NAME = "com.apple.net.utun_control"
UTUN_OPT_IFNAME = 2  # net/if_utun.h: getsockopt(SYSPROTO_CONTROL, ...) -> "utunN\0"
_CTLIOCGINFO = 0xC0644E03  # _IOWR('N', 3, struct ctl_info { u_int32_t id; char name[96]; })
HEADER_LEN = 4
_HEADER_V4 = struct.pack("!I", 2)  # AF_INET
_HEADER_V6 = struct.pack("!I", 30)  # AF_INET6 on Darwin (10 on Linux: not socket.AF_INET6)
_UTUN_NAME = re.compile(r"utun(\d+)")


def add_family_header(packet: bytes) -> bytes | None:
    """``packet`` behind utun's 4-byte address family header; None if it is not IPv4 or
    IPv6 (the kernel would refuse it)."""
    version = packet[0] >> 4 if packet else 0
    if version == 4:
        return _HEADER_V4 + packet
    if version == 6:
        return _HEADER_V6 + packet
    return None


def strip_family_header(frame: bytes) -> bytes:
    """The IP packet in a datagram read from utun (empty if there is none)."""
    return frame[HEADER_LEN:]


def utun_unit(name: str) -> int:
    """The control unit to connect to for interface ``name``: N + 1 for ``utunN``, else 0
    (the kernel picks the next free utun; ``tun.name`` then only names it in logs)."""
    m = _UTUN_NAME.fullmatch(name)
    return int(m.group(1)) + 1 if m else 0


def utun_commands(name: str, addresses: Iterable[str], mtu: int,
                  routes: Iterable[str] = ()) -> list[list[str]]:
    """The ``ifconfig`` and ``route`` commands that give utun ``name`` its addresses, MTU
    and routes. A utun is point to point, so each address's own network is routed to it
    explicitly (Linux does that by itself), then ``routes``."""
    cmds = [["ifconfig", name, "mtu", str(mtu)]]
    networks: list[str] = []
    for addr in addresses:
        iface = ipaddress.ip_interface(addr)
        if iface.version == 4:  # the destination of a point-to-point address: itself
            cmds.append(["ifconfig", name, "inet", addr, str(iface.ip), "alias"])
        else:
            cmds.append(["ifconfig", name, "inet6", addr, "alias"])
        if iface.network.num_addresses > 1:
            networks.append(str(iface.network))
    cmds.append(["ifconfig", name, "up"])
    for net in [*networks, *routes]:
        family = "-inet" if ipaddress.ip_network(net).version == 4 else "-inet6"
        cmds.append(["route", "-q", "-n", "add", family, net, "-interface", name])
    return cmds


def configure_utun(name: str, addresses: Iterable[str], mtu: int,
                   routes: Iterable[str] = ()) -> None:
    """Run ``utun_commands`` (``CalledProcessError`` names the failing command); a route
    that exists already is changed to point at ``name``, as ``ip route replace`` would."""
    for cmd in utun_commands(name, addresses, mtu, routes):
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        if res.returncode and cmd[0] == "route" and "exists" in res.stdout + res.stderr:
            res = subprocess.run([*cmd[:3], "change", *cmd[4:]], capture_output=True,
                                 text=True, timeout=30)
        if res.returncode:
            raise subprocess.CalledProcessError(res.returncode, cmd, res.stdout, res.stderr)


def open_utun(name: str) -> tuple[int, str]:
    """``(non-blocking file descriptor, interface name)`` of a new utun interface: the
    one ``name`` asks for if it is ``utunN``, else the next free one (needs root)."""
    if sys.platform != "darwin":
        raise TunUnavailable(f"utun devices exist only on macOS, not on {sys.platform}")
    unit = utun_unit(name)
    try:
        sock = socket.socket(socket.PF_SYSTEM, socket.SOCK_DGRAM, socket.SYSPROTO_CONTROL)
    except OSError as exc:
        raise TunUnavailable(f"cannot open a utun control socket: {exc.strerror}") from None
    try:
        if unit:
            info = fcntl.ioctl(sock.fileno(), _CTLIOCGINFO,
                               struct.pack("I96s", 0, UTUN_CONTROL_NAME.encode()))
            sock.connect((struct.unpack_from("I", info)[0], unit))
        else:
            sock.connect(UTUN_CONTROL_NAME)  # CPython looks the control's id up; unit 0
        raw = sock.getsockopt(socket.SYSPROTO_CONTROL, UTUN_OPT_IFNAME, 256)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        hint = " (run as root)" if exc.errno in (errno.EPERM, errno.EACCES) else ""
        raise TunUnavailable(f"cannot create utun interface {name!r}: {exc.strerror}{hint}") from None
    return sock.detach(), raw.split(b"\0", 1)[0].decode()


class UtunPort(TunPort):
    """``TunPort`` for a utun socket: each datagram is an IP packet behind its family
    header, taken off on reads and put on for writes."""

    read_size = TunPort.read_size + HEADER_LEN
    add_header = staticmethod(add_family_header)
    strip_header = staticmethod(strip_family_header)
