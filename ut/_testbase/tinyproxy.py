"""A real HTTP proxy for tests: Debian's ``tinyproxy``, in the foreground, on loopback.

``Tinyproxy(workdir).start()`` listens on ``127.0.0.1:port`` (``port`` 0: a free one),
allows CONNECT to any port from 127.0.0.1 (or from ``allow``), logs each connection it
opens to ``log``; ``stop()`` ends it by its pid. ``netns`` runs it inside a network
namespace (``ip netns exec``).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from .nginx import free_port
from .require import find_tool

__all__ = ["Tinyproxy", "tinyproxy_binary"]


def tinyproxy_binary() -> str | None:
    return find_tool("tinyproxy")


class Tinyproxy:
    def __init__(self, workdir: Any, *, listen: str = "127.0.0.1", port: int = 0,
                 allow: str = "127.0.0.1", netns: str | None = None) -> None:
        self.wd = Path(workdir)
        self.listen, self.port, self.allow, self.netns = listen, port, allow, netns
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.wd / "tinyproxy.log"

    def start(self, timeout: float = 10.0) -> Tinyproxy:
        binary = tinyproxy_binary()
        if binary is None:
            raise FileNotFoundError("tinyproxy is not installed (Debian: apt-get install tinyproxy)")
        self.wd.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port()
        conf = self.wd / "tinyproxy.conf"
        # No ConnectPort line: CONNECT to any port is allowed.
        conf.write_text(f"Port {self.port}\nListen {self.listen}\nTimeout 600\n"
                        f"Allow {self.allow}\nMaxClients 200\nLogLevel Info\n")
        argv = [binary, "-d", "-c", str(conf)]
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        self.proc = subprocess.Popen(argv, stdout=self.log.open("wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tinyproxy exited: {self.log.read_text()[-500:]}")
            if self.netns or self._listening():
                if self.netns:
                    time.sleep(0.3)  # cannot probe inside the namespace from here
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("tinyproxy did not start listening in time")

    def _listening(self) -> bool:
        try:
            with socket.create_connection((self.listen, self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def connects(self) -> int:
        """How many tunnels (CONNECT) it has opened so far, from its log."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return text.count("opensock: opening connection")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
