"""Record shaping (issue 15): PAD frames, their negotiation on HELLO, and what the TLS
record lengths of a real tunnel say about the datagrams inside."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

import ut
from ut import fastpath, shaping
from ut._testbase.faultproxy import FaultProxy
from ut._testbase.tunnelkit import (
    UdpEcho,
    UdpPeer,
    client_config,
    run_on,
    server_config,
    tunnel,
    wait_for,
)

WG_INIT, WG_RESPONSE, WG_KEEPALIVE = 148, 92, 32  # WireGuard's fixed message sizes
TLS13_OVERHEAD = 22  # record header 5 + content type 1 + AEAD tag 16


# -- the length policy ----------------------------------------------------------------

@pytest.mark.parametrize("n", [0, 22, 41, 105, 161, 165])
def test_small_writes_all_look_alike(n):
    # Every write shorter than SMALL_WRITE with its PAD frame ends up uniform over the
    # same range, whatever it carried.
    lengths = [n + shaping.PAD_FRAME_OVERHEAD + shaping.pad_length(n) for _ in range(4000)]
    lo, hi = shaping.SMALL_WRITE, shaping.SMALL_WRITE + shaping.SMALL_SPREAD
    assert min(lengths) >= lo and max(lengths) < hi
    counts = collections.Counter(lengths)
    assert len(counts) > shaping.SMALL_SPREAD * 0.9  # nearly every value shows up
    assert max(counts.values()) < 4000 * 0.02  # none stands out (uniform: 0.4 % each)
    assert abs(sum(lengths) / len(lengths) - (lo + hi - 1) / 2) < 8


@pytest.mark.parametrize("n, spread", [(166, shaping.SPREAD), (700, shaping.SPREAD),
                                       (1014, shaping.BULK_SPREAD), (16384, shaping.BULK_SPREAD)])
def test_larger_writes_get_a_bounded_extra(n, spread):
    pads = {shaping.pad_length(n) for _ in range(3000)}
    assert pads == set(range(spread))


# -- negotiation through real tunnels -------------------------------------------------

def _pad_bytes(lanes) -> int:
    return sum(lane.tx_pad_bytes for lane in lanes if lane is not None)


@pytest.mark.parametrize("client_pads, server_pads", [
    (True, True), (True, False), (False, True), (False, False)])
def test_each_end_pads_only_when_it_is_configured_to(pki, client_pads, server_pads):
    async def main():
        async with tunnel(pki, lanes=2,
                          client_tcp={"_extra": {"shaping": {"padding": client_pads}}},
                          server_tcp={"_extra": {"shaping": {"padding": server_pads}}}) as t:
            for i in range(30):
                t.peer.send(b"x%d" % i)
            got = await t.peer.drain(30)
            assert sorted(got) == sorted(b"x%d" % i for i in range(30))
            (server_session,) = t.server.sessions.values()
            assert await wait_for(lambda: None not in t.client.session.lanes + server_session.lanes)
            for i in range(30):  # the later lanes (they dial with a stagger) carry some too
                t.peer.send(b"z%d" % i)
            assert len(await t.peer.drain(30)) == 30
            client_lanes = t.client.session.lanes
            assert all(lane.pad_writes is client_pads for lane in client_lanes)
            assert all(lane.pad_writes is server_pads for lane in server_session.lanes)
            assert (_pad_bytes(client_lanes) > 0) is client_pads
            assert (_pad_bytes(server_session.lanes) > 0) is server_pads
            assert not any(t.server._stats.protocol_errors.values())

    run_on("uvloop", main())


def test_a_peer_without_padding_gets_none_after_the_hello(pki, monkeypatch):
    # A server that predates padding sets no FLAG_PAD on its HELLO: the client pads the
    # write that carries its own HELLO (it cannot know yet) and nothing after it.
    import ut.server

    monkeypatch.setattr(ut.server, "hello_flags",
                        lambda resequence, offload=False: fastpath.FLAG_SEQ if resequence else 0)

    async def main():
        async with tunnel(pki, lanes=2) as t:
            for i in range(30):
                t.peer.send(b"y%d" % i)
            assert len(await t.peer.drain(30)) == 30
            assert await wait_for(lambda: None not in t.client.session.lanes)
            lanes = t.client.session.lanes
            assert not any(lane.pad_writes for lane in lanes)
            # HELLO frames are 22 bytes: each lane padded exactly that one write.
            for lane in lanes:
                hello_pad = lane.tx_pad_bytes
                assert shaping.SMALL_WRITE - 22 <= hello_pad < shaping.SMALL_WRITE - 22 + shaping.SMALL_SPREAD

    run_on("uvloop", main())


# -- what an observer sees ---------------------------------------------------------------

def app_record_lengths(stream: bytes) -> list[int]:
    """Lengths (header included) of the TLS application-data records in ``stream``."""
    out, pos = [], 0
    while pos + 5 <= len(stream):
        rtype, _version, length = struct.unpack_from(">BHH", stream, pos)
        if rtype == 0x17:
            out.append(5 + length)
        pos += 5 + length
    return out


@contextlib.asynccontextmanager
async def recorded_tunnel(pki, shaping_cfg: dict):
    """A one-lane tunnel whose lane goes through a recording FaultProxy: yields the UDP
    peer in front of the client and the proxied connection (``conn.seen`` holds every
    byte the client sent), once a first datagram has gone through."""
    echo = UdpEcho().start()
    server = ut.Server(server_config(pki, echo.address, lanes=1))
    await server.start()
    proxy = await FaultProxy(server.address[:2], record=True).start()
    client = ut.Client(client_config(pki, proxy.address, lanes=1,
                                     _extra={"shaping": shaping_cfg}))
    await client.start()
    peer = await UdpPeer.open(client.udp_address[:2])
    try:
        peer.send(b"\x01" + bytes(WG_INIT - 1))
        await peer.recv()
        assert await wait_for(lambda: proxy.live)
        (conn,) = proxy.live
        yield peer, conn
    finally:
        peer.close()
        await client.close()
        await server.close()
        await proxy.close()
        echo.close()


async def _records_of_wg_sized_datagrams(pki, padding: bool) -> dict[int, list[int]]:
    """Send WireGuard-sized datagrams one at a time through a one-lane tunnel and return,
    per size, the lengths of the client's TLS records that carried them."""
    async with recorded_tunnel(pki, {"padding": padding}) as (peer, conn):
        by_size: dict[int, list[int]] = {}
        for size in (WG_INIT, WG_RESPONSE, WG_KEEPALIVE) * 40:
            before = len(app_record_lengths(bytes(conn.seen["up"])))
            peer.send(b"\x04" + bytes(size - 1))
            await peer.recv()
            await asyncio.sleep(0.002)
            records = app_record_lengths(bytes(conn.seen["up"]))[before:]
            assert len(records) == 1, records  # one datagram, one write, one record
            by_size.setdefault(size, []).extend(records)
        return by_size


def test_record_lengths_do_not_reveal_wireguard_message_sizes(pki):
    by_size = run_on("uvloop", _records_of_wg_sized_datagrams(pki, padding=True))
    lo = shaping.SMALL_WRITE + TLS13_OVERHEAD
    hi = lo + shaping.SMALL_SPREAD
    for size, lengths in by_size.items():
        assert all(lo <= n < hi for n in lengths), (size, lengths)
        # No length repeats often: the most common one carries few of the 40 messages.
        assert collections.Counter(lengths).most_common(1)[0][1] <= 4, (size, lengths)
    # And the three sizes cannot be told apart by a threshold on the record length: the
    # ranges coincide, so the means are close (uniform over 256 values, 40 samples each).
    means = [sum(v) / len(v) for v in by_size.values()]
    assert max(means) - min(means) < 80, means


def test_without_padding_each_size_has_its_own_record_length(pki):
    # The control: what an observer saw before padding, one fixed length per message.
    by_size = run_on("uvloop", _records_of_wg_sized_datagrams(pki, padding=False))
    for size, lengths in by_size.items():
        numbered = size + fastpath.HEADER_LEN + fastpath.SEQ_LEN
        assert set(lengths) == {numbered + TLS13_OVERHEAD}, (size, set(lengths))


# -- coalescing ----------------------------------------------------------------------------

async def _records_for_bursts(pki, coalesce_ms: float, bursts: int = 10, per_burst: int = 4):
    """Send ``bursts`` bursts of small datagrams (a few ms apart within a burst) through a
    one-lane tunnel; return (client records per burst, round trip of the first datagram)."""
    loop = asyncio.get_running_loop()
    async with recorded_tunnel(pki, {"coalesce_ms": coalesce_ms}) as (peer, conn):
        per_burst_records, rtts = [], []
        for _ in range(bursts):
            before = len(app_record_lengths(bytes(conn.seen["up"])))
            t0 = loop.time()
            for i in range(per_burst):
                peer.send(b"\x04" + bytes(31 + i))
                await asyncio.sleep(0.001)
            await peer.recv()
            rtts.append(loop.time() - t0)
            await peer.drain(per_burst - 1)
            await asyncio.sleep(0.005)
            per_burst_records.append(len(app_record_lengths(bytes(conn.seen["up"]))) - before)
        return per_burst_records, rtts


def test_coalescing_puts_a_burst_of_small_datagrams_in_fewer_records(pki):
    plain, _ = run_on("uvloop", _records_for_bursts(pki, 0))
    held, rtts = run_on("uvloop", _records_for_bursts(pki, 15))
    assert sorted(plain)[len(plain) // 2] >= 3  # one record per datagram, or nearly
    assert sorted(held)[len(held) // 2] == 1, held  # the burst shares one write
    # ... and the hold is bounded: the first datagram waits at most coalesce_ms (plus
    # the loopback round trip and scheduling).
    assert sorted(rtts)[len(rtts) // 2] < 0.015 + 0.030, rtts


# -- padding never costs a TCP segment of its own (issue 14) -------------------------

def _wire(n: int) -> int:
    """TLS 1.3 record bytes for ``n`` bytes of plaintext (records of at most 16 KiB)."""
    return n + -(-n // 16384) * 22


@given(st.integers(min_value=shaping.SMALL_WRITE - shaping.PAD_FRAME_OVERHEAD,
                   max_value=70000),
       st.sampled_from([536, 1208, 1388, 1448, 8948]))
def test_fitted_padding_ends_in_the_segment_the_write_ends_in(n, mss):
    pad = shaping.pad_length(n)
    fitted = shaping.fit_padding(n, pad, mss)
    segments = -(-_wire(n) // mss)
    if fitted < 0:
        # Not even an empty PAD frame fits: the write goes unpadded.
        assert _wire(n + shaping.PAD_FRAME_OVERHEAD) > segments * mss
    else:
        assert 0 <= fitted <= pad
        assert _wire(n + shaping.PAD_FRAME_OVERHEAD + fitted) <= segments * mss
        if _wire(n + shaping.PAD_FRAME_OVERHEAD + pad) <= segments * mss:
            assert fitted == pad  # what fits is left alone


def test_a_whole_wireguard_datagram_at_mtu_1380_goes_unpadded():
    # 1380 + 32 bytes of WireGuard, a numbered frame (9 + 4): a 1,447-byte record, one
    # byte short of a 1,448-byte segment; a PAD frame would send a second packet.
    assert shaping.fit_padding(1412 + 13, 40, 1448) == -1
    # At the default WireGuard MTU 1420 the record spills anyway: padding is free there.
    assert shaping.fit_padding(1452 + 13, 40, 1448) == 40


def test_small_writes_keep_their_padding_whatever_the_segment_size():
    for n in range(0, shaping.SMALL_WRITE - shaping.PAD_FRAME_OVERHEAD):
        pad = shaping.pad_length(n)
        assert shaping.fit_padding(n, pad, 100) == pad
    assert shaping.fit_padding(1000, 5, 0) == 5  # unknown segment size: unchanged
    assert shaping.fit_padding(1000, -1, 1448) == -1
