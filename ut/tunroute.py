"""TUN mode's addressing (sans-I/O): who may send from which address, who gets a packet.

In TUN mode (``tun.enabled``) a lane carries IP packets instead of WireGuard datagrams.
The server holds a static map, certificate CN -> the networks that client owns (like
WireGuard's AllowedIPs, ``tun.clients``): a packet that arrives from a client's session
must come *from* one of that CN's addresses (anything else is dropped and counted as
``spoofed``), and a packet read from the server's TUN device goes to the session of the
CN that owns its *destination* (longest prefix wins; no owner: dropped as ``no_route``).

``packet_addresses`` reads an IPv4 or IPv6 header's source and destination without
copying them; ``AddressBook`` answers both questions.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

__all__ = ["AddressBook", "link_local", "packet_addresses", "parse_client_entry"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def packet_addresses(packet: bytes) -> tuple[int, bytes, bytes] | None:
    """``(version, source, destination)`` of an IP packet (addresses as 4 or 16 raw
    bytes), or None if it is too short or not IPv4/IPv6."""
    if not packet:
        return None
    version = packet[0] >> 4
    if version == 4 and len(packet) >= 20:
        return 4, packet[12:16], packet[16:20]
    if version == 6 and len(packet) >= 40:
        return 6, packet[8:24], packet[24:40]
    return None


def link_local(packet: bytes) -> bool:
    """Whether an IP packet only concerns the TUN link itself (IPv6 neighbour discovery,
    MLD and router solicitations from a link-local or unspecified source or to a
    link-scope multicast group; IPv4 local-network multicast or broadcast): such packets
    are the kernel talking to the interface, never traffic to carry."""
    if not packet:
        return False
    version = packet[0] >> 4
    if version == 6 and len(packet) >= 40:
        src0, src1, dst0, dst1 = packet[8], packet[9], packet[24], packet[25]
        return (src0 == 0xFE and src1 & 0xC0 == 0x80) or not any(packet[8:24]) or (
            dst0 == 0xFF and dst1 & 0x0F <= 2)
    if version == 4 and len(packet) >= 20:
        return packet[16:19] == b"\xe0\x00\x00" or packet[16:20] == b"\xff\xff\xff\xff"
    return False


def parse_client_entry(text: str) -> tuple[str, list[Network]]:
    """``"home=10.77.0.2/32,fd77::2/128"`` -> ``("home", [networks])`` (``ValueError``
    with what is wrong)."""
    cn, sep, nets = text.partition("=")
    cn = cn.strip()
    if not sep or not cn:
        raise ValueError(f'expected "CN=address[/prefix],...", got {text[:60]!r}')
    out = []
    for part in nets.split(","):
        part = part.strip()
        if not part:
            continue
        out.append(ipaddress.ip_network(part, strict=False))
    if not out:
        raise ValueError(f"no address for {cn!r}")
    return cn, out


@dataclass
class AddressBook:
    """CN -> networks, and the reverse lookup by destination address. Lookups compare
    integers (network address and mask), a few hundred nanoseconds per packet."""

    by_cn: dict[str, list[Network]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        seen: list[tuple[Network, str]] = []
        for cn, nets in self.by_cn.items():
            for net in nets:
                for other, owner in seen:
                    if owner != cn and net.version == other.version and net.overlaps(other):
                        raise ValueError(f"{cn}'s {net} overlaps {owner}'s {other}")
                seen.append((net, cn))
        # Longest prefixes first, per version: (network int, mask int, cn).
        self._routes: dict[int, list[tuple[int, int, str]]] = {
            v: [(int(n.network_address), int(n.netmask), cn)
                for n, cn in sorted(seen, key=lambda x: -x[0].prefixlen) if n.version == v]
            for v in (4, 6)
        }
        self._own: dict[str, list[tuple[int, int, int]]] = {
            cn: [(n.version, int(n.network_address), int(n.netmask)) for n in nets]
            for cn, nets in self.by_cn.items()
        }

    @classmethod
    def from_entries(cls, entries: Iterable[str]) -> AddressBook:
        by_cn: dict[str, list[Network]] = {}
        for entry in entries:
            cn, nets = parse_client_entry(entry)
            if cn in by_cn:
                raise ValueError(f"{cn!r} is listed twice")
            by_cn[cn] = nets
        return cls(by_cn)

    def networks(self, cn: str) -> Sequence[Network]:
        return self.by_cn.get(cn, ())

    def may_send_from(self, cn: str, version: int, source: bytes) -> bool:
        """Whether ``cn`` owns the packet source ``source`` (raw bytes)."""
        addr = int.from_bytes(source, "big")
        return any(v == version and addr & mask == net for v, net, mask in self._own.get(cn, ()))

    def owner_of(self, version: int, destination: bytes) -> str | None:
        """The CN whose networks hold ``destination`` (longest prefix), or None."""
        addr = int.from_bytes(destination, "big")
        for net, mask, cn in self._routes.get(version, ()):
            if addr & mask == net:
                return cn
        return None
