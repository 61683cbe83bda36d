"""A real nginx (Debian ``nginx-light``) for tests: the reference web server and fallback.

``Nginx(workdir, cert, key).start()`` runs one nginx master (``daemon off``, one worker)
listening on loopback:

* ``extra_http``: more configuration inside ``http {}`` (a test puts the guide's
  reverse-proxy server block there);
* ``tls_port``: HTTPS (TLS 1.2 and 1.3, HTTP/2 and HTTP/1.1) with the given certificate:
  the *reference* a ut-tunnel server's web face is compared with;
* ``http_port``: plain HTTP/1.1 and ``h2c_port``: HTTP/2 with prior knowledge, the same
  site: the *fallback* a ut-tunnel server relays to (``fallback.addr``/``h2_addr``).

Every server block serves the same static ``index.html``, with ``server_tokens off``.
``header_timeout`` sets nginx's ``client_header_timeout`` (tests shorten nginx's 60 s,
and the web face's with it). ``stop()`` ends the master by its pid.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from .require import find_tool

__all__ = ["Nginx", "free_port", "guide_reverse_proxy", "nginx_binary"]

INDEX = b"<!DOCTYPE html>\n<html><head><title>A site</title></head><body>Hello.</body></html>\n"


def nginx_binary() -> str | None:
    """The nginx executable, or None (Debian installs it in /usr/sbin)."""
    return find_tool("nginx")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Nginx:
    """One nginx for a test (see the module docstring)."""

    def __init__(self, workdir: Any, cert: Any, key: Any, *, header_timeout: float = 60.0,
                 keepalive: float = 75.0, extra_http: str = "", netns: str | None = None,
                 listen: str = "127.0.0.1") -> None:
        self.wd = Path(workdir)
        self.cert, self.key = Path(cert), Path(key)
        self.header_timeout = header_timeout
        self.keepalive = keepalive
        self.extra_http = extra_http  # more blocks inside http {} (e.g. the guide's server)
        self.netns = netns  # run inside this network namespace (ip netns exec)
        self.listen = listen
        self.tls_port = self.http_port = self.h2c_port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def _config(self) -> str:
        wd = self.wd
        ht, ka = f"{round(self.header_timeout * 1000)}ms", f"{round(self.keepalive * 1000)}ms"
        # Root starts the workers as "nobody", who cannot read a test's 0700 tmp dirs.
        user = "user root root;" if os.geteuid() == 0 else ""
        return f"""
{user}
daemon off;
master_process on;
worker_processes 1;
pid {wd}/nginx.pid;
error_log {wd}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    server_tokens off;
    types {{ text/html html; }}
    default_type application/octet-stream;
    client_body_temp_path {wd}/tmp;
    client_header_timeout {ht};
    keepalive_timeout {ka};
    root {wd}/www;
    server {{
        listen {self.listen}:{self.tls_port} ssl http2;
        ssl_certificate {self.cert};
        ssl_certificate_key {self.key};
        ssl_protocols TLSv1.2 TLSv1.3;
    }}
    server {{ listen {self.listen}:{self.http_port}; }}
    server {{ listen {self.listen}:{self.h2c_port} http2; }}
{self.extra_http}
}}
"""

    def start(self, timeout: float = 10.0) -> Nginx:
        binary = nginx_binary()
        if binary is None:
            raise FileNotFoundError("nginx is not installed (Debian: apt-get install nginx-light)")
        (self.wd / "www").mkdir(parents=True, exist_ok=True)
        (self.wd / "tmp").mkdir(exist_ok=True)
        (self.wd / "www" / "index.html").write_bytes(INDEX)
        if not self.tls_port:
            self.tls_port, self.http_port, self.h2c_port = free_port(), free_port(), free_port()
        conf = self.wd / "nginx.conf"
        conf.write_text(self._config())
        argv = [binary, "-c", str(conf), "-p", str(self.wd), "-e", str(self.wd / "error.log")]
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"nginx exited ({self.proc.returncode}): {err[:500]}")
            if self.netns:  # its ports cannot be probed from here: give it a moment
                time.sleep(0.5)
                if self.proc.poll() is None:
                    return self
                continue
            if all(self._listening(p) for p in (self.tls_port, self.http_port, self.h2c_port)):
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("nginx did not start listening in time")

    @staticmethod
    def _listening(port: int) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        self.proc = None
        if proc.poll() is None:
            proc.send_signal(signal.SIGQUIT)  # nginx's graceful stop; workers follow the master
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if proc.stderr is not None:
            proc.stderr.close()

    def __enter__(self) -> Nginx:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def guide_reverse_proxy(workdir: Any, cert: Any, key: Any, *, ut_port: int, listen: str,
                        port: int, guide: Any, netns: str | None = None) -> Nginx:
    """An nginx running the guide's "Behind nginx" server block (docs/guide.md section 14)
    word for word, but for its address (``listen:port``), certificate paths, web root and
    the upstream port of ut-tunnel (``ut_port``). ``guide``: the guide's path."""
    import re

    text = Path(guide).read_text()
    section = text[text.index("### Behind nginx"):]
    m = re.search(r"```nginx\n(.*?)```", section, re.S)
    if m is None:
        raise ValueError("docs/guide.md lost its nginx block (section 14, Behind nginx)")
    block = m.group(1)
    for old, new in (("listen 443 ssl;", f"listen {listen}:{port} ssl;"),
                     ("/etc/ut/server.pem", str(cert)), ("/etc/ut/server.key", str(key)),
                     ("/var/www/html", str(Path(workdir) / "www")),
                     ("127.0.0.1:8443", f"127.0.0.1:{ut_port}")):
        if old not in block:
            raise ValueError(f"the guide's nginx block no longer holds {old!r}")
        block = block.replace(old, new)
    ng = Nginx(workdir, cert, key, extra_http=block, netns=netns, listen=listen)
    ng.proxy_port = port  # type: ignore[attr-defined]
    return ng
