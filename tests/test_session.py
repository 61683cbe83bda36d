"""The session's forwarding-latency histogram counts the time datagrams wait in its queue.

No sockets: a Session with one Lane on a fake transport (tests/test_fuzz.py's), so the
wait for a writable lane can be set exactly.
"""

from __future__ import annotations

import asyncio

import pytest

from ut._testbase.fakes import FakePort, open_lane
from ut._testbase.tunnelkit import use_implementation
from ut.session import Session
from ut.stats import TunnelStats

WAIT = 0.08  # seconds the only lane stays paused


class _ClientSession(Session):
    role = "client"

    def udp_target(self):
        return self.port, None


def _histogram(s: Session, direction: str):
    return s.counters.forward_latency[direction]


@pytest.mark.parametrize("impl", ["compiled", "pure"])
@pytest.mark.parametrize("lane_pick", ["rr", "hash"])
def test_input_latency_includes_the_wait_for_a_writable_lane(impl, lane_pick):
    async def main():
        with use_implementation(impl):
            stats = TunnelStats(role="client", max_lanes=1)
            s = _ClientSession(asyncio.get_running_loop(), stats, client_cn="home",
                               session_id=1, n_lanes=1, max_packets=64, max_bytes=1 << 20,
                               lane_pick=lane_pick)
            s.port = FakePort()
            lane = open_lane(s, 0, "client")
            s.lane_up(lane)
            hist = _histogram(s, stats.dir_in)

            # A writable lane: the datagrams go out in the same call, well under WAIT.
            s.push_datagrams([b"a" * 100] * 3)
            assert len(s.queue) == 0 and hist.count == 3
            assert hist.sum < 3 * WAIT / 2

            # A paused lane: they wait in the queue, and that wait is counted.
            lane.pause_writing()
            s.push_datagrams([b"b" * 100] * 5)
            assert len(s.queue) == 5 and hist.count == 3
            await asyncio.sleep(WAIT)
            s.push_datagrams([b"c" * 100] * 2)  # arrives later, leaves in the same flush
            lane.resume_writing()
            await asyncio.sleep(0)  # the flush runs on the next loop pass
            assert len(s.queue) == 0 and hist.count == 10
            # Each batch shares its oldest datagram's wait: at least WAIT for all 7.
            assert hist.sum >= 7 * WAIT
            assert hist.quantile(0.5) >= WAIT
            lane.connection_lost(None)

    asyncio.run(main())


@pytest.mark.parametrize("impl", ["compiled", "pure"])
def test_datagrams_that_waited_too_long_are_dropped_as_stale(impl):
    """queue.max_delay_ms: a datagram that waited longer is dropped (counted ``stale``)
    when the lanes take data again, so the inner TCP sees loss instead of delay."""
    async def main():
        with use_implementation(impl):
            stats = TunnelStats(role="client", max_lanes=1)
            s = _ClientSession(asyncio.get_running_loop(), stats, client_cn="home",
                               session_id=1, n_lanes=1, max_packets=64, max_bytes=1 << 20,
                               max_queue_delay=0.02)
            s.port = FakePort()
            lane = open_lane(s, 0, "client")
            s.lane_up(lane)
            lane.pause_writing()
            s.push_datagrams([b"old" * 100] * 4)
            await asyncio.sleep(WAIT)  # longer than max_delay
            s.push_datagrams([b"new" * 100] * 2)
            lane.resume_writing()
            await asyncio.sleep(0)
            assert s.counters.drops == {"stale": 4}
            assert s.counters.lane_tx_frames[0] == 2 and len(s.queue) == 0
            lane.connection_lost(None)

    asyncio.run(main())


@pytest.mark.parametrize("impl", ["compiled", "pure"])
def test_the_age_bound_drops_an_outage_backlog_and_caps_nothing(impl):
    """queue.max_age_seconds (issue 19): what waited longer than the bound while no lane
    was up is dropped as ``stale`` -- when more datagrams come in, and when a lane takes
    data again -- and, unlike max_delay_ms, the lanes keep their whole buffers."""
    async def main():
        with use_implementation(impl):
            stats = TunnelStats(role="client", max_lanes=1)
            s = _ClientSession(asyncio.get_running_loop(), stats, client_cn="home",
                               session_id=1, n_lanes=1, max_packets=64, max_bytes=1 << 20,
                               skip_slow_lanes=True, max_queue_age=WAIT / 2)
            assert s.stale_after == WAIT / 2 and s.cap_lanes is False
            s.port = FakePort()
            s.push_datagrams([b"outage" * 10] * 5)  # no lane yet: they wait
            await asyncio.sleep(WAIT)
            s.push_datagrams([b"later" * 10] * 3)  # the 5 have gone stale: dropped now
            assert s.counters.drops == {"stale": 5} and len(s.queue) == 3
            await asyncio.sleep(WAIT)
            lane = open_lane(s, 0, "client")
            s.lane_up(lane)  # the lane is back: the 3 are stale too, nothing goes out
            await asyncio.sleep(0)
            assert s.counters.drops == {"stale": 8} and len(s.queue) == 0
            assert s.counters.lane_tx_frames[0] == 0
            s.push_datagrams([b"fresh" * 10] * 2)
            assert s.counters.lane_tx_frames[0] == 2 and s.counters.drops == {"stale": 8}
            lane.connection_lost(None)

    asyncio.run(main())


def test_the_stricter_bound_applies_and_the_default_is_on():
    from ut.config import ConfigError, load_config
    from ut.session import session_options

    def stale_after(**kw):
        loop = asyncio.new_event_loop()
        try:
            return Session(loop, TunnelStats(role="client", max_lanes=1), client_cn="x",
                           session_id=1, n_lanes=1, max_packets=8, max_bytes=1 << 20,
                           **kw).stale_after
        finally:
            loop.close()

    assert stale_after() == 0.0
    assert stale_after(max_queue_age=3.0) == 3.0
    assert stale_after(max_queue_age=3.0, max_queue_delay=0.02) == 0.02
    assert stale_after(max_queue_age=0.0, max_queue_delay=0.02) == 0.02

    def config(**queue):
        return load_config({"role": "client", "tcp": {"server_addr": "h:1"}, "queue": queue,
                            "tls": {"ca_cert": "a", "cert": "b", "key": "c"}},
                           check_files=False)

    assert session_options(config())["max_queue_age"] == 3.0  # on by default
    assert session_options(config(max_age_seconds=0))["max_queue_age"] == 0.0
    for bad in (0.05, -1, 3601):
        with pytest.raises(ConfigError, match="max_age_seconds"):
            config(max_age_seconds=bad)
