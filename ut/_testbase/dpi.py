"""What a passive observer sees of the lanes: pcap reading, TLS record extraction,
WireGuard message matching, record-length statistics and an ``ndpiReader`` runner.

Standard library only (no dpkt, no scapy), so ``bench/`` and scripts can use it too::

    from ut._testbase import dpi
    records = dpi.tls_records(dpi.read_pcap("lanes.pcap"))
    messages = dpi.wireguard_messages(dpi.read_pcap("lo.pcap"), ut_port=15000)
    matches = dpi.match_carriers(messages, records, client_ip="10.1.2.11")
    flows, text = dpi.run_ndpi("lanes.pcap")

Conventions:

* A TLS record's ``length`` is the 16-bit length field of its 5-byte header (the
  ciphertext: for TLS 1.3 the payload + 1 content-type byte + 16 tag bytes). Without
  padding, one WireGuard message of *n* bytes alone in a lane write is one numbered DATA
  frame (9-byte header + 4-byte sequence number with ``tcp.resequence``, the default), so
  a record of length *n* + 30, *n* + 35 bytes on the wire (148 -> 178, 92 -> 122, 32 -> 62).
* A record's ``segment_len`` is the TCP payload length of the captured packet that holds
  the record's first byte (with GSO/GRO the capture can show "segments" above the MSS;
  the small ones that carry single WireGuard handshake or keepalive messages are real).
* Directions: ``up`` is client to server (home WireGuard -> ut client -> lanes), ``down``
  the other way.
"""

from __future__ import annotations

import bisect
import re
import shutil
import struct
import subprocess
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# ---------------------------------------------------------------------------- pcap
PCAP_MAGIC = {
    b"\xd4\xc3\xb2\xa1": ("<", 1e-6),
    b"\xa1\xb2\xc3\xd4": (">", 1e-6),
    b"\x4d\x3c\xb2\xa1": ("<", 1e-9),
    b"\xa1\xb2\x3c\x4d": (">", 1e-9),
}
LINKTYPE_NULL, LINKTYPE_ETHERNET, LINKTYPE_RAW, LINKTYPE_SLL, LINKTYPE_SLL2 = 0, 1, 101, 113, 276
ETH_IPV4, ETH_IPV6, ETH_VLAN = 0x0800, 0x86DD, {0x8100, 0x88A8}
TCP, UDP = 6, 17


class PcapError(ValueError):
    """The file is not a pcap this reader understands (pcapng: write with ``tcpdump -w``)."""


@dataclass(frozen=True)
class Packet:
    """One captured IPv4/IPv6 TCP or UDP packet (others are skipped)."""

    ts: float  # capture time, seconds since the epoch (the kernel's clock)
    proto: int  # TCP or UDP
    src: str
    sport: int
    dst: str
    dport: int
    payload: bytes  # transport payload as captured
    payload_len: int  # transport payload length on the wire (from the IP header)
    seq: int = 0  # TCP only
    flags: int = 0  # TCP only

    @property
    def syn(self) -> bool:
        return bool(self.flags & 0x02)

    @property
    def truncated(self) -> bool:
        return len(self.payload) < self.payload_len


def read_pcap(path: str | Path) -> Iterator[Packet]:
    """The TCP and UDP packets of a classic pcap file (``tcpdump -w``), in file order."""
    with open(path, "rb") as f:
        head = f.read(24)
        if len(head) < 24 or head[:4] not in PCAP_MAGIC:
            raise PcapError(f"{path}: not a classic pcap file (magic {head[:4].hex()})")
        endian, unit = PCAP_MAGIC[head[:4]]
        linktype = struct.unpack(endian + "I", head[20:24])[0] & 0x0FFFFFFF
        rec = struct.Struct(endian + "IIII")
        while True:
            h = f.read(16)
            if len(h) < 16:
                return
            sec, frac, caplen, _wirelen = rec.unpack(h)
            data = f.read(caplen)
            if len(data) < caplen:
                return  # a capture cut short while being written
            pkt = _decode(linktype, data, sec + frac * unit)
            if pkt is not None:
                yield pkt


def _decode(linktype: int, data: bytes, ts: float) -> Packet | None:
    if linktype == LINKTYPE_ETHERNET:
        if len(data) < 14:
            return None
        off, etype = 14, int.from_bytes(data[12:14], "big")
        while etype in ETH_VLAN and len(data) >= off + 4:
            etype = int.from_bytes(data[off + 2:off + 4], "big")
            off += 4
    elif linktype == LINKTYPE_SLL:
        off, etype = 16, int.from_bytes(data[14:16], "big")
    elif linktype == LINKTYPE_SLL2:
        off, etype = 20, int.from_bytes(data[0:2], "big")
    elif linktype in (LINKTYPE_RAW, 12, 14):
        off, etype = 0, ETH_IPV4 if data[:1] and data[0] >> 4 == 4 else ETH_IPV6
    elif linktype == LINKTYPE_NULL:
        fam = int.from_bytes(data[0:4], "little") if len(data) >= 4 else 0
        off, etype = 4, ETH_IPV4 if fam == 2 else ETH_IPV6
    else:
        raise PcapError(f"unsupported pcap link type {linktype}")
    ip = data[off:]
    if etype == ETH_IPV4 and len(ip) >= 20 and ip[0] >> 4 == 4:
        ihl = (ip[0] & 0x0F) * 4
        total = int.from_bytes(ip[2:4], "big")
        if int.from_bytes(ip[6:8], "big") & 0x1FFF:
            return None  # a non-first fragment
        proto, src, dst = ip[9], _ip4(ip[12:16]), _ip4(ip[16:20])
        l4, l4_len = ip[ihl:total], total - ihl
    elif etype == ETH_IPV6 and len(ip) >= 40 and ip[0] >> 4 == 6:
        proto = ip[6]  # extension headers are not followed
        src, dst = _ip6(ip[8:24]), _ip6(ip[24:40])
        l4_len = int.from_bytes(ip[4:6], "big")
        l4 = ip[40:40 + l4_len]
    else:
        return None
    if proto == TCP and len(l4) >= 20:
        doff = (l4[12] >> 4) * 4
        sport, dport, seq = struct.unpack("!HHI", l4[:8])
        return Packet(ts, TCP, src, sport, dst, dport, bytes(l4[doff:]), l4_len - doff,
                      seq=seq, flags=l4[13])
    if proto == UDP and len(l4) >= 8:
        sport, dport = struct.unpack("!HH", l4[:4])
        return Packet(ts, UDP, src, sport, dst, dport, bytes(l4[8:]), l4_len - 8)
    return None


def _ip4(b: bytes) -> str:
    return ".".join(str(x) for x in b)


def _ip6(b: bytes) -> str:
    import ipaddress

    return str(ipaddress.IPv6Address(b))


# ---------------------------------------------------------------------------- TLS records
Flow = tuple[str, int, str, int]  # (src, sport, dst, dport) of one direction

TLS_CHANGE_CIPHER_SPEC, TLS_ALERT, TLS_HANDSHAKE, TLS_APPLICATION_DATA = 20, 21, 22, 23


@dataclass(frozen=True)
class TlsRecord:
    flow: Flow  # the direction that carried it
    ts: float  # capture time of the packet holding the record's first byte
    ts_end: float  # ... and its last byte
    content_type: int  # outer type (TLS 1.3 shows everything after ServerHello as 23)
    length: int  # the header's length field
    segment_len: int  # TCP payload length of the packet holding the first byte
    offset: int  # stream offset of the record header

    @property
    def wire_len(self) -> int:
        return self.length + 5


@dataclass
class StreamInfo:
    """One TCP direction after reassembly."""

    flow: Flow
    bytes: int = 0
    records: int = 0
    gap_at: int | None = None  # stream offset of the first missing byte (parsing stops)
    not_tls_at: int | None = None  # offset where the bytes stopped looking like TLS
    truncated: bool = False  # a packet was cut by the snap length


def tcp_streams(packets: Iterable[Packet]) -> dict[Flow, list[tuple[int, float, bytes, int]]]:
    """Per direction, the segments as (stream offset, ts, payload, payload_len), sorted,
    retransmitted bytes removed. Offsets count from the byte after the SYN (or, without
    a SYN in the capture, from the first segment seen)."""
    segs: dict[Flow, list[tuple[int, float, bytes, int]]] = {}
    isn: dict[Flow, int] = {}
    for p in packets:
        if p.proto != TCP:
            continue
        flow = (p.src, p.sport, p.dst, p.dport)
        if p.syn:
            isn[flow] = (p.seq + 1) & 0xFFFFFFFF
            continue
        if p.payload_len <= 0:
            continue
        base = isn.setdefault(flow, p.seq)
        segs.setdefault(flow, []).append(((p.seq - base) & 0xFFFFFFFF, p.ts, p.payload, p.payload_len))
    for flow, lst in segs.items():
        lst.sort(key=lambda s: (s[0], s[1]))
        out, end = [], 0
        for off, ts, payload, plen in lst:
            if off + plen <= end:
                continue  # a retransmission of bytes we have
            if off < end:  # partly new: keep the new tail
                cut = end - off
                payload, plen, off = payload[cut:], plen - cut, end
            out.append((off, ts, payload, plen))
            end = off + plen
        segs[flow] = out
    return segs


def tls_records(packets: Iterable[Packet], info: dict[Flow, StreamInfo] | None = None) -> list[TlsRecord]:
    """Every TLS record header in every TCP direction, in time order. ``info`` (if given)
    is filled with a StreamInfo per direction (gaps, non-TLS bytes, truncation)."""
    records: list[TlsRecord] = []
    for flow, segs in tcp_streams(packets).items():
        si = StreamInfo(flow)
        if info is not None:
            info[flow] = si
        buf = bytearray()
        starts, times, lens = [], [], []
        for off, ts, payload, plen in segs:
            if off != len(buf):
                si.gap_at = len(buf)
                break
            if len(payload) < plen:
                si.truncated = True
                si.gap_at = len(buf) + len(payload)
                buf += payload
                starts.append(off)
                times.append(ts)
                lens.append(plen)
                break
            buf += payload
            starts.append(off)
            times.append(ts)
            lens.append(plen)
        si.bytes = len(buf)
        pos = 0
        while pos + 5 <= len(buf):
            ctype, major, length = buf[pos], buf[pos + 1], int.from_bytes(buf[pos + 3:pos + 5], "big")
            if not (20 <= ctype <= 24 and major == 3 and length <= 16384 + 2048):
                si.not_tls_at = pos
                break
            if pos + 5 + length > len(buf):
                break  # the rest is missing from the capture
            i = bisect.bisect_right(starts, pos) - 1
            j = bisect.bisect_right(starts, pos + 4 + length) - 1
            records.append(TlsRecord(flow, times[i], times[j], ctype, length, lens[i], pos))
            si.records += 1
            pos += 5 + length
    records.sort(key=lambda r: (r.ts, r.offset))
    return records


# ---------------------------------------------------------------------------- WireGuard
WG_KINDS = {1: "initiation", 2: "response", 3: "cookie"}
WG_SIZES = {"initiation": 148, "response": 92, "cookie": 64, "keepalive": 32}


@dataclass(frozen=True)
class WgMessage:
    ts: float
    direction: str  # "up": WireGuard -> ut client (to the lanes); "down": ut client -> WireGuard
    kind: str  # initiation, response, cookie, keepalive, data, other
    size: int  # UDP payload bytes


def wg_kind(payload: bytes, size: int) -> str:
    """WireGuard message type from its first byte (and 32-byte type 4 = keepalive)."""
    if size < 4 or payload[1:4] != b"\0\0\0":
        return "other"
    t = payload[0]
    if t == 4:
        return "keepalive" if size == 32 else "data"
    kind = WG_KINDS.get(t, "other")
    return kind if kind == "other" or size == WG_SIZES[kind] else "other"


def wireguard_messages(packets: Iterable[Packet], ut_port: int, ut_ip: str = "127.0.0.1") -> list[WgMessage]:
    """The WireGuard datagrams between WireGuard and the ut client's UDP socket
    (``ut_ip:ut_port``, the client's ``udp.listen_addr``), from a capture on that
    interface (loopback). Datagrams to/from other ports of the same address are skipped."""
    out = []
    for p in packets:
        if p.proto != UDP:
            continue
        if (p.dst, p.dport) == (ut_ip, ut_port):
            direction = "up"
        elif (p.src, p.sport) == (ut_ip, ut_port):
            direction = "down"
        else:
            continue
        out.append(WgMessage(p.ts, direction, wg_kind(p.payload, p.payload_len), p.payload_len))
    out.sort(key=lambda m: m.ts)
    return out


# ---------------------------------------------------------------------------- matching
@dataclass(frozen=True)
class Match:
    message: WgMessage
    record: TlsRecord | None  # None: no record in the window
    candidates: int  # application-data records of that direction within the window

    @property
    def lag(self) -> float | None:
        return None if self.record is None else abs(self.record.ts - self.message.ts)


def match_carriers(
    messages: Sequence[WgMessage],
    records: Sequence[TlsRecord],
    client_ip: str,
    window: float = 0.2,
    kinds: Iterable[str] = ("initiation", "response", "cookie", "keepalive"),
) -> list[Match]:
    """For each message of ``kinds``, the TLS application-data record that carried it.

    ``up`` (WireGuard handed it to the ut client, which then writes it to a lane): the
    first client->server record captured at or after the message, within ``window``
    seconds. ``down`` (a lane brought it, the ut client then handed it to WireGuard):
    the last server->client record captured at or before it, within ``window``. All lanes
    count (a message may ride any of them). ``candidates`` says how many records were in
    the window, so a caller can see whether the idle-time assumption (one message, one
    record) held.
    """
    kinds = set(kinds)
    up = [r for r in records if r.content_type == TLS_APPLICATION_DATA and r.flow[0] == client_ip]
    down = [r for r in records if r.content_type == TLS_APPLICATION_DATA and r.flow[2] == client_ip]
    up_ts = [r.ts for r in up]
    down_ts = [r.ts for r in down]
    out = []
    for m in messages:
        if m.kind not in kinds:
            continue
        if m.direction == "up":
            lo = bisect.bisect_left(up_ts, m.ts)
            hi = bisect.bisect_right(up_ts, m.ts + window)
            rec = up[lo] if hi > lo else None
        else:
            lo = bisect.bisect_left(down_ts, m.ts - window)
            hi = bisect.bisect_right(down_ts, m.ts)
            rec = down[hi - 1] if hi > lo else None
        out.append(Match(m, rec, hi - lo))
    return out


# ---------------------------------------------------------------------------- statistics
def mode_share(values: Sequence[int]) -> tuple[int | None, float]:
    """(most common value, the share of ``values`` it covers); (None, 0.0) when empty."""
    if not values:
        return None, 0.0
    value, count = Counter(values).most_common(1)[0]
    return value, count / len(values)


def ks_distance(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sample Kolmogorov-Smirnov distance: max over t of |F_a(t) - F_b(t)|.

    For lengths this is also what the best single-threshold classifier ("length <= t
    means class a", or the reverse) achieves: its balanced accuracy (the mean of the
    per-class hit rates) is 0.5 + D/2. D = 1: one threshold separates the two perfectly;
    D = 0: the two length distributions are identical.
    """
    if not a or not b:
        return 0.0
    sa, sb = sorted(a), sorted(b)
    d = 0.0
    for t in sorted(set(sa) | set(sb)):
        fa = bisect.bisect_right(sa, t) / len(sa)
        fb = bisect.bisect_right(sb, t) / len(sb)
        d = max(d, abs(fa - fb))
    return d


def best_threshold_accuracy(a: Sequence[float], b: Sequence[float]) -> float:
    """Balanced accuracy of the best single length threshold between ``a`` and ``b``."""
    return 0.5 + ks_distance(a, b) / 2


@dataclass
class LengthStats:
    """The carrying lengths of one WireGuard message kind in one direction."""

    kind: str
    direction: str
    record_lengths: list[int] = field(default_factory=list)
    segment_lengths: list[int] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.record_lengths)

    def row(self) -> str:
        rv, rs = mode_share(self.record_lengths)
        sv, ss = mode_share(self.segment_lengths)
        rl = self.record_lengths
        span = f"{min(rl)}..{max(rl)}" if rl else "-"
        distinct = len(set(rl))
        return (f"{self.kind:<10} {self.direction:<4} {WG_SIZES.get(self.kind, 0):>4} B  n={self.n:<3} "
                f"record len {span:<9} distinct {distinct:<3} mode {rv} ({rs:.0%})  "
                f"segment mode {sv} ({ss:.0%})")


def length_stats(matches: Iterable[Match]) -> dict[tuple[str, str], LengthStats]:
    """Matched records grouped by (kind, direction)."""
    out: dict[tuple[str, str], LengthStats] = {}
    for m in matches:
        if m.record is None:
            continue
        key = (m.message.kind, m.message.direction)
        st = out.setdefault(key, LengthStats(*key))
        st.record_lengths.append(m.record.length)
        st.segment_lengths.append(m.record.segment_len)
    return out


# ---------------------------------------------------------------------------- nDPI
@dataclass(frozen=True)
class NdpiFlow:
    l4: str  # TCP / UDP
    client: tuple[str, int]
    server: tuple[str, int]
    proto: str  # e.g. "TLS", "TLS.Google", "HTTP"
    proto_ids: str  # e.g. "91", "91.126"
    risks: tuple[str, ...]
    sni: str | None
    confidence: str | None
    line: str

    @property
    def is_tls(self) -> bool:
        """TLS or a TLS sub-protocol ("TLS.Google"); the master protocol comes first."""
        return self.proto.split(".")[0] == "TLS"


_FLOW = re.compile(
    r"^\s*\d+\s+(?P<l4>[A-Za-z0-9]+)\s+(?P<c>\[[^\]]+\]|[^\s\[\]]+):(?P<cp>\d+)\s+<?->\s+"
    r"(?P<s>\[[^\]]+\]|[^\s\[\]]+):(?P<sp>\d+)\s+(?P<rest>\[.*)$"
)
_PROTO = re.compile(r"\[proto: (?:(?P<ids>[0-9.]+)/)?(?P<name>[^\]]+)\]")
_RISKS = re.compile(r"\[Risk: ((?:\*\* .+? \*\*)+)\]")
_RISK = re.compile(r"\*\* (.+?) \*\*")
_SNI = re.compile(r"\[Hostname/SNI: ([^\]]*)\]")
_CONF = re.compile(r"\[Confidence: ([^\]]*)\]")


def parse_ndpi_flows(text: str) -> list[NdpiFlow]:
    """The per-flow lines of ``ndpiReader -v 2`` (nDPI 4.x text output)."""
    flows = []
    for line in text.splitlines():
        m = _FLOW.match(line)
        if not m:
            continue
        rest = m.group("rest")
        pm = _PROTO.search(rest)
        if not pm:
            continue
        rm = _RISKS.search(rest)
        sm = _SNI.search(rest)
        cm = _CONF.search(rest)
        flows.append(NdpiFlow(
            l4=m.group("l4"),
            client=(m.group("c").strip("[]"), int(m.group("cp"))),
            server=(m.group("s").strip("[]"), int(m.group("sp"))),
            proto=pm.group("name"),
            proto_ids=pm.group("ids") or "",
            risks=tuple(_RISK.findall(rm.group(1))) if rm else (),
            sni=sm.group(1) if sm else None,
            confidence=cm.group(1) if cm else None,
            line=line.strip(),
        ))
    return flows


def ndpi_version(ndpi: str = "ndpiReader") -> str | None:
    """nDPI's version as ndpiReader reports it ("4.2.0"), or None."""
    try:
        res = subprocess.run([ndpi, "-h"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"nDPI (?:\()?v?(\d+\.\d+[.\w-]*)", res.stdout + res.stderr)
    return m.group(1) if m else None


def run_ndpi(pcap: str | Path, ndpi: str = "ndpiReader", extra: Sequence[str] = (),
             timeout: float = 60) -> tuple[list[NdpiFlow], str]:
    """``ndpiReader -i PCAP -d -v 2``: DPI only (``-d``: no guess from the port number),
    every flow printed. Returns (flows, the whole output)."""
    exe = shutil.which(ndpi) or ndpi
    res = subprocess.run([exe, "-i", str(pcap), "-d", "-v", "2", *extra],
                         capture_output=True, text=True, timeout=timeout)
    text = res.stdout + res.stderr
    if res.returncode != 0:
        raise RuntimeError(f"ndpiReader failed ({res.returncode}):\n{text[-3000:]}")
    return parse_ndpi_flows(text), text


def ndpi_summary(text: str) -> str:
    """The "Detected protocols" and "Risk stats" blocks of ndpiReader's output."""
    keep, out = False, []
    for line in text.splitlines():
        if line.startswith(("Detected protocols:", "Risk stats")):
            keep = True
        elif line and not line.startswith(("\t", " ")):
            keep = False
        if keep and line.strip() and "NOTE:" not in line and "last column" not in line:
            out.append(line.rstrip())
    return "\n".join(out)
