#!/usr/bin/env python3
"""Coverage-guided fuzzing of the PDU decoder and the control parser (atheris / libFuzzer).

Each input is turned into a ``max_payload``, a read path (``feed`` or
``get_buffer``/``buffer_updated``), a list of cut points and a byte stream. The stream
is decoded by the pure-Python ``ut._purepy.Deframer`` (instrumented: atheris steers by
its coverage) and by the compiled ``ut._fastpath.Deframer``; both must give the same
frames and the same error, and raise nothing but ``FrameError``. Every CTRL payload,
and the raw input itself, goes through ``ut.control.decode_control``, which may raise
only ``ControlError``. A disagreement or any other exception is a crash: libFuzzer
writes the input to ``crash-*`` and exits non-zero.

The compiled module is C and is not coverage-instrumented here; the pure twin's
coverage drives the search and the compiled one is checked against it on every input.
(Instrumenting the C code too needs a rebuild with ``-fsanitize=fuzzer-no-link``.)

    pip install atheris
    python scripts/fuzz_atheris.py -runs=20000             # what tests/test_fuzz.py runs
    python scripts/fuzz_atheris.py -max_total_time=600 corpus/   # longer, keeps a corpus

Any libFuzzer flag works (``-max_len``, ``-seed``, ``-jobs`` ...).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import atheris  # noqa: E402

with atheris.instrument_imports(include=["ut"]):
    from ut import _purepy, control  # noqa: E402
    from ut.errors import ControlError, FrameError  # noqa: E402

try:
    from ut import _fastpath as _compiled  # noqa: E402
except ImportError:  # not built: fuzz the pure decoder alone
    _compiled = None

MAX_PAYLOADS = [65535, 65535, 1000, 9, 0]


def decode(fp, stream: bytes, cuts: list[int], use_buffer: bool, max_payload: int):
    d = fp.Deframer(max_payload)
    frames: list = []
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    try:
        for piece in pieces:
            if not use_buffer:
                frames += d.feed(piece)
                continue
            pos = 0
            while pos < len(piece):
                view = d.get_buffer(len(piece) - pos)
                n = min(len(view), len(piece) - pos)
                view[:n] = piece[pos:pos + n]
                pos += n
                frames += d.buffer_updated(n)
        d.eof()
    except FrameError as exc:
        return frames, exc.reason
    return frames, None


def check_control(payload: bytes) -> None:
    try:
        msg = control.decode_control(payload)
    except ControlError:
        return
    if isinstance(msg, control.Pad):  # any body is padding: only its length is kept
        payload = payload[:1] + bytes(len(payload) - 1)
    if control.encode_control(msg) != payload:
        raise AssertionError(f"not canonical: {payload!r} -> {msg!r}")


def TestOneInput(data: bytes) -> None:  # noqa: N802 - atheris' name
    fdp = atheris.FuzzedDataProvider(data)
    max_payload = fdp.PickValueInList(MAX_PAYLOADS)
    use_buffer = fdp.ConsumeBool()
    cuts = sorted(fdp.ConsumeIntInRange(0, 4096) for _ in range(fdp.ConsumeIntInRange(0, 6)))
    stream = fdp.ConsumeBytes(fdp.remaining_bytes())
    cuts = [min(c, len(stream)) for c in cuts]
    pure = decode(_purepy, stream, cuts, use_buffer, max_payload)
    if _compiled is not None:
        compiled = decode(_compiled, stream, cuts, use_buffer, max_payload)
        if compiled != pure:
            raise AssertionError(f"implementations disagree: compiled {compiled!r} pure {pure!r}")
    for ftype, _flags, payload in pure[0]:
        if ftype == _purepy.TYPE_CTRL:
            check_control(payload)
    check_control(stream)


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
