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

The names themselves are listed once, in the implementations' ``__all__`` (the same list
in both, ``tests/test_differential.py::test_same_public_api``); this module star-imports
whichever one it picks, as yarl's ``_quoting.py`` does. Type checkers take the first
branch and read the typed pure-Python twin.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ut.errors import ControlError, FrameError


def _no_extensions() -> bool:
    return os.environ.get("UT_NO_EXTENSIONS", "") not in ("", "0")


if TYPE_CHECKING or _no_extensions():
    from ut._purepy import *  # noqa: F403
    from ut._purepy import __all__ as _names

    IMPLEMENTATION = "pure"
else:
    try:
        from ut._fastpath import *  # noqa: F403
        from ut._fastpath import __all__ as _names

        IMPLEMENTATION = "compiled"
    except ImportError:  # not built (sdist without a compiler, plain checkout)
        from ut._purepy import *  # noqa: F403
        from ut._purepy import __all__ as _names

        IMPLEMENTATION = "pure"

__all__ = ["IMPLEMENTATION", *_names, "FrameError", "ControlError"]
