"""TUN mode on the server: one TUN device shared by every client session.

``TunHub`` owns the server's TUN device (``tun:`` config): packets read from it go to
the session of the client CN that owns their destination (``ut.tunroute.AddressBook``,
longest prefix; the newest session of that CN if it has several); each session gets a
``SessionTunPort`` in place of its UDP port, which writes the packets its lanes bring to
the device after checking that their *source* belongs to the session's CN. Drops are
counted on the session (``spoofed``) or on the hub (``no_route``: no client owns the
destination, or its session is gone).

With ``tun.offload`` the device gives packets behind a ``virtio_net_hdr``, maybe TCP or
UDP super-packets (``ut.tun``): a session whose client offered offloads on its HELLO
gets them as they are; any other gets them cut to plain packets (``fastpath.gso_split``).
What a client sends may be either (the first byte tells: an IP version, or the
header's flags), and the source checked is the one the kernel will see.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from .fastpath import VNET_HDR_LEN, gso_split
from .logs import Debounced, event
from .tun import open_port
from .tunroute import AddressBook, packet_addresses

__all__ = ["SessionTunPort", "TunHub"]

# Addresses remembered per session (sources checked) and by the hub (destinations routed):
# a lookup of a few hundred nanoseconds each is still per packet; a set hit is ~50 ns.
SOURCE_CACHE = 4096


class SessionTunPort:
    """A session's view of the hub: ``UdpPort``'s interface, writes checked by source."""

    def __init__(self, hub: TunHub, session: Any) -> None:
        self.hub = hub
        self.session = session
        self.address = None
        self._allowed: set[bytes] = set()  # sources already checked against the CN

    @property
    def closed(self) -> bool:
        return self.session.closed or self.hub.port.closed

    def start(self) -> None:
        self.hub.attach(self.session)

    def send_many(self, packets: list, addr: object = None) -> tuple[int, int]:
        """Write the packets whose source the session's CN owns; ``(sent, failed)``.

        The others are dropped and counted here (``spoofed``, packets only), and taken
        out of ``packets`` itself, so that what the caller counts as sent or failed, by
        number and by bytes, is only what was offered to the device
        (``Session.send_udp`` counts the bytes of the list's first ``sent``).
        """
        ok = []
        book, cn = self.hub.book, self.session.client_cn
        allowed = self._allowed
        for packet in packets:  # the client may only send from its own addresses
            version = packet[0] >> 4 if packet else 0
            at = 0
            if version != 4 and version != 6 and len(packet) > VNET_HDR_LEN:
                # A packet behind its virtio_net_hdr (tun.offload): the device reads the
                # header and takes the IP packet after it.
                at = VNET_HDR_LEN
                version = packet[at] >> 4
            source = (packet[at + 12:at + 16] if version == 4 else
                      packet[at + 8:at + 24] if version == 6 else b"")
            if source in allowed:  # the common case: a source seen and allowed before
                ok.append(packet)
                continue
            parsed = packet_addresses(packet[at:at + 40])
            if parsed is not None and book.may_send_from(cn, parsed[0], parsed[1]):
                if len(allowed) >= SOURCE_CACHE:
                    allowed.clear()
                allowed.add(parsed[1])
                ok.append(packet)
        spoofed = len(packets) - len(ok)
        if spoofed:
            packets[:] = ok  # the caller's ``datagrams[:sent]`` are then the packets sent
            self.hub.spoofed(self.session, spoofed)
        sent, failed = self.hub.port.send_many(ok) if ok else (0, 0)
        # The caller counts ``failed`` as lost; spoofed packets were counted already.
        return sent, failed

    def close(self) -> None:
        self.hub.detach(self.session)


class TunHub:
    """The server's TUN device and the routing between it and client sessions."""

    def __init__(self, loop: asyncio.AbstractEventLoop, config: Any) -> None:
        tun = config.tun
        self.book = AddressBook.from_entries(tun.clients)
        self.loop = loop
        self.port = open_port(loop, tun.name, tun.address, tun.mtu, (), self._from_device,
                              offload=tun.offload)
        # Offloads on for good: one device serves every client, and a client that does
        # not take super-packets gets them cut (_from_device).
        self.port.set_peer_offload(True)
        self.by_cn: dict[str, Any] = {}  # CN -> its newest session
        self._routes: dict[bytes, Any] = {}  # destination seen -> its session (a cache)
        self.no_route = 0
        self._log = Debounced(5.0)
        self.port.start()

    def port_for(self, session: Any) -> SessionTunPort:
        return SessionTunPort(self, session)

    def attach(self, session: Any) -> None:
        self.by_cn[session.client_cn] = session
        self._routes.clear()  # destinations may now belong to this newer session

    def detach(self, session: Any) -> None:
        cn = session.client_cn
        if self.by_cn.get(cn) is session:  # a newer session of the CN keeps its place
            del self.by_cn[cn]
            self._routes.clear()

    def _from_device(self, batch: list) -> None:
        """Packets the kernel routed into the device: to their destination's session."""
        out: dict[Any, list] = {}
        book, by_cn, routes = self.book, self.by_cn, self._routes
        lost = 0
        at = VNET_HDR_LEN if self.port.vnet else 0  # every packet behind its header
        for packet in batch:
            version = packet[at] >> 4
            dest = (packet[at + 16:at + 20] if version == 4 else
                    packet[at + 24:at + 40] if version == 6 else b"")
            session = routes.get(dest)  # the common case: a destination seen before
            if session is None:
                parsed = packet_addresses(packet[at:at + 40])
                owner = book.owner_of(parsed[0], parsed[2]) if parsed is not None else None
                session = by_cn.get(owner) if owner is not None else None
                if session is None:
                    lost += 1
                    continue
                if len(routes) >= SOURCE_CACHE:
                    routes.clear()
                routes[dest] = session
            out.setdefault(session, []).append(packet)
        for session, packets in out.items():
            if at and not session.offload:  # a client that takes no super-packets
                packets = self._plain(session, packets)
            session.push_datagrams(packets)
        if lost:
            self.no_route += lost
            due = self._log.hit()
            if due:
                event("tun_no_route", logging.WARNING, role="server", count=due,
                      dropped_total=self.no_route,
                      err="packets for an address no connected client owns (tun.clients)")

    def _plain(self, session: Any, packets: list) -> list:
        """Packets behind a ``virtio_net_hdr`` as plain IP packets for ``session``: the
        header dropped, super-packets cut and checksums finished (``gso_split``)."""
        plain: list = []
        lost = 0
        for packet in packets:
            if packet[0] == 0 and packet[1] == 0:  # no offload at work: only the header
                plain.append(packet[VNET_HDR_LEN:])
                continue
            cut = gso_split(packet)
            if not cut:
                lost += 1
            plain += cut
        if lost:
            session.counters.drop("offload", lost)
            due = self._log.hit()
            if due:
                session.log("tun_offload_drop", logging.WARNING, count=due,
                            err="a super-packet this server could not cut for a client "
                                "without offloads")
        return plain

    def spoofed(self, session: Any, n: int) -> None:
        session.counters.drop("spoofed", n)
        due = self._log.hit()
        if due:
            session.log("tun_spoofed", logging.WARNING, count=due,
                        err="packets from an address this client does not own (tun.clients)")

    def close(self) -> None:
        self.port.close()
