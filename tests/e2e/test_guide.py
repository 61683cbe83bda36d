"""Walk docs/guide.md, as written, in the real-WireGuard test bed (issue 20).

The bed gives two network namespaces standing in for the guide's hosts, "cloud VM"
(``cloud``) and "home box" (``home``), with every UDP packet between them dropped and no
WireGuard yet; "your machine" is the root namespace. This test reads sections 2 to 7 of
the guide and runs their blocks in order, on the host each block's first line names:

- ``sh`` blocks line by line (``sudo`` dropped: the test is root). ``/etc/ut`` and
  ``/etc/wireguard`` are that host's own directories under the bed's work directory, ``~``
  is "your machine"'s home there, ``scp ... root@HOST:DIR`` copies into HOST's directory.
  A line ending in ``&`` and the ``udpmon echo`` run in the background (the echo is stopped
  where the guide says "Stop the echo"), ``wg-quick up wg0`` brings up that host's
  ``wg0.conf``, ``ping`` is the bed's raw-socket ping.
- ``yaml`` blocks are written where their first line says (``/etc/ut/server.yaml``,
  ``/etc/ut/home.yaml``): the configs the guide shows are the configs that run.
- ``ini`` blocks are the WireGuard configs, with the key placeholders filled from the keys
  the guide's own ``wg genkey``/``wg pubkey`` commands made.

``vpn.example.com`` resolves to the cloud's link address inside the home namespace
(``/etc/netns/<ns>/hosts``, which ``ip netns exec`` mounts over ``/etc/hosts``). The
WireGuard interface of each host gets the bed's unique name instead of ``wg0`` (wireguard-go's
control sockets are shared by every namespace), so the bed removes it afterwards.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ut._testbase.netbed import METRICS_PORT, NetBed, ut_tunnel_command

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "guide.md"
WALKED_SECTIONS = (2, 3, 4, 5, 6, 7)  # install (1) and services (8, 9) need a real host
LABELS = (("your machine", "me"), ("cloud VM", "cloud"), ("home box", "home"))
SSH_NAMES = {"vpn.example.com": "cloud", "home-box": "home"}


@dataclass
class Block:
    section: int
    lang: str
    text: str

    @property
    def first(self) -> str:
        return self.text.splitlines()[0] if self.text else ""

    def hosts(self) -> list[str]:
        """The hosts a block's first line names ("cloud VM and home box": both)."""
        first = self.first.lower()
        if "cloud vm and home box" in first or "both machines" in first:
            return ["cloud", "home"]
        named = sorted((first.find(words.lower()), host) for words, host in LABELS
                       if words.lower() in first)
        if named:  # "home box (or the cloud VM)": the first one named
            return [named[0][1]]
        raise AssertionError(f"guide section {self.section}: a {self.lang} block without a "
                             f"host label: {self.first!r}")

    def commands(self) -> list[str]:
        out, pending = [], ""
        for line in self.text.splitlines():
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            line = (pending + line).strip()
            pending = ""
            if line and not line.startswith("#"):
                out.append(line)
        return out


def guide_blocks() -> list[Block]:
    """The guide's code blocks of WALKED_SECTIONS, in order, without the 'Bring your own
    CA' alternative (tests/test_byo_ca.py runs that one)."""
    text = GUIDE.read_text()
    blocks: list[Block] = []
    for m in re.finditer(r"^## (\d+)\. .*?(?=^## \d+\. |\Z)", text, re.S | re.M):
        section = int(m.group(1))
        if section not in WALKED_SECTIONS:
            continue
        body = re.sub(r"^### Bring your own CA.*?(?=^## |\Z)", "", m.group(0),
                      flags=re.S | re.M)
        for b in re.finditer(r"^```(\w*)\n(.*?)^```", body, re.S | re.M):
            if b.group(1) in ("sh", "yaml", "ini"):
                blocks.append(Block(section, b.group(1), b.group(2)))
    return blocks


@dataclass
class Walk:
    bed: NetBed
    root: Path
    env: dict
    wg_confs: dict[str, str] = field(default_factory=dict)  # host -> ini text
    private_key_files: dict[str, Path] = field(default_factory=dict)
    public_keys: dict[str, str] = field(default_factory=dict)
    background: dict[str, object] = field(default_factory=dict)
    ran: list[str] = field(default_factory=list)

    def node(self, host: str):
        return None if host == "me" else self.bed.node(host)

    def etc(self, host: str) -> Path:
        return self.root / host / "etc"

    def localise(self, host: str, line: str) -> str:
        line = re.sub(r"(^|[;&|]\s*)sudo ", r"\1", line)
        return line.replace("/etc/ut", str(self.etc(host) / "ut")).replace(
            "/etc/wireguard", str(self.etc(host) / "wireguard"))

    def sh(self, host: str, line: str, timeout: float = 60):
        # From the host's own directory: a relative path in the guide never lands in
        # the directory pytest runs from.
        line = f"cd {shlex.quote(str(self.root / host))} && {line}"
        res = self.bed.run(self.node(host), ["bash", "-c", line], check=False,
                           timeout=timeout, env=self.env)
        assert res.returncode == 0, (
            f"guide command failed on {host} (exit {res.returncode}): {line}\n"
            f"stdout: {res.stdout[-2000:]}\nstderr: {res.stderr[-2000:]}")
        return res

    def wait_metrics(self, host: str, within: float = 15) -> None:
        deadline = time.monotonic() + within
        url = f"http://127.0.0.1:{METRICS_PORT}/metrics"
        while True:
            res = self.bed.run(self.node(host), ["curl", "-s", "-o", "/dev/null", "--max-time",
                                                 "1", url], check=False)
            if res.returncode == 0:
                return
            proc = self.background.get(f"{host}:ut-tunnel")
            assert proc is None or proc.poll() is None, NetBed.log_text(proc, 40)
            assert time.monotonic() < deadline, f"{host}: metrics not up in {within}s"
            time.sleep(0.1)

    # -- one command of the guide, on one host -------------------------------------
    def run(self, host: str, raw: str) -> None:
        self.ran.append(f"{host}: {raw}")
        scp = re.match(r"^scp (.+) root@([\w.-]+):(\S+)$", raw)
        if scp:
            target = SSH_NAMES[scp.group(2)]
            dest = self.localise(target, scp.group(3))
            self.sh(host, f"cp -p {scp.group(1)} {dest}")
            return
        line = self.localise(host, raw)
        if line.endswith("&"):
            cmd = line[:-1].strip()
            proc = self.bed.spawn(self.node(host), ["bash", "-c", f"cd {self.root / host} && exec {cmd}"],
                                  name=f"guide-{host}-bg", env=self.env)
            if "ut-tunnel -config" in cmd:
                self.background[f"{host}:ut-tunnel"] = proc
                self.wait_metrics(host)
            return
        if "udpmon echo" in line:  # runs until Ctrl-C: "Stop the echo" below
            proc = self.bed.spawn(self.node(host), ["bash", "-c", f"cd {self.root / host} && exec {line}"],
                                  name=f"guide-{host}-echo", env=self.env)
            deadline = time.monotonic() + 15
            while "listening on" not in NetBed.log_text(proc):
                assert proc.poll() is None, NetBed.log_text(proc)
                assert time.monotonic() < deadline, "udpmon echo did not start"
                time.sleep(0.05)
            self.background["echo"] = proc
            return
        if line.startswith("wg-quick up wg0"):
            self.stop_echo()  # "Stop the echo (Ctrl-C), start WireGuard on both"
            node = self.bed.node(host)
            conf = self.etc(host) / "wireguard" / f"{node.wg_if}.conf"
            fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(self.render_wg_conf(host))
            self.sh(host, f"wg-quick up {conf}")
            return
        ping = re.match(r"^ping -c (\d+) (\S+)$", line)
        if ping:
            self.bed.wait_ping(host, ping.group(2), within=20)
            got = self.bed.ping(host, ping.group(2), count=int(ping.group(1)))
            assert got["received"] == int(ping.group(1)), got
            return
        genkey = re.search(r"wg genkey > (\S+?)'?$", line)
        if genkey:
            self.private_key_files[host] = Path(genkey.group(1))
        res = self.sh(host, line)
        if line.startswith("wg pubkey"):
            self.public_keys[host] = res.stdout.strip()
        if "udpmon probe" in line:
            assert "OK: loss" in res.stdout, res.stdout
        if line.startswith("curl ") and "/metrics" in line:
            self.check_metrics(host, res.stdout)

    def stop_echo(self) -> None:
        echo = self.background.pop("echo", None)
        if echo is not None:
            assert self.bed.stop(echo, signal.SIGINT) == 0, NetBed.log_text(echo)

    def render_wg_conf(self, host: str) -> str:
        other = "home" if host == "cloud" else "cloud"
        text = self.wg_confs[host]
        for h in ("cloud", "home"):
            text = text.replace(f"<{h} private key>",
                                self.private_key_files[h].read_text().strip())
            text = text.replace(f"<{h} public key>", self.public_keys[h])
        assert "<" not in text, text
        assert self.public_keys[other] in text
        return text

    @staticmethod
    def check_metrics(host: str, text: str) -> None:
        """The lines the guide's grep keeps, as section 7 shows them (client CN "home")."""
        values = dict(re.findall(r"^(\S+) (\S+)$", text, re.M))
        role = "client" if host == "home" else "server"
        assert [k for k in values if k.startswith("ut_build_info{") and f'role="{role}"' in k]
        lanes = float(values['ut_lanes_active{client_cn="home"}'])
        assert lanes == float(values['ut_lanes_active_total{client_cn="home"}'])
        assert lanes >= 1, text
        assert float(values['ut_sessions_active{client_cn="home"}']) == 1
        assert float(values['ut_udp_drop_total{client_cn="home",dir="up",reason="oldest"}']) == 0


@pytest.fixture
def guide_bed(bed_ready, tunnel_ready, tmp_path):
    """A bed with namespaces, links and the UDP drop, but no WireGuard: the guide sets
    that up itself. Tears down everything, including /etc/netns/<home ns>."""
    missing = [t for t in ("wg-quick", "bash") if shutil.which(t) is None]
    if missing:
        msg = f"tools missing: {missing}"
        if os.environ.get("UT_REQUIRE_E2E", "") not in ("", "0"):
            pytest.fail(msg + " (UT_REQUIRE_E2E=1 turns this skip into a failure)", pytrace=False)
        pytest.skip(msg)
    bed = NetBed(homes=1, workdir=str(tmp_path / "bed"))
    bed._wireguard_up = lambda: None  # type: ignore[method-assign]  # the guide does it
    netns_etc = Path("/etc/netns") / bed.home.ns
    try:
        bed.up()
        netns_etc.mkdir(parents=True, exist_ok=True)
        (netns_etc / "hosts").write_text(
            f"127.0.0.1 localhost\n{bed.cloud.link_ip} vpn.example.com\n")
        yield bed
    finally:
        problems = bed.teardown()
        shutil.rmtree(netns_etc, ignore_errors=True)
        assert not problems, problems


def test_the_guide_walks_through(guide_bed: NetBed, tmp_path: Path) -> None:
    root = tmp_path / "hosts"
    for host in ("me", "cloud", "home"):
        (root / host / "etc").mkdir(parents=True)
    ut_bin = Path(ut_tunnel_command()[0]).parent
    env = {
        "HOME": str(root / "me"),
        "PATH": f"{ut_bin}{os.pathsep}{os.environ.get('PATH', '')}",
        "WG_QUICK_USERSPACE_IMPLEMENTATION": "wireguard-go",
    }
    walk = Walk(guide_bed, root, env)
    blocks = guide_blocks()
    assert [b for b in blocks if b.lang == "yaml"], "the guide shows no config"
    for block in blocks:
        if block.lang == "yaml":
            m = re.match(r"# (/etc/ut/\S+\.yaml)", block.first)
            assert m, block.first
            host = "cloud" if block.section == 3 else "home"
            path = Path(walk.localise(host, m.group(1)))
            path.write_text(block.text)
            walk.ran.append(f"{host}: write {m.group(1)}")
            continue
        if block.lang == "ini":
            m = re.match(r"# /etc/wireguard/wg0\.conf on the (cloud VM|home box)", block.first)
            assert m, block.first
            walk.wg_confs["cloud" if m.group(1) == "cloud VM" else "home"] = block.text
            continue
        for host in block.hosts():
            for command in block.commands():
                walk.run(host, command)

    # Everything the guide promises along the way happened.
    joined = "\n".join(walk.ran)
    for step in ("pki init", "pki client", "scp", "install -d -m 0700 /etc/ut", "wg genkey",
                 "write /etc/ut/server.yaml", "write /etc/ut/home.yaml", "check -config",
                 "udpmon echo", "udpmon probe", "wg-quick up wg0", "ping -c", "curl -s"):
        assert step in joined, f"the walk never ran {step!r}:\n{joined}"
    assert set(walk.public_keys) == {"cloud", "home"}
    pki = root / "me" / "ut-pki"
    assert oct(pki.stat().st_mode & 0o777) == "0o700"
    for host, files in (("cloud", {"ca.pem", "server.pem", "server.key", "server.yaml"}),
                        ("home", {"ca.pem", "home.pem", "home.key", "home.yaml"})):
        etc_ut = walk.etc(host) / "ut"
        assert files == {p.name for p in etc_ut.iterdir()}, (host, list(etc_ut.iterdir()))
        assert oct(etc_ut.stat().st_mode & 0o777) == "0o700"
        for key in etc_ut.glob("*.key"):
            assert oct(key.stat().st_mode & 0o777) == "0o600", key
    # WireGuard really went through the tunnel: UDP between the hosts is dropped.
    assert guide_bed.drop_udp
    for host in ("cloud", "home"):
        proc = walk.background[f"{host}:ut-tunnel"]
        assert proc.poll() is None, NetBed.log_text(proc, 40)
    lane_opens = [e for e in NetBed.log_events(walk.background["home:ut-tunnel"])
                  if e.get("event") == "lane_open"]
    assert lane_opens, NetBed.log_text(walk.background["home:ut-tunnel"], 40)
    print("guide walk:\n  " + "\n  ".join(shlex.quote(x) if "\n" in x else x for x in walk.ran))
