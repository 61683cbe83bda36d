"""PDU v1 framing (encode_frame, encode_data, Deframer), run against both implementations.

The hex test vectors come from docs/protocol.md, so the document and the code agree.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Iterable
from pathlib import Path

import pytest

from ut.errors import FrameError

PROTOCOL_MD = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"
_VECTOR_RE = re.compile(r"<!-- vector: ([\w-]+) -->\s*```\n(.*?)```", re.S)


def load_vectors() -> dict[str, bytes]:
    """``{name: frame bytes}`` for every ``<!-- vector: NAME -->`` block of protocol.md."""
    text = PROTOCOL_MD.read_text(encoding="utf-8")
    return {name: bytes.fromhex(body) for name, body in _VECTOR_RE.findall(text)}


VECTORS = load_vectors()
READ_CHUNK = 65536


def decode_all(fp, stream: bytes, chunks: Iterable[int] | None = None, via: str = "feed", **kw):
    """Feed ``stream`` in pieces of the given sizes (``feed`` or ``get_buffer`` +
    ``buffer_updated``), then call ``eof``; return (frames, error or None)."""
    d = fp.Deframer(**kw)
    frames: list = []
    pos = 0
    sizes = iter(chunks) if chunks is not None else None
    while pos < len(stream):
        k = next(sizes) if sizes is not None else len(stream)
        if via == "feed":
            piece = stream[pos : pos + k]
            pos += len(piece)
            frames += d.feed(piece)
        else:
            view = d.get_buffer(k)
            assert len(view) >= 1
            n = min(len(view), k, len(stream) - pos)
            view[:n] = stream[pos : pos + n]
            pos += n
            frames += d.buffer_updated(n)
        if d.error is not None:
            return frames, d.error
    try:
        d.eof()
    except FrameError as err:
        return frames, err
    return frames, None


def random_frames(fp, rng: random.Random, count: int) -> list[tuple[int, int, bytes]]:
    sizes = [0, 1, 2, 8, 9, 10, 100, 1420, 1500, 9000, 65535]
    out = []
    for _ in range(count):
        n = rng.choice(sizes)
        ftype = fp.TYPE_DATA if rng.random() < 0.9 else fp.TYPE_CTRL
        payload = rng.randbytes(n)
        if ftype == fp.TYPE_CTRL and payload[:1] == bytes([fp.KIND_PAD]):
            payload = b"\x05" + payload[1:]  # not a PAD frame: the deframer drops those
        out.append((ftype, rng.randrange(256), payload))
    return out


def encode_all(fp, frames) -> bytes:
    return b"".join(fp.encode_frame(t, p, f) for t, f, p in frames)


# -- constants and test vectors -------------------------------------------------------


def test_constants(fp):
    assert fp.MAGIC == b"UT"
    assert fp.VERSION == 1
    assert fp.TYPE_DATA == 0x01
    assert fp.TYPE_CTRL == 0x10
    assert fp.HEADER_LEN == 9
    assert fp.MAX_PAYLOAD == 65535


def test_doc_has_the_vectors():
    for name in ("data-empty", "data-hello", "ctrl-hello", "ctrl-goodbye-idle",
                 "ctrl-err-lane-range", "data-seq", "ctrl-hello-seq", "ctrl-pad",
                 "ctrl-hello-seq-pad", "write-padded"):
        assert name in VECTORS, f"docs/protocol.md lacks test vector {name!r}"


def test_numbered_data_and_hello_vectors(fp):
    from ut.control import Hello, control_frame

    assert fp.encode_data_seq([b"hi"], 7) == (VECTORS["data-seq"], 8)
    r = fp.Resequencer()
    r.feed(fp.Deframer().feed(VECTORS["data-seq"]), 0.0)  # number 7 while 0 is expected
    assert r.held == 1
    assert control_frame(Hello(0x0102030405060708, 3, 5), fp.FLAG_SEQ) == VECTORS["ctrl-hello-seq"]


def test_padding_vectors(fp):
    from ut.control import Hello, Pad, control_frame, decode_control

    assert fp.pad_frame(3) == VECTORS["ctrl-pad"]
    assert decode_control(VECTORS["ctrl-pad"][fp.HEADER_LEN:]) == Pad(3)
    # The deframer drops PAD frames: they only change the length of a write.
    d = fp.Deframer()
    assert d.feed(VECTORS["ctrl-pad"]) == [] and d.controls == 0
    hello = Hello(0x0102030405060708, 3, 5)
    assert control_frame(hello, fp.FLAG_SEQ | fp.FLAG_PAD) == VECTORS["ctrl-hello-seq-pad"]
    assert fp.encode_data_seq([b"hi"], 7, 2) == (VECTORS["write-padded"], 8)
    assert fp.encode_data_seq([b"hi"], 7)[0] + fp.pad_frame(2) == VECTORS["write-padded"]
    assert d.feed(VECTORS["write-padded"]) == [(fp.TYPE_DATA, fp.FLAG_SEQ, b"\x00\x00\x00\x07hi")]
    assert d.controls == 0


def test_deframer_counts_control_frames_and_drops_padding(fp):
    # controls: CTRL frames in the list just returned, so a lane can tell "DATA only" at a
    # glance; a PAD frame split across reads is dropped too, and an empty CTRL payload is
    # not padding (it is a malformed control message for the layer above).
    from ut.control import Goodbye, control_frame

    bye = control_frame(Goodbye(1))
    stream = (fp.encode_data([b"a"], 5) + bye + fp.pad_frame(300) + fp.encode_frame(fp.TYPE_CTRL, b"")
              + fp.encode_data([b"b"]))
    for cut in range(len(stream) + 1):
        d = fp.Deframer()
        first = d.feed(stream[:cut])
        n_first = d.controls
        second = d.feed(stream[cut:])
        frames = first + second
        assert frames == [(fp.TYPE_DATA, 0, b"a"), (fp.TYPE_CTRL, 0, b"\x02\x01"),
                          (fp.TYPE_CTRL, 0, b""), (fp.TYPE_DATA, 0, b"b")], cut
        assert n_first + d.controls == 2, cut
        assert n_first == sum(1 for t, _f, _p in first if t == fp.TYPE_CTRL)


def test_data_vectors_encode_byte_for_byte(fp):
    assert fp.encode_frame(fp.TYPE_DATA, b"") == VECTORS["data-empty"]
    assert fp.encode_frame(fp.TYPE_DATA, b"hello") == VECTORS["data-hello"]
    assert fp.encode_data([b"", b"hello"]) == VECTORS["data-empty"] + VECTORS["data-hello"]


@pytest.mark.parametrize(
    "name, expected",
    [
        ("data-empty", (0x01, 0, b"")),
        ("data-hello", (0x01, 0, b"hello")),
        ("ctrl-hello", (0x10, 0, bytes.fromhex("01 0102030405060708 0003 0005"))),
        ("ctrl-goodbye-idle", (0x10, 0, b"\x02\x01")),
        ("ctrl-err-lane-range", (0x10, 0, b"\x03\x00\x02lane id out of range")),
        ("data-seq", (0x01, 1, b"\x00\x00\x00\x07hi")),
        ("ctrl-hello-seq", (0x10, 1, bytes.fromhex("01 0102030405060708 0003 0005"))),
    ],
)
def test_good_vectors_decode(fp, name, expected):
    assert fp.Deframer().feed(VECTORS[name]) == [expected]
    assert fp.encode_frame(expected[0], expected[2], expected[1]) == VECTORS[name]


@pytest.mark.parametrize("name", ["bad-magic", "bad-version", "bad-type", "too-long", "truncated"])
def test_bad_vectors_give_their_reason(fp, name):
    frames, err = decode_all(fp, VECTORS["data-hello"] + VECTORS[name])
    assert frames == [(1, 0, b"hello")]
    assert isinstance(err, FrameError)
    assert err.reason == name.replace("-", "_")


# -- encoder --------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 1420, 65535])
@pytest.mark.parametrize("ftype", [0x01, 0x10])
def test_round_trip_sizes(fp, size, ftype):
    payload = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    frame = fp.encode_frame(ftype, payload, 0xA5)
    assert len(frame) == 9 + size
    assert frame[:5] == b"UT\x01" + bytes([ftype, 0xA5])
    assert int.from_bytes(frame[5:9], "big") == size
    assert fp.Deframer().feed(frame) == [(ftype, 0xA5, payload)]
    if ftype == 0x01:
        assert fp.encode_data([payload]) == fp.encode_frame(ftype, payload)


def test_encoder_refuses_65536(fp):
    with pytest.raises(ValueError):
        fp.encode_frame(fp.TYPE_DATA, bytes(65536))
    with pytest.raises(ValueError):
        fp.encode_data([b"ok", bytes(65536)])


@pytest.mark.parametrize("ftype", [0, 2, 0x11, 0xFF, -1, 256])
def test_encoder_refuses_unknown_type(fp, ftype):
    with pytest.raises((ValueError, OverflowError)):
        fp.encode_frame(ftype, b"x")


@pytest.mark.parametrize("flags", [-1, 256])
def test_encoder_refuses_bad_flags(fp, flags):
    with pytest.raises((ValueError, OverflowError)):
        fp.encode_frame(fp.TYPE_DATA, b"x", flags)


def test_encoders_accept_any_bytes_like(fp):
    want = fp.encode_frame(fp.TYPE_DATA, b"abc")
    assert fp.encode_frame(fp.TYPE_DATA, bytearray(b"abc")) == want
    assert fp.encode_frame(fp.TYPE_DATA, memoryview(b"xabcx")[1:4]) == want
    assert fp.encode_data([bytearray(b"abc"), memoryview(b"abc"), b"abc"]) == want * 3
    assert fp.encode_data((b"abc",)) == want
    assert fp.encode_data([]) == b""
    assert isinstance(fp.encode_data([bytearray(b"abc")]), bytes)


def test_encode_data_is_consecutive_data_frames(fp):
    rng = random.Random(7)
    grams = [rng.randbytes(rng.choice([0, 1, 1420, 65535])) for _ in range(50)]
    blob = fp.encode_data(grams)
    assert blob == b"".join(fp.encode_frame(fp.TYPE_DATA, g) for g in grams)
    assert fp.Deframer().feed(blob) == [(fp.TYPE_DATA, 0, g) for g in grams]


# -- decoder: chunking ----------------------------------------------------------------


@pytest.mark.parametrize("via", ["feed", "buffer"])
@pytest.mark.parametrize("seed", range(6))
def test_random_chunk_splits(fp, via, seed):
    rng = random.Random(seed)
    frames = random_frames(fp, rng, 120)
    stream = encode_all(fp, frames)
    top = rng.choice([16, 3000, 70000, 300000])
    chunks = (rng.randint(1, top) for _ in itertools.count())
    got, err = decode_all(fp, stream, chunks, via=via)
    assert err is None
    assert got == frames


@pytest.mark.parametrize("via", ["feed", "buffer"])
def test_one_byte_at_a_time(fp, via):
    rng = random.Random(1)
    frames = [(t, f, p[:300]) for t, f, p in random_frames(fp, rng, 40)]
    stream = encode_all(fp, frames)
    got, err = decode_all(fp, stream, [1] * len(stream), via=via)
    assert err is None
    assert got == frames


def test_feed_and_buffer_may_be_mixed(fp):
    rng = random.Random(3)
    frames = random_frames(fp, rng, 200)
    stream = encode_all(fp, frames)
    d = fp.Deframer()
    got = []
    pos = 0
    while pos < len(stream):
        k = rng.randint(1, 20000)
        if rng.random() < 0.5:
            got += d.feed(stream[pos : pos + k])
            pos += k
        else:
            view = d.get_buffer(rng.choice([-1, 0, 1, k]))
            n = min(len(view), k, len(stream) - pos)
            view[:n] = stream[pos : pos + n]
            pos += n
            got += d.buffer_updated(n)
    d.eof()
    assert got == frames
    assert d.buffered == 0


def test_whole_stream_in_one_feed(fp):
    frames = random_frames(fp, random.Random(5), 300)
    assert fp.Deframer().feed(encode_all(fp, frames)) == frames


def test_feed_accepts_bytes_like(fp):
    frame = fp.encode_frame(fp.TYPE_DATA, b"payload")
    for data in (bytearray(frame), memoryview(frame), memoryview(b"__" + frame)[2:]):
        assert fp.Deframer().feed(data) == [(1, 0, b"payload")]


def test_buffered_counts_the_unfinished_frame(fp):
    frame = fp.encode_frame(fp.TYPE_DATA, b"x" * 100)
    d = fp.Deframer()
    assert d.buffered == 0
    assert d.feed(frame[:5]) == []
    assert d.buffered == 5
    assert d.feed(frame[5:50]) == []
    assert d.buffered == 50
    assert d.feed(frame[50:] + frame[:20]) == [(1, 0, b"x" * 100)]
    assert d.buffered == 20


def test_payloads_are_independent_bytes(fp):
    d = fp.Deframer()
    view = d.get_buffer(-1)
    frame = fp.encode_frame(fp.TYPE_DATA, b"abcd")
    view[: len(frame)] = frame
    ((_, _, payload),) = d.buffer_updated(len(frame))
    assert type(payload) is bytes
    view[: len(frame)] = b"\0" * len(frame)  # overwriting the buffer leaves the frame alone
    assert payload == b"abcd"


# -- decoder: get_buffer / buffer_updated ---------------------------------------------


@pytest.mark.parametrize("hint", [-1, 0, 1, 100, 65536, 1 << 20])
def test_get_buffer_is_writable_and_non_empty(fp, hint):
    d = fp.Deframer()
    view = d.get_buffer(hint)
    assert isinstance(view, memoryview)
    assert not view.readonly
    assert len(view) >= 1


def test_buffer_memory_stays_bounded(fp):
    rng = random.Random(11)
    frames = [(1, 0, rng.randbytes(65535)) for _ in range(12)]
    stream = encode_all(fp, frames)
    bound = 9 + 65535 + READ_CHUNK
    d = fp.Deframer()
    got = []
    pos = 0
    while pos < len(stream):
        view = d.get_buffer(rng.choice([-1, 1, 1000, 70000]))
        assert d.buffered + len(view) <= bound
        n = min(len(view), len(stream) - pos, rng.randint(1, 100000))
        view[:n] = stream[pos : pos + n]
        pos += n
        got += d.buffer_updated(n)
    assert got == frames


def test_small_max_payload_keeps_small_buffers(fp):
    d = fp.Deframer(max_payload=100)
    view = d.get_buffer(-1)
    assert len(view) <= 9 + 100 + READ_CHUNK


def test_buffer_updated_checks_nbytes(fp):
    d = fp.Deframer()
    view = d.get_buffer(10)
    with pytest.raises(ValueError):
        d.buffer_updated(len(view) + 1)
    with pytest.raises((ValueError, OverflowError)):
        d.buffer_updated(-1)
    assert d.buffer_updated(0) == []


@pytest.mark.parametrize("max_payload", [-1, 65536])
def test_max_payload_range(fp, max_payload):
    with pytest.raises((ValueError, OverflowError)):
        fp.Deframer(max_payload)


# -- decoder: errors ------------------------------------------------------------------


def test_decoder_refuses_65536(fp):
    header = b"UT\x01\x01\x00" + (65536).to_bytes(4, "big")
    d = fp.Deframer()
    assert d.feed(header) == []
    assert d.error.reason == "too_long"


def test_max_payload_limit(fp):
    d = fp.Deframer(max_payload=10)
    ok = fp.encode_frame(fp.TYPE_DATA, b"x" * 10)
    assert d.feed(ok) == [(1, 0, b"x" * 10)]
    assert d.feed(fp.encode_frame(fp.TYPE_DATA, b"x" * 11)) == []
    assert d.error.reason == "too_long"


@pytest.mark.parametrize("via", ["feed", "buffer"])
def test_header_is_judged_before_its_payload_arrives(fp, via):
    bad = b"UT\x01\x01\x00" + (1 << 31).to_bytes(4, "big")
    frames, err = decode_all(fp, bad, [9], via=via)
    assert frames == [] and err.reason == "too_long"
    good_header = b"UT\x01\x01\x00" + (60000).to_bytes(4, "big")
    d = fp.Deframer()
    assert d.feed(good_header) == []
    assert d.error is None and d.buffered == 9


def test_header_judged_when_completed_across_feeds(fp):
    d = fp.Deframer()
    assert d.feed(b"UT\x01") == []
    assert d.feed(b"\x07\x00\x00") == []
    assert d.error is None
    assert d.feed(b"\x00\x00\x01") == []
    assert d.error.reason == "bad_type"


def _flip_cases():
    # (byte index, bit) -> expected reason, or None where the flip leaves a valid header.
    cases = []
    for index in range(9):
        for bit in range(8):
            if index < 2:
                reason = "bad_magic"
            elif index == 2:
                reason = "bad_version"
            elif index == 3:
                reason = "bad_type"  # 0x01 is one flip away from no valid type
            elif index in (5, 6):
                reason = "too_long"  # Len >= 65536
            else:
                reason = None  # flags, or a Len still <= 65535
            cases.append((index, bit, reason))
    return cases


@pytest.mark.parametrize("via", ["feed", "buffer"])
@pytest.mark.parametrize("index, bit, reason", _flip_cases())
def test_single_bit_flips_in_the_header(fp, via, index, bit, reason):
    before = fp.encode_data([b"first", b"second"])
    target = bytearray(fp.encode_frame(fp.TYPE_DATA, bytes(range(200))))
    target[index] ^= 1 << bit
    frames, err = decode_all(fp, before + bytes(target), [7] * 200, via=via)
    assert frames[:2] == [(1, 0, b"first"), (1, 0, b"second")]
    if reason is None:
        if index == 4:
            assert err is None
            assert frames[2] == (1, 1 << bit, bytes(range(200)))
        else:  # a shorter or longer Len: misframed, but no header error at this header
            assert err is None or err.reason == "truncated" or len(frames) == 3
    else:
        assert len(frames) == 2
        assert isinstance(err, FrameError)
        assert err.reason == reason


@pytest.mark.parametrize("via", ["feed", "buffer"])
def test_frames_before_a_bad_header_are_returned_and_the_error_sticks(fp, via):
    good = [(1, 0, b"a" * n) for n in (0, 1, 1420)]
    stream = encode_all(fp, good) + b"XX\x01\x01\x00\x00\x00\x00\x00" + encode_all(fp, good)
    d = fp.Deframer()
    if via == "feed":
        out = d.feed(stream)
    else:
        view = d.get_buffer(len(stream))
        view[: len(stream)] = stream
        out = d.buffer_updated(len(stream))
    assert out == good
    assert isinstance(d.error, FrameError) and d.error.reason == "bad_magic"
    assert d.buffered == 0
    first = d.error
    with pytest.raises(FrameError) as e1:
        d.feed(fp.encode_frame(1, b"later"))
    with pytest.raises(FrameError) as e2:
        d.buffer_updated(0)
    with pytest.raises(FrameError) as e3:
        d.eof()
    assert e1.value is first and e2.value is first and e3.value is first
    assert len(d.get_buffer(-1)) >= 1  # still safe to call after an error


def test_error_messages(fp):
    def err(data):
        d = fp.Deframer()
        d.feed(data)
        return d.error

    e = err(b"XY\x01\x01\x00\x00\x00\x00\x00")
    assert (e.reason, str(e)) == ("bad_magic", "bad_magic: expected b'UT', got b'XY'")
    assert str(err(b"UT\x09\x01\x00\x00\x00\x00\x00")) == "bad_version: version 9, expected 1"
    assert str(err(b"UT\x01\x22\x00\x00\x00\x00\x00")) == "bad_type: type 0x22"
    assert str(err(b"UT\x01\x01\x00\x00\x01\x00\x00")) == "too_long: length 65536 > 65535"


@pytest.mark.parametrize("cut", [1, 5, 8, 9, 10, 13])
@pytest.mark.parametrize("via", ["feed", "buffer"])
def test_truncation_is_reported_at_eof(fp, cut, via):
    stream = fp.encode_data([b"whole", b"cut short"])
    frame_len = 9 + 5
    frames, err = decode_all(fp, stream[: frame_len + cut], [3] * 100, via=via)
    assert frames == [(1, 0, b"whole")]
    assert err.reason == "truncated"
    assert str(err) == f"truncated: {cut} bytes of an unfinished frame at end of stream"


def test_eof_on_frame_boundary_is_clean(fp):
    d = fp.Deframer()
    d.eof()
    d.feed(fp.encode_frame(1, b"x"))
    d.eof()
    assert d.error is None
