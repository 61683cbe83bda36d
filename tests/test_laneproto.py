"""The lane protocol state machine (ut.laneproto), with no sockets at all (issue 16).

Client machines talk to server machines through Deframers, the bytes cut one at a time
and at random; every rule of docs/protocol.md that the machine owns is checked on its
own. The same machines run inside real lanes in tests/test_tunnel.py and friends.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ut import fastpath
from ut.control import (
    ERR_BAD_HELLO,
    ERR_LANE_ID_OUT_OF_RANGE,
    ERR_PROTOCOL_ERROR,
    GOODBYE_IDLE,
    Err,
    Goodbye,
    Hello,
    control_frame,
)
from ut.laneproto import (
    Data,
    LaneMachine,
    PeerError,
    PeerGoodbye,
    PeerHello,
    State,
    Violation,
)

SID = 0x1122334455667788


def pipe(data: bytes, receiver: LaneMachine, cuts: str = "random", seed: int = 0) -> list:
    """Carry ``data`` to ``receiver`` through a Deframer in pieces; return every event, the
    way a lane would gather them (judging again after each PeerHello)."""
    rng = random.Random(seed)
    deframer = fastpath.Deframer()
    events: list = []
    pos = 0
    while pos < len(data):
        step = 1 if cuts == "bytes" else rng.randint(1, 64)
        frames = deframer.feed(data[pos:pos + step])
        pos += step
        done = 0
        while done < len(frames):
            more, done = receiver.receive(frames, done)
            events += more
    return events


def data_frames(events: list) -> list:
    return [f for e in events if type(e) is Data for f in e.frames]


def open_pair(cuts: str = "random", seed: int = 0, *, client_pads: bool = True,
              server_pads: bool = True) -> tuple[LaneMachine, LaneMachine]:
    flags = fastpath.FLAG_SEQ | fastpath.FLAG_PAD
    client = LaneMachine("client", session_id=SID, lane_id=1, lane_count=3, flags=flags,
                         padding=client_pads)
    server = LaneMachine("server", max_lanes=2, flags=flags, padding=server_pads)
    server.transport_up()
    (hello,) = pipe(client.send_hello(), server, cuts, seed)
    assert type(hello) is PeerHello and hello.hello == Hello(SID, 1, 3) and hello.flags == flags
    (answer,) = pipe(server.accept(lane_count=2), client, cuts, seed)
    assert type(answer) is PeerHello and answer.hello == Hello(SID, 1, 2)
    return client, server


@pytest.mark.parametrize("cuts", ["bytes", "random"])
@pytest.mark.parametrize("seed", range(3))
def test_a_whole_lane_life_between_two_machines(cuts, seed):
    client, server = open_pair(cuts, seed)
    assert client.state is State.OPEN and server.state is State.OPEN
    assert client.pad_writes and server.pad_writes
    rng = random.Random(seed)
    grams = [rng.randbytes(rng.choice([0, 32, 148, 1420])) for _ in range(40)]
    up, _ = fastpath.encode_data_seq(grams, 0, 17)
    down = fastpath.encode_data(grams[::-1], 300)
    assert [p for _t, _f, p in data_frames(pipe(up, server, cuts, seed))] == [
        (i).to_bytes(4, "big") + g for i, g in enumerate(grams)]
    assert [p for _t, _f, p in data_frames(pipe(down, client, cuts, seed))] == grams[::-1]
    # The client leaves: GOODBYE; the server sees it, and then nothing more may come.
    bye = client.close(GOODBYE_IDLE)
    assert client.state is State.CLOSING
    (event,) = pipe(bye, server, cuts, seed)
    assert event == PeerGoodbye("idle") and server.state is State.PEER_CLOSING
    # What the server still had in flight reaches the closing client.
    assert data_frames(pipe(fastpath.encode_data([b"late"]), client, cuts, seed)) == [
        (fastpath.TYPE_DATA, 0, b"late")]
    (event,) = pipe(fastpath.encode_data([b"after"]), server, cuts, seed)
    assert event.reason == "data_after_goodbye" and server.state is State.CLOSED


def test_padding_is_only_for_a_peer_that_understands_it():
    old_server = LaneMachine("server", max_lanes=2, flags=fastpath.FLAG_SEQ, padding=True)
    client = LaneMachine("client", session_id=SID, lane_id=0, lane_count=2,
                         flags=fastpath.FLAG_PAD, padding=True)
    old_server.transport_up()
    hello = client.send_hello()
    assert len(hello) >= 176  # the client pads its own HELLO write anyway
    (event,) = pipe(hello, old_server)
    assert type(event) is PeerHello
    answer = old_server.accept(2)
    # This server pads (the client said FLAG_PAD) but does not say FLAG_PAD itself...
    assert len(answer) > 22 and old_server.pad_writes is True
    pipe(answer, client)
    assert client.pad_writes is False  # ... so the client pads nothing after its HELLO


# -- the rules, one by one -------------------------------------------------------------

HELLO_0 = control_frame(Hello(SID, 0, 2), fastpath.FLAG_PAD)


def server_waiting() -> LaneMachine:
    m = LaneMachine("server", max_lanes=2)
    m.transport_up()
    return m


@pytest.mark.parametrize("data, reason, err_code", [
    (fastpath.encode_data([b"x"]), "data_before_hello", ERR_PROTOCOL_ERROR),
    (control_frame(Goodbye(0)), "bad_hello", ERR_BAD_HELLO),
    (fastpath.encode_frame(fastpath.TYPE_CTRL, b"\x01\x00"), "bad_hello", ERR_BAD_HELLO),
    (fastpath.encode_frame(fastpath.TYPE_CTRL, b""), "bad_hello", ERR_BAD_HELLO),
    (control_frame(Hello(SID, 2, 5)), "lane_id_out_of_range", ERR_LANE_ID_OUT_OF_RANGE),
])
def test_what_the_server_takes_as_a_first_frame(data, reason, err_code):
    m = server_waiting()
    (event,) = pipe(data, m)
    assert type(event) is Violation and (event.reason, event.err_code) == (reason, err_code)
    assert m.state is State.CLOSED and m.violation == event


def test_the_server_reads_a_hello_that_beats_its_own_handshake_call():
    # The client writes HELLO right after its handshake; the server's lane may read it
    # before the server's await on the handshake returns (state still CONNECTING).
    m = LaneMachine("server", max_lanes=2)
    (event,) = pipe(HELLO_0, m)
    assert type(event) is PeerHello and m.state is State.OPEN


def test_the_client_wants_the_servers_hello_for_its_own_session_and_lane():
    for answer, reason in [(control_frame(Hello(SID + 1, 0, 2)), "bad_hello"),
                           (control_frame(Hello(SID, 1, 2)), "bad_hello"),
                           (fastpath.encode_data([b"x"]), "data_before_hello")]:
        c = LaneMachine("client", session_id=SID, lane_id=0, lane_count=2)
        c.send_hello()
        (event,) = pipe(answer, c)
        assert event.reason == reason and event.err_code == 0  # a client sends no ERR here


OPEN_RULES = [
    (control_frame(Hello(SID, 0, 2)), "unexpected_hello"),
    (fastpath.encode_frame(fastpath.TYPE_CTRL, b"\x09abc"), "unknown_control"),
    (fastpath.encode_frame(fastpath.TYPE_CTRL, b"\x02"), "bad_length"),
    (fastpath.encode_frame(fastpath.TYPE_CTRL, b""), "empty"),
]


@pytest.mark.parametrize("data, reason", OPEN_RULES)
def test_control_frames_an_open_lane_refuses(data, reason):
    for machine in open_pair():
        before = fastpath.encode_data([b"kept"])
        after = fastpath.encode_data([b"never"])
        events = pipe(before + data + after, machine)
        assert data_frames(events) == [(fastpath.TYPE_DATA, 0, b"kept")]
        assert type(events[-1]) is Violation and events[-1].reason == reason
        assert machine.state is State.CLOSED


def test_err_and_goodbye_end_what_the_peer_may_send():
    client, server = open_pair()
    (event,) = pipe(control_frame(Err(5, "bye")), server)
    assert event == PeerError(Err(5, "bye")) and server.state is State.PEER_CLOSING
    (event,) = pipe(control_frame(Goodbye(0)), server)
    assert event.reason == "control_after_goodbye"


def test_padding_does_not_count_as_a_frame_after_goodbye():
    client, server = open_pair()
    events = pipe(control_frame(Goodbye(1)) + fastpath.pad_frame(40), server)
    assert events == [PeerGoodbye("idle")] and server.state is State.PEER_CLOSING


def test_our_close_before_hello_says_goodbye_only_on_the_client():
    c = LaneMachine("client", session_id=SID, lane_id=0, lane_count=2)
    c.send_hello()
    assert c.close(GOODBYE_IDLE) == control_frame(Goodbye(GOODBYE_IDLE))
    s = server_waiting()
    assert s.close(GOODBYE_IDLE) == b""
    assert s.state is State.CLOSING


def test_misuse_is_an_error_not_a_silent_state_change():
    c = LaneMachine("client", lane_id=0)
    with pytest.raises(RuntimeError):
        c.transport_up()
    c.send_hello()
    with pytest.raises(RuntimeError):
        c.send_hello()
    with pytest.raises(RuntimeError):
        server_waiting().accept(2)  # no HELLO yet
    with pytest.raises(ValueError):
        LaneMachine("proxy")


# -- any input ---------------------------------------------------------------------------

frame_st = st.one_of(
    st.builds(lambda p: fastpath.encode_frame(fastpath.TYPE_DATA, p), st.binary(max_size=40)),
    st.sampled_from([control_frame(Goodbye(1)), control_frame(Err(3, "x")),
                     control_frame(Hello(SID, 1, 3)), fastpath.pad_frame(5),
                     fastpath.encode_frame(fastpath.TYPE_CTRL, b"\x07")]),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=st.lists(frame_st, max_size=12), seed=st.integers(0, 1000))
def test_any_frames_into_an_open_lane(frames, seed):
    """Whatever arrives: at most one Violation and it is last; DATA is delivered in order
    up to the first rule broken (or the peer's GOODBYE/ERR), never after."""
    _client, server = open_pair()
    events = pipe(b"".join(frames), server, "random", seed)
    kinds = [type(e) for e in events]
    assert Violation not in kinds[:-1]
    delivered = [p for _t, _f, p in data_frames(events)]
    expected = []
    for raw in frames:
        ((ftype, _flags, payload),) = fastpath.Deframer().feed(raw) or [(None, 0, b"")]
        if ftype is None:
            continue  # padding
        if ftype != fastpath.TYPE_DATA:
            break
        expected.append(payload)
    # Everything before the first control frame is delivered, in order.
    assert delivered[:len(expected)] == expected
    if any(k is Violation for k in kinds):
        assert server.state is State.CLOSED
