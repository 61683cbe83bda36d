"""A real-WireGuard test bed in Linux network namespaces, for tests, scripts and benchmarks.

Topology (one bed; every name carries a per-instance tag so beds never collide)::

    ns <prefix>-<pid>-<tag>-home  (one per home; "home", "home2", ...)
        lo 127.0.0.1          ut-tunnel client: UDP 127.0.0.1:15000, metrics 127.0.0.1:5080
        uv<tag>h<i>  10.A.B.(10+i)/24  --veth-->  uv<tag>c<i> (port of the cloud bridge)
        ug<tag>h<i>  WireGuard (wireguard-go), 10.C.D.(10+i)/24, MTU 1380
    ns <prefix>-<pid>-<tag>-cloud
        lo 127.0.0.1          ut-tunnel server: WireGuard at 127.0.0.1:51820, metrics :5080
        ub<tag>      bridge, 10.A.B.1/24  (the "veth address" the server listens on)
        ug<tag>c     WireGuard (wireguard-go), 10.C.D.1/24, listen-port 51820, MTU 1380

With ``drop_udp`` (the default) nftables in every namespace drops all UDP that enters or
leaves the veth/bridge interfaces, so WireGuard can only talk through the tunnel's TCP
lanes. UDP on loopback (WireGuard <-> ut-tunnel) and inside WireGuard is untouched.

MTU: the WireGuard interfaces use 1380 (``DEFAULT_WG_MTU``). Over the tunnel the datagram
size is not bound by the path MTU (datagrams ride inside TCP), so any MTU up to ~65 KiB
would work; 1380 is the conservative value we recommend for WireGuard over ut-tunnel, since
it also survives a direct-UDP fallback over PPPoE/IPv6 paths. Pass ``mtu=`` to change it.

Everything started here is tracked and removed by ``teardown()`` (also on failure, and as a
context manager): processes are ended by their pid, then any process still inside one of our
namespaces (by pid, from ``ip netns pids``), then the WireGuard interfaces, their control
sockets in the shared ``/var/run/wireguard/``, and the namespaces.

The file is also a small helper program run *inside* a namespace::

    python3 netbed.py ping DST [--count N] [--timeout S] [--interval S] [--until-reply S]
    python3 netbed.py http --root DIR --bind IP --port PORT   # GET files, PUT uploads

It needs only the standard library (no PyYAML: the tunnel configs are written as JSON, which
is YAML).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

WG_ENV = "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD"
WG_RUN_DIR = Path("/var/run/wireguard")
NETNS_DIR = Path("/run/netns")
NS_PREFIX = "utbed"
DEFAULT_WG_MTU = 1380
WG_PORT = 51820
CLIENT_UDP_PORT = 15000
SERVER_TCP_PORT = 5443
METRICS_PORT = 5080
HTTP_PORT = 8080
REQUIRED_TOOLS = ("ip", "nft", "wireguard-go", "wg", "curl")
HERE = Path(__file__).resolve()
STATE_DIR = Path("/run/ut-testbed")


class BedError(RuntimeError):
    """Something in the bed failed; the message says what, with output."""


def missing_prerequisites(tools: tuple[str, ...] = REQUIRED_TOOLS) -> list[str]:
    """Reasons this machine cannot run a bed (empty list: it can)."""
    reasons = []
    if sys.platform != "linux":
        return [f"network namespaces need Linux, this is {sys.platform}"]
    if os.geteuid() != 0:
        reasons.append("not root (network namespaces, nftables and TUN need root)")
    for tool in tools:
        if shutil.which(tool) is None:
            reasons.append(f"tool {tool!r} not found on PATH")
    if not Path("/dev/net/tun").exists():
        reasons.append("/dev/net/tun is missing (wireguard-go needs TUN)")
    if reasons:
        return reasons
    probe = f"{NS_PREFIX}-probe-{os.getpid()}-{secrets.token_hex(3)}"
    res = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if res.returncode != 0:
        reasons.append(f"cannot create a network namespace: {res.stderr.strip()}")
    else:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return reasons


def ut_tunnel_command() -> list[str]:
    """The ``ut-tunnel`` console script: $UT_TUNNEL_BIN, next to this Python, or on PATH."""
    env = os.environ.get("UT_TUNNEL_BIN")
    if env:
        return env.split()
    beside = Path(sys.executable).parent / "ut-tunnel"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("ut-tunnel")
    if found:
        return [found]
    raise BedError("the ut-tunnel console script is not installed (pip install -e .)")


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def make_random_file(path: str | os.PathLike, size: int) -> str:
    """Write ``size`` random bytes to ``path``; return their sha256."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(left, 1 << 20))
            h.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    return h.hexdigest()


def deep_merge(base: dict, over: dict | None) -> dict:
    out = json.loads(json.dumps(base))
    for k, v in (over or {}).items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus text format -> [(name, labels, value)] (comments skipped)."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        labels = dict(_LABEL.findall(m.group(3) or ""))
        try:
            value = float(m.group(4))
        except ValueError:
            continue
        out.append((m.group(1), labels, value))
    return out


def metric_sum(samples, name: str, **labels: str) -> float | None:
    """Sum of ``name`` over samples matching ``labels``; None if the name is absent."""
    found = None
    for n, lab, v in samples:
        if n == name and all(lab.get(k) == val for k, val in labels.items()):
            found = (found or 0.0) + v
    return found


@dataclass
class Node:
    """One namespace of the bed with its WireGuard interface."""

    name: str  # logical: "cloud", "home", "home2", ...
    ns: str  # network namespace name
    link_if: str  # veth (home) or bridge (cloud)
    link_ip: str
    wg_if: str
    wg_ip: str
    wg_port: int = WG_PORT
    wg_key_file: Path | None = None
    wg_pub: str = ""
    wg_proc: subprocess.Popen | None = None
    endpoint: str | None = None  # home: where its WireGuard peer (cloud) is reached

    def __str__(self) -> str:
        return self.name


@dataclass
class Tracked:
    proc: subprocess.Popen
    name: str
    ns: str | None
    log: Path | None


@dataclass
class NetBed:
    """Namespaces "cloud" and ``homes`` x "home", veth, nftables, wireguard-go, helpers.

    ``with NetBed() as bed: ...`` brings it up and always tears it down.
    """

    homes: int = 1
    mtu: int = DEFAULT_WG_MTU
    drop_udp: bool = True
    workdir: str | None = None
    keep_workdir: bool = False
    prefix: str = NS_PREFIX
    keepalive: int = 0
    verbose: bool = False
    tag: str = ""
    cloud: Node = field(init=False)
    home_nodes: list[Node] = field(init=False, default_factory=list)
    _tracked: list[Tracked] = field(init=False, default_factory=list)
    # node name -> more interfaces whose UDP ``drop_udp`` drops (add_drop_link)
    _extra_drop_links: dict[str, list[str]] = field(init=False, default_factory=dict)
    _namespaces: list[str] = field(init=False, default_factory=list)
    _is_up: bool = field(init=False, default=False)
    _torn_down: bool = field(init=False, default=False)

    # ------------------------------------------------------------------ naming
    def __post_init__(self) -> None:
        if not 1 <= self.homes <= 9:
            raise ValueError("homes must be 1..9")
        self.tag = self.tag or self._fresh_tag()
        rnd = random.Random(self.tag)
        # Private subnets picked per instance: link 10.200-239.x.0/24, WireGuard 10.240-254.x.0/24.
        link_net = f"10.{rnd.randint(200, 239)}.{rnd.randint(0, 255)}"
        wg_net = f"10.{rnd.randint(240, 254)}.{rnd.randint(0, 255)}"
        self.link_net, self.wg_net = link_net, wg_net
        base = f"{self.prefix}-{os.getpid()}-{self.tag}"
        self.cloud = Node(
            "cloud", f"{base}-cloud", f"ub{self.tag}", f"{link_net}.1",
            f"ug{self.tag}c", f"{wg_net}.1",
        )
        for i in range(1, self.homes + 1):
            name = "home" if i == 1 else f"home{i}"
            self.home_nodes.append(
                Node(
                    name, f"{base}-{name}", f"uv{self.tag}h{i}", f"{link_net}.{10 + i}",
                    f"ug{self.tag}h{i}", f"{wg_net}.{10 + i}",
                )
            )
        if self.workdir is None:
            self.workdir = tempfile.mkdtemp(prefix=f"utbed-{self.tag}-")
            self._own_workdir = True
        else:
            Path(self.workdir).mkdir(parents=True, exist_ok=True)
            self._own_workdir = False
        self.wd = Path(self.workdir)
        (self.wd / "logs").mkdir(exist_ok=True)

    @staticmethod
    def _fresh_tag() -> str:
        for _ in range(100):
            tag = secrets.token_hex(3)
            taken = any(tag in p.name for p in _ls(WG_RUN_DIR)) or any(
                tag in p.name for p in _ls(NETNS_DIR)
            )
            if not taken:
                return tag
        raise BedError("could not find a free bed tag")

    @property
    def home(self) -> Node:
        return self.home_nodes[0]

    @property
    def nodes(self) -> list[Node]:
        return [self.cloud, *self.home_nodes]

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if name in (n.name, n.ns):
                return n
        raise KeyError(name)

    # ------------------------------------------------------------------ commands
    def _ns(self, ns: Node | str | None) -> str | None:
        if ns is None:
            return None
        if isinstance(ns, Node):
            return ns.ns
        for n in self.nodes:
            if ns == n.name:
                return n.ns
        return ns  # a literal namespace name

    def _argv(self, ns: Node | str | None, cmd: Sequence[object] | str) -> list[str]:
        argv = cmd.split() if isinstance(cmd, str) else [str(c) for c in cmd]
        name = self._ns(ns)
        return (["ip", "netns", "exec", name] if name else []) + argv

    @staticmethod
    def _env(extra: dict | None = None) -> dict:
        env = dict(os.environ)
        env[WG_ENV] = "1"
        env.update(extra or {})
        return env

    def run(
        self,
        ns: Node | str | None,
        cmd: Sequence[object] | str,
        check: bool = True,
        timeout: float = 60,
        input: str | bytes | None = None,
        env: dict | None = None,
    ) -> subprocess.CompletedProcess:
        """Run ``cmd`` in namespace ``ns`` (None: the root namespace), bounded by ``timeout``."""
        argv = self._argv(ns, cmd)
        if self.verbose:
            print("+", " ".join(argv), file=sys.stderr)
        text = not isinstance(input, bytes)
        try:
            res = subprocess.run(
                argv, capture_output=True, text=text, timeout=timeout, input=input,
                env=self._env(env),
            )
        except subprocess.TimeoutExpired as exc:
            raise BedError(f"timed out after {timeout}s: {' '.join(argv)}") from exc
        if check and res.returncode != 0:
            raise BedError(
                f"command failed ({res.returncode}): {' '.join(argv)}\n"
                f"stdout: {res.stdout!s:.2000}\nstderr: {res.stderr!s:.2000}"
            )
        return res

    def spawn(
        self,
        ns: Node | str | None,
        cmd: Sequence[object] | str,
        name: str | None = None,
        env: dict | None = None,
        log: bool = True,
    ) -> subprocess.Popen:
        """Start ``cmd`` in ``ns`` as a tracked process (stdout+stderr to ``logs/<name>.log``)."""
        argv = self._argv(ns, cmd)
        name = name or Path(argv[4 if ns else 0]).name
        logpath = None
        logfile: IO[bytes] | None = None
        if log:
            logpath = self.wd / "logs" / f"{name}.log"
            n = 1
            while logpath.exists():
                n += 1
                logpath = self.wd / "logs" / f"{name}.{n}.log"
            logfile = open(logpath, "wb")
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL if logfile is None else logfile,
                stderr=subprocess.STDOUT, env=self._env(env), start_new_session=True,
            )
        finally:
            if logfile is not None:
                logfile.close()
        proc.bed_name = name  # type: ignore[attr-defined]
        proc.bed_log = logpath  # type: ignore[attr-defined]
        self._tracked.append(Tracked(proc, name, self._ns(ns), logpath))
        if self.verbose:
            print(f"+ [{proc.pid}] {' '.join(argv)}", file=sys.stderr)
        return proc

    @staticmethod
    def log_text(proc: subprocess.Popen, tail: int = 0) -> str:
        path = getattr(proc, "bed_log", None)
        if not path or not Path(path).exists():
            return ""
        text = Path(path).read_text(errors="replace")
        if tail:
            text = "\n".join(text.splitlines()[-tail:])
        return text

    def stop(self, proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 5) -> int | None:
        """Signal ``proc`` by its pid, wait up to ``timeout``, then SIGKILL; return its code."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
        return proc.returncode

    def kill9(self, proc: subprocess.Popen) -> None:
        """``kill -9`` by pid, and reap."""
        self.stop(proc, signal.SIGKILL, timeout=5)

    # ------------------------------------------------------------------ bring-up
    def __enter__(self) -> NetBed:
        self.up()
        return self

    def __exit__(self, *exc) -> None:
        self.teardown()

    def up(self) -> NetBed:
        """Create namespaces, links, firewall and WireGuard. Tears down what it made on error."""
        if self._is_up:
            return self
        try:
            self._up()
        except BaseException:
            self.teardown()
            raise
        self._is_up = True
        return self

    def _up(self) -> None:
        for n in self.nodes:
            self.run(None, ["ip", "netns", "add", n.ns])
            self._namespaces.append(n.ns)
            self.run(n, "ip link set lo up")
        c = self.cloud
        self.run(c, ["ip", "link", "add", c.link_if, "type", "bridge"])
        self.run(c, ["ip", "addr", "add", f"{c.link_ip}/24", "dev", c.link_if])
        self.run(c, ["ip", "link", "set", c.link_if, "up"])
        for i, h in enumerate(self.home_nodes, 1):
            peer_if = f"uv{self.tag}c{i}"
            self.run(None, [
                "ip", "link", "add", h.link_if, "netns", h.ns, "type", "veth",
                "peer", "name", peer_if, "netns", c.ns,
            ])
            self.run(c, ["ip", "link", "set", peer_if, "master", c.link_if, "up"])
            self.run(h, ["ip", "addr", "add", f"{h.link_ip}/24", "dev", h.link_if])
            self.run(h, ["ip", "link", "set", h.link_if, "up"])
        self.set_drop_udp(self.drop_udp)
        self._wireguard_up()

    def _links_of(self, n: Node) -> list[str]:
        extra = self._extra_drop_links.get(n.name, [])
        if n is self.cloud:
            return ([n.link_if] + [f"uv{self.tag}c{i}" for i in range(1, len(self.home_nodes) + 1)]
                    + extra)
        return [n.link_if] + extra

    def add_drop_link(self, node: Node | str, ifname: str) -> None:
        """Treat ``ifname`` in ``node`` (e.g. a ut/_testbase/linkemu.py device) like the veth: the
        UDP drop rules cover it too (applied now if they are on)."""
        n = node if isinstance(node, Node) else self.node(node)
        links = self._extra_drop_links.setdefault(n.name, [])
        if ifname not in links:
            links.append(ifname)
        if self.drop_udp:
            self.set_drop_udp(True)

    def set_drop_udp(self, on: bool) -> None:
        """nftables: drop (on) or allow (off) all UDP in and out of the veth/bridge links."""
        for n in self.nodes:
            self.run(n, "nft delete table inet utbed", check=False)
            if not on:
                continue
            ifs = ", ".join(f'"{i}"' for i in self._links_of(n))
            rules = f"""
table inet utbed {{
  chain input {{ type filter hook input priority -10; policy accept;
    iifname {{ {ifs} }} meta l4proto udp counter drop; }}
  chain forward {{ type filter hook forward priority -10; policy accept;
    meta l4proto udp iifname {{ {ifs} }} counter drop;
    meta l4proto udp oifname {{ {ifs} }} counter drop; }}
  chain output {{ type filter hook output priority -10; policy accept;
    oifname {{ {ifs} }} meta l4proto udp counter drop; }}
}}
"""
            self.run(n, ["nft", "-f", "-"], input=rules)
        self.drop_udp = on

    def udp_dropped(self) -> int:
        """Packets dropped by the UDP rules so far (all namespaces)."""
        total = 0
        for n in self.nodes:
            res = self.run(n, "nft list table inet utbed", check=False)
            total += sum(int(x) for x in re.findall(r"counter packets (\d+)", res.stdout))
        return total

    def _wireguard_up(self) -> None:
        for n in self.nodes:
            key = self.run(None, ["wg", "genkey"]).stdout.strip()
            n.wg_key_file = self.wd / f"{n.name}.wgkey"
            fd = os.open(n.wg_key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(key + "\n")
            n.wg_pub = self.run(None, ["wg", "pubkey"], input=key + "\n").stdout.strip()
            n.wg_proc = self.spawn(n, ["wireguard-go", "-f", n.wg_if], name=f"wireguard-go-{n.name}")
        for n in self.nodes:
            self._wait_wg_socket(n)
        c = self.cloud
        self.run(c, ["wg", "set", c.wg_if, "private-key", c.wg_key_file, "listen-port", c.wg_port])
        for h in self.home_nodes:
            self.run(h, ["wg", "set", h.wg_if, "private-key", h.wg_key_file, "listen-port", h.wg_port])
            h.endpoint = f"{c.link_ip}:{c.wg_port}"  # direct; tests point it at the tunnel
            self._add_peers(h)
        for n in self.nodes:
            self.run(n, ["ip", "addr", "add", f"{n.wg_ip}/24", "dev", n.wg_if])
            self.run(n, ["ip", "link", "set", n.wg_if, "mtu", self.mtu, "up"])

    def _wait_wg_socket(self, n: Node, timeout: float = 10) -> None:
        sock = WG_RUN_DIR / f"{n.wg_if}.sock"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sock.exists():
                return
            if n.wg_proc is not None and n.wg_proc.poll() is not None:
                raise BedError(f"wireguard-go for {n} exited: {self.log_text(n.wg_proc)}")
            time.sleep(0.05)
        raise BedError(f"wireguard-go for {n} made no control socket {sock} in {timeout}s")

    def _add_peers(self, h: Node) -> None:
        c = self.cloud
        ka = ["persistent-keepalive", str(self.keepalive)] if self.keepalive else []
        self.run(h, ["wg", "set", h.wg_if, "peer", c.wg_pub, "endpoint", h.endpoint,
                     "allowed-ips", f"{c.wg_ip}/32", *ka])
        self.run(c, ["wg", "set", c.wg_if, "peer", h.wg_pub, "allowed-ips", f"{h.wg_ip}/32"])

    # ------------------------------------------------------------------ WireGuard helpers
    def set_endpoint(self, home: Node | str, endpoint: str) -> None:
        """Point ``home``'s WireGuard peer (the cloud) at ``endpoint`` (host:port)."""
        h = home if isinstance(home, Node) else self.node(home)
        h.endpoint = endpoint
        self.run(h, ["wg", "set", h.wg_if, "peer", self.cloud.wg_pub, "endpoint", endpoint])

    def use_tunnel(self, home: Node | str | None = None, port: int = CLIENT_UDP_PORT) -> None:
        for h in [home] if home else self.home_nodes:
            self.set_endpoint(h, f"127.0.0.1:{port}")

    def use_direct(self, home: Node | str | None = None) -> None:
        for h in [home] if home else self.home_nodes:
            self.set_endpoint(h, f"{self.cloud.link_ip}:{self.cloud.wg_port}")

    def reset_wireguard(self) -> None:
        """Forget handshakes and learnt endpoints: remove and re-add every peer (same keys)."""
        for h in self.home_nodes:
            self.run(h, ["wg", "set", h.wg_if, "peer", self.cloud.wg_pub, "remove"])
            self.run(self.cloud, ["wg", "set", self.cloud.wg_if, "peer", h.wg_pub, "remove"])
            self._add_peers(h)

    def new_handshake(self, home: Node | str | None = None) -> None:
        """Make ``home`` (default: every home) start a fresh WireGuard session: remove and
        re-add the peers (same keys), the cloud's side first. With ``keepalive`` set a home
        initiates as soon as its peer is added, and this order lets that first initiation
        be answered (``reset_wireguard`` adds the home's side first)."""
        c = self.cloud
        homes = [home if isinstance(home, Node) else self.node(home)] if home else self.home_nodes
        for h in homes:
            ka = ["persistent-keepalive", str(self.keepalive)] if self.keepalive else []
            self.run(h, ["wg", "set", h.wg_if, "peer", c.wg_pub, "remove"])
            self.run(c, ["wg", "set", c.wg_if, "peer", h.wg_pub, "remove"])
            self.run(c, ["wg", "set", c.wg_if, "peer", h.wg_pub, "allowed-ips", f"{h.wg_ip}/32"])
            self.run(h, ["wg", "set", h.wg_if, "peer", c.wg_pub, "endpoint", h.endpoint,
                         "allowed-ips", f"{c.wg_ip}/32", *ka])

    def _wg_show(self, n: Node, what: str) -> dict[str, list[str]]:
        res = self.run(n, ["wg", "show", n.wg_if, what])
        out = {}
        for line in res.stdout.splitlines():
            parts = line.split("\t")
            if len(parts) >= 2:
                out[parts[0]] = parts[1:]
        return out

    def latest_handshake(self, n: Node, peer: Node | None = None) -> int:
        """Unix time of the latest handshake of ``n`` with ``peer`` (0: never)."""
        peer = peer or (self.home if n is self.cloud else self.cloud)
        return int(self._wg_show(n, "latest-handshakes").get(peer.wg_pub, ["0"])[0])

    def wg_transfer(self, n: Node, peer: Node | None = None) -> tuple[int, int]:
        """(rx, tx) bytes of ``n``'s WireGuard with ``peer``."""
        peer = peer or (self.home if n is self.cloud else self.cloud)
        rx, tx = self._wg_show(n, "transfer").get(peer.wg_pub, ["0", "0"])[:2]
        return int(rx), int(tx)

    def wg_endpoint(self, n: Node, peer: Node | None = None) -> str | None:
        peer = peer or (self.home if n is self.cloud else self.cloud)
        ep = self._wg_show(n, "endpoints").get(peer.wg_pub, ["(none)"])[0]
        return None if ep == "(none)" else ep

    # ------------------------------------------------------------------ traffic helpers
    def ping(
        self,
        src: Node | str,
        dst: Node | str,
        count: int = 1,
        timeout: float = 1.0,
        interval: float = 0.2,
    ) -> dict:
        """ICMP echo from ``src`` to ``dst`` (Node: its WireGuard address, or an IP string).

        Returns {"sent", "received", "rtt_ms": [...]}. No ping binary needed (raw socket).
        """
        dst_ip = dst.wg_ip if isinstance(dst, Node) else dst
        cmd = [sys.executable, HERE, "ping", dst_ip, "--count", count,
               "--timeout", timeout, "--interval", interval]
        res = self.run(src, cmd, timeout=count * (timeout + interval) + 30)
        return json.loads(res.stdout.strip().splitlines()[-1])

    def wait_ping(self, src: Node | str, dst: Node | str, within: float, interval: float = 0.2) -> float:
        """Ping every ``interval`` until the first reply; return seconds taken, or raise."""
        dst_ip = dst.wg_ip if isinstance(dst, Node) else dst
        cmd = [sys.executable, HERE, "ping", dst_ip, "--until-reply", within,
               "--interval", interval, "--timeout", min(1.0, within)]
        res = self.run(src, cmd, timeout=within + 30)
        out = json.loads(res.stdout.strip().splitlines()[-1])
        if not out["received"]:
            raise BedError(f"no ping reply {src}->{dst_ip} within {within}s ({out})")
        return out["first_reply_s"]

    def start_http_server(self, root: str | os.PathLike, node: Node | None = None,
                          port: int = HTTP_PORT, bind: str | None = None) -> str:
        """HTTP server in ``node`` (cloud) on its WireGuard address (or ``bind``): GET
        files, PUT uploads.

        Returns its base URL. Uploads land in ``root/uploads/`` and the reply is
        ``{"sha256": ..., "bytes": ...}``.
        """
        node = node or self.cloud
        bind = bind or node.wg_ip
        proc = self.spawn(node, [sys.executable, HERE, "http", "--root", root,
                                 "--bind", bind, "--port", port], name=f"http-{node.name}")
        url = f"http://{bind}:{port}"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            res = self.run(node, ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                  "--max-time", "1", url + "/"], check=False)
            if res.stdout.strip() == "200":
                return url
            if proc.poll() is not None:
                raise BedError(f"http server exited: {self.log_text(proc)}")
            time.sleep(0.1)
        raise BedError(f"http server at {url} did not answer: {self.log_text(proc)}")

    def curl_download_cmd(self, url: str, dest: str | os.PathLike, max_time: float = 120) -> list[str]:
        return ["curl", "-sS", "--fail", "--max-time", str(max_time), "-o", str(dest), url]

    def download(self, home: Node, url: str, dest: str | os.PathLike, max_time: float = 120) -> float:
        """curl ``url`` in ``home`` into ``dest``; return seconds taken."""
        t0 = time.monotonic()
        self.run(home, self.curl_download_cmd(url, dest, max_time), timeout=max_time + 10)
        return time.monotonic() - t0

    def upload(self, home: Node, src: str | os.PathLike, url: str, max_time: float = 120) -> tuple[dict, float]:
        """PUT ``src`` from ``home`` to ``url``; return (server reply, seconds taken)."""
        t0 = time.monotonic()
        res = self.run(home, ["curl", "-sS", "--fail", "--max-time", str(max_time),
                              "-T", str(src), url], timeout=max_time + 10)
        return json.loads(res.stdout), time.monotonic() - t0

    def both_ways(self, home: Node, served: Path, digest: str, url: str, tag: str,
                  max_time: float = 180) -> tuple[float, float]:
        """Download ``served`` (from the HTTP server at ``url``) to ``home`` and upload it
        back, checking both sha256s against ``digest``; (down, up) in Mbit/s. Leaves no
        copy behind."""
        dest = self.wd / f"download-{tag}.bin"
        up_name = f"up-{tag}.bin"
        secs = self.download(home, f"{url}/{served.name}", dest, max_time=max_time)
        try:
            if sha256_file(dest) != digest:
                raise BedError(f"{tag}: the download's sha256 differs")
            reply, usecs = self.upload(home, dest, f"{url}/upload/{up_name}", max_time=max_time)
            if reply != {"sha256": digest, "bytes": served.stat().st_size}:
                raise BedError(f"{tag}: the upload arrived as {reply}")
        finally:
            dest.unlink(missing_ok=True)
            (self.wd / "www" / "uploads" / up_name).unlink(missing_ok=True)
        mbit = served.stat().st_size * 8 / 1e6
        return mbit / secs, mbit / usecs

    def metrics(self, node: Node, port: int = METRICS_PORT, path: str = "/metrics") -> list:
        """Scrape the Prometheus endpoint at 127.0.0.1:port inside ``node``."""
        res = self.run(node, ["curl", "-sS", "--fail", "--max-time", "3",
                              f"http://127.0.0.1:{port}{path}"], timeout=10)
        return parse_metrics(res.stdout)

    def start_capture(
        self,
        node: Node | str,
        iface: str,
        path: str | os.PathLike,
        bpf: str = "",
        snaplen: int = 262144,
        wait: float = 10,
    ) -> subprocess.Popen:
        """``tcpdump`` in ``node`` on ``iface`` writing a pcap to ``path`` (whole packets up
        to ``snaplen``, each written as it comes); returns once tcpdump is capturing.
        ``stop()`` ends it (SIGTERM: tcpdump writes what it has and closes the file).
        Needs ``tcpdump`` (not in ``REQUIRED_TOOLS``)."""
        n = node if isinstance(node, Node) else self.node(node)
        cmd = ["tcpdump", "-i", iface, "-n", "-U", "-Z", "root", "-s", str(snaplen),
               "-w", str(path)] + ([bpf] if bpf else [])
        proc = self.spawn(n, cmd, name=f"tcpdump-{n.name}-{iface}")
        deadline = time.monotonic() + wait
        while "listening on" not in self.log_text(proc):
            if proc.poll() is not None:
                raise BedError(f"tcpdump exited with {proc.returncode}: {self.log_text(proc)}")
            if time.monotonic() > deadline:
                raise BedError(f"tcpdump on {n}:{iface} not capturing after {wait}s: "
                               f"{self.log_text(proc)}")
            time.sleep(0.02)
        return proc

    # ------------------------------------------------------------------ ut-tunnel helpers
    def pki(self, server_name: str = "ut-cloud", clients: tuple[str, ...] | None = None) -> Path:
        """``ut-tunnel pki init`` + ``pki client`` for each home (CN = home name)."""
        d = self.wd / "pki"
        ut = ut_tunnel_command()
        self.run(None, [*ut, "pki", "init", d, "--server-name", server_name,
                        "--ip", self.cloud.link_ip])
        for cn in clients or [h.name for h in self.home_nodes]:
            self.run(None, [*ut, "pki", "client", d, cn])
        self.server_name = server_name
        self.pki_dir = d
        return d

    def server_config(self, overrides: dict | None = None) -> dict:
        d = self.pki_dir
        base = {
            "role": "server",
            "tcp": {
                "listen_addr": f"{self.cloud.link_ip}:{SERVER_TCP_PORT}",
                "lanes": 5,
                "idle_seconds": 120,
            },
            "udp": {"wg_udp_addr": f"127.0.0.1:{self.cloud.wg_port}"},
            "metrics": {"listen_addr": f"127.0.0.1:{METRICS_PORT}", "path": "/metrics"},
            "tls": {"ca_cert": str(d / "ca.pem"), "cert": str(d / "server.pem"),
                    "key": str(d / "server.key")},
        }
        return deep_merge(base, overrides)

    def client_config(self, home: Node, overrides: dict | None = None, cn: str | None = None) -> dict:
        d = self.pki_dir
        cn = cn or home.name
        base = {
            "role": "client",
            "tcp": {
                "server_addr": f"{self.cloud.link_ip}:{SERVER_TCP_PORT}",
                "lanes": 5,
                "idle_seconds": 120,
                "dial_backoff_min_seconds": 0.2,
                "dial_backoff_max_seconds": 2,
            },
            "udp": {"listen_addr": f"127.0.0.1:{CLIENT_UDP_PORT}"},
            "metrics": {"listen_addr": f"127.0.0.1:{METRICS_PORT}", "path": "/metrics"},
            "tls": {"ca_cert": str(d / "ca.pem"), "cert": str(d / f"{cn}.pem"),
                    "key": str(d / f"{cn}.key"), "server_name": self.server_name},
        }
        return deep_merge(base, overrides)

    def start_ut(self, node: Node, config: dict, name: str | None = None, wait: float = 15) -> subprocess.Popen:
        """Write ``config`` (JSON, which is YAML) and run ``ut-tunnel -config`` in ``node``.

        Waits until its metrics endpoint answers (if configured) or raises with its log.
        """
        name = name or f"ut-{config['role']}-{node.name}"
        path = self.wd / f"{name}.yaml"
        path.write_text(json.dumps(config, indent=2) + "\n")
        proc = self.spawn(node, [*ut_tunnel_command(), "-config", path], name=name)
        maddr = (config.get("metrics") or {}).get("listen_addr")
        if maddr and wait:
            port = int(maddr.rsplit(":", 1)[1])
            mpath = config["metrics"].get("path", "/metrics")
            deadline = time.monotonic() + wait
            while True:
                if proc.poll() is not None:
                    raise BedError(f"{name} exited with {proc.returncode}:\n{self.log_text(proc, 40)}")
                res = self.run(node, ["curl", "-s", "-o", "/dev/null", "--max-time", "1",
                                      f"http://127.0.0.1:{port}{mpath}"], check=False)
                if res.returncode == 0:
                    break
                if time.monotonic() > deadline:
                    raise BedError(f"{name} metrics not up in {wait}s:\n{self.log_text(proc, 40)}")
                time.sleep(0.1)
        return proc

    def start_server(self, overrides: dict | None = None, **kw) -> subprocess.Popen:
        return self.start_ut(self.cloud, self.server_config(overrides), **kw)

    def start_client(self, home: Node | None = None, overrides: dict | None = None, **kw) -> subprocess.Popen:
        home = home or self.home
        return self.start_ut(home, self.client_config(home, overrides), **kw)

    @staticmethod
    def log_events(proc: subprocess.Popen) -> list[dict]:
        """The JSON log lines of a tracked process, parsed (other lines skipped)."""
        out = []
        for line in NetBed.log_text(proc).splitlines():
            line = line.strip()
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    # ------------------------------------------------------------------ teardown
    def state(self) -> dict:
        """What teardown needs, as JSON-able data (for detached beds: scripts/testbed.py)."""
        return {
            "tag": self.tag,
            "owner_pid": os.getpid(),
            "namespaces": list(self._namespaces),
            "wg_ifs": [n.wg_if for n in self.nodes],
            "pids": [t.proc.pid for t in self._tracked if t.proc.poll() is None],
            "workdir": str(self.wd),
            "own_workdir": self._own_workdir and not self.keep_workdir,
        }

    def teardown(self) -> list[str]:
        """Remove everything this bed made. Never raises; returns the problems it met."""
        if self._torn_down:
            return []
        problems: list[str] = []
        for t in reversed(self._tracked):
            try:
                self.stop(t.proc, timeout=3)
            except Exception as exc:  # noqa: BLE001 - teardown must go on
                problems.append(f"stop {t.name} [{t.proc.pid}]: {exc}")
        problems += teardown_state(
            {
                "namespaces": list(self._namespaces),
                "wg_ifs": [n.wg_if for n in self.nodes],
                "pids": [],
                "workdir": str(self.wd),
                "own_workdir": self._own_workdir and not self.keep_workdir,
            }
        )
        self._torn_down = True
        self._is_up = False
        return problems


def _ls(d: Path) -> list[Path]:
    try:
        return list(d.iterdir())
    except OSError:
        return []


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _is_zombie(pid)


def teardown_state(state: dict) -> list[str]:
    """Kill ``state['pids']`` and every process left in its namespaces (by pid), delete the
    WireGuard interfaces, their sockets, the namespaces, and the owned workdir."""
    problems = []
    pids = set(int(p) for p in state.get("pids", []))
    for ns in state.get("namespaces", []):
        res = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
        pids.update(int(p) for p in res.stdout.split() if p.isdigit())
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 3
    while pids and time.monotonic() < deadline:
        pids = {p for p in pids if _pid_alive(p) and not _is_zombie(p)}
        time.sleep(0.05)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for ns in state.get("namespaces", []):
        for wg_if in state.get("wg_ifs", []):
            subprocess.run(["ip", "-n", ns, "link", "del", wg_if], capture_output=True)
    for wg_if in state.get("wg_ifs", []):
        sock = WG_RUN_DIR / f"{wg_if}.sock"
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
    for ns in state.get("namespaces", []):
        if not (NETNS_DIR / ns).exists():
            continue
        res = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True)
        if res.returncode != 0:
            problems.append(f"ip netns del {ns}: {res.stderr.strip()}")
    if state.get("own_workdir") and state.get("workdir"):
        shutil.rmtree(state["workdir"], ignore_errors=True)
    return problems


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return False


def stale_beds(prefix: str = NS_PREFIX) -> dict[str, list[str]]:
    """Leftover beds whose owner process is gone: {tag: [namespaces]} (detached beds,
    which have a state file in /run/ut-testbed, are not stale)."""
    detached = {p.stem for p in _ls(STATE_DIR)}
    out: dict[str, list[str]] = {}
    for p in _ls(NETNS_DIR):
        m = re.match(rf"^{re.escape(prefix)}-(\d+)-([0-9a-f]+)-", p.name)
        if not m:
            continue
        pid, tag = int(m.group(1)), m.group(2)
        if tag in detached or _pid_alive(pid):
            continue
        out.setdefault(tag, []).append(p.name)
    return out


def remove_stale_beds(prefix: str = NS_PREFIX) -> list[str]:
    removed = []
    for tag, namespaces in stale_beds(prefix).items():
        wg_ifs = [p.stem for p in _ls(WG_RUN_DIR) if p.stem.startswith(f"ug{tag}")]
        teardown_state({"namespaces": namespaces, "wg_ifs": wg_ifs, "pids": []})
        removed += namespaces
    return removed


# ---------------------------------------------------------------------- helper programs
def _icmp_checksum(b: bytes) -> int:
    if len(b) % 2:
        b += b"\0"
    s = sum(int.from_bytes(b[i:i + 2], "big") for i in range(0, len(b), 2))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def _ping_main(args) -> int:
    import select
    import socket
    import struct

    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ident = (os.getpid() ^ random.getrandbits(16)) & 0xFFFF
    sent = received = 0
    rtts: list[float] = []
    start = time.monotonic()
    first = None
    seq = 0
    while True:
        if args.until_reply is not None:
            if received or time.monotonic() - start >= args.until_reply:
                break
        elif seq >= args.count:
            break
        hdr = struct.pack("!BBHHH", 8, 0, 0, ident, seq & 0xFFFF)
        payload = b"utbed-ping".ljust(56, b".")
        pkt = hdr[:2] + struct.pack("!H", _icmp_checksum(hdr + payload)) + hdr[4:] + payload
        t0 = time.monotonic()
        sock.sendto(pkt, (args.dst, 0))
        sent += 1
        wait = args.timeout
        if args.until_reply is not None:
            wait = min(wait, max(0.0, args.until_reply - (t0 - start)))
        while True:
            left = wait - (time.monotonic() - t0)
            if left <= 0:
                break
            r, _, _ = select.select([sock], [], [], left)
            if not r:
                break
            data, addr = sock.recvfrom(65535)
            ihl = (data[0] & 0x0F) * 4
            if len(data) < ihl + 8:
                continue
            typ, _, _, rid, rseq = struct.unpack("!BBHHH", data[ihl:ihl + 8])
            if typ == 0 and rid == ident and rseq == seq & 0xFFFF and addr[0] == args.dst:
                now = time.monotonic()
                rtts.append(round((now - t0) * 1000, 3))
                received += 1
                if first is None:
                    first = round(now - start, 3)
                break
        seq += 1
        if args.until_reply is not None and received:
            break
        spent = time.monotonic() - t0
        if spent < args.interval:
            time.sleep(args.interval - spent)
    print(json.dumps({"sent": sent, "received": received, "rtt_ms": rtts, "first_reply_s": first}))
    return 0


def _http_main(args) -> int:
    import functools
    import http.server

    root = Path(args.root)
    (root / "uploads").mkdir(parents=True, exist_ok=True)

    class Handler(http.server.SimpleHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *a):  # quiet, but keep errors on stderr
            pass

        def do_PUT(self):
            name = Path(self.path.split("?", 1)[0]).name or "upload"
            length = self.headers.get("Content-Length")
            h = hashlib.sha256()
            n = 0
            dest = root / "uploads" / name
            with open(dest, "wb") as f:
                if length is not None:
                    left = int(length)
                    while left:
                        chunk = self.rfile.read(min(left, 1 << 20))
                        if not chunk:
                            break
                        h.update(chunk)
                        f.write(chunk)
                        n += len(chunk)
                        left -= len(chunk)
                else:  # chunked
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            self.rfile.readline()
                            break
                        chunk = self.rfile.read(size)
                        self.rfile.readline()
                        h.update(chunk)
                        f.write(chunk)
                        n += len(chunk)
            body = json.dumps({"sha256": h.hexdigest(), "bytes": n}).encode()
            self.send_response(201)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    handler = functools.partial(Handler, directory=str(root))
    http.server.ThreadingHTTPServer.allow_reuse_address = True
    srv = http.server.ThreadingHTTPServer((args.bind, args.port), handler)

    def _on_term(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _on_term)
    with contextlib.suppress(KeyboardInterrupt):
        srv.serve_forever()
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="netbed helper programs (run inside a namespace)")
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("ping")
    pp.add_argument("dst")
    pp.add_argument("--count", type=int, default=1)
    pp.add_argument("--timeout", type=float, default=1.0)
    pp.add_argument("--interval", type=float, default=0.2)
    pp.add_argument("--until-reply", type=float, default=None,
                    help="ping until the first reply or this many seconds")
    ph = sub.add_parser("http")
    ph.add_argument("--root", required=True)
    ph.add_argument("--bind", required=True)
    ph.add_argument("--port", type=int, default=HTTP_PORT)
    args = p.parse_args(argv)
    return _ping_main(args) if args.cmd == "ping" else _http_main(args)


if __name__ == "__main__":
    sys.exit(main())
