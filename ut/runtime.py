"""Event-loop choice: uvloop when installed (and not disabled), else asyncio's own."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_name() -> str:
    """``"uvloop"`` or ``"asyncio"``: what ``run`` will use."""
    if os.environ.get("UT_NO_UVLOOP", "") not in ("", "0"):
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def new_event_loop(kind: str | None = None) -> asyncio.AbstractEventLoop:
    """A new loop of ``kind`` (``"uvloop"`` or ``"asyncio"``; default ``loop_name()``)."""
    if (kind or loop_name()) == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run(coro: Coroutine[Any, Any, T], kind: str | None = None) -> T:
    """Run ``coro`` to completion on a new loop of ``kind`` (default ``loop_name()``),
    then cancel whatever tasks it left behind and close the loop."""
    loop = new_event_loop(kind)
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(coro)
    finally:
        try:
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()
