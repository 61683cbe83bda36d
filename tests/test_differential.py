"""Differential tests: the compiled ``ut._fastpath`` and the pure ``ut._purepy`` must agree.

Hypothesis feeds the same random input to both implementations (yarl's approach) and
demands identical results and identical errors. Also: the two export the same API with
the same docstrings, and the batched UDP calls (stage 2) work over real loopback sockets.
"""

from __future__ import annotations

import errno
import inspect
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ut
from ut.errors import FrameError

SETTINGS = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def outcome(fn, *args):
    """("ok", result) or ("raise", exception type name, message, reason)."""
    try:
        return ("ok", fn(*args))
    except Exception as exc:  # noqa: BLE001 - comparing whatever either side raises
        return ("raise", type(exc).__name__, str(exc), getattr(exc, "reason", None))


# -- API surface ----------------------------------------------------------------------

PUBLIC = [
    "MAGIC", "VERSION", "TYPE_DATA", "TYPE_CTRL", "HEADER_LEN", "MAX_PAYLOAD", "HAVE_MMSG",
    "HAVE_GSO", "encode_frame", "encode_data", "Deframer", "RingQueue", "LanePicker", "flow_key",
    "recv_batch", "send_batch", "encode_data_seq", "FLAG_SEQ", "SEQ_LEN", "Resequencer",
    "pad_frame", "FLAG_PAD", "KIND_PAD", "HAVE_RXQ_OVFL", "recv_batch_with_drops", "QueueBudget",
    "TUN_READ_HEADROOM", "tun_read_batch", "tun_write_batch", "FLAG_OFFLOAD", "VNET_HDR_LEN",
    "gso_split",
]


def test_same_public_api(fp_compiled, fp_pure):
    assert sorted(fp_compiled.__all__) == sorted(fp_pure.__all__) == sorted(PUBLIC)
    for name in PUBLIC:
        if name in ("HAVE_MMSG", "HAVE_GSO"):  # build facts (tests/test_distribution.py)
            continue
        assert getattr(fp_compiled, name) == getattr(fp_pure, name) or callable(
            getattr(fp_pure, name)
        ), name


def _members(obj):
    return {
        name
        for name in dir(obj)
        if not name.startswith("_") and (inspect.getdoc(getattr(obj, name, None)) is not None)
    }


@pytest.mark.parametrize(
    "name",
    ["encode_frame", "encode_data", "Deframer", "RingQueue", "LanePicker", "flow_key",
     "recv_batch", "send_batch", "encode_data_seq", "Resequencer", "pad_frame",
     "recv_batch_with_drops", "tun_read_batch", "tun_write_batch", "gso_split"],
)
def test_same_docstrings(fp_compiled, fp_pure, name):
    c, p = getattr(fp_compiled, name), getattr(fp_pure, name)
    assert c.__doc__ == p.__doc__
    if inspect.isclass(p):
        for member in sorted(_members(p)):
            assert getattr(c, member).__doc__ == getattr(p, member).__doc__, member
            assert getattr(p, member).__doc__, f"{name}.{member} has no docstring"


def test_same_errors_module(fp_compiled, fp_pure):
    for fp in (fp_compiled, fp_pure):
        d = fp.Deframer()
        d.feed(b"NOPE-NOPE")
        assert type(d.error) is FrameError


def test_have_mmsg(fp_compiled, fp_pure):
    assert fp_pure.HAVE_MMSG is False
    assert isinstance(fp_compiled.HAVE_MMSG, bool)


@pytest.mark.parametrize(
    "value, expected",
    [(None, "compiled"), ("", "compiled"), ("0", "compiled"), ("1", "pure"), ("yes", "pure")],
)
def test_selector_follows_ut_no_extensions(request, value, expected):
    if expected == "compiled":
        request.getfixturevalue("fp_compiled")  # skips (or fails) if the extension is missing
    env = {k: v for k, v in os.environ.items() if k != "UT_NO_EXTENSIONS"}
    if value is not None:
        env["UT_NO_EXTENSIONS"] = value
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(ut.__file__).resolve().parents[1]), env.get("PYTHONPATH", "")]
    )
    code = (
        "import ut.fastpath as f; "
        "print(f.IMPLEMENTATION, f.Deframer.__module__, f.FrameError.__module__)"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    module = "ut._fastpath" if expected == "compiled" else "ut._purepy"
    assert out == [expected, module, "ut.errors"]


# -- framing --------------------------------------------------------------------------


@st.composite
def frame_streams(draw):
    """A byte stream of mostly valid frames with the odd corruption or garbage."""
    parts = []
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(["frame"] * 8 + ["big", "garbage", "flip"]))
        if kind == "garbage":
            parts.append(draw(st.binary(max_size=20)))
            continue
        payload = draw(st.binary(max_size=3000 if kind == "big" else 60))
        if payload and draw(st.booleans()):
            payload = b"\x04" + payload[1:]  # a PAD frame when the type is CTRL
        frame = bytearray(
            b"UT\x01"
            + bytes([draw(st.sampled_from([0x01, 0x10])), draw(st.integers(0, 255))])
            + len(payload).to_bytes(4, "big")
            + payload
        )
        if kind == "flip":
            i = draw(st.integers(0, 8))
            frame[i] ^= 1 << draw(st.integers(0, 7))
        parts.append(bytes(frame))
    return b"".join(parts)


operations = st.lists(
    st.tuples(st.sampled_from(["feed", "buffer", "short-buffer"]), st.integers(1, 5000),
              st.sampled_from([-1, 0, 1, 7, 100, 4096, 70000])),
    min_size=1,
    max_size=60,
)


def run_deframer(fp, max_payload, stream, ops):
    log = []
    d_or_err = outcome(fp.Deframer, max_payload)
    if d_or_err[0] != "ok":
        return [d_or_err]
    d = d_or_err[1]
    pos = 0
    for op, size, hint in ops:
        if pos >= len(stream):
            break
        if op == "feed":
            chunk = stream[pos : pos + size]
            pos += len(chunk)
            log.append(outcome(d.feed, chunk))
        else:
            view = d.get_buffer(hint)
            log.append(("view", len(view), d.buffered))
            n = min(len(view), size, len(stream) - pos)
            if op == "short-buffer":
                n = min(n, 3)
            view[:n] = stream[pos : pos + n]
            pos += n
            log.append(outcome(d.buffer_updated, n))
        err = d.error
        log.append((d.buffered, d.controls, None if err is None else (err.reason, str(err))))
    log.append(outcome(d.eof))
    return log


@SETTINGS
@given(stream=frame_streams(), ops=operations, max_payload=st.sampled_from([65535, 3000, 40, 0]))
def test_deframer_agrees(fp_compiled, fp_pure, stream, ops, max_payload):
    assert run_deframer(fp_compiled, max_payload, stream, ops) == run_deframer(
        fp_pure, max_payload, stream, ops
    )


@SETTINGS
@given(stream=st.binary(max_size=200), cut=st.integers(0, 200))
def test_deframer_agrees_on_raw_bytes(fp_compiled, fp_pure, stream, cut):
    ops = [("feed", cut or 1, -1), ("feed", 1000, -1)]
    assert run_deframer(fp_compiled, 65535, stream, ops) == run_deframer(
        fp_pure, 65535, stream, ops
    )


@SETTINGS
@given(
    ftype=st.integers(-(2**31), 2**31 - 1) | st.sampled_from([1, 16]),
    flags=st.integers(-(2**31), 2**31 - 1) | st.integers(0, 255),
    payload=st.binary(max_size=100) | st.sampled_from([bytes(65535), bytes(65536)]),
)
def test_encode_frame_agrees(fp_compiled, fp_pure, ftype, flags, payload):
    assert outcome(fp_compiled.encode_frame, ftype, payload, flags) == outcome(
        fp_pure.encode_frame, ftype, payload, flags
    )


@SETTINGS
@given(grams=st.lists(st.binary(max_size=100) | st.sampled_from([bytes(65535), bytes(65536)]),
                      max_size=20))
def test_encode_data_agrees(fp_compiled, fp_pure, grams):
    assert outcome(fp_compiled.encode_data, grams) == outcome(fp_pure.encode_data, grams)
    mixed = [bytearray(g) if i % 2 else memoryview(g) for i, g in enumerate(grams)]
    assert outcome(fp_compiled.encode_data, mixed) == outcome(fp_pure.encode_data, grams)


PADS = st.integers(-3, 600) | st.sampled_from([65533, 65534, 65535, 65536])


@SETTINGS
@given(grams=st.lists(st.binary(max_size=100), max_size=8), pad=PADS,
       seq=st.integers(0, 2**32 - 1))
def test_padding_agrees(fp_compiled, fp_pure, grams, pad, seq):
    # A PAD frame after the datagrams, in both encoders, and alone.
    assert outcome(fp_compiled.encode_data, grams, pad) == outcome(fp_pure.encode_data, grams, pad)
    assert outcome(fp_compiled.encode_data_seq, grams, seq, pad) == outcome(
        fp_pure.encode_data_seq, grams, seq, pad)
    assert outcome(fp_compiled.pad_frame, pad) == outcome(fp_pure.pad_frame, pad)
    if 0 <= pad < 65535:
        data = fp_pure.encode_data(grams, pad)
        for fp in (fp_compiled, fp_pure):
            d = fp.Deframer()
            assert d.feed(data) == [(fp.TYPE_DATA, 0, g) for g in grams]  # PAD dropped
            assert d.controls == 0


# -- ring queue -----------------------------------------------------------------------

queue_ops = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.integers(0, 300), st.floats(0, 1e6)),
        st.tuples(st.just("pop")),
        st.tuples(st.just("pop_batch"), st.integers(-1, 20), st.integers(0, 2000)),
        st.tuples(st.just("clear")),
        st.tuples(st.just("drop_stale"), st.floats(0, 1e6)),
    ),
    max_size=200,
)


def run_queue(fp, max_packets, max_bytes, ops):
    q = fp.RingQueue(max_packets, max_bytes)
    log = []
    counter = 0
    for op in ops:
        if op[0] == "push":
            counter += 1
            data = counter.to_bytes(4, "big") * (op[1] // 4) + bytes(op[1] % 4)
            log.append(outcome(q.push, data, op[2]))
        elif op[0] == "pop":
            log.append(outcome(q.pop))
        elif op[0] == "pop_batch":
            log.append(outcome(q.pop_batch, op[1], op[2]))
        elif op[0] == "drop_stale":
            log.append(outcome(q.drop_stale, op[1]))
        else:
            log.append(outcome(q.clear))
        log.append((len(q), q.nbytes, q.dropped, q.dropped_bytes, q.head_stamp))
    return log


@SETTINGS
@given(max_packets=st.integers(1, 40), max_bytes=st.integers(1, 3000), ops=queue_ops)
def test_ring_queue_agrees(fp_compiled, fp_pure, max_packets, max_bytes, ops):
    assert run_queue(fp_compiled, max_packets, max_bytes, ops) == run_queue(
        fp_pure, max_packets, max_bytes, ops
    )


# -- lane picker ----------------------------------------------------------------------

picker_ops = st.lists(
    st.one_of(
        st.tuples(st.just("set"), st.integers(-1, 9), st.booleans()),
        st.tuples(st.just("pick"), st.integers(-(2**63), 2**63 - 1) | st.integers(0, 100)),
        st.tuples(st.just("is_ready"), st.integers(-1, 9)),
    ),
    max_size=200,
)


def run_picker(fp, n, strategy, ops):
    p = fp.LanePicker(n, strategy)
    log = []
    for op in ops:
        if op[0] == "set":
            log.append(outcome(p.set_ready, op[1], op[2]))
        elif op[0] == "pick":
            log.append(outcome(p.pick, op[1]))
        else:
            log.append(outcome(p.is_ready, op[1]))
        log.append(p.ready_count)
    return log


@SETTINGS
@given(n=st.integers(1, 8), strategy=st.sampled_from(["rr", "hash"]), ops=picker_ops)
def test_lane_picker_agrees(fp_compiled, fp_pure, n, strategy, ops):
    assert run_picker(fp_compiled, n, strategy, ops) == run_picker(fp_pure, n, strategy, ops)


@SETTINGS
@given(
    data=st.binary(max_size=40)
    | st.tuples(st.sampled_from([1, 2, 3, 4]), st.binary(max_size=40)).map(
        lambda t: bytes([t[0]]) + t[1]
    )
)
def test_flow_key_agrees(fp_compiled, fp_pure, data):
    assert fp_compiled.flow_key(data) == fp_pure.flow_key(data)
    assert fp_compiled.flow_key(bytearray(data)) == fp_pure.flow_key(memoryview(data))


def _ip_like(version_ihl: int, proto: int, frag: int, body: bytes) -> bytes:
    # An IP packet's first bytes, valid or not: any IHL, any length from 0 on, the
    # protocol (IPv4 byte 9, IPv6 byte 6) from the ported ones or not, fragments or not.
    head = bytearray(body)
    head[:1] = bytes([version_ihl])
    if len(head) > 9:
        head[9] = proto
    if len(head) > 7 and version_ihl >> 4 == 4:
        head[6:8] = frag.to_bytes(2, "big")
    if len(head) > 6 and version_ihl >> 4 == 6:
        head[6] = proto
    return bytes(head)


@SETTINGS
@given(
    version_ihl=st.integers(0x40, 0x4F) | st.integers(0x60, 0x6F),
    proto=st.sampled_from([6, 17, 132, 136]) | st.integers(0, 255),
    frag=st.sampled_from([0, 0x4000, 0x2000, 0x0001, 0x1FFF]) | st.integers(0, 0xFFFF),
    body=st.binary(min_size=1, max_size=100),
)
def test_flow_key_agrees_on_ip_packets(fp_compiled, fp_pure, version_ihl, proto, frag, body):
    data = _ip_like(version_ihl, proto, frag, body)
    assert fp_compiled.flow_key(data) == fp_pure.flow_key(data)
    assert fp_compiled.flow_key(bytearray(data)) == fp_pure.flow_key(memoryview(data))


@pytest.mark.parametrize("args", [(0,), (65537,), (3, "random"), (3, "RR")])
def test_constructor_errors_agree(fp_compiled, fp_pure, args):
    assert outcome(fp_compiled.LanePicker, *args)[:2] == outcome(fp_pure.LanePicker, *args)[:2]


# -- batched UDP (stage 2): real loopback sockets, both implementations ---------------


def _udp_pair(family: int, host: str):
    rx = socket.socket(family, socket.SOCK_DGRAM)
    tx = socket.socket(family, socket.SOCK_DGRAM)
    for s in (rx, tx):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        s.bind((host, 0))
        s.setblocking(False)
    return rx, tx


def _has_ipv6() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


FAMILIES = [
    pytest.param(socket.AF_INET, "127.0.0.1", id="ipv4"),
    pytest.param(
        socket.AF_INET6, "::1", id="ipv6",
        marks=pytest.mark.skipif(not _has_ipv6(), reason="no IPv6 loopback here"),
    ),
]


def _recv_all(fp, sock, want: int, max_count: int = 64, bufsize: int = 65535):
    got = []
    deadline = time.monotonic() + 5
    while len(got) < want and time.monotonic() < deadline:
        batch = fp.recv_batch(sock, max_count, bufsize)
        assert len(batch) <= max_count
        got += batch
        if not batch:
            time.sleep(0.001)
    return got


@pytest.mark.parametrize("family, host", FAMILIES)
def test_recv_batch_empty_returns_nothing(fp, family, host):
    rx, tx = _udp_pair(family, host)
    with rx, tx:
        assert fp.recv_batch(rx, 32) == []
        rx.setblocking(True)  # never blocks, even on a blocking socket
        assert fp.recv_batch(rx, 32) == []
        assert fp.recv_batch(rx, 0) == []


@pytest.mark.parametrize("family, host", FAMILIES)
@pytest.mark.parametrize("sender", ["compiled", "pure"])
def test_send_batch_to_address_and_recv_batch(fp, fp_compiled, fp_pure, family, host, sender):
    tx_fp = fp_compiled if sender == "compiled" else fp_pure
    rx, tx = _udp_pair(family, host)
    with rx, tx:
        grams = [bytes([i % 256]) * (i * 37 % 1500) for i in range(200)]
        grams += [b"", bytes(9000), bytes(65507 if family == socket.AF_INET else 65487)]
        sent = 0
        while sent < len(grams):
            n = tx_fp.send_batch(tx, grams[sent:], rx.getsockname())
            sent += n
            got = _recv_all(fp, rx, n) if n else []
            assert [d for d, _ in got] == grams[sent - n : sent]
            # Addresses look exactly like socket.recvfrom's.
            assert {a for _, a in got} <= {tx.getsockname()}


@pytest.mark.parametrize("family, host", FAMILIES)
def test_send_batch_connected(fp, family, host):
    rx, tx = _udp_pair(family, host)
    with rx, tx:
        tx.connect(rx.getsockname())
        grams = [b"%d" % i for i in range(150)]
        assert fp.send_batch(tx, grams) == 150
        got = _recv_all(fp, rx, 150, max_count=1000)
        assert [d for d, _ in got] == grams
        assert all(a == tx.getsockname() for _, a in got)
        assert fp.send_batch(tx, []) == 0
        assert fp.send_batch(tx, (bytearray(b"ba"), memoryview(b"mv"))) == 2
        assert [d for d, _ in _recv_all(fp, rx, 2)] == [b"ba", b"mv"]


# Sizes that exercise GSO runs: equal runs, a shorter datagram ending a run, empty
# datagrams, runs cut by the 64-datagram and 65000-byte limits, and big datagrams.
_GSO_SIZES = st.lists(
    st.one_of(
        st.tuples(st.sampled_from([1, 100, 1200, 1420, 1452, 9000]), st.integers(1, 80)),
        st.tuples(st.integers(0, 1500), st.just(1)),
        st.tuples(st.sampled_from([30000, 65000]), st.integers(1, 3)),
    ),
    min_size=1, max_size=8,
).map(lambda runs: [size for size, n in runs for _ in range(n)])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=_GSO_SIZES, connected=st.booleans())
@pytest.mark.parametrize("family, host", FAMILIES)
def test_send_batch_gso_delivers_the_same_datagrams(fp, family, host, sizes, connected):
    """With gso, the receiver (a plain socket, like wireguard-go's) gets exactly the
    datagrams sent, in order, each with its own length."""
    rx, tx = _udp_pair(family, host)
    with rx, tx:
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        grams = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
        addr = rx.getsockname()
        if connected:
            tx.connect(addr)
            addr = None
        sent = 0
        while sent < len(grams):
            n = fp.send_batch(tx, grams[sent:], addr, gso=True)
            assert n > 0
            got = _recv_all(fp, rx, n, max_count=1000)
            assert [d for d, _ in got] == grams[sent : sent + n]
            sent += n


def test_gso_runs_of_the_pure_twin():
    from ut._purepy import _gso_runs as runs

    assert runs([]) == []
    assert runs([1420] * 3) == [3]
    assert runs([1420, 1420, 100, 1420]) == [3, 1]  # a shorter one ends a run
    assert runs([100, 1420]) == [1, 1]  # a longer one starts a new run
    assert runs([0, 0, 5]) == [1, 1, 1]  # empty datagrams go alone
    assert runs([1000] * 100) == [64, 36]  # at most 64 datagrams
    assert runs([1452] * 50) == [44, 6]  # at most 65000 bytes
    assert runs([65000, 65000]) == [1, 1]


SO_NO_CHECK = 11  # Linux: a socket without UDP checksums cannot use GSO (EINVAL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="UDP GSO is Linux-only")
def test_send_batch_gso_really_segments(fp):
    """A socket that cannot segment refuses a run with gso (so the run did go out as
    one UDP_SEGMENT message) and sends it without. A build without GSO (UT_NO_MMSG=1,
    the macOS-like build) ignores ``gso``."""
    rx, tx = _udp_pair(socket.AF_INET, "127.0.0.1")
    with rx, tx:
        tx.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)
        run = [b"x" * 100] * 3
        if fp.HAVE_GSO:
            with pytest.raises(OSError) as err:
                fp.send_batch(tx, run, rx.getsockname(), gso=True)
            assert err.value.errno == errno.EINVAL
        else:
            assert fp.send_batch(tx, run, rx.getsockname(), gso=True) == 3
        assert fp.send_batch(tx, [b"y" * 100], rx.getsockname(), gso=True) == 1  # no run
        assert fp.send_batch(tx, [b"z" * 100] * 3, rx.getsockname()) == 3
        want = ([] if fp.HAVE_GSO else run) + [b"y" * 100] + [b"z" * 100] * 3
        assert [d for d, _ in _recv_all(fp, rx, len(want))] == want


def test_recv_batch_matches_recvfrom_addresses(fp):
    rx, tx = _udp_pair(socket.AF_INET, "127.0.0.1")
    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with rx, tx, other:
        other.bind(("127.0.0.1", 0))
        for i in range(10):
            (tx if i % 3 else other).sendto(b"%d" % i, rx.getsockname())
        got = _recv_all(fp, rx, 10)
        assert [d for d, _ in got] == [b"%d" % i for i in range(10)]
        assert [a for _, a in got] == [
            (other if i % 3 == 0 else tx).getsockname() for i in range(10)
        ]


def test_recv_batch_truncates_to_bufsize(fp):
    rx, tx = _udp_pair(socket.AF_INET, "127.0.0.1")
    with rx, tx:
        tx.sendto(b"0123456789", rx.getsockname())
        tx.sendto(b"ab", rx.getsockname())
        got = _recv_all(fp, rx, 2, bufsize=4)
        assert [d for d, _ in got] == [b"0123", b"ab"]


def test_recv_batch_respects_max_count(fp):
    rx, tx = _udp_pair(socket.AF_INET, "127.0.0.1")
    with rx, tx:
        for i in range(100):
            tx.sendto(b"%d" % i, rx.getsockname())
        time.sleep(0.05)
        first = fp.recv_batch(rx, 30)
        assert len(first) == 30
        rest = _recv_all(fp, rx, 70, max_count=500)
        assert [d for d, _ in first + rest] == [b"%d" % i for i in range(100)]


def test_send_batch_stops_at_eagain(fp):
    rx, tx = _udp_pair(socket.AF_INET, "127.0.0.1")
    with rx, tx:
        tx.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        tx.connect(rx.getsockname())
        # Loopback UDP rarely blocks; whatever happens the count must be a prefix.
        grams = [bytes(8000)] * 300
        n = fp.send_batch(tx, grams)
        assert 0 < n <= 300


def test_send_batch_errors(fp):
    rx, tx = _udp_pair(socket.AF_INET, "127.0.0.1")
    with rx, tx:
        with pytest.raises(OSError):
            fp.send_batch(tx, [b"x"])  # not connected, no address
        with pytest.raises(OSError):
            fp.send_batch(tx, [bytes(70000)], rx.getsockname())  # EMSGSIZE
        with pytest.raises((TypeError, OverflowError)):
            fp.send_batch(tx, [b"x"], ("127.0.0.1", 70000))
        with pytest.raises(TypeError):
            fp.send_batch(tx, [5], rx.getsockname())
        assert fp.send_batch(tx, [b"by", b"name"], ("localhost", rx.getsockname()[1])) == 2
        assert [d for d, _ in _recv_all(fp, rx, 2)] == [b"by", b"name"]


def test_closed_socket_raises(fp):
    rx, tx = _udp_pair(socket.AF_INET, "127.0.0.1")
    tx.close()
    rx.close()
    with pytest.raises(OSError):
        fp.recv_batch(rx, 8)
    with pytest.raises(OSError):
        fp.send_batch(tx, [b"x"], ("127.0.0.1", 9))


# -- GSO run grouping (issue 16): the compiled grouping against the pure one ----------

# Sizes where the rules meet: 64 x 1015 fits in 65000 bytes and 64 x 1016 does not; two of
# 32500 fit and two of 32501 do not; 65000 is the most one run may carry; 65507 is the
# largest IPv4 UDP payload; 70000 cannot be sent at all but must still group the same.
_RUN_SIZES = [0, 1, 2, 100, 1015, 1016, 1420, 1452, 9000, 32500, 32501, 65000, 65001,
              65507, 70000]


@st.composite
def gso_size_lists(draw, max_size: int = 70000, max_bytes: int | None = None,
                   max_count: int | None = None):
    """Datagram sizes in runs of one size (up to 140, past the 64-segment cap), each run
    maybe ended by a shorter datagram, the way WireGuard traffic looks to ``send_batch``."""
    sizes: list[int] = []
    for _ in range(draw(st.integers(0, 8))):
        size = draw(st.sampled_from([s for s in _RUN_SIZES if s <= max_size])
                    | st.integers(0, max_size))
        run = [size] * draw(st.integers(1, 140))
        if draw(st.booleans()):
            run.append(draw(st.integers(0, size)))  # a shorter last datagram
        if (max_bytes is not None and sum(sizes) + sum(run) > max_bytes
                or max_count is not None and len(sizes) + len(run) > max_count):
            break
        sizes += run
    return sizes


def _check_gso_rules(sizes: list[int], runs: list[int]) -> None:
    """``runs`` keep the kernel's UDP_SEGMENT rules (udp_send_skb: every segment the
    gso_size but the last, which may be shorter; at most UDP_MAX_SEGMENTS = 64 of them;
    the payload within one IP packet, 65000 bytes here) and are greedy: each run is as
    long as those rules allow, and a zero-length datagram goes alone."""
    assert sum(runs) == len(sizes) and all(r >= 1 for r in runs), runs
    i = 0
    for r in runs:
        run = sizes[i : i + r]
        seg = run[0]
        assert r <= 64
        if r > 1:
            assert seg > 0 and all(s == seg for s in run[:-1]), run
            assert 0 < run[-1] <= seg and sum(run) <= 65000, run
        if i + r < len(sizes):  # greedy: the next datagram could not have joined
            nxt = sizes[i + r]
            assert (seg == 0 or r == 64 or nxt == 0 or nxt > seg or run[-1] < seg
                    or sum(run) + nxt > 65000), (run, nxt)
        i += r


@pytest.mark.parametrize("sizes, runs", [
    ([], []),
    ([1420], [1]),
    ([1420] * 3, [3]),
    ([1420, 1420, 100, 1420], [3, 1]),  # a shorter one ends a run
    ([100, 1420], [1, 1]),  # a longer one starts a new run
    ([0, 0, 5], [1, 1, 1]),  # empty datagrams go alone
    ([5, 0, 5], [1, 1, 1]),
    ([7] * 64, [64]),
    ([7] * 65, [64, 1]),  # at most 64 datagrams
    ([7] * 200, [64, 64, 64, 8]),
    ([1015] * 65, [64, 1]),  # 64 x 1015 = 64960 bytes: the count is the limit
    ([1016] * 65, [63, 2]),  # 64 x 1016 = 65024 bytes: the byte limit comes first
    ([1452] * 50, [44, 6]),  # at most 65000 bytes
    ([32500, 32500, 32500], [2, 1]),
    ([32501, 32501], [1, 1]),
    ([65000, 65000], [1, 1]),
    ([65001, 1], [1, 1]),  # over the run limit: alone (and the kernel may refuse it)
    ([70000, 70000], [1, 1]),
    ([40000, 30000], [1, 1]),  # shorter, but the two exceed 65000 bytes
    ([100] + [1420] * 64, [1, 45, 19]),  # runs do not depend on sendmmsg's 64-message calls
    ([9] + [100] * 63 + [100, 100], [1, 64, 1]),
])
def test_gso_runs_edge_cases(fp_compiled, fp_pure, sizes, runs):
    assert fp_compiled._gso_runs(sizes) == fp_pure._gso_runs(sizes) == runs
    _check_gso_rules(sizes, runs)


@SETTINGS
@given(sizes=gso_size_lists())
def test_gso_runs_agree(fp_compiled, fp_pure, sizes):
    """The compiled ``send_batch`` groups a batch into UDP_SEGMENT runs exactly as the
    pure twin does, and both keep the kernel's rules."""
    assert fp_compiled._gso_runs.__doc__ == fp_pure._gso_runs.__doc__
    runs = fp_pure._gso_runs(sizes)
    assert fp_compiled._gso_runs(sizes) == runs
    _check_gso_rules(sizes, runs)


def _gro_receiver():
    """A loopback receiver with UDP_GRO (Linux 5.0+): a UDP_SEGMENT message reaches it
    whole, with its segment size in a control message, so a test sees the runs."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.setsockopt(socket.IPPROTO_UDP, 104, 1)  # UDP_GRO
    except OSError:
        rx.close()
        pytest.skip("this kernel has no UDP_GRO (Linux 5.0+)")
    try:  # past net.core.rmem_max where allowed (root); the batches stay small anyway
        rx.setsockopt(socket.SOL_SOCKET, 33, 4 << 20)  # SO_RCVBUFFORCE
    except OSError:
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    rx.bind(("127.0.0.1", 0))
    rx.setblocking(False)
    return rx


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="UDP GSO/GRO are Linux-only")
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=gso_size_lists(max_size=65000, max_bytes=96 * 1024, max_count=200),
       gso=st.booleans())
def test_send_batch_sends_the_runs_of_gso_runs(fp, sizes, gso):
    """What the kernel gets from ``send_batch(..., gso=True)`` is ``_gso_runs``' grouping:
    one UDP_SEGMENT message per run (seen whole by a UDP_GRO receiver), whatever the
    batch's length; without gso (or without HAVE_GSO), one message per datagram."""
    import struct

    rx = _gro_receiver()
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.setblocking(False)
    with rx, tx:
        grams = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
        assert fp.send_batch(tx, grams, rx.getsockname(), gso=gso) == len(grams)
        runs, data = [], []
        deadline = time.monotonic() + 5
        while sum(runs) < len(grams) and time.monotonic() < deadline:
            try:
                msg, anc, _, _ = rx.recvmsg(1 << 17, 256)
            except BlockingIOError:
                time.sleep(0.001)
                continue
            seg = len(msg)
            for level, kind, value in anc:
                if level == socket.IPPROTO_UDP and kind == 104:
                    seg = struct.unpack("=i", value[:4])[0]
            runs.append(-(-len(msg) // seg) if seg else 1)
            data.append(msg)
    assert b"".join(data) == b"".join(grams)
    want = fp._gso_runs(sizes) if gso and fp.HAVE_GSO else [1] * len(sizes)
    assert runs == want
