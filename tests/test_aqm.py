"""The session queue's CoDel (``queue.aqm``, ut/aqm.py) and the lanes' congestion control
(``tcp.congestion``, ut/lanecc.py): issue 14.

The state machine is checked against RFC 8289's behaviour with a simulated clock, then
in a Session whose only lane is paused and resumed (tests/test_session.py's fakes), so
the drops are counted with their reason and nothing is lost uncounted.
"""

from __future__ import annotations

import asyncio
import math
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ut._testbase.fakes import FakePort, open_lane
from ut._testbase.tunnelkit import use_implementation
from ut.aqm import CODEL_MIN_BACKLOG_BYTES, CoDel
from ut.config import ConfigError, load_config
from ut.lanecc import CLEAR_SECONDS, QUEUED_SECONDS, CongestionChooser
from ut.session import LANE_MAX_UNSENT, Session, session_options
from ut.stats import TunnelStats
from ut.tcpsock import congestion_control, set_congestion_control

BIG = 100 * CODEL_MIN_BACKLOG_BYTES  # a backlog well above one datagram


def _drops(codel: CoDel, now: float, sojourn: float, backlog: int = BIG) -> int:
    """Ask as the session does: drop the head while the answer is yes (a fresh head
    waited as long, the queue holds as much)."""
    n = 0
    while codel.drop_head(now, sojourn, backlog):
        n += 1
        assert n < 1000
    return n


def test_a_delay_below_target_is_never_dropped():
    codel = CoDel(0.005, 0.1)
    assert sum(_drops(codel, t / 1000, 0.0049) for t in range(0, 5000)) == 0
    assert not codel.dropping


def test_a_burst_shorter_than_the_interval_passes():
    """A lane's loss repair: the delay is high for less than an interval, then falls."""
    codel = CoDel(0.005, 0.1)
    for t in range(0, 95):  # 95 ms above target
        assert _drops(codel, t / 1000, 0.05) == 0
    assert _drops(codel, 0.096, 0.001) == 0  # below target: the clock starts again
    for t in range(97, 190):
        assert _drops(codel, t / 1000, 0.05) == 0
    assert codel.drops == 0


def test_a_small_backlog_is_never_dropped_from():
    codel = CoDel(0.005, 0.1)
    assert sum(_drops(codel, t / 1000, 1.0, CODEL_MIN_BACKLOG_BYTES) for t in range(2000)) == 0


def test_a_standing_queue_is_dropped_from_ever_more_often():
    """The first drop comes one interval after the delay rose above target; then drop
    k+1 follows drop k by interval / sqrt(k) (RFC 8289's control law)."""
    codel = CoDel(0.005, 0.1)
    times = []
    for t in range(0, 2000):  # 2 s of a standing 50 ms queue, looked at every ms
        if _drops(codel, t / 1000, 0.05):
            times.append(t / 1000)
    assert times[0] == pytest.approx(0.1)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    for k, gap in enumerate(gaps[:10], start=1):
        assert gap == pytest.approx(0.1 / math.sqrt(k), abs=0.0011)
    assert gaps[-1] < gaps[0] / 3  # ever more often while the queue stands
    assert codel.dropping and codel.drops == len(times)


def test_dropping_stops_when_the_delay_falls_and_resumes_near_its_rate():
    codel = CoDel(0.005, 0.1)
    for t in range(0, 600):
        _drops(codel, t / 1000, 0.05)
    count = codel.count
    assert count > 3
    assert _drops(codel, 0.600, 0.001) == 0 and not codel.dropping
    # Above target again soon after: an interval later, it resumes with the count it
    # had reached (less the one it started from), not at 1 (RFC 8289 section 5.5).
    for t in range(601, 702):
        _drops(codel, t / 1000, 0.05)
    assert codel.dropping and codel.count >= count - 2


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 0.01), st.floats(0, 0.5),
                          st.integers(0, 10 * BIG)), max_size=300))
def test_codel_never_drops_below_target_nor_before_an_interval_of_delay(steps):
    """Whatever the delays: no drop of a head that waited less than the target, and no
    drop before the delay has been above target for a whole interval."""
    codel = CoDel(0.005, 0.1)
    now = 0.0
    above_since = None
    for dt, sojourn, backlog in steps:
        now += dt
        dropped = codel.drop_head(now, sojourn, backlog)
        high = sojourn >= 0.005 and backlog > CODEL_MIN_BACKLOG_BYTES
        if not high:
            above_since = None
            assert not dropped
            continue
        if above_since is None:
            above_since = now
        if dropped:
            assert now - above_since >= 0.1 - 1e-9


class _ClientSession(Session):
    role = "client"

    def udp_target(self):
        return self.port, None


def _aqm_session(n_lanes: int, **kw) -> _ClientSession:
    """A client session with CoDel (5 ms over 50 ms) and room for every datagram pushed."""
    s = _ClientSession(asyncio.get_running_loop(), TunnelStats(role="client", max_lanes=n_lanes),
                       client_cn="home", session_id=1, n_lanes=n_lanes, max_packets=4096,
                       max_bytes=1 << 24, aqm=True, aqm_target=0.005, aqm_interval=0.05, **kw)
    s.port = FakePort()
    return s


@pytest.mark.parametrize("impl", ["compiled", "pure"])
def test_a_session_drops_a_standing_queue_and_counts_it(impl):
    """A lane that takes data only now and then (a saturated uplink): the queue's head
    waits past the target for more than an interval, so CoDel drops from it, counted as
    ``aqm``; everything pushed is either sent or counted."""
    async def main():
        with use_implementation(impl):
            s = _aqm_session(1)
            lane = open_lane(s, 0, "client")
            s.lane_up(lane)
            pushed = 0
            lane.pause_writing()
            for _ in range(20):  # 20 x 10 ms: the head always waits about 10 ms
                s.push_datagrams([b"x" * 1000] * 10)
                pushed += 10
                await asyncio.sleep(0.01)
                lane.resume_writing()  # one flush: it drains the queue ...
                lane.pause_writing()  # ... and the next push waits again
            lane.resume_writing()
            await asyncio.sleep(0)
            drops = s.counters.drops
            assert set(drops) <= {"aqm"}
            sent = s.counters.lane_tx_frames[0]
            assert sent + drops.get("aqm", 0) + len(s.queue) == pushed
            lane.connection_lost(None)
            return drops.get("aqm", 0)

    # A queue drained every 10 ms never stands: CoDel leaves it alone.
    assert asyncio.run(main()) == 0


@pytest.mark.parametrize("impl", ["compiled", "pure"])
def test_a_session_behind_a_saturated_lane_drops_with_codel(impl):
    """The lane holds more than LANE_MAX_UNSENT unsent (its TCP cannot keep up), so the
    session keeps the backlog and looks again every millisecond: once the head has
    waited past the target for an interval, CoDel drops from it, counted as ``aqm``.
    When the lane drains, everything left goes out: sent + dropped == pushed."""
    async def main():
        with use_implementation(impl):
            s = _aqm_session(1, skip_slow_lanes=True)
            lane = open_lane(s, 0, "client")
            s.lane_up(lane)
            lane.transport.buffered = LANE_MAX_UNSENT + 1
            pushed = 0
            for _ in range(15):  # a standing queue: 150 ms of arrivals, nothing leaves
                s.push_datagrams([b"y" * 1000] * 5)
                pushed += 5
                await asyncio.sleep(0.01)
            drops = dict(s.counters.drops)
            assert 1 <= drops.get("aqm", 0) < pushed // 2
            assert s.counters.lane_tx_frames[0] == 0
            lane.transport.buffered = 0  # the lane drains: the rest goes out
            await asyncio.sleep(0.01)
            drops = s.counters.drops
            assert set(drops) == {"aqm"} and len(s.queue) == 0
            assert s.counters.lane_tx_frames[0] + drops["aqm"] == pushed
            lane.connection_lost(None)

    asyncio.run(main())


def config(**queue):
    return load_config({"role": "client", "tcp": {"server_addr": "h:1"}, "queue": queue,
                        "tls": {"ca_cert": "a", "cert": "b", "key": "c"}},
                       check_files=False)


def test_config_turns_the_aqm_on_by_default_and_checks_its_keys():
    opts = session_options(config())
    assert opts["aqm"] is True
    assert opts["aqm_target"] == 0.005 and opts["aqm_interval"] == 0.1
    assert session_options(config(aqm="off"))["aqm"] is False
    with pytest.raises(ConfigError, match="aqm_target_ms"):
        config(aqm_target_ms=200, aqm_interval_ms=100)
    with pytest.raises(ConfigError, match="queue.aqm"):
        config(aqm="red")


def test_the_aqm_caps_what_a_lane_holds_unsent():
    """With the AQM on, the backlog waits in the session queue (where CoDel sees it),
    not in the lanes' buffers; off, the lanes take what their buffers hold."""
    loop = asyncio.new_event_loop()
    try:
        stats = TunnelStats(role="client", max_lanes=1)
        common = dict(client_cn="home", session_id=1, n_lanes=1, max_packets=64,
                      max_bytes=1 << 20, skip_slow_lanes=True)
        assert _ClientSession(loop, stats, aqm=True, **common).cap_lanes is True
        assert _ClientSession(loop, stats, aqm=False, **common).cap_lanes is False
    finally:
        loop.close()


# -- tcp.congestion: auto (ut/lanecc.py) ----------------------------------------------

def _feed(cc, t0, t1, delay, retrans=0, segs=100, step=0.02):
    """Readings every ``step`` from t0 to t1; the first switch and when it came."""
    t = t0
    while t < t1:
        got = cc.update(t, delay(t) if callable(delay) else delay, retrans, segs)
        if got:
            return got, t
        t += step
    return None, t1


def test_the_chooser_moves_to_loss_based_after_a_window_of_overflowing_queue():
    cc = CongestionChooser()
    # BBR's probing dips the delay now and then: the window's mean decides.
    dips = lambda t: 0.001 if int(t * 50) % 10 == 0 else 0.03  # noqa: E731
    got, when = _feed(cc, 0.0, 5.0, dips, retrans=40)
    assert got == "queued" and when == pytest.approx(QUEUED_SECONDS, abs=0.03)
    # A loss-based control keeps some queue: no flapping back while it stands ...
    assert _feed(cc, 1.0, 40.0, 0.008, retrans=1) == (None, 40.0)
    # ... only a quiet window (a lossy path a loss-based control cannot fill).
    got, when = _feed(cc, 40.0, 80.0, 0.0005)
    assert got == "clear" and when <= 40.0 + 2 * CLEAR_SECONDS


def test_a_queue_without_overflow_keeps_the_host_control():
    """A lossy path (loss, no queue) or a lagging fast link (queue, little loss)."""
    assert _feed(CongestionChooser(), 0.0, 5.0, 0.05, retrans=2) == (None, 5.0)
    assert _feed(CongestionChooser(), 0.0, 5.0, 0.0, retrans=30) == (None, 5.0)


def test_a_lane_socket_switches_congestion_control_while_connected():
    """The switch is made on connected lanes: Linux lets a live connection change its
    control. Reno is built in and always allowed."""
    if congestion_control(socket.socket()) is None:
        pytest.skip("no TCP_CONGESTION here (not Linux)")
    with socket.create_server(("127.0.0.1", 0)) as srv:
        c = socket.create_connection(srv.getsockname())
        a, _ = srv.accept()
        with c, a:
            host = congestion_control(c)
            assert host
            assert set_congestion_control(c, "reno") and congestion_control(c) == "reno"
            c.sendall(b"x" * 100_000)
            got = 0
            while got < 100_000:
                got += len(a.recv(65536))
            assert set_congestion_control(c, host) and congestion_control(c) == host
            assert not set_congestion_control(c, "no_such_cc")
            assert congestion_control(c) == host


def test_config_congestion_names():
    assert session_options(config())["congestion"] == "auto"
    for ok in ("system", "cubic", "bbr", "reno"):
        cfg = load_config({"role": "client", "tcp": {"server_addr": "h:1", "congestion": ok},
                           "tls": {"ca_cert": "a", "cert": "b", "key": "c"}}, check_files=False)
        assert cfg.tcp.congestion == ok
    for bad in ("", "Cubic", "x" * 20, "bbr; rm"):
        with pytest.raises(ConfigError, match="tcp.congestion"):
            load_config({"role": "client", "tcp": {"server_addr": "h:1", "congestion": bad},
                         "tls": {"ca_cert": "a", "cert": "b", "key": "c"}}, check_files=False)


@pytest.mark.parametrize("impl", ["compiled", "pure"])
def test_lanes_opening_restart_the_judgement(impl):
    """Lanes open one by one after a dial, the first ones busy at once: the waits until
    the last one opens are the tunnel starting, not a full path. Each lane that opens
    restarts CoDel's interval, so nothing is dropped while the lanes come up (a CoDel
    that kept its clock would drop from 50 ms on here)."""
    async def main():
        with use_implementation(impl):
            s = _aqm_session(2, skip_slow_lanes=True)
            first = open_lane(s, 0, "client")
            first.transport.buffered = LANE_MAX_UNSENT + 1  # busy from the start
            s.lane_up(first)
            for _ in range(4):  # 40 ms: the first lane holds, the queue waits
                s.push_datagrams([b"z" * 1000] * 5)
                await asyncio.sleep(0.01)
            second = open_lane(s, 1, "client")
            second.transport.buffered = LANE_MAX_UNSENT + 1
            s.lane_up(second)
            for _ in range(3):  # 30 ms more: 70 ms since the first lane opened
                s.push_datagrams([b"z" * 1000] * 5)
                await asyncio.sleep(0.01)
            assert s.counters.drops == {}
            first.transport.buffered = second.transport.buffered = 0
            await asyncio.sleep(0.01)
            assert s.counters.drops == {} and len(s.queue) == 0
            assert sum(s.counters.lane_tx_frames) == 35
            first.connection_lost(None)
            second.connection_lost(None)

    asyncio.run(main())
