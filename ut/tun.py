"""TUN devices: where TUN mode's IP packets come from and go to (Linux ``/dev/net/tun``,
macOS ``utun``).

``open_port(loop, name, addresses, mtu, routes, on_batch)`` is what the client and the
server call: it opens the platform's device, configures it and returns its ``TunPort``.

``open_tun(name)`` creates (or attaches to) a layer-3 TUN interface without packet
information headers (``IFF_TUN | IFF_NO_PI``): each read is one IP packet, each write
one IP packet. ``configure_tun`` gives it addresses, an MTU and routes with ``ip``
(iproute2) and brings it up.

With ``tun.offload`` (Linux, little-endian hosts) the device is opened with
``IFF_VNET_HDR``: each packet has a 10-byte ``virtio_net_hdr`` in front, and once the
peer said it takes them (``FLAG_OFFLOAD`` on its HELLO) the kernel's offloads are turned
on (``TUNSETOFFLOAD``: checksum, TCP segmentation for IPv4 and IPv6, UDP segmentation
where the kernel has it). A bulk TCP flow then reads as super-packets of up to
``GSO_MAX_SIZE`` bytes, each one datagram through the session and one write at the
other end, whose kernel takes it whole (as GRO would have made it): a few reads,
frames and writes where there were forty. Toward a peer that does not take them, the
offloads stay off (the client) or ``fastpath.gso_split`` cuts them (the server's shared
device). ``TunPort`` has ``ut.udp.UdpPort``'s interface (batched
reads into ``on_batch``, ``send_many`` returning ``(sent, failed)``), so sessions move
packets between lanes and a TUN device as they move datagrams to and from WireGuard;
``on_batch`` gets a list of packets (there is no sender address to pair them with).

On macOS, ``ut.tun_darwin`` opens a ``utun`` interface instead (a kernel control socket
whose packets carry a 4-byte address family header: ``UtunPort``), configured with
``ifconfig`` and ``route``; it is not tested in CI. Elsewhere, ``open_port`` raises
``TunUnavailable`` with what to do.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import struct
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence

from .fastpath import tun_read_batch, tun_write_batch
from .logs import event
from .tunroute import link_local

__all__ = ["GSO_MAX_SIZE", "READ_BATCH", "TunPort", "TunUnavailable", "configure_tun",
           "offload_possible", "open_port", "open_tun", "set_offloads"]

_TUNSETIFF = 0x400454CA
_TUNSETOFFLOAD = 0x400454D0
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000
# linux/if_tun.h: what the device may hand us unfinished (TUNSETOFFLOAD).
_TUN_F_CSUM, _TUN_F_TSO4, _TUN_F_TSO6, _TUN_F_USO4, _TUN_F_USO6 = 0x01, 0x02, 0x04, 0x20, 0x40
_OFFLOADS = _TUN_F_CSUM | _TUN_F_TSO4 | _TUN_F_TSO6
_OFFLOADS_USO = _OFFLOADS | _TUN_F_USO4 | _TUN_F_USO6  # UDP segmentation: Linux 6.2+
#: The largest super-packet the device may hand over (``ip link ... gso_max_size``): with
#: its header it must fit one numbered DATA frame (65535 - 4 bytes).
GSO_MAX_SIZE = 65000
#: Packets read per readiness callback at most (as UDP's batched receive).
READ_BATCH = 64


class TunUnavailable(OSError):
    """No TUN device could be opened here (platform, permission, kernel module)."""


def offload_possible() -> bool:
    """Whether this host can carry TUN offloads: Linux, and the little-endian byte order
    the wire's ``virtio_net_hdr`` is in (docs/protocol.md, "TUN offloads")."""
    return sys.platform.startswith("linux") and sys.byteorder == "little"


def open_tun(name: str, vnet: bool = False) -> int:
    """The non-blocking file descriptor of TUN interface ``name`` (created if needed;
    needs CAP_NET_ADMIN); with ``vnet``, each packet behind a ``virtio_net_hdr``
    (``IFF_VNET_HDR``; offloads off until ``set_offloads``)."""
    if not sys.platform.startswith("linux"):
        raise TunUnavailable(f"/dev/net/tun is Linux only, not {sys.platform} (ut.tun.open_port "
                             "opens the platform's device)")
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise TunUnavailable(f"cannot open /dev/net/tun ({exc.strerror}): load the tun "
                             "module, and in a container pass --device /dev/net/tun") from None
    try:
        flags = _IFF_TUN | _IFF_NO_PI | (_IFF_VNET_HDR if vnet else 0)
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode()[:15], flags))
    except OSError as exc:
        os.close(fd)
        hint = " (run as root or grant CAP_NET_ADMIN)" if exc.errno == errno.EPERM else ""
        raise TunUnavailable(f"cannot create TUN interface {name!r}: {exc.strerror}{hint}") from None
    return fd


def set_offloads(fd: int, on: bool) -> bool:
    """Turn a ``vnet`` device's offloads on (checksum, TCP and, where the kernel has it,
    UDP segmentation) or off; whether they are on."""
    if not on:
        fcntl.ioctl(fd, _TUNSETOFFLOAD, 0)
        return False
    try:
        fcntl.ioctl(fd, _TUNSETOFFLOAD, _OFFLOADS_USO)
    except OSError:  # a kernel before 6.2: no UDP segmentation offload
        fcntl.ioctl(fd, _TUNSETOFFLOAD, _OFFLOADS)
    return True


def configure_tun(name: str, addresses: Iterable[str], mtu: int,
                  routes: Iterable[str] = (), netns: str | None = None) -> None:
    """Addresses (``10.77.0.2/24``, ``fd77::2/64``), MTU and routes of ``name``, then up
    (``ip`` from iproute2; ``CalledProcessError`` names the failing command)."""
    prefix = ["ip", "netns", "exec", netns] if netns else []
    cmds: list[Sequence[str]] = [["ip", "link", "set", "dev", name, "mtu", str(mtu)]]
    for addr in addresses:
        cmds.append(["ip", "addr", "replace", addr, "dev", name])
    cmds.append(["ip", "link", "set", "dev", name, "up"])
    for route in routes:
        cmds.append(["ip", "route", "replace", route, "dev", name])
    for cmd in cmds:
        subprocess.run([*prefix, *cmd], check=True, capture_output=True, timeout=30)
    # Super-packets (tun.offload) must fit a DATA frame; an ``ip`` too old for the key
    # leaves the kernel's 64 KiB, and the rare longer one is cut on read (tun_read_batch).
    subprocess.run([*prefix, "ip", "link", "set", "dev", name, "gso_max_size", str(GSO_MAX_SIZE)],
                   check=False, capture_output=True, timeout=30)


def _refused_last(packets: list, refused: list[int], tried: int) -> None:
    """Reorder ``packets[:tried]`` in place: the written ones first, then the refused."""
    skip = set(refused)
    written = [p for i, p in enumerate(packets[:tried]) if i not in skip]
    packets[:tried] = written + [packets[i] for i in refused]


def open_port(loop: asyncio.AbstractEventLoop, name: str, addresses: Iterable[str], mtu: int,
              routes: Iterable[str], on_batch: Callable[[list], None],
              offload: bool = False) -> TunPort:
    """This platform's TUN device ``name``, configured, as a ``TunPort`` (not started).

    ``offload`` (``tun.offload``): open it for offloads where the host can
    (``offload_possible``; ``port.vnet`` says whether it was); they are turned on by
    ``port.set_peer_offload(True)``.

    ``port.name`` is the interface's name (logged: ``tun_open``): on macOS the kernel
    names utun interfaces, so it is ``name`` only if that is a free ``utunN``.
    ``TunUnavailable`` elsewhere than Linux and macOS, or without the rights."""
    port_class: type[TunPort]
    addresses, routes = list(addresses), list(routes)
    vnet = offload and offload_possible()
    if sys.platform.startswith("linux"):
        fd, configure, port_class = open_tun(name, vnet), configure_tun, TunPort
    elif sys.platform == "darwin":
        from .tun_darwin import UtunPort, configure_utun, open_utun

        (fd, name), configure, port_class = open_utun(name), configure_utun, UtunPort
    else:
        raise TunUnavailable(f"TUN mode needs Linux (/dev/net/tun) or macOS (utun), not "
                             f"{sys.platform}: use WireGuard over ut-tunnel there")
    try:
        configure(name, addresses, mtu, routes)
    except BaseException:
        os.close(fd)
        raise
    port = port_class(loop, fd, on_batch, mtu=mtu, vnet=vnet)
    port.name = name
    event("tun_open", interface=name, address=addresses, mtu=mtu, routes=routes, offload=vnet)
    return port


class TunPort:
    """A TUN device's packets, with ``UdpPort``'s interface (``addr`` is ignored;
    ``on_batch`` gets the packets themselves).

    A subclass for a device whose packets carry a header (macOS utun) sets
    ``add_header`` (returns the datagram to write, or None for a packet the device
    cannot take) and ``strip_header``; on Linux both are None and the fast path's
    ``tun_read_batch``/``tun_write_batch`` do the reads and writes (up to ``READ_BATCH``
    packets per readiness callback, one call per batch); a framed device keeps one
    ``os.read``/``os.write`` per packet here.

    ``vnet``: the device was opened for offloads (``IFF_VNET_HDR``). Until
    ``set_peer_offload(True)`` its offloads are off and reads give plain IP packets;
    then they keep their ``virtio_net_hdr`` (maybe super-packets). Writes take both:
    a packet with no header gets a zeroed one."""

    read_size = 65536  # an IP packet's largest size (framed devices: _read_framed)
    add_header: Callable[[bytes], bytes | None] | None = None
    strip_header: Callable[[bytes], bytes] | None = None
    name = ""  # the interface (open_port)

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int,
                 on_batch: Callable[[list], None], mtu: int = 65535, vnet: bool = False) -> None:
        self.loop = loop
        self.fd = fd
        self.vnet = vnet
        self.peer_offload = False
        self._read_mode = 2 if vnet else 0  # tun_read_batch's vnet argument
        #: The device's MTU: reads take packets up to ``mtu + TUN_READ_HEADROOM`` bytes.
        self.mtu = mtu
        self.on_batch = on_batch
        self._reading = False

    @property
    def address(self) -> None:
        return None

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def set_peer_offload(self, on: bool) -> None:
        """The peer takes (``on``) or does not take super-packets with their header:
        turn the device's offloads on or off to match (a device opened without ``vnet``
        stays as it is)."""
        if not self.vnet or on == self.peer_offload or self.fd < 0:
            return
        set_offloads(self.fd, on)
        self.peer_offload = on
        self._read_mode = 1 if on else 2

    def start(self) -> None:
        if not self._reading:
            self.loop.add_reader(self.fd, self._on_readable)
            self._reading = True

    def pause(self) -> None:
        if self._reading:
            self.loop.remove_reader(self.fd)
            self._reading = False

    def _on_readable(self) -> None:
        if self.strip_header is None:
            # The whole loop in the fast path: one reused buffer, no exception per EAGAIN,
            # link_local() on the buffer (issue 21).
            batch = tun_read_batch(self.fd, READ_BATCH, self.mtu, self._read_mode)
        else:
            batch = self._read_framed()
        if batch:
            self.on_batch(batch)

    def _read_framed(self) -> list:
        # A device whose packets carry a header (macOS utun): one os.read each.
        batch = []
        fd, size, strip = self.fd, self.read_size, self.strip_header
        assert strip is not None
        for _ in range(READ_BATCH):
            try:
                packet = os.read(fd, size)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break  # the device went away: close() follows
            if not packet:
                break
            packet = strip(packet)
            if not packet:
                continue  # a header and nothing behind it
            if link_local(packet):
                continue  # the kernel talking to the link (ND, MLD): nothing to carry
            batch.append(packet)
        return batch

    def send_many(self, packets: list, addr: object = None) -> tuple[int, int]:
        """Write each packet; ``(sent, failed)``. A full device queue loses the rest of
        the batch (as a full UDP socket would; the caller counts them).

        The first ``sent`` packets of ``packets`` are the ones written: a packet the
        kernel refuses is skipped and moved behind them (the caller counts the bytes of
        ``packets[:sent]``)."""
        if self.add_header is not None:
            return self._send_framed(packets)
        fd, n = self.fd, len(packets)
        sent = start = 0
        refused: list[int] = []
        while start < n:
            done, _, err = tun_write_batch(fd, packets[start:] if start else packets, self.vnet)
            sent += done
            start += done
            if err in (errno.EINVAL, errno.EMSGSIZE):
                refused.append(start)  # not an IP packet the kernel takes: skip it, count it
                start += 1
                continue
            break  # all written, a full device queue (EAGAIN) or a device gone
        if refused:
            _refused_last(packets, refused, start)
        return sent, n - sent

    def _send_framed(self, packets: list) -> tuple[int, int]:
        # A device whose packets carry a header (macOS utun): one os.write each.
        sent = 0
        fd, add = self.fd, self.add_header
        assert add is not None
        refused: list[int] = []
        for i, packet in enumerate(packets):
            framed = add(packet)
            if framed is None:
                refused.append(i)
                continue
            try:
                os.write(fd, framed)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno in (errno.EINVAL, errno.EMSGSIZE):
                    refused.append(i)  # not an IP packet the kernel takes: skip it, count it
                    continue
                break
            sent += 1
        if refused:
            _refused_last(packets, refused, sent + len(refused))
        return sent, len(packets) - sent

    def close(self) -> None:
        self.pause()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
