"""Control messages (ut.control): encoding, decoding, errors, and the docs/protocol.md vectors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ut import control
from ut.control import (
    ERR_LANE_ID_OUT_OF_RANGE,
    GOODBYE_IDLE,
    Err,
    Goodbye,
    Hello,
    control_frame,
    decode_control,
    encode_control,
)
from ut.errors import ControlError

PROTOCOL_MD = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"
_VECTOR_RE = re.compile(r"<!-- vector: ([\w-]+) -->\s*```\n(.*?)```", re.S)
VECTORS = {
    name: bytes.fromhex(body)
    for name, body in _VECTOR_RE.findall(PROTOCOL_MD.read_text(encoding="utf-8"))
}

DOC_MESSAGES = {
    "ctrl-hello": Hello(session_id=0x0102030405060708, lane_id=3, lane_count=5),
    "ctrl-goodbye-idle": Goodbye(GOODBYE_IDLE),
    "ctrl-err-lane-range": Err(ERR_LANE_ID_OUT_OF_RANGE, "lane id out of range"),
}


@pytest.mark.parametrize("name", sorted(DOC_MESSAGES))
def test_doc_vectors_byte_for_byte(name):
    msg = DOC_MESSAGES[name]
    assert name in VECTORS, f"docs/protocol.md lacks test vector {name!r}"
    assert control_frame(msg) == VECTORS[name]
    assert encode_control(msg) == VECTORS[name][9:]
    assert decode_control(VECTORS[name][9:]) == msg


@pytest.mark.parametrize("name", sorted(DOC_MESSAGES))
def test_doc_vectors_through_the_deframer(fp, name):
    ((ftype, flags, payload),) = fp.Deframer().feed(VECTORS[name])
    assert (ftype, flags) == (fp.TYPE_CTRL, 0)
    assert decode_control(payload) == DOC_MESSAGES[name]


def test_constants():
    assert (control.KIND_HELLO, control.KIND_GOODBYE, control.KIND_ERR) == (1, 2, 3)
    assert control.GOODBYE_REASONS == {0: "shutdown", 1: "idle", 2: "replaced", 3: "error"}
    assert control.ERR_CODES == {
        1: "bad_hello",
        2: "lane_id_out_of_range",
        3: "protocol_error",
        4: "hello_timeout",
        5: "internal",
        6: "limit",
    }
    assert control.ERR_MESSAGE_MAX_BYTES == 512


@pytest.mark.parametrize(
    "msg",
    [
        Hello(0, 0, 1),
        Hello(2**64 - 1, 65535, 65535),
        Goodbye(),
        Goodbye(3),
        Goodbye(255),
        Err(1),
        Err(5, "internal trouble"),
        Err(65535, "ünïcødé ✓ 🚀"),
    ],
)
def test_round_trip(msg):
    assert decode_control(encode_control(msg)) == msg
    assert decode_control(bytearray(encode_control(msg))) == msg
    assert decode_control(memoryview(encode_control(msg))) == msg


def test_sizes():
    assert len(encode_control(Hello(1, 2, 3))) == 13
    assert len(encode_control(Goodbye(0))) == 2
    assert len(encode_control(Err(1, "abc"))) == 6


def test_names():
    assert Goodbye(1).reason_name == "idle"
    assert Goodbye(200).reason_name == "unknown"
    assert Err(4).code_name == "hello_timeout"
    assert Err(99).code_name == "unknown"


def test_messages_are_frozen():
    with pytest.raises(AttributeError):
        Hello(1, 2, 3).lane_id = 4  # type: ignore[misc]


@pytest.mark.parametrize(
    "make",
    [
        lambda: Hello(-1, 0, 1),
        lambda: Hello(2**64, 0, 1),
        lambda: Hello(1, 65536, 1),
        lambda: Hello(1, 0, 0),
        lambda: Hello(1, 0, 65536),
        lambda: Goodbye(256),
        lambda: Goodbye(-1),
        lambda: Err(65536),
        lambda: Err(-1),
    ],
)
def test_constructors_check_ranges(make):
    with pytest.raises(ValueError):
        make()


def test_err_message_must_be_text():
    with pytest.raises(TypeError):
        Err(1, b"bytes")  # type: ignore[arg-type]


def test_long_err_message_is_cut_at_a_char_boundary():
    assert encode_control(Err(3, "a" * 600))[3:] == b"a" * 512
    for text in ("é" * 300, "a" + "é" * 300, "🚀" * 200, "ab" + "🚀" * 200, "abc" + "🚀" * 200):
        body = encode_control(Err(3, text))[3:]
        assert len(body) <= 512
        assert len(body) > 512 - 4
        decoded = body.decode("utf-8")  # still valid UTF-8
        assert text.startswith(decoded)
    assert decode_control(encode_control(Err(3, "é" * 300))) == Err(3, "é" * 256)


def test_unencodable_text_is_replaced():
    msg = decode_control(encode_control(Err(3, "bad \udcff surrogate")))
    assert msg == Err(3, "bad ? surrogate")


@pytest.mark.parametrize(
    "payload, reason",
    [
        (b"", "empty"),
        (b"\x00", "unknown_kind"),
        (b"\x05\x00", "unknown_kind"),
        (b"\xff", "unknown_kind"),
        (b"\x01", "bad_length"),
        (bytes.fromhex("01 0102030405060708 0003 00"), "bad_length"),
        (bytes.fromhex("01 0102030405060708 0003 0005 00"), "bad_length"),
        (bytes.fromhex("01 0102030405060708 0003 0000"), "bad_value"),
        (b"\x02", "bad_length"),
        (b"\x02\x00\x00", "bad_length"),
        (b"\x03", "bad_length"),
        (b"\x03\x00", "bad_length"),
        (b"\x03\x00\x01" + b"a" * 513, "bad_length"),
        (b"\x03\x00\x01\xff", "bad_utf8"),
        (b"\x03\x00\x01abc\xc3", "bad_utf8"),
    ],
)
def test_decode_errors(payload, reason):
    with pytest.raises(ControlError) as info:
        decode_control(payload)
    assert info.value.reason == reason


def test_err_message_at_the_limit_decodes():
    assert decode_control(b"\x03\x00\x01" + b"a" * 512) == Err(1, "a" * 512)
    assert decode_control(b"\x03\x00\x01") == Err(1, "")


def test_encode_rejects_other_objects():
    with pytest.raises(TypeError):
        encode_control("HELLO")  # type: ignore[arg-type]


def test_control_frame_is_a_ctrl_frame(fp):
    frame = control_frame(Goodbye(0))
    assert fp.Deframer().feed(frame) == [(fp.TYPE_CTRL, 0, b"\x02\x00")]
