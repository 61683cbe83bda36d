"""ut-tunnel: WireGuard's UDP over several TCP+mTLS lanes.

Embedding example::

    import asyncio, ut

    async def main():
        cfg = ut.load_config("/etc/ut/ut.yaml")
        async with ut.Client(cfg) as client:   # or ut.Server(cfg)
            await asyncio.sleep(60)
            print(client.stats())

    asyncio.run(main())

``ut.IMPLEMENTATION`` says which fast path is active: ``"compiled"`` (the
Cython extension) or ``"pure"`` (its pure-Python twin, forced with the
environment variable ``UT_NO_EXTENSIONS=1``).
"""

from ._version import __version__
from .client import Client
from .config import Config, load_config
from .errors import ConfigError, ControlError, FrameError
from .fastpath import IMPLEMENTATION
from .server import Server

__all__ = [
    "Client",
    "Config",
    "ConfigError",
    "ControlError",
    "FrameError",
    "IMPLEMENTATION",
    "Server",
    "__version__",
    "load_config",
]
