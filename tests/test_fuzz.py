"""Fuzzing the decoders and the code that consumes them (issue 5).

What ``tests/test_differential.py`` already does (compiled vs pure Deframer on mostly
valid streams, raw bytes, encoders, queue, picker) is not repeated. Added here:

* ``ut.control.decode_control`` on arbitrary and on near-valid bytes: a message or a
  ``ControlError`` with a documented reason, nothing else; whatever decodes re-encodes
  to the same bytes (one encoding per message).
* A third, independent decoder written from docs/protocol.md (``spec_decode``) as the
  oracle both implementations must match, on streams with frames up to 65535 bytes cut
  at random points, fed through ``feed`` or ``get_buffer``/``buffer_updated``, with the
  documented memory bound checked after every step.
* The real consumers, without a network: random bytes into a ``Lane`` owned by a
  ``Session`` and into the server's pre-HELLO path. Nothing may escape but a counted
  protocol error that closes the lane.

A coverage-guided run (atheris) lives in ``scripts/fuzz_atheris.py``; a short bounded
run of it is the last test here (skipped when atheris is not installed).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ut
from ut import control
from ut._testbase.fakes import FakePort, FakeTransport, open_lane
from ut._testbase.tunnelkit import use_implementation
from ut.control import Err, Goodbye, Hello, Pad, decode_control, encode_control
from ut.errors import ControlError, FrameError
from ut.transport import TlsTransport

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = settings(
    max_examples=300, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
CONTROL_REASONS = {"empty", "unknown_kind", "bad_length", "bad_utf8", "bad_value"}
FRAME_REASONS = {"bad_magic", "bad_version", "bad_type", "too_long", "truncated"}
HEADER_LEN = 9
READ_CHUNK = 64 * 1024


# ---------------------------------------------------------------------------------------
# decode_control
# ---------------------------------------------------------------------------------------

def check_control(payload: bytes) -> Any:
    try:
        msg = decode_control(payload)
    except ControlError as err:
        assert err.reason in CONTROL_REASONS, err.reason
        assert str(err)
        return err.reason
    assert isinstance(msg, (Hello, Goodbye, Err, Pad))
    if isinstance(msg, Pad):  # any body is padding; only its length is kept
        assert encode_control(msg) == payload[:1] + bytes(len(payload) - 1)
        return msg
    assert encode_control(msg) == payload  # canonical: one encoding per message
    return msg


@SETTINGS
@given(payload=st.binary(max_size=600))
def test_decode_control_arbitrary_bytes(payload):
    check_control(payload)


@st.composite
def near_control(draw):
    """Kind bytes that exist (and some that do not), lengths around the exact sizes,
    ERR texts that are valid, invalid or cut UTF-8."""
    kind = draw(st.sampled_from([1, 2, 3, 0, 4, 0xFF]))
    size = {1: 13, 2: 2, 3: draw(st.integers(3, 515))}.get(kind, 1)
    size = max(1, size + draw(st.sampled_from([0, 0, 0, -1, 1, -3, 7])))
    if kind == 3 and draw(st.booleans()):
        text = draw(st.text(max_size=200)).encode("utf-8", "replace")
        cut = draw(st.integers(0, len(text)))
        body = (draw(st.integers(0, 0xFFFF)).to_bytes(2, "big") + text[:cut])[: size - 1]
    else:
        body = draw(st.binary(min_size=size - 1, max_size=size - 1))
    return bytes([kind]) + body


@SETTINGS
@given(payload=near_control())
def test_decode_control_near_valid(payload):
    check_control(payload)


@SETTINGS
@given(msg=st.one_of(
    st.builds(Hello, st.integers(0, 2**64 - 1), st.integers(0, 0xFFFF), st.integers(1, 0xFFFF)),
    st.builds(Goodbye, st.integers(0, 255)),
    st.builds(Err, st.integers(0, 0xFFFF), st.text(max_size=700)),
))
def test_control_round_trip_and_length_limits(msg):
    payload = encode_control(msg)
    back = decode_control(payload)
    if isinstance(msg, Err):
        assert len(payload) <= 3 + control.ERR_MESSAGE_MAX_BYTES
        assert back.code == msg.code
        assert msg.message.encode("utf-8", "replace").startswith(back.message.encode())
    else:
        assert back == msg
    # Every truncation is a clean error (or an ERR with a shorter, still valid text).
    for cut in range(len(payload)):
        check_control(payload[:cut])


# ---------------------------------------------------------------------------------------
# The spec oracle
# ---------------------------------------------------------------------------------------

def spec_decode(stream: bytes, max_payload: int = 65535) -> tuple[list, str | None]:
    """docs/protocol.md, read literally: frames until the first bad header (judged as
    soon as its 9 bytes are in: magic, version, type, length), or ``truncated``."""
    frames, pos = [], 0
    while pos < len(stream):
        head = stream[pos:pos + HEADER_LEN]
        if len(head) < HEADER_LEN:  # a header is judged only once all 9 bytes are in
            return frames, "truncated"
        if head[:2] != b"UT":
            return frames, "bad_magic"
        if head[2] != 1:
            return frames, "bad_version"
        if head[3] not in (0x01, 0x10):
            return frames, "bad_type"
        length = int.from_bytes(head[5:9], "big")
        if length > max_payload:
            return frames, "too_long"
        end = pos + HEADER_LEN + length
        if end > len(stream):
            return frames, "truncated"
        frames.append((head[3], head[4], stream[pos + HEADER_LEN:end]))
        pos = end
    return frames, None


@st.composite
def big_streams(draw):
    """Frames of every size up to the maximum (payloads are cheap zero-filled bytes with
    a marker), the odd corrupted header or garbage, and random cut points."""
    parts = []
    for i in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["small", "small", "big", "max", "garbage", "flip"]))
        if kind == "garbage":
            parts.append(draw(st.binary(min_size=1, max_size=12)))
            continue
        size = {"small": draw(st.integers(0, 40)), "big": draw(st.integers(1000, 65534)),
                "max": 65535, "flip": draw(st.integers(0, 20))}[kind]
        payload = (i.to_bytes(2, "big") + bytes(size))[:size]
        head = bytearray(b"UT\x01" + bytes([draw(st.sampled_from([1, 16])),
                                            draw(st.integers(0, 255))]) + size.to_bytes(4, "big"))
        if kind == "flip":
            j = draw(st.integers(0, 8))
            head[j] ^= 1 << draw(st.integers(0, 7))
        parts.append(bytes(head) + payload)
    stream = b"".join(parts)
    cuts = sorted(draw(st.lists(st.integers(0, max(0, len(stream))), max_size=12)))
    return stream, cuts


def run_impl(fp: Any, stream: bytes, cuts: list[int], via: str, max_payload: int) -> tuple:
    d = fp.Deframer(max_payload)
    bound = HEADER_LEN + max_payload + READ_CHUNK
    frames: list = []
    err = None
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    try:
        for piece in pieces:
            if via == "feed":
                frames += d.feed(piece)
            else:
                pos = 0
                while pos < len(piece):
                    view = d.get_buffer(len(piece) - pos)
                    assert d.buffered + len(view) <= bound  # the documented memory bound
                    n = min(len(view), len(piece) - pos)
                    view[:n] = piece[pos:pos + n]
                    pos += n
                    frames += d.buffer_updated(n)
            assert d.buffered < HEADER_LEN + max_payload  # at most one unfinished frame
        d.eof()
    except FrameError as exc:
        err = exc.reason
        assert err in FRAME_REASONS
        # A bad header sticks: every later call raises the same error. (Truncation is
        # only known at EOF and is not a header error.)
        for call in (lambda: d.feed(b"UT"), d.eof) if err != "truncated" else ():
            with pytest.raises(FrameError) as again:
                call()
            assert again.value.reason == err
    return [(t, f, bytes(p)) for t, f, p in frames], err


@SETTINGS
@given(data=big_streams(), via=st.sampled_from(["feed", "buffer"]),
       max_payload=st.sampled_from([65535, 65535, 30000, 9]))
def test_both_deframers_match_the_spec_oracle(fp_compiled, fp_pure, data, via, max_payload):
    stream, cuts = data
    want = spec_decode(stream, max_payload)
    assert run_impl(fp_compiled, stream, cuts, via, max_payload) == want
    assert run_impl(fp_pure, stream, cuts, via, max_payload) == want


@SETTINGS
@given(ops=st.lists(st.tuples(
    st.sampled_from(["get_buffer", "buffer_updated", "feed", "eof"]),
    st.integers(-(2**40), 2**40) | st.integers(-3, 70000),
    st.binary(max_size=30)), max_size=25))
def test_deframer_api_misuse_agrees_and_only_raises_documented_errors(fp_compiled, fp_pure, ops):
    """Hints and byte counts out of range, calls out of order, after an error or EOF:
    both implementations do the same thing, and raise only FrameError, ValueError or
    OverflowError (a C integer conversion)."""

    def run(fp):
        d, log, view = fp.Deframer(), [], None
        for op, n, data in ops:
            try:
                if op == "get_buffer":
                    view = d.get_buffer(n)
                    res = ("view", len(view) > 0, d.buffered)
                elif op == "buffer_updated":
                    if view is not None and 0 <= n <= len(view):
                        view[:min(n, len(data))] = data[:n]
                    res = d.buffer_updated(n)
                elif op == "feed":
                    res = d.feed(data)
                else:
                    res = d.eof()
                log.append(("ok", res))
            except (FrameError, ValueError, OverflowError) as exc:
                kind = "value" if isinstance(exc, (ValueError, OverflowError)) else type(exc)
                log.append(("raise", kind.__name__ if isinstance(kind, type) else kind,
                            getattr(exc, "reason", None)))
        return log

    assert run(fp_compiled) == run(fp_pure)


# ---------------------------------------------------------------------------------------
# The consumers: Lane -> Session, and the server before HELLO
# ---------------------------------------------------------------------------------------

def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    cuts = sorted(c % (len(data) + 1) for c in cuts)
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def first_lane_error(stream: bytes) -> str | None:
    """The reason an open lane reading ``stream`` must stop at (docs/protocol.md, and
    ``ut.laneproto``): the first bad header, or the first control frame that breaks a
    rule before it: malformed, of an unknown kind, a second HELLO, or anything after the
    peer's GOODBYE or ERR. PAD frames are dropped by the deframer and break nothing."""
    return _first_lane_error(stream)[0]


def _first_lane_error(stream: bytes) -> tuple[str | None, bool]:
    """``first_lane_error``, and whether the peer had said GOODBYE or ERR before it (the
    lane then closes its side: bytes that come in a later read are never judged)."""
    frames, err = spec_decode(stream)
    peer_gone = False
    for ftype, _flags, payload in frames:
        if ftype == 0x10 and payload[:1] == b"\x04":
            continue  # padding
        if peer_gone:
            return ("data_after_goodbye" if ftype == 0x01 else "control_after_goodbye"), True
        if ftype != 0x10:
            continue
        try:
            msg = decode_control(payload)
        except ControlError as exc:
            return ("unknown_control" if exc.reason == "unknown_kind" else exc.reason), False
        if isinstance(msg, Hello):
            return "unexpected_hello", False
        if isinstance(msg, (Goodbye, Err)):
            peer_gone = True
    return err, peer_gone


def feed_lane(lane: Any, data: bytes) -> None:
    """Deliver ``data`` as the event loop would (get_buffer/buffer_updated) until the
    lane's transport is closed; the lane must never raise."""
    pos = 0
    while pos < len(data) and not lane.transport.is_closing():
        view = lane.get_buffer(len(data) - pos)
        n = min(len(view), len(data) - pos)
        view[:n] = data[pos:pos + n]
        pos += n
        lane.buffer_updated(n)


def _lane_stream():
    ctrl = st.one_of(
        st.builds(lambda p: ut.fastpath.encode_frame(0x10, p), near_control()),
        st.builds(lambda p: ut.fastpath.encode_frame(0x10, p), st.binary(max_size=20)),
    )
    data = st.builds(lambda p: ut.fastpath.encode_frame(0x01, p), st.binary(max_size=50))
    garbage = st.binary(min_size=1, max_size=12)
    return st.lists(st.one_of(data, data, ctrl, garbage), max_size=10).map(b"".join)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=_lane_stream(), cuts=st.lists(st.integers(0, 10_000), max_size=6),
       impl=st.sampled_from(["compiled", "pure"]), eof=st.booleans())
def test_random_bytes_into_a_lane_of_a_session(stream, cuts, impl, eof):
    from ut.session import Session
    from ut.stats import TunnelStats

    class FuzzSession(Session):
        role = "server"

        def udp_target(self):
            return self.port, None

    async def main():
        with use_implementation(impl):
            stats = TunnelStats(role="server", max_lanes=2)
            s = FuzzSession(asyncio.get_running_loop(), stats, client_cn="fuzz", session_id=1,
                            n_lanes=2, max_packets=64, max_bytes=1 << 20)
            s.port = FakePort()
            lane = open_lane(s, 0)
            s.lane_up(lane)
            for piece in _chunks(stream, cuts):
                feed_lane(lane, piece)
            if eof and not lane.transport.is_closing():
                lane.eof_received()
            lane.connection_lost(None)
            first_err, after_goodbye = _first_lane_error(stream)
            c = s.counters
            assert c.lanes_active == 0 and s.lanes[0] is None  # gone, and only once
            errors = stats.protocol_errors
            if first_err not in (None, "truncated"):
                # After the peer's GOODBYE or ERR our side closes: what follows is judged
                # only if it came in the same read.
                want = (0, 1) if after_goodbye else (1,)
                assert errors.get(first_err, 0) in want, (first_err, errors)
                assert lane.transport.is_closing()  # ERR sent and closed, or aborted
            assert sum(errors.values()) <= 1  # one violation per lane, at most
            # Every DATA frame that the lane read was counted and handed to UDP.
            assert c.lane_rx_frames[0] == c.udp_out_packets + c.dropped == s.port.sent
            assert set(errors) <= FRAME_REASONS | CONTROL_REASONS | {
                "unknown_control", "unexpected_hello", "data_after_goodbye",
                "control_after_goodbye"}

    asyncio.run(main())


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=_lane_stream(), hello_first=st.booleans(), lane_id=st.integers(0, 5))
def test_random_first_frames_into_the_server(stream, hello_first, lane_id):
    """The pre-HELLO path: whatever arrives first, the lane is admitted once with a valid
    HELLO, or refused (ERR sent) and counted; the server never raises."""
    from ut.control import control_frame
    from ut.lane import Lane
    from ut.laneproto import LaneMachine

    async def main():
        from ut.config import load_config

        # No TLS happens here (the transport is fake), so no certificate files are read.
        cfg = load_config({
            "role": "server", "tcp": {"listen_addr": "127.0.0.1:0", "lanes": 3},
            "udp": {"wg_udp_addr": "127.0.0.1:9"}, "metrics": {"enabled": False},
            "tls": {"ca_cert": "ca.pem", "cert": "c.pem", "key": "k.pem"},
        }, check_files=False)
        server = ut.Server(cfg)
        server.loop = asyncio.get_running_loop()
        server.transport = TlsTransport(None, cfg.tcp)  # only its peer_identity() is used
        lane = Lane(server, LaneMachine("server", max_lanes=3))
        lane.connection_made(FakeTransport())
        lane.proto.transport_up()
        server._pending[lane] = None
        data = (control_frame(Hello(77, lane_id, 3)) if hello_first else b"") + stream
        try:
            feed_lane(lane, data)
            admitted = bool(server.sessions)
            refused = lane.transport.is_closing()
            assert admitted or refused or lane in server._pending or not data
            if admitted:
                assert lane.lane_id < 3 and lane not in server._pending
        finally:
            for s in list(server.sessions.values()):
                server.end_session(s, "test")

    asyncio.run(main())


# ---------------------------------------------------------------------------------------
# Coverage-guided: a short bounded atheris run
# ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_atheris_short_run():
    try:
        import atheris  # noqa: F401
    except ImportError:
        pytest.skip("atheris is not installed (pip install atheris); "
                    "scripts/fuzz_atheris.py runs it")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "fuzz_atheris.py"), "-runs=20000",
         "-max_len=4096", "-seed=1"],
        capture_output=True, text=True, timeout=300, env=env, cwd=str(ROOT))
    tail = (res.stdout + res.stderr)[-3000:]
    assert res.returncode == 0, tail
    assert "Done 20000 runs" in tail, tail
