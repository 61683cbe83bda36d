"""The fast path in use: the compiled ``ut._fastpath`` or its pure-Python twin ``ut._purepy``.

Import the hot-path API from here, never from either implementation directly::

    from ut import fastpath
    frames = fastpath.Deframer().feed(data)

Selection follows the aio-libs convention (aiohttp, yarl, multidict, frozenlist): the
compiled extension is used when it imports; setting the environment variable
``UT_NO_EXTENSIONS`` to a non-empty value other than ``"0"`` forces the pure-Python twin
(for debugging, profiling Python code, or platforms without a wheel). Both
implementations have the same API, docstrings, results and exceptions
(``tests/test_differential.py``), so nothing else changes.

``IMPLEMENTATION`` is ``"compiled"`` or ``"pure"``: logged at start-up and shown by
``ut-tunnel --version``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ut.errors import ControlError, FrameError

__all__ = [
    "IMPLEMENTATION",
    "MAGIC",
    "VERSION",
    "TYPE_DATA",
    "TYPE_CTRL",
    "HEADER_LEN",
    "MAX_PAYLOAD",
    "HAVE_MMSG",
    "HAVE_GSO",
    "encode_frame",
    "encode_data",
    "encode_data_seq",
    "pad_frame",
    "FLAG_SEQ",
    "FLAG_PAD",
    "KIND_PAD",
    "SEQ_LEN",
    "Deframer",
    "Resequencer",
    "RingQueue",
    "LanePicker",
    "flow_key",
    "recv_batch",
    "send_batch",
    "FrameError",
    "ControlError",
]


def _no_extensions() -> bool:
    return os.environ.get("UT_NO_EXTENSIONS", "") not in ("", "0")


if TYPE_CHECKING:
    # Type checkers read the typed pure-Python twin; the compiled module has the same API.
    from ut._purepy import (
        FLAG_PAD,
        FLAG_SEQ,
        HAVE_GSO,
        HAVE_MMSG,
        HEADER_LEN,
        KIND_PAD,
        MAGIC,
        MAX_PAYLOAD,
        SEQ_LEN,
        TYPE_CTRL,
        TYPE_DATA,
        VERSION,
        Deframer,
        LanePicker,
        Resequencer,
        RingQueue,
        encode_data,
        encode_data_seq,
        encode_frame,
        flow_key,
        pad_frame,
        recv_batch,
        send_batch,
    )

    IMPLEMENTATION: str
else:
    IMPLEMENTATION = "pure"
    if not _no_extensions():
        try:
            from ut._fastpath import (
                FLAG_PAD,
                FLAG_SEQ,
                HAVE_GSO,
                HAVE_MMSG,
                HEADER_LEN,
                KIND_PAD,
                MAGIC,
                MAX_PAYLOAD,
                SEQ_LEN,
                TYPE_CTRL,
                TYPE_DATA,
                VERSION,
                Deframer,
                LanePicker,
                Resequencer,
                RingQueue,
                encode_data,
                encode_data_seq,
                encode_frame,
                flow_key,
                pad_frame,
                recv_batch,
                send_batch,
            )

            IMPLEMENTATION = "compiled"
        except ImportError:  # not built (sdist without a compiler, plain checkout)
            pass
    if IMPLEMENTATION == "pure":
        from ut._purepy import (
            FLAG_PAD,
            FLAG_SEQ,
            HAVE_GSO,
            HAVE_MMSG,
            HEADER_LEN,
            KIND_PAD,
            MAGIC,
            MAX_PAYLOAD,
            SEQ_LEN,
            TYPE_CTRL,
            TYPE_DATA,
            VERSION,
            Deframer,
            LanePicker,
            Resequencer,
            RingQueue,
            encode_data,
            encode_data_seq,
            encode_frame,
            flow_key,
            pad_frame,
            recv_batch,
            send_batch,
        )
